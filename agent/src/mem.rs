//! Memory: mappings and their pages — dump and restore.
//!
//! Dump reads `/proc/PID/smaps` for the mappings and their `VmFlags`, and
//! `/proc/PID/pagemap` to find the pages that exist: pages never touched are not
//! stored. What is stored depends on the mapping:
//!
//! | mapping                 | pages stored                                         |
//! |-------------------------|------------------------------------------------------|
//! | private anonymous       | present or swapped                                   |
//! | private file            | the process's own copies (present and not file pages, or swapped) |
//! | shared anonymous        | present or swapped, once per object for the whole tree |
//! | shared file             | none: the file holds them                            |
//! | vDSO / vvar / vsyscall  | none: mapped again by the kernel                     |
//!
//! All-zero pages are dropped too (fresh anonymous memory is zero). The rest is cut
//! into chunks of at most [`CHUNK_MAX`] bytes ([`CHUNK_MAX_REMOTE`] for a remote
//! store; see [`dump_parallel`]), hashed
//! (BLAKE3) and put in the store.
//!
//! Reading and writing target memory needs no ptrace relationship, only
//! PTRACE_MODE_ATTACH credentials, so worker threads do `process_vm_readv`/`writev`,
//! hashing and store I/O in parallel while the tracer thread keeps to ptrace.
//! `process_vm_readv` copies once; `/proc/PID/mem` (two copies, through a bounce
//! page) is used only for mappings the process itself cannot read (PROT_NONE).

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;

use ckpt_shared::image::{prot, ChunkRef, Extent, Mapping, MappingKind, PAGE_SIZE};
use ckpt_shared::location::{ImageStore, ImageStoreError};
use libc::pid_t;

use crate::sys::{self, proc};

/// Largest chunk for a local store: 1 MiB. Every chunk is a file there, synced
/// before the commit; smaller chunks dedupe finer.
pub const CHUNK_MAX: u64 = 1 << 20;
/// Largest chunk for a remote store: 4 MiB. Every chunk is a request there, and an
/// S3 server's cost per request makes 1 MiB objects slow to fetch (measured with
/// s3s-fs: restore at 0.73 of a plain download with 1 MiB chunks, 0.82 with 4).
pub const CHUNK_MAX_REMOTE: u64 = 4 << 20;

