//! Files deleted (unlinked) while the tree holds them: by a descriptor, a
//! mapping, or both. Open MPI's shared-memory probe holds
//! `/dev/shm/open_mpi.0000 (deleted)` in every process.
//!
//! Dump: a mapping or descriptor link that ends with ` (deleted)` (after the
//! memfds, `/dev/zero` and System V segments, which look the same); the content
//! is read through a descriptor of ours ([`super::object`]), its mode and owner
//! from `fstat`. Only regular files.
//!
//! Restore: an unlinked file again, in the directory the file was in, so on the
//! same filesystem (what the program may count on: tmpfs memory, a disk's
//! space): `O_TMPFILE`, which never gives it a name anyone could see or take;
//! where the filesystem lacks `O_TMPFILE`, a fresh name made with `O_EXCL` and
//! unlinked at once. The old name is not taken again: a file of that name may
//! exist (the next job's probe), and the file had none anyway. A directory that
//! is gone on this node is a clear error.

use std::os::fd::OwnedFd;

use ckpt_shared::image::{FileOwner, ShmBacking};
use libc::pid_t;

use super::object::{self, ShmemPlan};
use super::MemError;
use crate::sys::{self, proc};

/// The backing of the deleted file `link` whose `fstat` is `st`.
pub fn backing(link: &str, st: &libc::stat) -> Result<ShmBacking, MemError> {
    if st.st_mode & libc::S_IFMT != libc::S_IFREG {
        return Err(MemError::Object(format!(
            "a deleted file that is not a regular file: {link}"
        )));
    }
    Ok(ShmBacking::Deleted {
        path: object::undeleted(link).to_string(),
        owner: owner_of(st),
    })
}

/// Mode and owner of `st`.
pub fn owner_of(st: &libc::stat) -> FileOwner {
    FileOwner {
        mode: st.st_mode & 0o7777,
        uid: st.st_uid,
        gid: st.st_gid,
    }
}

/// Mapping `v` of `pid`, of a deleted file: the object's id.
pub fn classify(pid: pid_t, v: &proc::Vma, shmem: &mut ShmemPlan) -> Result<u32, MemError> {
    let file = object::open_mapped(pid, v)?;
    shmem.object(file, &v.name, |_, st| backing(&v.name, st))
}

/// The directory of `path`.
pub fn dir_of(path: &str) -> &str {
    match path.rfind('/') {
        Some(0) => "/",
        Some(i) => &path[..i],
        None => ".",
    }
}

/// An unlinked file of `size` bytes in the directory of `path`.
pub fn make(path: &str, owner: &FileOwner, size: u64) -> Result<OwnedFd, MemError> {
    let dir = dir_of(path);
    if !std::path::Path::new(dir).is_dir() {
        return Err(MemError::Object(format!(
            "the deleted file {path} of the image was in {dir}, which does not exist on \
             this node: create the directory, then restore"
        )));
    }
    match sys::shm::tmpfile(dir, size, owner.mode, owner.uid, owner.gid) {
        Ok(fd) => Ok(fd),
        Err(e) if e.source.raw_os_error() == Some(libc::EOPNOTSUPP) => {
            named_then_unlinked(dir, owner, size)
        }
        Err(e) => Err(e.into()),
    }
}

/// Where `O_TMPFILE` is not supported: a fresh name, unlinked at once.
fn named_then_unlinked(dir: &str, owner: &FileOwner, size: u64) -> Result<OwnedFd, MemError> {
    let (fd, name) = named_file(dir, "deleted", owner, size)?;
    std::fs::remove_file(&name)
        .map_err(|source| MemError::Object(format!("unlinking {name}: {source}")))?;
    Ok(fd)
}

/// A new file of `size` bytes under a fresh name in `dir` (made with `O_EXCL`),
/// with `owner`'s mode and owner: the descriptor and the name.
pub fn named_file(
    dir: &str,
    what: &str,
    owner: &FileOwner,
    size: u64,
) -> Result<(OwnedFd, String), MemError> {
    use std::os::unix::fs::{fchown, OpenOptionsExt, PermissionsExt};
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let name = format!("{dir}/.ckpt-{what}-{}-{n}", std::process::id());
    let io = |source: std::io::Error| MemError::Object(format!("making {name}: {source}"));
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&name)
        .map_err(io)?;
    let set = (|| {
        f.set_len(size)?;
        f.set_permissions(std::fs::Permissions::from_mode(owner.mode))?;
        fchown(&f, Some(owner.uid), Some(owner.gid))
    })();
    if let Err(e) = set {
        let _ = std::fs::remove_file(&name);
        return Err(io(e));
    }
    Ok((f.into(), name))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn directories_of_paths() {
        assert_eq!(dir_of("/dev/shm/open_mpi.0000"), "/dev/shm");
        assert_eq!(dir_of("/x"), "/");
        assert_eq!(dir_of("x"), ".");
    }
}
