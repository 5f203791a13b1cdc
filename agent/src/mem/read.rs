//! Dump side of memory: reading the planned pages (from the live tree, or from a
//! snapshot of it taken while frozen), dropping zero pages, cutting chunks,
//! hashing and storing them in parallel.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;

use ckpt_shared::image::{ChunkRef, Extent, PAGE_SIZE};
use ckpt_shared::location::ImageStore;
use libc::pid_t;

use super::{MemError, ReadJob, Source, Target, CHUNK_MAX};
use crate::sys;

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
    if let Source::File(f) = &j.source {
        return read_file(j, f, b);
    }
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

/// A job of a memory object: its bytes from our descriptor, zero past its end.
fn read_file(j: &ReadJob, f: &File, b: &mut [u8]) -> Result<(), MemError> {
    let mut done = 0usize;
    while done < b.len() {
        let n = f
            .read_at(&mut b[done..], j.addr + done as u64)
            .map_err(|source| MemError::Read {
                pid: j.pid,
                addr: j.addr + done as u64,
                source,
            })?;
        if n == 0 {
            b[done..].fill(0);
            break;
        }
        done += n;
    }
    Ok(())
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
}