#[derive(Debug, thiserror::Error)]
pub enum MemError {
    #[error("unsupported: mapping {start:#x}-{end:#x} of PID {pid} is {what}")]
    Unsupported {
        pid: pid_t,
        start: u64,
        end: u64,
        what: String,
    },
    #[error("reading memory of PID {pid} at {addr:#x}: {source}")]
    Read {
        pid: pid_t,
        addr: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("writing memory of PID {pid} at {addr:#x}: {source}")]
    Write {
        pid: pid_t,
        addr: u64,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Store(#[from] ImageStoreError),
    #[error(transparent)]
    Proc(#[from] proc::ProcError),
    #[error("stopped by {}", crate::cancel::signal_name(*signal))]
    Cancelled { signal: i32 },
}

/// Where the bytes of a read job belong in the image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Target {
    /// Mapping `m` of process `p` (indexes into the image); extents at absolute addresses.
    Mapping { p: usize, m: usize },
    /// Shared memory object `id`; extents at offsets into the object.
    Shmem { id: u32 },
}

/// A contiguous run of pages to read.
#[derive(Debug, Clone)]
pub struct ReadJob {
    pub target: Target,
    pub pid: pid_t,
    pub addr: u64,
    pub len: u64,
    /// Subtract from an address to get the extent's `addr` (0 for mappings).
    pub rebase: i64,
    /// Read through `/proc/PID/mem` (the mapping is not readable by the process).
    pub force: bool,
}

/// Identity of a shared anonymous object: (device, inode).
pub type ShmemKey = (u32, u32, u64);

/// What we learn about the tree's shared anonymous objects while planning.
#[derive(Default)]
pub struct ShmemPlan {
    pub ids: HashMap<ShmemKey, u32>,
    /// Largest byte offset seen per object id.
    pub size: HashMap<u32, u64>,
}

/// Classify one mapping; `Err` for what we can't restore.
pub fn classify(pid: pid_t, v: &proc::Vma, shmem: &mut ShmemPlan) -> Result<MappingKind, MemError> {
    let unsupported = |what: &str| MemError::Unsupported {
        pid,
        start: v.start,
        end: v.end,
        what: what.to_string(),
    };
    match v.name.as_str() {
        "[vdso]" => return Ok(MappingKind::Vdso),
        "[vvar]" | "[vvar_vclock]" => return Ok(MappingKind::Vvar),
        "[vsyscall]" => return Ok(MappingKind::Vsyscall),
        _ => {}
    }
    if v.inode == 0 {
        if v.shared {
            return Err(unsupported("a shared mapping without a file"));
        }
        if v.name.starts_with('[')
            && !matches!(v.name.as_str(), "[heap]" | "[stack]")
            && !v.name.starts_with("[anon:")
        {
            return Err(unsupported(&format!("the special mapping {}", v.name)));
        }
        let name = (!v.name.is_empty()).then(|| v.name.clone());
        return Ok(MappingKind::Anon { name });
    }
    if v.name.starts_with("/dev/zero") {
        let key = (v.dev.0, v.dev.1, v.inode);
        let next = shmem.ids.len() as u32;
        let id = *shmem.ids.entry(key).or_insert(next);
        let end = v.pgoff + (v.end - v.start);
        let s = shmem.size.entry(id).or_insert(0);
        *s = (*s).max(end);
        if !v.shared {
            // A private mapping of /dev/zero is plain anonymous memory.
            return Ok(MappingKind::Anon { name: None });
        }
        return Ok(MappingKind::SharedAnon {
            shmem_id: id,
            offset: v.pgoff,
        });
    }
    if v.name.starts_with("/SYSV") {
        return Err(unsupported("System V shared memory"));
    }
    if v.name.starts_with("/memfd:") {
        return Err(unsupported(&format!("a memfd mapping ({})", v.name)));
    }
    if v.name.ends_with(" (deleted)") {
        return Err(unsupported(&format!(
            "a mapping of a deleted file ({})",
            v.name
        )));
    }
    if !v.name.starts_with('/') {
        return Err(unsupported(&format!("a mapping of {}", v.name)));
    }
    Ok(MappingKind::File {
        path: v.name.clone(),
        offset: v.pgoff,
        check: u32::MAX,
    })
}

/// Which pages of a mapping must be stored, given its pagemap entry.
fn wanted(kind: &MappingKind, shared: bool, pm: u64) -> bool {
    let present = pm & proc::PM_PRESENT != 0;
    let swapped = pm & proc::PM_SWAP != 0;
    match kind {
        MappingKind::Anon { .. } | MappingKind::SharedAnon { .. } => present || swapped,
        MappingKind::File { .. } if !shared => (present && pm & proc::PM_FILE == 0) || swapped,
        _ => false,
    }
}

/// Plan the reads for one mapping: runs of wanted pages, at most `chunk_max` each.
pub fn plan_reads(
    pagemap: &File,
    pid: pid_t,
    target: Target,
    map: &Mapping,
    seen_shmem: &mut std::collections::HashSet<(u32, u64)>,
    chunk_max: u64,
) -> Result<Vec<ReadJob>, MemError> {
    if matches!(
        map.kind,
        MappingKind::Vdso | MappingKind::Vvar | MappingKind::Vsyscall
    ) {
        return Ok(Vec::new());
    }
    if matches!(map.kind, MappingKind::File { .. }) && map.shared {
        return Ok(Vec::new());
    }
    let pm = proc::pagemap(pagemap, map.start, map.end).map_err(|source| MemError::Read {
        pid,
        addr: map.start,
        source,
    })?;
    let (rebase, shm) = match map.kind {
        MappingKind::SharedAnon { shmem_id, offset } => {
            ((map.start as i64) - offset as i64, Some((shmem_id, offset)))
        }
        _ => (0, None),
    };
    let force = map.prot & prot::READ == 0;
    let mut jobs = Vec::new();
    let mut run: Option<(u64, u64)> = None;
    let flush = |run: &mut Option<(u64, u64)>, jobs: &mut Vec<ReadJob>| {
        if let Some((a, l)) = run.take() {
            jobs.push(ReadJob {
                target,
                pid,
                addr: a,
                len: l,
                rebase,
                force,
            });
        }
    };
    for (i, &e) in pm.iter().enumerate() {
        let addr = map.start + i as u64 * PAGE_SIZE;
        let mut want = wanted(&map.kind, map.shared, e);
        if let Some((id, _)) = shm {
            // Each page of a shared object is stored once, whoever maps it.
            let off = (addr as i64 - rebase) as u64;
            if want && !seen_shmem.insert((id, off)) {
                want = false;
            }
        }
        match (&mut run, want) {
            (Some((a, l)), true) if *a + *l == addr && *l < chunk_max => *l += PAGE_SIZE,
            (_, true) => {
                flush(&mut run, &mut jobs);
                run = Some((addr, PAGE_SIZE));
            }
            (_, false) => flush(&mut run, &mut jobs),
        }
    }
    flush(&mut run, &mut jobs);
    Ok(jobs)
}

/// Plan one private anonymous mapping of an incremental dump: of the pages that
/// exist, those in `written` (sorted ranges) are read; every other one is unchanged
/// since the parent image and is taken from the parent's chunks (`parent`: the
/// parent process's extents, sorted by address), or is zero if the parent had no
/// data for it. Returns the read jobs (one page run each, to be packed) and the
/// extents that point into the parent.
pub fn plan_incremental(
    pagemap: &File,
    pid: pid_t,
    target: Target,
    map: &Mapping,
    written: &[(u64, u64)],
    parent: &[Extent],
    chunk_max: u64,
) -> Result<(Vec<ReadJob>, Vec<Extent>), MemError> {
    let pm = proc::pagemap(pagemap, map.start, map.end).map_err(|source| MemError::Read {
        pid,
        addr: map.start,
        source,
    })?;
    let force = map.prot & prot::READ == 0;
    let mut jobs: Vec<ReadJob> = Vec::new();
    let mut refs: Vec<Extent> = Vec::new();
    let mut w = 0usize;
    for (i, &e) in pm.iter().enumerate() {
        let addr = map.start + i as u64 * PAGE_SIZE;
        if !wanted(&map.kind, map.shared, e) {
            continue;
        }
        while w < written.len() && written[w].1 <= addr {
            w += 1;
        }
        let dirty = w < written.len() && written[w].0 <= addr;
        if dirty {
            match jobs.last_mut() {
                Some(j) if j.addr + j.len == addr && j.len < chunk_max => j.len += PAGE_SIZE,
                _ => jobs.push(ReadJob {
                    target,
                    pid,
                    addr,
                    len: PAGE_SIZE,
                    rebase: 0,
                    force,
                }),
            }
            continue;
        }
        // The last parent extent that starts at or before the page.
        let k = parent.partition_point(|x| x.addr <= addr);
        let Some(src) = k
            .checked_sub(1)
            .map(|k| &parent[k])
            .filter(|x| addr < x.end())
        else {
            continue; // zero in the parent, and not written since
        };
        let off = src.off as u64 + (addr - src.addr);
        match refs.last_mut() {
            Some(r)
                if r.chunk == src.chunk && r.end() == addr && r.off as u64 + r.bytes() == off =>
            {
                r.len = (r.bytes() + PAGE_SIZE) as u32;
            }
            _ => refs.push(Extent {
                addr,
                chunk: src.chunk,
                off: off as u32,
                len: PAGE_SIZE as u32,
            }),
        }
    }
    for r in &mut refs {
        if r.off == 0 && r.bytes() == r.chunk.len as u64 {
            r.len = 0;
        }
    }
    Ok((jobs, refs))
}

/// Totals of a parallel dump.
#[derive(Debug, Default)]
pub struct DumpTotals {
    pub memory_bytes: u64,
    pub stored_bytes: u64,
}

fn is_zero(page: &[u8]) -> bool {
    // Blocks of 64 bytes OR-ed together (which the compiler vectorises), stopping
    // at the first block that is not zero.
    let mut blocks = page.chunks_exact(64);
    blocks.all(|b| b.iter().fold(0, |a, &x| a | x) == 0)
        && blocks.remainder().iter().all(|&x| x == 0)
}

/// Memory captured while the tree was frozen, to be hashed and stored after it
/// runs again (`dump --leave-running`): the freeze then lasts only as long as a
/// copy. One anonymous region, populated before the freeze where its size could be
/// estimated, since this VM faults fresh pages in slowly.
pub struct Snapshot {
    region: Region,
    /// Offset of each job's bytes in the region.
    offsets: Vec<usize>,
}

/// An anonymous private mapping of ours.
pub struct Region {
    map: sys::mem::AnonMap,
}

impl Region {
    /// Map `len` bytes, populated (faulted in) now if `populate`.
    pub fn new(len: usize, populate: bool) -> Result<Region, MemError> {
        let len = len.max(PAGE_SIZE as usize);
        let map = sys::mem::AnonMap::new(len, populate).map_err(|source| MemError::Read {
            pid: 0,
            addr: 0,
            source,
        })?;
        Ok(Region { map })
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

impl Snapshot {
    /// Copy every job's pages into `pool` (or a bigger region if the estimate was
    /// short), with `workers` threads. Runs while the tree is frozen.
    pub fn take(
        jobs: &[ReadJob],
        pool: Option<Region>,
        workers: usize,
    ) -> Result<Snapshot, MemError> {
        let total: u64 = jobs.iter().map(|j| j.len).sum();
        let mut region = match pool {
            Some(r) if r.len() as u64 >= total => r,
            _ => Region::new(total as usize, false)?,
        };
        let mut offsets = Vec::with_capacity(jobs.len());
        let err: Mutex<Option<MemError>> = Mutex::new(None);
        {
            // Each job's own part of the region, handed out in order to the
            // threads: the parts are disjoint, so the threads write side by side.
            let mut parts = Vec::with_capacity(jobs.len());
            let mut rest = region.map.as_mut_slice();
            let mut off = 0usize;
            for j in jobs {
                let (part, after) = rest.split_at_mut(j.len as usize);
                parts.push(part);
                rest = after;
                offsets.push(off);
                off += j.len as usize;
            }
            let work = Mutex::new(jobs.iter().zip(parts));
            std::thread::scope(|s| {
                for _ in 0..workers.max(1) {
                    s.spawn(|| {
                        let mut mem_files = HashMap::new();
                        loop {
                            if err.lock().expect("poisoned").is_some() {
                                return;
                            }
                            let Some((j, b)) = work.lock().expect("poisoned").next() else {
                                return;
                            };
                            if let Err(e) = read_job(j, b, &mut mem_files) {
                                err.lock().expect("poisoned").get_or_insert(e);
                                return;
                            }
                        }
                    });
                }
            });
        }
        if let Some(e) = err.into_inner().expect("poisoned") {
            return Err(e);
        }
        Ok(Snapshot { region, offsets })
    }

    fn bytes(&self, i: usize, len: u64) -> &[u8] {
        &self.region.map.as_slice()[self.offsets[i]..][..len as usize]
    }
}

/// Jobs `[start, end)` of a job list, read together into one chunk: a run of pages
/// of one mapping (a full dump), or scattered runs packed together (an
/// incremental dump). The jobs of a group are consecutive, so their bytes are
/// consecutive in a snapshot too.
pub type Group = std::ops::Range<usize>;

/// One group per job: the layout of a full dump.
pub fn one_group_per_job(jobs: &[ReadJob]) -> Vec<Group> {
    (0..jobs.len()).map(|i| i..i + 1).collect()
}

/// Consecutive jobs packed into groups of at most `chunk_max` bytes.
pub fn packed_groups(jobs: &[ReadJob], chunk_max: u64) -> Vec<Group> {
    let mut out = Vec::new();
    let (mut start, mut bytes) = (0, 0u64);
    for (i, j) in jobs.iter().enumerate() {
        if i > start && bytes + j.len > chunk_max {
            out.push(start..i);
            start = i;
            bytes = 0;
        }
        bytes += j.len;
    }
    if start < jobs.len() {
        out.push(start..jobs.len());
    }
    out
}

/// Read (from the live tree, or from a snapshot of it), hash and store every group
/// with `workers` threads. A group's pages, all-zero ones left out, become one
/// chunk; each run of them that is contiguous in one job becomes an extent (a
/// whole-chunk extent where the run is the whole chunk). Returns the extents of
/// each target, sorted by address.
pub fn dump_parallel(
    jobs: &[ReadJob],
    groups: &[Group],
    snapshot: Option<&Snapshot>,
    store: &ImageStore,
    zstd_level: Option<i32>,
    workers: usize,
    cancel: &crate::cancel::Cancel,
) -> Result<(HashMap<Target, Vec<Extent>>, DumpTotals), MemError> {
    let next = AtomicUsize::new(0);
    let out: Mutex<HashMap<Target, Vec<Extent>>> = Mutex::new(HashMap::new());
    let totals = Totals::default();
    let err: Mutex<Option<MemError>> = Mutex::new(None);
    std::thread::scope(|s| {
        for _ in 0..workers.max(1) {
            s.spawn(|| {
                let mut bufs = GroupBufs {
                    buf: vec![
                        0u8;
                        if snapshot.is_some() {
                            0
                        } else {
                            CHUNK_MAX as usize
                        }
                    ],
                    pack: Vec::new(),
                    mem_files: HashMap::new(),
                };
                loop {
                    let gi = next.fetch_add(1, Ordering::Relaxed);
                    if gi >= groups.len() || err.lock().expect("poisoned").is_some() {
                        return;
                    }
                    // A group is one chunk at most: a cancelled store stops within
                    // one chunk's write per worker.
                    if let Err(signal) = cancel.check() {
                        err.lock()
                            .expect("poisoned")
                            .get_or_insert(MemError::Cancelled { signal });
                        return;
                    }
                    let group = &jobs[groups[gi].clone()];
                    let g = groups[gi].start;
                    let r = dump_group(group, g, snapshot, &mut bufs, store, zstd_level, &totals);
                    match r {
                        Ok(exts) => {
                            let mut out = out.lock().expect("poisoned");
                            for (t, e) in exts {
                                out.entry(t).or_default().push(e);
                            }
                        }
                        Err(e) => {
                            err.lock().expect("poisoned").get_or_insert(e);
                            return;
                        }
                    }
                }
            });
        }
    });
    if let Some(e) = err.into_inner().expect("poisoned") {
        return Err(e);
    }
    let mut out = out.into_inner().expect("poisoned");
    for v in out.values_mut() {
        v.sort_by_key(|e| e.addr);
    }
    Ok((
        out,
        DumpTotals {
            memory_bytes: totals.memory.into_inner(),
            stored_bytes: totals.stored.into_inner(),
        },
    ))
}

/// What the threads of [`dump_parallel`] add up.
#[derive(Default)]
struct Totals {
    memory: AtomicU64,
    stored: AtomicU64,
}

/// One thread's buffers in [`dump_parallel`].
struct GroupBufs {
    /// The group's bytes when read now (no snapshot).
    buf: Vec<u8>,
    /// The group's pages that are not zero, when some are.
    pack: Vec<u8>,
    mem_files: HashMap<pid_t, File>,
}

/// A run of kept pages: (target, address, offset in the chunk, bytes).
type Run = (Target, u64, u64, u64);

/// Stores the group `group` (jobs starting at index `g`) as one chunk: its
/// extents.
fn dump_group(
    group: &[ReadJob],
    g: usize,
    snapshot: Option<&Snapshot>,
    bufs: &mut GroupBufs,
    store: &ImageStore,
    zstd_level: Option<i32>,
    totals: &Totals,
) -> Result<Vec<(Target, Extent)>, MemError> {
    let total: u64 = group.iter().map(|j| j.len).sum();
    let b: &[u8] = match snapshot {
        Some(snap) => snap.bytes(g, total),
        None => read_group(group, total, &mut bufs.buf, &mut bufs.mem_files)?,
    };
    totals.memory.fetch_add(total, Ordering::Relaxed);
    let all_nonzero = b.chunks(PAGE_SIZE as usize).all(|p| !is_zero(p));
    let (runs, kept) = kept_runs(group, b, all_nonzero, &mut bufs.pack);
    if kept == 0 {
        return Ok(Vec::new());
    }
    let bytes: &[u8] = if all_nonzero { b } else { &bufs.pack };
    let chunk = ChunkRef::of(bytes);
    let put = store.put_chunk(chunk, bytes, zstd_level)?;
    totals.stored.fetch_add(put.stored_bytes, Ordering::Relaxed);
    Ok(runs
        .into_iter()
        .map(|(t, addr, off, len)| {
            let e = if off == 0 && len == kept {
                Extent::whole(addr, chunk)
            } else {
                Extent {
                    addr,
                    chunk,
                    off: off as u32,
                    len: len as u32,
                }
            };
            (t, e)
        })
        .collect())
}

/// The `total` bytes of `group`, read now into `buf`.
fn read_group<'a>(
    group: &[ReadJob],
    total: u64,
    buf: &'a mut Vec<u8>,
    mem_files: &mut HashMap<pid_t, File>,
) -> Result<&'a [u8], MemError> {
    if buf.len() < total as usize {
        buf.resize(total as usize, 0);
    }
    let mut o = 0usize;
    for j in group {
        read_job(j, &mut buf[o..o + j.len as usize], mem_files)?;
        o += j.len as usize;
    }
    Ok(&buf[..total as usize])
}

/// The runs of pages of `b` (the bytes of `group`) that are kept, and how many
/// bytes they make: every page if `all_nonzero`, else the pages that are not
/// zero, which are packed into `pack`.
fn kept_runs(
    group: &[ReadJob],
    b: &[u8],
    all_nonzero: bool,
    pack: &mut Vec<u8>,
) -> (Vec<Run>, u64) {
    let mut runs: Vec<Run> = Vec::new();
    let mut kept = 0u64;
    let mut o = 0u64;
    pack.clear();
    for j in group {
        for pg in 0..j.len / PAGE_SIZE {
            let page = &b[(o + pg * PAGE_SIZE) as usize..][..PAGE_SIZE as usize];
            if !all_nonzero && is_zero(page) {
                continue;
            }
            let addr = ((j.addr + pg * PAGE_SIZE) as i64 - j.rebase) as u64;
            match runs.last_mut() {
                Some((t, a, _, l)) if *t == j.target && *a + *l == addr => *l += PAGE_SIZE,
                _ => runs.push((j.target, addr, kept, PAGE_SIZE)),
            }
            if !all_nonzero {
                pack.extend_from_slice(page);
            }
            kept += PAGE_SIZE;
        }
        o += j.len;
    }
    (runs, kept)
}

fn read_job(
    j: &ReadJob,
    b: &mut [u8],
    mem_files: &mut HashMap<pid_t, File>,
) -> Result<(), MemError> {
    let mut done = 0usize;
    if !j.force {
        match sys::process_vm_readv(j.pid, j.addr, b) {
            Ok(n) => done = n,
            Err(e) if e.errno() == Some(libc::EFAULT) => {}
            Err(e) => {
                return Err(MemError::Read {
                    pid: j.pid,
                    addr: j.addr,
                    source: e.source,
                })
            }
        }
    }
    if done < b.len() {
        // Unreadable by the process itself: go through /proc/PID/mem, which may
        // read with FOLL_FORCE.
        let f = match mem_files.entry(j.pid) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => {
                let f = File::open(format!("/proc/{}/mem", j.pid)).map_err(|source| {
                    MemError::Read {
                        pid: j.pid,
                        addr: j.addr,
                        source,
                    }
                })?;
                e.insert(f)
            }
        };
        while done < b.len() {
            let n = f
                .read_at(&mut b[done..], j.addr + done as u64)
                .map_err(|source| MemError::Read {
                    pid: j.pid,
                    addr: j.addr + done as u64,
                    source,
                })?;
            if n == 0 {
                return Err(MemError::Read {
                    pid: j.pid,
                    addr: j.addr + done as u64,
                    source: std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "page vanished"),
                });
            }
            done += n;
        }
    }
    Ok(())
}

