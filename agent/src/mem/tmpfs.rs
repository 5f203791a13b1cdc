//! Files on a tmpfs that the tree maps shared: POSIX shared memory
//! (`shm_open`, `/dev/shm/NAME`; Open MPI's vader segments
//! `/dev/shm/vader_segment.HOST.*`, Python's semaphores `/dev/shm/sem.*`), and
//! any other tmpfs file mapped `MAP_SHARED`.
//!
//! Such a file is memory, not data that outlives the job: it is gone after a
//! reboot, and it does not exist on another node. So its content goes into the
//! image like memory (read through a descriptor of ours, [`super::object`]), and
//! the restore makes the file again. A descriptor of the same file (the `shm_open`
//! descriptor a program keeps) becomes a descriptor of the object
//! ([`crate::fd`]'s `object` kind), so it reaches the same file as the mappings.
//! A file under `/dev/shm` is taken so even if no process maps it (Open MPI's
//! probe `/dev/shm/open_mpi.0000` is held by a descriptor only); another tmpfs
//! file that the tree only holds by a descriptor, unmapped, stays a regular file
//! (reopened by path, checked: `/tmp` may be a tmpfs holding the job's output).
//!
//! # When the file is there at restore
//!
//! A restore in place finds the file the killed tree left behind; after
//! `--leave-running`, the running tree's file, changed since. Policy: the restore
//! makes a new file with the image's content (under a temporary name in the same
//! directory) and, at the release, renames it over the path (atomically: anyone
//! opening the path sees the old file or the new, never a mix). Chosen because the restored processes must see the bytes of the
//! checkpoint (which their memory and registers were taken with), not whatever
//! the file holds now; and because writing into the existing file instead would
//! change it under any process still using it (the original tree after
//! `--leave-running`), while the rename leaves them their file (unlinked). The
//! other choice, refusing when the file exists, would refuse the ordinary restore
//! in place after a kill. Before the release the path is not touched: a failed
//! restore leaves it as it was.

use std::os::fd::{AsFd, OwnedFd};

use libc::pid_t;

use ckpt_shared::image::{FileOwner, ShmBacking};

use super::object::{self, ShmemPlan};
use super::MemError;
use crate::sys::{self, proc};

/// Shared mapping `v` of `pid` of a file: the object's id if the file is on a
/// tmpfs (a regular file), `None` if it is a file like any other.
pub fn classify(pid: pid_t, v: &proc::Vma, shmem: &mut ShmemPlan) -> Result<Option<u32>, MemError> {
    // tmpfs has an anonymous device (major 0); a mapping of a file elsewhere (a
    // disk, a device) is left alone without a look at the path.
    if v.dev.0 != 0 || !sys::shm::path_on_tmpfs(&v.name).unwrap_or(false) {
        return Ok(None);
    }
    let file = object::open_mapped(pid, v)?;
    if !sys::shm::on_tmpfs(file.as_fd(), &v.name)? {
        return Ok(None);
    }
    let id = shmem.object(file, &v.name, |_, st| {
        if st.st_mode & libc::S_IFMT != libc::S_IFREG {
            return Err(MemError::Unsupported {
                pid,
                start: v.start,
                end: v.end,
                what: format!("a shared mapping of {}, not a regular file", v.name),
            });
        }
        Ok(backing(&v.name, st))
    })?;
    Ok(Some(id))
}

/// The backing of the tmpfs file `path` whose `fstat` is `st`.
pub fn backing(path: &str, st: &libc::stat) -> ShmBacking {
    ShmBacking::Tmpfs {
        path: path.to_string(),
        owner: super::deleted::owner_of(st),
    }
}

/// The new file for `path`, under a temporary name in the same directory until
/// [`publish`] renames it (so the rename stays on the tmpfs, and the mappings made
/// of it meanwhile show `path` afterwards, as they did at the dump): its
/// descriptor and its temporary name.
pub fn make(path: &str, owner: &FileOwner, size: u64) -> Result<(OwnedFd, String), MemError> {
    let dir = super::deleted::dir_of(path);
    if !std::path::Path::new(dir).is_dir() {
        return Err(MemError::Object(format!(
            "the shared memory file {path} of the image was in {dir}, which does not \
             exist on this node: create the directory (a tmpfs), then restore"
        )));
    }
    super::deleted::named_file(dir, "restore", owner, size)
}

/// The release: the new file takes `path`, replacing what is there.
pub fn publish(temp: &str, path: &str) -> Result<(), MemError> {
    std::fs::rename(temp, path)
        .map_err(|source| MemError::Object(format!("renaming {temp} to {path}: {source}")))
}
