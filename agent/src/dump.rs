//! `ckpt-agent dump`: freeze a process tree, read its state from outside, store the
//! image, then let the tree go (or kill it).
//!
//! Order, and why:
//! 1. freeze every thread (ptrace seize + interrupt);
//! 2. per thread and per process, what needs injected system calls (sigaltstack,
//!    handlers, timers, tid address, brk) — while the tree is frozen, before memory is
//!    read, because the scratch bytes we borrow on the stack are put back first;
//! 3. descriptors (pipes are copied with tee, nothing is consumed);
//! 4. memory, in parallel worker threads, straight into the store;
//! 5. with `--leave-running` the tree is thawed here; the rest (file checks, sync,
//!    manifest) runs while it computes;
//! 6. write the manifest (the commit point) once the chunks are durable;
//! 7. without `--leave-running`, kill the tree only now that the image is safe.
//!
//! Any error before 7 drops the [`Frozen`] guard, which thaws the tree as if nothing
//! had happened. A manifest never exists for a failed dump.

use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::path::Path;
use std::time::Instant;

use ckpt_shared::codec;
use ckpt_shared::gc::{Leases, Registration};
use ckpt_shared::image::{
    self, Creds, DumpStats, Extent, FileCheck, FileKind, HostFingerprint, Image, Mapping,
    MappingKind, MmFields, Process,
};
use ckpt_shared::location::{ImageStore, ImageStoreError, Location};
use ckpt_shared::objstore::StoreConfig;
use libc::pid_t;
use tracing::info;

use crate::fd::{FdError, FdTable};
use crate::freeze::{self, FreezeError};
use crate::inject::{self, InjectError, Remote};
use crate::mem::{self, MemError, ShmemPlan, Target};
use crate::signals::{self, SignalError};
use crate::sys::{self, nr, proc};
use crate::thread::{self, StackScratch, ThreadError, SCRATCH_LEN};
use crate::track;