/// Where restored bytes go.
#[derive(Debug, Clone, Copy)]
pub enum Dest {
    /// Memory of a husk process.
    Process(pid_t),
    /// A descriptor of ours (a memfd standing for a shared object), at offsets.
    Fd(std::os::fd::RawFd),
    /// Memory of a husk process, in a range registered with `uffd` (our copy of a
    /// userfaultfd bound to the husk's mm): filled with `UFFDIO_COPY`, no populate.
    Uffd {
        uffd: std::os::fd::RawFd,
        pid: pid_t,
    },
}

/// Bytes `[off, off + len)` of a chunk, to be written at `addr` of `dest`.
#[derive(Debug, Clone, Copy)]
pub struct Piece {
    pub dest: Dest,
    pub addr: u64,
    pub off: u32,
    pub len: u32,
}

impl Piece {
    /// Where extent `e` goes in `dest`.
    pub fn of(dest: Dest, e: &Extent) -> Piece {
        Piece {
            dest,
            addr: e.addr,
            off: e.off,
            len: e.bytes() as u32,
        }
    }
}

/// One chunk to fetch and verify once, and the places its bytes go.
#[derive(Debug, Clone)]
pub struct WriteJob {
    pub chunk: ChunkRef,
    pub pieces: Vec<Piece>,
}

