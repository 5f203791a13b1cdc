//! System V shared memory segments (`shmget`/`shmat`): mappings named
//! `/SYSV<key in hex>`, whose inode number is the segment's id.
//!
//! Dump: the segment's key, size, mode and owner (`shmctl(IPC_STAT)`), whether it
//! was marked for removal while attached (`SHM_DEST`), and its content, read
//! through a descriptor of ours onto the segment's file
//! (`/proc/PID/map_files/...`, [`super::object`]). Only whole attachments (offset
//! 0, the segment's size): a part left by `munmap` or `mremap` is refused.
//!
//! Restore: the segment is made again with its key and its old id (asked for
//! through `/proc/sys/kernel/shm_next_id`: programs keep ids, and `shmctl` or
//! `shmat` by id must reach it), its mode and owner, filled through a descriptor
//! of its file, and each process attaches it at its old address with an injected
//! `shmat` (so `shmdt` and `nattch` work as before). A segment that was marked
//! for removal is marked again once every process has attached it.
//!
//! # A segment with the key already there
//!
//! Segments outlive their processes: a restore in place finds the one the killed
//! tree left. A segment with the key that no process has attached (`nattch` 0) is
//! that leftover, or one as dead: it is removed and made again from the image.
//! One that some process has attached is in use (the original tree after
//! `--leave-running`, or another job that picked the key): refused, naming it. An
//! old id taken by another segment is refused too.
//!
//! # IPC namespaces
//!
//! Keys and ids are per IPC namespace. The dump reads segments through its own
//! namespace, so it refuses a tree in another one; the restore makes them in the
//! restorer's namespace, where the husks are. Restoring into a fresh IPC namespace
//! is not offered.

use std::os::fd::OwnedFd;

use ckpt_shared::image::{FileOwner, ShmBacking, PAGE_SIZE};
use libc::pid_t;
use tracing::warn;

use super::object::{self, ShmemPlan};
use super::MemError;
use crate::sys::{self, proc};

/// `SHM_DEST` in a segment's mode: removed once the last process detaches.
const SHM_DEST: u32 = 0o1000;

/// Mapping `v` of `pid`, of a System V segment: the object's id.
pub fn classify(pid: pid_t, v: &proc::Vma, shmem: &mut ShmemPlan) -> Result<u32, MemError> {
    let unsupported = |what: String| MemError::Unsupported {
        pid,
        start: v.start,
        end: v.end,
        what,
    };
    if !sys::shm::same_ipc_ns(pid)? {
        return Err(unsupported(format!(
            "System V shared memory ({}) of another IPC namespace than the agent's",
            v.name
        )));
    }
    let shmid = i32::try_from(v.inode)
        .map_err(|_| unsupported(format!("a System V segment with id {}", v.inode)))?;
    let st = sys::shm::shm_stat(shmid)?;
    let whole = st.size.div_ceil(PAGE_SIZE) * PAGE_SIZE;
    if v.pgoff != 0 || v.end - v.start != whole {
        return Err(unsupported(format!(
            "part of System V segment {shmid} ({} bytes at offset {} of {}): only whole \
             attachments are supported",
            v.end - v.start,
            v.pgoff,
            st.size
        )));
    }
    let file = object::open_mapped(pid, v)?;
    shmem.object(file, &v.name, |_, _| {
        Ok(ShmBacking::SysV {
            key: st.key,
            shmid,
            owner: FileOwner {
                mode: st.mode & 0o777,
                uid: st.uid,
                gid: st.gid,
            },
            removed: st.mode & SHM_DEST != 0,
        })
    })
}

/// The segment made again (see the module doc): its id and a descriptor of its
/// memory to fill.
pub fn make(
    key: i32,
    shmid: i32,
    owner: &FileOwner,
    size: u64,
) -> Result<(i32, OwnedFd), MemError> {
    if key != libc::IPC_PRIVATE {
        if let Some(old) = sys::shm::shm_lookup(key)? {
            let st = sys::shm::shm_stat(old)?;
            if st.nattch > 0 {
                return Err(MemError::Object(format!(
                    "System V segment key {key:#x} is in use on this node (segment {old}, \
                     attached by {} processes): end them or remove it (ipcrm -m {old}), \
                     then restore",
                    st.nattch
                )));
            }
            warn!(
                key = format!("{key:#x}"),
                segment = old,
                "removing the unattached segment left with the image's key"
            );
            sys::shm::shm_remove(old)?;
        }
    }
    let id = sys::shm::shm_create(key, size, owner.mode, shmid)?;
    if id != shmid {
        let _ = sys::shm::shm_remove(id);
        return Err(MemError::Object(format!(
            "System V segment id {shmid} (key {key:#x}) is taken on this node by another \
             segment: the restored programs would not find theirs by id"
        )));
    }
    let made = (|| {
        sys::shm::shm_set_owner(id, owner.mode, owner.uid, owner.gid)?;
        sys::shm::shm_file(id, size)
    })();
    match made {
        Ok(fd) => Ok((id, fd)),
        Err(e) => {
            let _ = sys::shm::shm_remove(id);
            Err(e.into())
        }
    }
}
