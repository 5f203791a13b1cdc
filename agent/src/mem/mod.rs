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
//! | memory object ([`object`]) | the object's data, once for the whole tree, read through a descriptor; a private mapping also its own copies |
//! | shared file             | none: the file holds them                            |
//! | vDSO / vvar / vsyscall  | none: mapped again by the kernel                     |
//!
//! Memory objects are the files whose content the image must carry because the
//! restore cannot find them by path: memfds ([`memfd`]), files deleted while held
//! ([`deleted`]), files on a tmpfs mapped shared (POSIX shared memory under
//! `/dev/shm`, [`tmpfs`]) and System V segments ([`sysv`]). Each kind has its file,
//! with how the dump recognises it and how the restore makes it again; [`object`]
//! holds what they share (the tree-wide registry, reading them, making them).
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

pub mod deleted;
mod fill;
pub mod memfd;
pub mod object;
mod read;
pub mod sysv;
pub mod tmpfs;

pub use fill::*;
pub use object::{Objects, ShmemPlan};
pub use read::*;

use std::fs::File;
use std::sync::Arc;

use ckpt_shared::image::{prot, Extent, Mapping, MappingKind, PAGE_SIZE};
use ckpt_shared::location::ImageStoreError;
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
    #[error(transparent)]
    Sys(#[from] sys::SysError),
    /// A memory object that cannot be made again here, and why.
    #[error("{0}")]
    Object(String),
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

/// Where a read job's bytes come from.
#[derive(Debug, Clone)]
pub enum Source {
    /// The memory of the job's process, at the job's address.
    Process,
    /// A descriptor of ours onto a memory object, at the job's address as an
    /// offset (bytes past its end read as zero).
    File(Arc<File>),
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
    pub source: Source,
}

/// Identity of a memory object: (device major, minor, inode).
pub type ShmemKey = (u32, u32, u64);

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
        let id = shmem.anon((v.dev.0, v.dev.1, v.inode), v.pgoff + (v.end - v.start));
        if !v.shared {
            // A private mapping of /dev/zero is plain anonymous memory.
            return Ok(MappingKind::Anon { name: None });
        }
        return Ok(MappingKind::SharedAnon {
            shmem_id: id,
            offset: v.pgoff,
        });
    }
    let object = if v.name.starts_with("/SYSV") {
        sysv::classify(pid, v, shmem).map(Some)
    } else if v.name.starts_with("/memfd:") {
        memfd::classify(pid, v, shmem).map(Some)
    } else if v.name.ends_with(" (deleted)") {
        deleted::classify(pid, v, shmem).map(Some)
    } else if v.shared && v.name.starts_with('/') {
        tmpfs::classify(pid, v, shmem)
    } else {
        Ok(None)
    };
    // What a kind refuses is refused for this mapping of this process.
    let object = object.map_err(|e| match e {
        MemError::Object(what) => unsupported(&what),
        e => e,
    })?;
    if let Some(shmem_id) = object {
        return Ok(MappingKind::Object {
            shmem_id,
            offset: v.pgoff,
        });
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
        MappingKind::File { .. } | MappingKind::Object { .. } if !shared => {
            (present && pm & proc::PM_FILE == 0) || swapped
        }
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
    if matches!(
        map.kind,
        MappingKind::File { .. } | MappingKind::Object { .. }
    ) && map.shared
    {
        // The file holds them, or the object's own reads ([`ShmemPlan::reads`]).
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
                source: Source::Process,
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
                    source: Source::Process,
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