/// Groups pieces by chunk, so that a chunk that several extents use (an
/// incremental image's parent chunks, a packed chunk) is fetched once.
pub fn by_chunk(pieces: Vec<(ChunkRef, Piece)>) -> Vec<WriteJob> {
    let mut index: HashMap<ChunkRef, usize> = HashMap::new();
    let mut jobs: Vec<WriteJob> = Vec::new();
    for (c, p) in pieces {
        match index.get(&c) {
            Some(&i) => jobs[i].pieces.push(p),
            None => {
                index.insert(c, jobs.len());
                jobs.push(WriteJob {
                    chunk: c,
                    pieces: vec![p],
                });
            }
        }
    }
    jobs
}

/// A run of contiguous extents of one husk, populated with one injected
/// `madvise(MADV_POPULATE_WRITE)` before its chunks are written.
#[derive(Debug, Clone)]
pub struct Segment {
    /// Index of the husk (for the caller's populate step).
    pub husk: usize,
    pub start: u64,
    pub end: u64,
    pub jobs: Vec<WriteJob>,
}

/// Largest segment: big enough that the injection costs nothing, small enough that
/// populating the next one overlaps with filling this one.
pub const SEGMENT_MAX: u64 = 32 << 20;

/// Cut a mapping's extents into segments.
pub fn segments(husk: usize, pid: pid_t, exts: &[Extent], out: &mut Vec<Segment>) {
    let mut cur: Option<Segment> = None;
    for e in exts {
        let (s, t) = (e.addr, e.end());
        let job = WriteJob {
            chunk: e.chunk,
            pieces: vec![Piece::of(Dest::Process(pid), e)],
        };
        match &mut cur {
            Some(c) if c.end == s && t - c.start <= SEGMENT_MAX => {
                c.end = t;
                c.jobs.push(job);
            }
            _ => {
                out.extend(cur.take());
                cur = Some(Segment {
                    husk,
                    start: s,
                    end: t,
                    jobs: vec![job],
                });
            }
        }
    }
    out.extend(cur);
}