#[derive(Debug, thiserror::Error)]
pub enum DumpError {
    #[error(transparent)]
    Freeze(#[from] FreezeError),
    #[error(transparent)]
    Thread(#[from] ThreadError),
    #[error(transparent)]
    Signal(#[from] SignalError),
    #[error(transparent)]
    Fd(#[from] FdError),
    #[error(transparent)]
    Mem(#[from] MemError),
    #[error(transparent)]
    Inject(#[from] InjectError),
    #[error(transparent)]
    Proc(#[from] proc::ProcError),
    #[error(transparent)]
    Sys(#[from] sys::SysError),
    #[error(transparent)]
    Store(#[from] ImageStoreError),
    #[error(transparent)]
    Codec(#[from] codec::CodecError),
    #[error("process {pid} has no vDSO: cannot inject system calls into it")]
    NoVdso { pid: pid_t },
    #[error("{location} already holds an image; choose another name or remove it first")]
    ImageExists { location: Location },
    #[error("cannot check file {path}: {source}")]
    FileCheck {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "an incremental dump (--parent) needs a shared store: write the image as \
         file:///store/NAME or s3://bucket/prefix/NAME, with the parent in the same store"
    )]
    ParentNeedsSharedStore,
    #[error("induced failure at stage {0} (CKPT_FAULT, test hook)")]
    Fault(&'static str),
    #[error("the job's checkpoint was given up: {0}")]
    Aborted(String),
    #[error(transparent)]
    Lock(#[from] crate::netlock::LockError),
}

/// What to dump and how.
#[derive(Debug, Clone)]
pub struct DumpOptions {
    pub pid: pid_t,
    pub image: Location,
    pub leave_running: bool,
    /// zstd level for chunks; `None` stores them raw.
    pub zstd_level: Option<i32>,
    /// Worker threads for memory.
    pub workers: usize,
    /// Largest tree (anonymous memory, bytes) that `--leave-running` copies into a
    /// snapshot to shorten the freeze; larger trees are stored while frozen.
    pub snapshot_limit: u64,
    /// An earlier image in the same shared store: pages not written since it was
    /// taken are not read again but taken from it (see `track`).
    pub parent: Option<String>,
    /// With `--leave-running` into a shared store: arm write tracking so that the
    /// next dump can be incremental.
    pub track: bool,
    /// Largest chunk, in bytes (a multiple of the page size).
    pub chunk_size: u64,
}

/// Half of the memory available now: the default snapshot limit.
pub fn default_snapshot_limit() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("MemAvailable:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<u64>().ok())
        })
        .map(|kb| kb * 1024 / 2)
        .unwrap_or(0)
}

/// Anonymous resident memory of the tree under `root`, before it is frozen.
fn tree_anon_bytes(root: pid_t) -> u64 {
    let mut total = 0;
    let mut queue = vec![root];
    while let Some(pid) = queue.pop() {
        if let Ok(st) = proc::status(pid) {
            total += st.rss_anon_kb * 1024;
        }
        queue.extend(proc::children(pid).unwrap_or_default());
    }
    total
}

/// Test-only fault hook: `CKPT_FAULT=<stage>` makes the dump fail at that stage.
fn fault(stage: &'static str) -> Result<(), DumpError> {
    match std::env::var("CKPT_FAULT") {
        Ok(s) if s == stage => Err(DumpError::Fault(stage)),
        _ => Ok(()),
    }
}

/// Write tracking of one process of the tree.
struct Tracking {
    start_time: u64,
    /// Our copy of its userfaultfd (reused from the last arming, or new).
    uffd: Option<OwnedFd>,
    /// Whether this dump takes unwritten pages from the parent.
    incremental: bool,
    /// The holder of the last arming.
    old_holder: Option<(pid_t, u64)>,
}

/// Private anonymous memory: what write tracking covers.
fn trackable(m: &Mapping) -> bool {
    matches!(m.kind, MappingKind::Anon { .. }) && !m.shared
}

/// A trackable mapping still registered since the last arming (`uw` in smaps).
fn is_tracked(m: &Mapping) -> bool {
    trackable(m) && m.vm_flags.iter().any(|f| f == "uw")
}

/// The parent image `name` in the store of `image`, committed and decoded.
fn load_parent(image: &Location, name: &str) -> Result<(Location, Image), DumpError> {
    let Location::Named { store, .. } = image else {
        return Err(DumpError::ParentNeedsSharedStore);
    };
    let loc = Location::Named {
        store: store.clone(),
        name: name.to_string(),
    };
    let s = ImageStore::open(&loc, &StoreConfig::from_env())?;
    let img = codec::decode_image(&s.get_manifest()?)?;
    Ok((loc, img))
}

/// Every memory extent of process `pid` in `img`, sorted by address.
fn parent_extents(img: &Image, pid: pid_t) -> Vec<Extent> {
    let mut v: Vec<Extent> = img
        .processes
        .iter()
        .filter(|p| p.pid == pid)
        .flat_map(|p| p.mappings.iter())
        .filter(|m| trackable(m))
        .flat_map(|m| m.data.iter().cloned())
        .collect();
    v.sort_by_key(|e| e.addr);
    v
}

/// Ends a dump's registration in a shared store when the dump ends, whatever way.
struct Registered<'a> {
    store: &'a ImageStore,
    reg: Option<&'a Registration>,
}

impl Drop for Registered<'_> {
    fn drop(&mut self) {
        if let Some(reg) = self.reg {
            if let Err(e) = self.store.end_checkpoint(reg) {
                // Harmless: a gc treats the marker as abandoned once its lease ends.
                tracing::warn!(marker = %reg.marker, %e, "could not remove the checkpoint's marker");
            }
        }
    }
}

/// Files larger than this are checked by size, mtime and inode only.
const HASH_LIMIT: u64 = 64 << 20;

/// Dumps one tree on its own (the `dump` command).
pub fn dump(opts: &DumpOptions) -> Result<Image, DumpError> {
    dump_gated(opts, &crate::gate::Alone)
}

/// Dumps one tree as one rank of a job: `gate` holds it at the points where the
/// job's barrier must be crossed together (see [`crate::gate`]).
pub fn dump_gated(opts: &DumpOptions, gate: &dyn crate::gate::Gate) -> Result<Image, DumpError> {
    let t0 = Instant::now();
    let mut ph = crate::Phases::new("dump");
    // The store is reached, and the name checked, before anything is frozen.
    let store = ImageStore::open(&opts.image, &StoreConfig::from_env())?;
    store.check()?;
    if store.exists()? {
        return Err(DumpError::ImageExists {
            location: opts.image.clone(),
        });
    }
    // In a shared store, a gc must not delete chunks this dump is about to reuse:
    // register before any chunk is looked at (see ckpt_shared::gc).
    let registration = store.begin_checkpoint(&Leases::from_env())?;
    let _registered = Registered {
        store: &store,
        reg: registration.as_ref(),
    };
    let epoch = opts.image.to_string();
    let parent = match &opts.parent {
        None => None,
        Some(name) => Some(load_parent(&opts.image, name)?),
    };
    let want_track =
        opts.track && opts.leave_running && matches!(opts.image, Location::Named { .. });
    // With --leave-running, memory is copied into a snapshot while the tree is
    // frozen and stored after it runs again. Populate the snapshot's memory now,
    // before the freeze, from an estimate of the tree's anonymous memory.
    let snapshot_pool = if opts.leave_running {
        let estimate = tree_anon_bytes(opts.pid);
        if estimate <= opts.snapshot_limit {
            Some(mem::Region::new(
                (estimate + estimate / 16 + (16 << 20)) as usize,
                true,
            )?)
        } else {
            info!(
                estimate,
                limit = opts.snapshot_limit,
                "tree too large for a snapshot: storing while frozen"
            );
            None
        }
    } else {
        None
    };
    ph.mark("snapshot-pool");
    // nft, started now: its start is then not part of the standstill.
    let nft = crate::netlock::prepare();
    let mut frozen = freeze::freeze(opts.pid)?;
    let t_frozen = Instant::now();
    ph.mark("freeze");
    fault("after-seize")?;
    // Descriptors first: the table finds the TCP connections (a duplicate of each
    // socket, nothing read from it yet), and the network lock holds every one of
    // them still before any socket is read (their packets are dropped both ways
    // until the tree runs again, or until it is killed).
    let mut table = FdTable::default();
    let mut fds_of: HashMap<pid_t, Vec<image::Fd>> = HashMap::new();
    for p in &frozen.procs {
        fds_of.insert(p.pid, table.dump_process(p.pid)?);
    }
    ph.mark("fd-table");
    let conns = table.tcp_conns();
    let mut net_lock = if conns.is_empty() {
        None
    } else {
        let (table, part) = gate
            .lock_name()
            .unwrap_or_else(|| (crate::netlock::own_name("d", opts.pid), "r0".into()));
        Some(crate::netlock::NetLock::lock_prepared(
            nft, &table, &part, &conns,
        )?)
    };
    ph.mark("net-lock");
    gate.frozen().map_err(DumpError::Aborted)?;

    // Per process: threads, signals, mm, credentials, layout.
    let mut processes = Vec::new();
    let mut smaps_of: Vec<Vec<proc::Vma>> = Vec::new();
    let mut host: Option<HostFingerprint> = None;
    let mut shmem = ShmemPlan::default();
    let mut tracking: Vec<Tracking> = Vec::new();
    for pi in 0..frozen.procs.len() {
        let pid = frozen.procs[pi].pid;
        let vmas = proc::smaps(pid)?;
        let (syscall_ip, vdso_bytes) = find_vdso(pid, &vmas)?;
        if host.is_none() {
            let xsave_size = 0; // filled from the first thread below
            let vvar_size = vmas
                .iter()
                .filter(|v| v.name.starts_with("[vvar"))
                .map(|v| v.end - v.start)
                .sum();
            host = Some(HostFingerprint {
                kernel: uname_release(),
                hostname: hostname(),
                xcr0: sys::host_xcr0(),
                xsave_size,
                vdso_hash: *blake3::hash(&vdso_bytes).as_bytes(),
                vdso_size: vdso_bytes.len() as u64,
                vvar_size,
            });
        }
        let mut threads = Vec::new();
        let fp = &mut frozen.procs[pi];
        for t in &mut fp.threads {
            let (th, swallowed) = thread::dump(pid, t, syscall_ip)?;
            fp.swallowed
                .extend(swallowed.into_iter().map(|s| (t.tid, s)));
            threads.push(th);
        }
        // Process-wide state, injected into the leader.
        let leader = &fp.threads[0];
        let scratch = StackScratch::take(leader.tid, leader.regs.rsp)?;
        let mut remote = Remote {
            tid: leader.tid,
            syscall_ip,
            base: leader.regs,
            scratch: scratch.addr,
            scratch_len: SCRATCH_LEN,
            new_children: Vec::new(),
            swallowed: Vec::new(),
        };
        let start_time = proc::stat(pid)?.start_time;
        // Write tracking: the userfaultfd of the last arming, from its holder.
        let entry = if parent.is_some() || want_track {
            track::load(pid, start_time)
        } else {
            None
        };
        let reused = entry.as_ref().and_then(track::take);
        let incremental = reused.is_some()
            && match (&parent, &entry) {
                (Some((loc, img)), Some(e)) => {
                    e.epoch == loc.to_string() && img.processes.iter().any(|p| p.pid == pid)
                }
                _ => false,
            };
        let got = (|| -> Result<_, DumpError> {
            let sig = signals::dump(&mut remote, pid)?;
            let brk = remote.syscall(nr::BRK, [0; 6])?;
            let uffd = match reused {
                Some(fd) => Some(fd),
                None if want_track => track::create(&mut remote)?,
                None => None,
            };
            Ok((sig, brk, uffd))
        })();
        scratch.give_back(leader.tid)?;
        fp.swallowed
            .extend(remote.swallowed.iter().map(|&s| (leader.tid, s)));
        fp.settle();
        let (
            signals::SignalState {
                actions: sigactions,
                itimers,
                timers: posix_timers,
            },
            brk,
            uffd,
        ) = got?;
        tracking.push(Tracking {
            start_time,
            uffd,
            incremental,
            old_holder: entry.map(|e| (e.holder_pid, e.holder_start)),
        });
        let shared_pending = sys::ptrace::peek_siginfo(leader.tid, true)
            .map_err(ThreadError::from)?
            .into_iter()
            .map(thread::siginfo)
            .collect();
        let stopped = fp.stopped;

        let st = proc::stat(pid)?;
        let status = proc::status(pid)?;
        let rlimits = proc::limits(pid)?;
        let personality = std::fs::read_to_string(format!("/proc/{pid}/personality"))
            .ok()
            .and_then(|s| u32::from_str_radix(s.trim(), 16).ok())
            .unwrap_or(0);
        let mut mappings = Vec::new();
        for v in &vmas {
            let kind = mem::classify(pid, v, &mut shmem)?;
            let prot = [
                (v.read, image::prot::READ),
                (v.write, image::prot::WRITE),
                (v.exec, image::prot::EXEC),
            ]
            .iter()
            .filter(|(on, _)| *on)
            .fold(0, |acc, (_, bit)| acc | bit);
            mappings.push(Mapping {
                start: v.start,
                end: v.end,
                prot,
                shared: v.shared,
                kind,
                vm_flags: v.vm_flags.clone(),
                data: Vec::new(),
            });
        }
        processes.push(Process {
            pid,
            ppid: st.ppid,
            pgid: st.pgid,
            sid: st.sid,
            threads,
            mappings,
            mm: MmFields {
                start_code: st.start_code,
                end_code: st.end_code,
                start_data: st.start_data,
                end_data: st.end_data,
                start_brk: st.start_brk,
                brk,
                start_stack: st.start_stack,
                arg_start: st.arg_start,
                arg_end: st.arg_end,
                env_start: st.env_start,
                env_end: st.env_end,
                auxv: proc::auxv(pid)?,
                exe: proc::readlink(format!("/proc/{pid}/exe"))?,
            },
            fds: Vec::new(),
            sigactions,
            shared_pending,
            itimers,
            posix_timers,
            rlimits,
            cwd: proc::readlink(format!("/proc/{pid}/cwd"))?,
            umask: status.umask,
            creds: Creds {
                uid: status.uid,
                gid: status.gid,
                groups: status.groups,
            },
            stopped,
            personality,
        });
        smaps_of.push(vmas);
    }
    let mut host = host.expect("a tree has a root");
    host.xsave_size = processes[0].threads[0].xsave.len() as u32;
    ph.mark("threads+process");
    fault("after-regs")?;

    // Descriptors: the TCP connections are read now, under the lock.
    for p in &mut processes {
        p.fds = fds_of.remove(&p.pid).unwrap_or_default();
    }
    table.capture_tcp()?;
    ph.mark("tcp-capture");
    {
        let mut view: Vec<(pid_t, &mut Vec<image::Fd>)> =
            processes.iter_mut().map(|p| (p.pid, &mut p.fds)).collect();
        table.finish(&mut view)?;
    }
    ph.mark("fds");
    fault("after-files")?;

    // Memory. Incremental processes: only the pages written since the parent are
    // read (packed into chunks); the rest point into the parent's chunks.
    let mut jobs = Vec::new();
    let mut written_jobs = Vec::new();
    let mut from_parent: HashMap<Target, Vec<Extent>> = HashMap::new();
    let mut seen_shm = std::collections::HashSet::new();
    for (pi, p) in processes.iter().enumerate() {
        let pm = std::fs::File::open(format!("/proc/{}/pagemap", p.pid)).map_err(|source| {
            MemError::Read {
                pid: p.pid,
                addr: 0,
                source,
            }
        })?;
        let t = &tracking[pi];
        let parent_exts = match (&parent, t.incremental) {
            (Some((_, img)), true) => {
                // From here on, a failure must not leave the parent as the epoch:
                // the written pages are about to be protected again.
                track::set_epoch(p.pid, t.start_time, &epoch);
                Some(parent_extents(img, p.pid))
            }
            _ => None,
        };
        for (mi, m) in p.mappings.iter().enumerate() {
            let target = match m.kind {
                MappingKind::SharedAnon { shmem_id, .. } => Target::Shmem { id: shmem_id },
                _ => Target::Mapping { p: pi, m: mi },
            };
            match &parent_exts {
                Some(pe) if is_tracked(m) => {
                    let written = track::written(&pm, m.start, m.end)?;
                    let (j, refs) = mem::plan_incremental(
                        &pm,
                        p.pid,
                        target,
                        m,
                        &written,
                        pe,
                        opts.chunk_size,
                    )?;
                    written_jobs.extend(j);
                    from_parent.entry(target).or_default().extend(refs);
                }
                _ => jobs.extend(mem::plan_reads(
                    &pm,
                    p.pid,
                    target,
                    m,
                    &mut seen_shm,
                    opts.chunk_size,
                )?),
            }
        }
    }
    let mut groups = mem::one_group_per_job(&jobs);
    let first_written = jobs.len();
    groups.extend(
        mem::packed_groups(&written_jobs, opts.chunk_size)
            .into_iter()
            .map(|g| g.start + first_written..g.end + first_written),
    );
    jobs.extend(written_jobs);
    let reused_bytes: u64 = from_parent.values().flatten().map(Extent::bytes).sum();
    // Arm tracking for the next dump, still frozen: from here, every write is seen.
    let mut armed: Vec<(pid_t, u64, OwnedFd)> = Vec::new();
    if want_track {
        for (p, t) in processes.iter().zip(tracking.iter_mut()) {
            let Some(uffd) = t.uffd.take() else { continue };
            let ranges: Vec<(u64, u64)> = p
                .mappings
                .iter()
                .filter(|m| trackable(m) && !(t.incremental && is_tracked(m)))
                .map(|m| (m.start, m.end))
                .collect();
            track::arm(&uffd, p.pid, &ranges);
            armed.push((p.pid, t.start_time, uffd));
        }
    }
    ph.mark("plan-memory");
    // File checks: size, mtime and inode as they are at the freeze (a tree let run
    // on may write to its files right after); the content hash comes later.
    let mut checks: Vec<FileCheck> = Vec::new();
    let mut check_index: HashMap<String, u32> = HashMap::new();
    let mut check_for = |path: &str| -> Result<u32, DumpError> {
        if let Some(&i) = check_index.get(path) {
            return Ok(i);
        }
        checks.push(stat_check(path)?);
        let i = (checks.len() - 1) as u32;
        check_index.insert(path.to_string(), i);
        Ok(i)
    };
    for p in &mut processes {
        for m in &mut p.mappings {
            if let MappingKind::File { path, check, .. } = &mut m.kind {
                *check = check_for(path)?;
            }
        }
    }
    let mut files = table.files;
    let tcp_dups = table.tcp;
    let cloexec_later = table.cloexec_later;
    for f in &mut files {
        if let FileKind::Regular { path, check, .. } = &mut f.kind {
            *check = check_for(path)?;
        }
    }
    let snapshot = match snapshot_pool {
        Some(pool) => Some(mem::Snapshot::take(&jobs, Some(pool), opts.workers)?),
        None => None,
    };
    gate.captured().map_err(DumpError::Aborted)?;
    let stored_now = if snapshot.is_none() {
        Some(mem::dump_parallel(
            &jobs,
            &groups,
            None,
            &store,
            opts.zstd_level,
            opts.workers,
        )?)
    } else {
        None
    };
    ph.mark("memory");
    fault("after-memory")?;
    let freeze_end = Instant::now();
    let frozen_for_kill = if opts.leave_running {
        frozen.thaw();
        drop(net_lock.take());
        crate::fd::read_cloexec(&cloexec_later, &mut processes);
        gate.storing().map_err(DumpError::Aborted)?;
        None
    } else {
        crate::fd::read_cloexec(&cloexec_later, &mut processes);
        Some(frozen)
    };
    let freeze_us = freeze_end.duration_since(t_frozen).as_micros() as u64;
    if !armed.is_empty() {
        // Out of the freeze window: the tracking is armed and our descriptors keep
        // it until the holder has its copies. The holder keeps the userfaultfds
        // once this command exits; the older holder, whose descriptors the new one
        // now has too, can go.
        match track::park(&armed, &epoch) {
            Ok(_) => {
                let mut old: Vec<(pid_t, u64)> =
                    tracking.iter().filter_map(|t| t.old_holder).collect();
                old.sort_unstable();
                old.dedup();
                for (h, start) in old {
                    track::retire(h, start);
                }
            }
            Err(e) => tracing::warn!(%e, "write tracking could not be kept: the next dump is full"),
        }
        drop(armed);
    }
    let (mut extents, totals) = match stored_now {
        Some(x) => x,
        None => mem::dump_parallel(
            &jobs,
            &groups,
            snapshot.as_ref(),
            &store,
            opts.zstd_level,
            opts.workers,
        )?,
    };
    drop(snapshot);
    ph.mark("store-snapshot");
    for (t, refs) in from_parent {
        let v = extents.entry(t).or_default();
        v.extend(refs);
        v.sort_by_key(|e| e.addr);
    }

    for (pi, p) in processes.iter_mut().enumerate() {
        for (mi, m) in p.mappings.iter_mut().enumerate() {
            if let Some(e) = extents.remove(&Target::Mapping { p: pi, m: mi }) {
                m.data = e;
            }
        }
    }
    let mut shm_objs: Vec<image::SharedMemory> = shmem
        .size
        .iter()
        .map(|(&id, &size)| image::SharedMemory {
            id,
            size,
            data: extents.remove(&Target::Shmem { id }).unwrap_or_default(),
        })
        .collect();
    shm_objs.sort_by_key(|s| s.id);

    // Hash the files behind the checks, now that the tree may run: only the bytes
    // that existed at the freeze (see `stat_check`).
    for c in &mut checks {
        c.hash = hash_prefix(&c.path, c.size)?;
    }
    ph.mark("file-hashes");

    let chunks: std::collections::HashSet<_> = processes
        .iter()
        .flat_map(|p| p.mappings.iter().flat_map(|m| m.data.iter()))
        .chain(shm_objs.iter().flat_map(|s| s.data.iter()))
        .map(|e| e.chunk.hash)
        .collect();
    let mut img = Image {
        format_version: image::FORMAT_VERSION,
        arch: image::ARCH.to_string(),
        tool_version: env!("CARGO_PKG_VERSION").to_string(),
        created_unix: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        host,
        root_pid: opts.pid,
        processes,
        files,
        shmem: shm_objs,
        file_checks: checks,
        stats: DumpStats {
            freeze_us,
            total_us: 0,
            memory_bytes: totals.memory_bytes,
            stored_bytes: totals.stored_bytes,
            chunks: chunks.len() as u64,
            reused_bytes,
            parent: parent
                .as_ref()
                .filter(|_| tracking.iter().any(|t| t.incremental))
                .map(|(loc, _)| loc.to_string()),
        },
    };
    ph.mark("file-checks");
    fault("before-commit")?;
    if let Some(reg) = &registration {
        store.check_checkpoint(reg)?;
    }
    img.stats.total_us = t0.elapsed().as_micros() as u64;
    let bytes = codec::encode_image(&img)?;
    // Syncs the chunks and the manifest together, then renames it into place.
    store.put_manifest(&bytes)?;
    ph.mark("sync+manifest");
    if let Some(f) = frozen_for_kill {
        // The image is written, but only the job's commit makes it a checkpoint:
        // until then the tree must stay able to run on.
        if let Err(reason) = gate.stored(&img) {
            drop(f);
            return Err(DumpError::Aborted(reason));
        }
        // The connections end without a word to the peers (no FIN, no RST): they
        // come back with the image.
        for t in &tcp_dups {
            use std::os::fd::AsFd;
            if let Err(e) = crate::fd::tcp::silence(t.dup.as_fd()) {
                tracing::warn!(%e, "a TCP connection could not be silenced before the kill");
            }
        }
        f.kill();
        drop(net_lock.take());
        img.stats.freeze_us = t_frozen.elapsed().as_micros() as u64;
    }
    info!(
        pid = opts.pid,
        freeze_us = img.stats.freeze_us,
        bytes = img.stats.memory_bytes,
        "dump complete"
    );
    Ok(img)
}

/// Find the vDSO: a `syscall` instruction in it to inject through, and its bytes.
fn find_vdso(pid: pid_t, vmas: &[proc::Vma]) -> Result<(u64, Vec<u8>), DumpError> {
    let v = vmas
        .iter()
        .find(|v| v.name == "[vdso]")
        .ok_or(DumpError::NoVdso { pid })?;
    let mut bytes = vec![0u8; (v.end - v.start) as usize];
    let n = sys::process_vm_readv(pid, v.start, &mut bytes)?;
    bytes.truncate(n);
    let ip = inject::find_syscall_insn(&bytes, v.start).ok_or(DumpError::NoVdso { pid })?;
    Ok((ip, bytes))
}

/// Size, mtime and identity of a file, taken while the tree is frozen.
pub fn stat_check(path: &str) -> Result<FileCheck, DumpError> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).map_err(|source| DumpError::FileCheck {
        path: path.to_string(),
        source,
    })?;
    Ok(FileCheck {
        path: path.to_string(),
        size: m.len(),
        mtime_ns: m.mtime() as i128 * 1_000_000_000 + m.mtime_nsec() as i128,
        dev: m.dev(),
        ino: m.ino(),
        hash: None,
    })
}

/// BLAKE3 of the first `size` bytes of a file (those that existed at the freeze),
/// if the file is small enough to hash.
pub fn hash_prefix(path: &str, size: u64) -> Result<Option<[u8; 32]>, DumpError> {
    if size > HASH_LIMIT {
        return Ok(None);
    }
    let err = |source| DumpError::FileCheck {
        path: path.to_string(),
        source,
    };
    let f = std::fs::File::open(path).map_err(err)?;
    let mut h = blake3::Hasher::new();
    let copied = std::io::copy(&mut std::io::Read::take(f, size), &mut h).map_err(err)?;
    if copied != size {
        return Err(err(std::io::Error::other(format!(
            "the file shrank below {size} bytes while it was hashed"
        ))));
    }
    Ok(Some(*h.finalize().as_bytes()))
}

pub fn hash_file(path: &Path) -> std::io::Result<[u8; 32]> {
    let mut h = blake3::Hasher::new();
    let mut f = std::fs::File::open(path)?;
    std::io::copy(&mut f, &mut h)?;
    Ok(*h.finalize().as_bytes())
}

pub fn uname_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}
