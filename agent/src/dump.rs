//! `ckpt-agent dump`: freeze a process tree, read its state from outside, store the
//! image, then let the tree go (or kill it).
//!
//! A dump is a [`DumpSession`] whose methods are its phases, in this order, and why:
//! 1. [`DumpSession::open`]: the store is reached, the name checked, the dump
//!    registered against a gc, the parent read, the snapshot's memory populated —
//!    all before anything is frozen;
//! 2. [`freeze`](DumpSession::freeze) every thread (ptrace seize + interrupt);
//! 3. [`descriptor_table`](DumpSession::descriptor_table): every descriptor
//!    classified, a duplicate of each TCP socket taken, nothing read from it yet;
//! 4. [`network_lock`](DumpSession::network_lock): every connection held still
//!    before any socket is read; then the job's FROZEN barrier;
//! 5. [`capture_processes`](DumpSession::capture_processes): per thread and per
//!    process, what needs injected system calls (sigaltstack, handlers, timers, tid
//!    address, brk), before memory is read, because the scratch bytes we borrow on
//!    the stack are put back first; then what `/proc` tells ([`crate::process`]);
//! 6. [`capture_descriptors`](DumpSession::capture_descriptors): the TCP
//!    connections under the lock, pipes copied with tee (nothing is consumed);
//! 7. [`plan_memory`](DumpSession::plan_memory): what to read (only pages written
//!    since the parent, for an incremental dump), and write tracking armed for the
//!    next one, still frozen;
//! 8. [`check_files`](DumpSession::check_files) as they are at the freeze, and the
//!    memory copied into a snapshot (`--leave-running`); then the job's CAPTURED
//!    barrier;
//! 9. [`store_memory`](DumpSession::store_memory): with `--leave-running` the tree
//!    is thawed first and its snapshot stored while it computes; otherwise stored
//!    while frozen;
//! 10. [`commit`](DumpSession::commit): the manifest (the commit point) once the
//!     chunks are durable; without `--leave-running`, the tree is killed only now
//!     that the image is safe, and for a job only once the job's checkpoint is.
//!
//! Any error before the kill drops the session, which lifts the network lock and
//! thaws the tree as if nothing had happened. A manifest never exists for a failed
//! dump.

use std::collections::{HashMap, HashSet};
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::Instant;

use ckpt_shared::codec;
use ckpt_shared::gc::{Leases, Registration};
use ckpt_shared::image::{
    self, DumpStats, Extent, FileCheck, FileKind, HostFingerprint, Image, Mapping, MappingKind,
    Process,
};
use ckpt_shared::location::{ImageStore, ImageStoreError, Location};
use ckpt_shared::objstore::StoreConfig;
use libc::pid_t;
use tracing::info;