/// Fill memory from the store, pipelined: the calling thread (the tracer) runs
/// `populate` for each segment in turn and hands the segment's chunks to `workers`
/// threads, which fetch, verify and write them while the next segment is being
/// populated. `direct` jobs (shared memory objects) need no populate.
pub fn fill_pipelined<E: From<MemError>>(
    direct: Vec<WriteJob>,
    segs: Vec<Segment>,
    store: &ImageStore,
    workers: usize,
    mut populate: impl FnMut(&Segment) -> Result<(), E>,
) -> Result<u64, E> {
    if store.is_remote() {
        return fill_remote(direct, segs, store, workers, populate);
    }
    let written = AtomicU64::new(0);
    let err: Mutex<Option<MemError>> = Mutex::new(None);
    let (tx, rx) = std::sync::mpsc::sync_channel::<Vec<WriteJob>>(4);
    let rx = Mutex::new(rx);
    let mut outer: Result<(), E> = Ok(());
    std::thread::scope(|s| {
        for _ in 0..workers.max(1) {
            s.spawn(|| {
                let mut buf = vec![0u8; CHUNK_MAX as usize];
                loop {
                    let batch = match rx.lock().expect("poisoned").recv() {
                        Ok(b) => b,
                        Err(_) => return,
                    };
                    for j in &batch {
                        if err.lock().expect("poisoned").is_some() {
                            break;
                        }
                        match write_job(j, store, &mut buf) {
                            Ok(n) => {
                                written.fetch_add(n, Ordering::Relaxed);
                            }
                            Err(e) => {
                                err.lock().expect("poisoned").get_or_insert(e);
                            }
                        }
                    }
                }
            });
        }
        let send = |jobs: Vec<WriteJob>| {
            // Batches of 8 chunks keep both workers busy without lock churn.
            let mut it = jobs.into_iter().peekable();
            while it.peek().is_some() {
                let b: Vec<WriteJob> = it.by_ref().take(8).collect();
                if tx.send(b).is_err() {
                    return;
                }
            }
        };
        send(direct);
        for seg in segs {
            if err.lock().expect("poisoned").is_some() {
                break;
            }
            if let Err(e) = populate(&seg) {
                outer = Err(e);
                break;
            }
            send(seg.jobs);
        }
        drop(tx);
    });
    outer?;
    if let Some(e) = err.into_inner().expect("poisoned") {
        return Err(e.into());
    }
    Ok(written.into_inner())
}

