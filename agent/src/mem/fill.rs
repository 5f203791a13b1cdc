//! Restore side of memory: fetching chunks, verifying them and writing their
//! bytes into husks (populate and `process_vm_writev`, or `UFFDIO_COPY`) and into
//! the restorer's descriptors of memory objects, in parallel.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use ckpt_shared::image::{ChunkRef, Extent, PAGE_SIZE};
use ckpt_shared::location::ImageStore;
use libc::pid_t;

use super::{MemError, CHUNK_MAX};
use crate::sys;

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
    fn extents_merge_into_ranges() {
        let c = |len| ChunkRef { hash: [0; 32], len };
        let e = |addr, len| Extent::whole(addr, c(len));
        assert_eq!(
            ranges(&[e(0, 4096), e(4096, 8192), e(20480, 4096)]),
            vec![(0, 12288), (20480, 24576)]
        );
    }
}