use crate::fd::{FdError, FdTable, TcpDup};
use crate::freeze::{self, FreezeError, Frozen};
use crate::gate::Gate;
use crate::hooks::Hooks;
use crate::inject::{self, InjectError};
use crate::mem::{self, MemError, ShmemPlan, Target};
use crate::netlock::{self, NetLock};
use crate::process::{self, Uffd};
use crate::rescue::{self, Record};
use crate::signals::SignalError;
use crate::sys::{self, proc};
use crate::thread::ThreadError;
use crate::track::{self, Registry};

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
    #[error("induced failure at stage {0} (test hook)")]
    Fault(&'static str),
    #[error("the job's checkpoint was given up: {0}")]
    Aborted(String),
    #[error("stopped by {}", crate::cancel::signal_name(*signal))]
    Cancelled { signal: i32 },
    #[error(transparent)]
    Lock(#[from] crate::netlock::LockError),
    #[error(transparent)]
    Rescue(#[from] crate::rescue::RescueError),
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
    /// How to reach the store (S3 endpoint, credentials, retries).
    pub store: StoreConfig,
    /// The gc protocol's leases (how long this dump waits for a running gc).
    pub leases: Leases,
    /// The write-tracking registry.
    pub registry: Registry,
    pub hooks: Hooks,
    /// The watchdog that puts the tree back if this process dies mid-dump (see
    /// [`crate::rescue`]); `None` runs without one (library callers, tests of
    /// other things).
    pub rescue: Option<Arc<crate::rescue::Watch>>,
    /// How the tree is held (group-stop unless measuring its cost).
    pub hold: freeze::Hold,
    /// The root's start time (`/proc/PID/stat` field 22) when the caller knows
    /// which process it means (an attached rank): a process that took the PID over
    /// is refused, untouched.
    pub start_time: Option<u64>,
    /// Set by SIGINT or SIGTERM: the dump gives up at the next phase or chunk.
    pub cancel: crate::cancel::Cancel,
}

impl DumpError {
    /// The signal that stopped the dump, if that is why it failed.
    pub fn cancelled_by(&self) -> Option<i32> {
        match self {
            DumpError::Cancelled { signal } | DumpError::Mem(MemError::Cancelled { signal }) => {
                Some(*signal)
            }
            _ => None,
        }
    }
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

/// The largest chunk by default: 1 MiB in a directory or `file://` store, 4 MiB in
/// `s3://` (fewer requests; S3 servers are slow on small objects).
pub fn default_chunk_size(image: &Location) -> u64 {
    match image {
        Location::Named {
            store: ckpt_shared::objstore::StoreUrl::S3 { .. },
            ..
        } => mem::CHUNK_MAX_REMOTE,
        _ => mem::CHUNK_MAX,
    }
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
fn load_parent(
    image: &Location,
    name: &str,
    config: &StoreConfig,
) -> Result<(Location, Image), DumpError> {
    let Location::Named { store, .. } = image else {
        return Err(DumpError::ParentNeedsSharedStore);
    };
    let loc = Location::Named {
        store: store.clone(),
        name: name.to_string(),
    };
    let s = ImageStore::open(&loc, config)?;
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

/// Ends a dump's registration in a shared store when the dump ends, whatever way;
/// a dump that ends before its manifest is written first removes the chunks it
/// wrote (a disk it filled gets its space back; see
/// [`ImageStore::discard_written`]).
struct Registered {
    store: Arc<ImageStore>,
    reg: Option<Registration>,
    leases: Leases,
    committed: bool,
}

impl Drop for Registered {
    fn drop(&mut self) {
        if !self.committed {
            match self.store.discard_written(self.reg.as_ref(), &self.leases) {
                Ok(Some(n)) if n > 0 => info!(chunks = n, "removed the chunks of the failed dump"),
                Ok(Some(_)) => {}
                Ok(None) => tracing::warn!(
                    "another checkpoint is in progress in the store: the chunks of the \
                     failed dump are left to the next gc"
                ),
                Err(e) => tracing::warn!(%e, "could not remove the chunks of the failed dump"),
            }
        }
        if let Some(reg) = &self.reg {
            if let Err(e) = self.store.end_checkpoint(reg) {
                // Harmless: a gc treats the marker as abandoned once its lease ends.
                tracing::warn!(marker = %reg.marker, %e, "could not remove the checkpoint's marker");
            }
        }
    }
}

/// Find the vDSO: a `syscall` instruction in it to inject through, and its bytes.
pub(crate) fn find_vdso(pid: pid_t, vmas: &[proc::Vma]) -> Result<(u64, Vec<u8>), DumpError> {
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

/// Where each target's memory went, and the totals.
pub type Stored = (HashMap<Target, Vec<Extent>>, mem::DumpTotals);

/// What the memory phases decided: the reads, their grouping into chunks, and the
/// extents taken from the parent.
#[derive(Default)]
struct MemoryPlan {
    jobs: Vec<mem::ReadJob>,
    groups: Vec<mem::Group>,
    from_parent: HashMap<Target, Vec<Extent>>,
    reused_bytes: u64,
    /// Userfaultfds armed for the next dump, to hand to a holder.
    armed: Vec<(pid_t, u64, OwnedFd)>,
}

/// The file checks of an image: one per path, each mapping or descriptor pointing
/// at its path's.
#[derive(Default)]
struct FileChecks {
    checks: Vec<FileCheck>,
    index: HashMap<String, u32>,
}

impl FileChecks {
    fn of(&mut self, path: &str) -> Result<u32, DumpError> {
        if let Some(&i) = self.index.get(path) {
            return Ok(i);
        }
        self.checks.push(crate::host::stat_check(path)?);
        let i = (self.checks.len() - 1) as u32;
        self.index.insert(path.to_string(), i);
        Ok(i)
    }
}

/// One dump in progress; its methods are the phases, in order (see the module
/// doc). Dropping it before [`DumpSession::commit`] lifts the lock and thaws the
/// tree (fields drop in their order: the lock, then the tree, then the
/// registration).
pub struct DumpSession<'a> {
    opts: &'a DumpOptions,
    gate: &'a dyn Gate,
    net_lock: Option<NetLock>,
    frozen: Option<Frozen>,
    snapshot: Option<mem::Snapshot>,
    snapshot_pool: Option<mem::Region>,
    registered: Registered,
    store: Arc<ImageStore>,
    parent: Option<(Location, Image)>,
    want_track: bool,
    phases: crate::Phases,
    t0: Instant,
    t_frozen: Option<Instant>,
    freeze_us: u64,
    nft: Option<netlock::Prepared>,
    table: FdTable,
    fds_of: HashMap<pid_t, Vec<image::Fd>>,
    processes: Vec<Process>,
    host: Option<HostFingerprint>,
    shmem: ShmemPlan,
    tracking: Vec<Tracking>,
    plan: MemoryPlan,
    files: FileChecks,
    /// Last, so that it goes after the tree is thawed (see [`crate::rescue`]).
    journal: Option<Arc<crate::rescue::Journal>>,
}

/// Dumps one tree on its own (the `dump` command).
pub fn dump(opts: &DumpOptions) -> Result<Image, DumpError> {
    dump_gated(opts, &crate::gate::Alone)
}

/// Dumps one tree as one rank of a job: `gate` holds it at the points where the
/// job's barrier must be crossed together (see [`crate::gate`]).
pub fn dump_gated(opts: &DumpOptions, gate: &dyn Gate) -> Result<Image, DumpError> {
    let mut s = DumpSession::open(opts, gate)?;
    s.freeze()?;
    s.descriptor_table()?;
    s.network_lock()?;
    gate.frozen().map_err(DumpError::Aborted)?;
    s.capture_processes()?;
    s.capture_descriptors()?;
    s.plan_memory()?;
    s.check_files()?;
    s.take_snapshot()?;
    gate.captured().map_err(DumpError::Aborted)?;
    let stored = s.store_memory()?;
    s.commit(stored)
}

impl<'a> DumpSession<'a> {
    /// Reaches the store and checks the name, registers against a gc, reads the
    /// parent and populates the snapshot's memory: nothing is frozen yet.
    pub fn open(opts: &'a DumpOptions, gate: &'a dyn Gate) -> Result<Self, DumpError> {
        let t0 = Instant::now();
        let mut phases = crate::Phases::new("dump");
        let store = Arc::new(ImageStore::open(&opts.image, &opts.store)?);
        store.check()?;
        if store.exists()? {
            return Err(DumpError::ImageExists {
                location: opts.image.clone(),
            });
        }
        // In a shared store, a gc must not delete chunks this dump is about to
        // reuse: register before any chunk is looked at (see ckpt_shared::gc).
        let registered = Registered {
            reg: store.begin_checkpoint(&opts.leases)?,
            store: store.clone(),
            leases: opts.leases,
            committed: false,
        };
        let parent = match &opts.parent {
            None => None,
            Some(name) => Some(load_parent(&opts.image, name, &opts.store)?),
        };
        let want_track =
            opts.track && opts.leave_running && matches!(opts.image, Location::Named { .. });
        let snapshot_pool = Self::snapshot_pool(opts)?;
        phases.mark("snapshot-pool");
        let journal = match &opts.rescue {
            Some(w) => Some(w.journal("dump")?),
            None => None,
        };
        Ok(DumpSession {
            opts,
            gate,
            net_lock: None,
            frozen: None,
            snapshot: None,
            snapshot_pool,
            registered,
            store,
            parent,
            want_track,
            phases,
            t0,
            t_frozen: None,
            freeze_us: 0,
            nft: None,
            table: FdTable::default(),
            fds_of: HashMap::new(),
            processes: Vec::new(),
            host: None,
            shmem: ShmemPlan::default(),
            tracking: Vec::new(),
            plan: MemoryPlan::default(),
            files: FileChecks::default(),
            journal,
        })
    }

    /// With --leave-running, memory is copied into a snapshot while the tree is
    /// frozen and stored after it runs again. Its memory is populated now, before
    /// the freeze, from an estimate of the tree's anonymous memory.
    fn snapshot_pool(opts: &DumpOptions) -> Result<Option<mem::Region>, DumpError> {
        if !opts.leave_running {
            return Ok(None);
        }
        let estimate = tree_anon_bytes(opts.pid);
        if estimate > opts.snapshot_limit {
            info!(
                estimate,
                limit = opts.snapshot_limit,
                "tree too large for a snapshot: storing while frozen"
            );
            return Ok(None);
        }
        Ok(Some(mem::Region::new(
            (estimate + estimate / 16 + (16 << 20)) as usize,
            true,
        )?))
    }

    /// The end of a phase: a SIGINT or SIGTERM received meanwhile stops the dump
    /// here, and so does a test fault at `stage`.
    fn fault(&self, stage: &'static str) -> Result<(), DumpError> {
        if self.opts.hooks.pauses_at(stage) {
            // Test hook: hold the dump here (frozen, its lock in place) until a
            // signal stops it.
            eprintln!("ckpt-agent: test pause at {stage} (CKPT_TEST_PAUSE)");
            while self.opts.cancel.signal().is_none() {
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
        }
        self.opts
            .cancel
            .check()
            .map_err(|signal| DumpError::Cancelled { signal })?;
        if self.opts.hooks.fails_at(stage) {
            return Err(DumpError::Fault(stage));
        }
        Ok(())
    }

    /// Lifts the network lock, if any, and says so in the journal.
    fn unlock(&mut self) {
        if let Some(lock) = self.net_lock.take() {
            let table = lock.table().to_string();
            drop(lock);
            if let Err(e) = rescue::note(self.journal.as_deref(), Record::NetUnlock { table }) {
                tracing::warn!(%e, "journal");
            }
        }
    }

    fn frozen(&mut self) -> &mut Frozen {
        self.frozen
            .as_mut()
            .expect("the tree is frozen in this phase")
    }

    /// Seizes every thread of the tree.
    pub fn freeze(&mut self) -> Result<(), DumpError> {
        // nft, started now: its start is then not part of the standstill.
        self.fault("before-freeze")?;
        self.nft = netlock::prepare();
        self.frozen = Some(freeze::freeze(
            self.opts.pid,
            self.opts.start_time,
            self.journal.clone(),
            self.opts.hold,
        )?);
        self.t_frozen = Some(Instant::now());
        self.phases.mark("freeze");
        self.fault("after-seize")
    }

    /// Descriptors first: the table finds the TCP connections (a duplicate of each
    /// socket, nothing read from it yet).
    pub fn descriptor_table(&mut self) -> Result<(), DumpError> {
        let pids: Vec<pid_t> = self.frozen().procs.iter().map(|p| p.pid).collect();
        for pid in pids {
            let fds = self.table.dump_process(pid)?;
            self.fds_of.insert(pid, fds);
        }
        // The memory objects behind descriptors, for the mappings to join.
        self.shmem = std::mem::take(&mut self.table.shm);
        self.phases.mark("fd-table");
        Ok(())
    }

    /// The network lock holds every connection still before any socket is read
    /// (their packets are dropped both ways until the tree runs again, or until it
    /// is killed).
    pub fn network_lock(&mut self) -> Result<(), DumpError> {
        let conns = self.table.tcp_conns();
        let nft = self.nft.take();
        if !conns.is_empty() {
            let (table, part) = self
                .gate
                .lock_name()
                .unwrap_or_else(|| (netlock::own_name("d", self.opts.pid), "r0".into()));
            let full = format!("{}{table}", netlock::TABLE_PREFIX);
            rescue::note(self.journal.as_deref(), Record::NetLock { table: full })?;
            self.net_lock = Some(NetLock::lock_prepared(nft, &table, &part, &conns)?);
        }
        self.phases.mark("net-lock");
        Ok(())
    }

    /// Per process: threads, signals, mm, credentials, layout.
    pub fn capture_processes(&mut self) -> Result<(), DumpError> {
        for pi in 0..self.frozen().procs.len() {
            self.capture_process(pi)?;
        }
        self.table.adopt_objects(&self.shmem);
        let host = self.host.as_mut().expect("a tree has a root");
        host.xsave_size = self.processes[0].threads[0].xsave.len() as u32;
        self.phases.mark("threads+process");
        self.fault("after-regs")
    }

    fn capture_process(&mut self, pi: usize) -> Result<(), DumpError> {
        let pid = self.frozen().procs[pi].pid;
        let vmas = proc::smaps(pid)?;
        let (syscall_ip, vdso_bytes) = find_vdso(pid, &vmas)?;
        if self.host.is_none() {
            self.host = Some(crate::host::fingerprint(&vmas, &vdso_bytes));
        }
        let start_time = proc::stat(pid)?.start_time;
        // Write tracking: the userfaultfd of the last arming, from its holder.
        let entry = if self.parent.is_some() || self.want_track {
            self.opts.registry.load(pid, start_time)
        } else {
            None
        };
        let reused = entry.as_ref().and_then(track::take);
        let incremental = reused.is_some()
            && match (&self.parent, &entry) {
                (Some((loc, img)), Some(e)) => {
                    e.epoch == loc.to_string() && img.processes.iter().any(|p| p.pid == pid)
                }
                _ => false,
            };
        let uffd = match reused {
            Some(fd) => Uffd::Reuse(fd),
            None if self.want_track => Uffd::Create,
            None => Uffd::None,
        };
        let frozen = self.frozen.as_mut().expect("frozen");
        let fp = &mut frozen.procs[pi];
        let (threads, injected) =
            process::dump_threads_and_injected(fp, syscall_ip, uffd, self.journal.as_deref())?;
        self.tracking.push(Tracking {
            start_time,
            uffd: injected.uffd,
            incremental,
            old_holder: entry.map(|e| (e.holder_pid, e.holder_start)),
        });
        let frozen = self.frozen.as_ref().expect("frozen");
        let p = process::describe(
            &frozen.procs[pi],
            &vmas,
            threads,
            injected.signals,
            injected.brk,
            &mut self.shmem,
        )?;
        self.processes.push(p);
        Ok(())
    }

    /// Descriptors: the TCP connections are read now, under the lock.
    pub fn capture_descriptors(&mut self) -> Result<(), DumpError> {
        for p in &mut self.processes {
            p.fds = self.fds_of.remove(&p.pid).unwrap_or_default();
        }
        let sockets = self.table.tcp_sockets();
        let journal = self.journal.as_deref();
        if !sockets.is_empty() {
            rescue::note(journal, Record::Repair { sockets })?;
        }
        self.table.capture_tcp()?;
        rescue::note(journal, Record::RepairOff)?;
        self.phases.mark("tcp-capture");
        let mut view: Vec<(pid_t, &mut Vec<image::Fd>)> = self
            .processes
            .iter_mut()
            .map(|p| (p.pid, &mut p.fds))
            .collect();
        self.table.finish(&mut view)?;
        self.phases.mark("fds");
        self.fault("after-files")
    }

    /// Memory. Incremental processes: only the pages written since the parent are
    /// read (packed into chunks); the rest point into the parent's chunks. Then
    /// tracking is armed for the next dump, still frozen: from here, every write is
    /// seen.
    pub fn plan_memory(&mut self) -> Result<(), DumpError> {
        let chunk_size = self.opts.chunk_size;
        let epoch = self.opts.image.to_string();
        let mut jobs = Vec::new();
        let mut written_jobs = Vec::new();
        let mut from_parent: HashMap<Target, Vec<Extent>> = HashMap::new();
        let mut seen_shm = HashSet::new();
        for (pi, p) in self.processes.iter().enumerate() {
            let pm = std::fs::File::open(format!("/proc/{}/pagemap", p.pid)).map_err(|source| {
                MemError::Read {
                    pid: p.pid,
                    addr: 0,
                    source,
                }
            })?;
            let t = &self.tracking[pi];
            let parent_exts = match (&self.parent, t.incremental) {
                (Some((_, img)), true) => {
                    // From here on, a failure must not leave the parent as the
                    // epoch: the written pages are about to be protected again.
                    self.opts.registry.set_epoch(p.pid, t.start_time, &epoch);
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
                        let (j, refs) =
                            mem::plan_incremental(&pm, p.pid, target, m, &written, pe, chunk_size)?;
                        written_jobs.extend(j);
                        from_parent.entry(target).or_default().extend(refs);
                    }
                    _ => jobs.extend(mem::plan_reads(
                        &pm,
                        p.pid,
                        target,
                        m,
                        &mut seen_shm,
                        chunk_size,
                    )?),
                }
            }
        }
        // Memory objects with a descriptor of ours: read whole, once.
        jobs.extend(self.shmem.reads(chunk_size)?);
        let mut groups = mem::one_group_per_job(&jobs);
        let first_written = jobs.len();
        groups.extend(
            mem::packed_groups(&written_jobs, chunk_size)
                .into_iter()
                .map(|g| g.start + first_written..g.end + first_written),
        );
        jobs.extend(written_jobs);
        self.plan = MemoryPlan {
            reused_bytes: from_parent.values().flatten().map(Extent::bytes).sum(),
            jobs,
            groups,
            from_parent,
            armed: self.arm_tracking(),
        };
        self.phases.mark("plan-memory");
        Ok(())
    }

    fn arm_tracking(&mut self) -> Vec<(pid_t, u64, OwnedFd)> {
        let mut armed = Vec::new();
        if !self.want_track {
            return armed;
        }
        for (p, t) in self.processes.iter().zip(self.tracking.iter_mut()) {
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
        armed
    }

    /// File checks: size, mtime and inode as they are at the freeze (a tree let
    /// run on may write to its files right after); the content hash comes later.
    pub fn check_files(&mut self) -> Result<(), DumpError> {
        for p in &mut self.processes {
            for m in &mut p.mappings {
                if let MappingKind::File { path, check, .. } = &mut m.kind {
                    *check = self.files.of(path)?;
                    if m.prot & image::prot::EXEC != 0 {
                        self.files.checks[*check as usize].mapped_exec = true;
                    }
                }
            }
        }
        for f in &mut self.table.files {
            if let FileKind::Regular { path, check, .. } = &mut f.kind {
                *check = self.files.of(path)?;
                let acc = f.flags & libc::O_ACCMODE as u32;
                if acc == libc::O_WRONLY as u32 || acc == libc::O_RDWR as u32 {
                    self.files.checks[*check as usize].written = true;
                }
            }
        }
        // A tree left running goes on writing its output: the bytes it had
        // written at the freeze are hashed now, while it is still frozen (the
        // other files after the thaw, in `image`).
        if self.opts.leave_running {
            for c in self.files.checks.iter_mut().filter(|c| c.written) {
                c.hash = crate::host::hash_prefix(&c.path, c.size)?;
            }
        }
        Ok(())
    }

    /// With --leave-running (and a tree that fits): memory copied into the
    /// snapshot, still frozen.
    pub fn take_snapshot(&mut self) -> Result<(), DumpError> {
        if let Some(pool) = self.snapshot_pool.take() {
            self.snapshot = Some(mem::Snapshot::take(
                &self.plan.jobs,
                Some(pool),
                self.opts.workers,
            )?);
        }
        Ok(())
    }

    fn dump_memory(&self) -> Result<Stored, DumpError> {
        Ok(mem::dump_parallel(
            &self.plan.jobs,
            &self.plan.groups,
            self.snapshot.as_ref(),
            &self.store,
            self.opts.zstd_level,
            self.opts.workers,
            &self.opts.cancel,
        )?)
    }

    /// Stores the memory: while frozen without a snapshot; otherwise the tree is let
    /// go first (with `--leave-running`) and the snapshot stored while it runs.
    pub fn store_memory(&mut self) -> Result<Stored, DumpError> {
        let stored_now = match self.snapshot {
            None => Some(self.dump_memory()?),
            Some(_) => None,
        };
        self.phases.mark("memory");
        self.fault("after-memory")?;
        let freeze_end = Instant::now();
        if self.opts.leave_running {
            self.frozen.take().expect("frozen").thaw();
            self.unlock();
        }
        // Out of the standstill with --leave-running (a read of /proc per socket).
        crate::fd::read_cloexec(&self.table.cloexec_later, &mut self.processes);
        let t_frozen = self.t_frozen.expect("frozen");
        self.freeze_us = freeze_end.duration_since(t_frozen).as_micros() as u64;
        if self.opts.leave_running {
            self.gate.storing().map_err(DumpError::Aborted)?;
        }
        self.park_tracking();
        let stored = match stored_now {
            Some(x) => x,
            None => self.dump_memory()?,
        };
        self.snapshot = None;
        self.phases.mark("store-snapshot");
        Ok(stored)
    }

    /// Out of the freeze window: the tracking is armed and our descriptors keep it
    /// until the holder has its copies. The holder keeps the userfaultfds once this
    /// command exits; the older holder, whose descriptors the new one now has too,
    /// can go.
    fn park_tracking(&mut self) {
        let armed = std::mem::take(&mut self.plan.armed);
        if armed.is_empty() {
            return;
        }
        match self
            .opts
            .registry
            .park(&armed, &self.opts.image.to_string())
        {
            Ok(_) => {
                let mut old: Vec<(pid_t, u64)> =
                    self.tracking.iter().filter_map(|t| t.old_holder).collect();
                old.sort_unstable();
                old.dedup();
                for (h, start) in old {
                    track::retire(h, start);
                }
            }
            Err(e) => tracing::warn!(%e, "write tracking could not be kept: the next dump is full"),
        }
    }

    /// Writes the manifest (the commit point), and in kill mode kills the tree once
    /// the image (for a job: the job's checkpoint) is safe.
    pub fn commit(mut self, stored: Stored) -> Result<Image, DumpError> {
        let mut img = self.image(stored)?;
        self.phases.mark("file-checks");
        self.fault("before-commit")?;
        if let Some(reg) = &self.registered.reg {
            self.store.check_checkpoint(reg)?;
        }
        img.stats.total_us = self.t0.elapsed().as_micros() as u64;
        let bytes = codec::encode_image(&img)?;
        // Syncs the chunks and the manifest together, then renames it into place.
        self.store.put_manifest(&bytes)?;
        self.registered.committed = true;
        self.phases.mark("sync+manifest");
        if let Some(f) = self.frozen.take() {
            // The image is written, but only the job's commit makes it a checkpoint:
            // until then the tree must stay able to run on.
            if let Err(reason) = self.gate.stored(&img) {
                drop(f);
                return Err(DumpError::Aborted(reason));
            }
            silence(&self.table.tcp);
            f.kill();
            self.unlock();
            img.stats.freeze_us = self.t_frozen.expect("frozen").elapsed().as_micros() as u64;
        }
        info!(
            pid = self.opts.pid,
            freeze_us = img.stats.freeze_us,
            bytes = img.stats.memory_bytes,
            "dump complete"
        );
        Ok(img)
    }

    /// The image: every process with its memory's extents, the descriptions, the
    /// shared memory, and the files' checks with their hashes (taken now that the
    /// tree may run: only the bytes that existed at the freeze).
    fn image(&mut self, stored: Stored) -> Result<Image, DumpError> {
        let (mut extents, totals) = stored;
        for (t, refs) in std::mem::take(&mut self.plan.from_parent) {
            let v = extents.entry(t).or_default();
            v.extend(refs);
            v.sort_by_key(|e| e.addr);
        }
        let mut processes = std::mem::take(&mut self.processes);
        for (pi, p) in processes.iter_mut().enumerate() {
            for (mi, m) in p.mappings.iter_mut().enumerate() {
                if let Some(e) = extents.remove(&Target::Mapping { p: pi, m: mi }) {
                    m.data = e;
                }
            }
        }
        let shm_objs = std::mem::take(&mut self.shmem).into_image(&mut extents);
        let mut checks = std::mem::take(&mut self.files.checks);
        for c in checks.iter_mut().filter(|c| c.hash.is_none() && !c.written) {
            c.hash = crate::host::hash_prefix(&c.path, c.size)?;
        }
        // Without --leave-running the tree never ran again: its output is still
        // as it was at the freeze.
        if !self.opts.leave_running {
            for c in checks.iter_mut().filter(|c| c.written) {
                c.hash = crate::host::hash_prefix(&c.path, c.size)?;
            }
        }
        self.phases.mark("file-hashes");
        let parent = self
            .parent
            .as_ref()
            .filter(|_| self.tracking.iter().any(|t| t.incremental))
            .map(|(loc, _)| loc.to_string());
        let mut img = Image {
            format_version: image::FORMAT_VERSION,
            arch: image::ARCH.to_string(),
            tool_version: env!("CARGO_PKG_VERSION").to_string(),
            created_unix: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
            host: self.host.take().expect("a tree has a root"),
            root_pid: self.opts.pid,
            processes,
            files: std::mem::take(&mut self.table.files),
            shmem: shm_objs,
            file_checks: checks,
            stats: DumpStats {
                freeze_us: self.freeze_us,
                total_us: 0,
                memory_bytes: totals.memory_bytes,
                stored_bytes: totals.stored_bytes,
                chunks: 0,
                reused_bytes: self.plan.reused_bytes,
                parent,
            },
        };
        let chunks: HashSet<_> = img.extents().map(|e| e.chunk.hash).collect();
        img.stats.chunks = chunks.len() as u64;
        Ok(img)
    }
}

/// The connections end without a word to the peers (no FIN, no RST): they come
/// back with the image.
fn silence(tcp: &[TcpDup]) {
    use std::os::fd::AsFd;
    for t in tcp {
        if let Err(e) = crate::fd::tcp::silence(t.dup.as_fd()) {
            tracing::warn!(%e, "a TCP connection could not be silenced before the kill");
        }
    }
}