/// [`fill_pipelined`] over the network: every segment is populated first, then one
/// thread drives `concurrency` requests at a time and writes each chunk's bytes
/// while they arrive (still in the cache), a step at a time. A chunk that then fails
/// its check fails the fill: the caller kills the husks it wrote into, so no process
/// runs on unverified bytes.
fn fill_remote<E: From<MemError>>(
    direct: Vec<WriteJob>,
    segs: Vec<Segment>,
    store: &ImageStore,
    concurrency: usize,
    mut populate: impl FnMut(&Segment) -> Result<(), E>,
) -> Result<u64, E> {
    let mut jobs = direct;
    for seg in segs {
        populate(&seg)?;
        jobs.extend(seg.jobs);
    }
    let chunks: Vec<ChunkRef> = jobs.iter().map(|j| j.chunk).collect();
    let mut written = 0u64;
    let done = store.fetch_each(&chunks, concurrency, |i, off, b| -> Result<(), MemError> {
        written += write_part(&jobs[i].pieces, off as u64, b)?;
        Ok(())
    });
    match done {
        Some(r) => r.map(|()| written).map_err(E::from),
        None => Err(E::from(MemError::Write {
            pid: 0,
            addr: 0,
            source: std::io::Error::other("internal: a local store filled as a remote one"),
        })),
    }
}

/// Writes bytes `[off, off + b.len())` of a chunk wherever `pieces` put them; returns
/// the bytes written. `off` and the length are whole pages (or reach the chunk's end,
/// as whole pages do), so every part a `UFFDIO_COPY` gets is whole pages too.
fn write_part(pieces: &[Piece], off: u64, b: &[u8]) -> Result<u64, MemError> {
    let end = off + b.len() as u64;
    let mut written = 0;
    for p in pieces {
        let (s, e) = (off.max(p.off as u64), end.min(p.off as u64 + p.len as u64));
        if s >= e {
            continue;
        }
        let part = Piece {
            dest: p.dest,
            addr: p.addr + (s - p.off as u64),
            off: s as u32,
            len: (e - s) as u32,
        };
        write_piece(&part, &b[(s - off) as usize..(e - off) as usize])?;
        written += e - s;
    }
    Ok(written)
}

fn write_job(j: &WriteJob, store: &ImageStore, buf: &mut Vec<u8>) -> Result<u64, MemError> {
    if buf.len() < j.chunk.len as usize {
        buf.resize(j.chunk.len as usize, 0);
    }
    let b = &mut buf[..j.chunk.len as usize];
    store.get_chunk(&j.chunk, b)?;
    // Extents are checked against their chunk when the manifest is decoded.
    write_part(&j.pieces, 0, b)
}

fn write_piece(p: &Piece, b: &[u8]) -> Result<(), MemError> {
    match p.dest {
        Dest::Process(pid) => write_process(pid, p.addr, b)?,
        Dest::Uffd { uffd, pid } => {
            // The restorer keeps this descriptor open until every job is done.
            let fd = uffd;
            if let Err(e) = sys::uffd::copy(fd, p.addr, b) {
                if e.errno() != Some(libc::EEXIST) {
                    return Err(MemError::Write {
                        pid,
                        addr: p.addr,
                        source: e.source,
                    });
                }
                // Some page of the range is already there: page by page, copying
                // where it is missing and writing where it is present (a write
                // through the mm of a missing page in a registered range would
                // fail, not fault it in).
                for (i, page) in b.chunks(PAGE_SIZE as usize).enumerate() {
                    let addr = p.addr + i as u64 * PAGE_SIZE;
                    match sys::uffd::copy(fd, addr, page) {
                        Ok(()) => {}
                        Err(e) if e.errno() == Some(libc::EEXIST) => {
                            write_process(pid, addr, page)?
                        }
                        Err(e) => {
                            return Err(MemError::Write {
                                pid,
                                addr,
                                source: e.source,
                            })
                        }
                    }
                }
            }
        }
        Dest::Fd(fd) => {
            // fd is a memfd the restorer owns for the whole restore.
            sys::fd::pwrite_all(fd, b, p.addr).map_err(|source| MemError::Write {
                pid: 0,
                addr: p.addr,
                source,
            })?;
        }
    }
    Ok(())
}

fn write_process(pid: pid_t, addr: u64, b: &[u8]) -> Result<(), MemError> {
    let n = sys::process_vm_writev(pid, addr, b).map_err(|e| MemError::Write {
        pid,
        addr,
        source: e.source,
    })?;
    if n != b.len() {
        return Err(MemError::Write {
            pid,
            addr: addr + n as u64,
            source: std::io::Error::new(std::io::ErrorKind::WriteZero, "short write"),
        });
    }
    Ok(())
}

/// Merge extents into address ranges `[start, end)` (to populate them in bulk).
pub fn ranges(exts: &[Extent]) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for e in exts {
        let (s, t) = (e.addr, e.end());
        match out.last_mut() {
            Some(last) if last.1 == s => last.1 = t,
            _ => out.push((s, t)),
        }
    }
    out
}

/// `madvise` advice that recreates a smaps VmFlag.
pub fn advice_for(flag: &str) -> Option<i32> {
    Some(match flag {
        "dd" => libc::MADV_DONTDUMP,
        "dc" => libc::MADV_DONTFORK,
        "hg" => libc::MADV_HUGEPAGE,
        "nh" => libc::MADV_NOHUGEPAGE,
        "mg" => libc::MADV_MERGEABLE,
        "wf" => libc::MADV_WIPEONFORK,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_pages_are_found() {
        let mut p = vec![0u8; 4096];
        assert!(is_zero(&p));
        p[4095] = 1;
        assert!(!is_zero(&p));
    }

    #[test]
    fn extents_merge_into_ranges() {
        let c = |len| ChunkRef { hash: [0; 32], len };
        let e = |addr, len| Extent::whole(addr, c(len));
        assert_eq!(
            ranges(&[e(0, 4096), e(4096, 8192), e(20480, 4096)]),
            vec![(0, 12288), (20480, 24576)]
        );
    }
}
