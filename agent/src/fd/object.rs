//! Descriptors of memory objects ([`crate::mem::object`]): memfds, files deleted
//! while held, and tmpfs files the tree also maps shared.
//!
//! Dump: a memfd, a deleted file or a file under `/dev/shm` (on a tmpfs) is
//! registered with the tree's objects here (its content is stored with the
//! memory, once, whoever holds or maps it); another tmpfs file first looks like a
//! regular file and becomes an object's descriptor if the tree maps it shared
//! ([`FdTable::adopt_objects`]).
//!
//! Restore: the restorer's descriptor of the object is reopened through
//! `/proc/self/fd/N` with the description's flags, then moved to its position: a
//! description of its own, as the dumped one was, of the same file as every other
//! descriptor and mapping of the object.

use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd};

use ckpt_shared::image::{FileKind, OpenFile};
use serde_json::{json, Value};

use super::kind::{Opening, Persist, Seen};
use super::{FdError, FdTable};
use crate::mem::{self, MemError};

pub struct Object;

/// Our descriptor of what descriptor `seen` is.
fn open_seen(seen: &Seen<'_>) -> Result<File, FdError> {
    let path = format!("/proc/{}/fd/{}", seen.pid, seen.fd);
    File::open(&path).map_err(|source| FdError::Open { path, source })
}

/// POSIX shared memory: files here are memory, whether mapped or not (Open
/// MPI's probe `/dev/shm/open_mpi.0000` is held by a descriptor only), and do not
/// exist on another node.
const DEV_SHM: &str = "/dev/shm/";

fn on_tmpfs(file: &File, link: &str) -> Result<bool, FdError> {
    use std::os::fd::AsFd;
    Ok(crate::sys::shm::on_tmpfs(file.as_fd(), link)?)
}

fn refusal(seen: &Seen<'_>, e: MemError) -> FdError {
    seen.unsupported(format!(
        "{} (its content could not be saved: {e})",
        seen.link
    ))
}

impl Persist for Object {
    fn dump(&self, t: &mut FdTable, seen: &mut Seen<'_>) -> Option<Result<FileKind, FdError>> {
        if !seen.meta.is(libc::S_IFREG) {
            return None;
        }
        let memfd = seen.link.starts_with("/memfd:");
        let deleted = seen.link.ends_with(" (deleted)");
        if !memfd && !deleted && !seen.link.starts_with(DEV_SHM) {
            return None;
        }
        let got = (|| {
            let file = open_seen(seen)?;
            let link = seen.link;
            if !memfd && !deleted && !on_tmpfs(&file, link)? {
                return Ok(None);
            }
            let id = t
                .shm
                .object(file, link, |f, st| {
                    if memfd {
                        mem::memfd::backing(link, f)
                    } else if deleted {
                        mem::deleted::backing(link, st)
                    } else {
                        Ok(mem::tmpfs::backing(link, st))
                    }
                })
                .map_err(|e| refusal(seen, e))?;
            Ok(Some(FileKind::Object {
                shmem_id: id,
                pos: seen.pos,
            }))
        })();
        got.transpose()
    }

    fn owns(&self, kind: &FileKind) -> bool {
        matches!(kind, FileKind::Object { .. })
    }

    fn open(&self, _: usize, f: &OpenFile, o: &mut Opening<'_>) -> Result<OwnedFd, FdError> {
        let FileKind::Object { shmem_id, pos } = &f.kind else {
            unreachable!("owns() chose this kind")
        };
        let Some(fd) = o.objects.get(shmem_id) else {
            return Err(FdError::Open {
                path: format!("memory object {shmem_id}"),
                source: std::io::Error::other("the image has no such object"),
            });
        };
        // O_NOFOLLOW (shm_open's) would refuse the /proc link itself.
        super::file::open_at(
            &format!("/proc/self/fd/{}", fd.as_raw_fd()),
            f.flags as i32 & !libc::O_NOFOLLOW,
            *pos,
        )
    }

    fn describe(&self, kind: &FileKind) -> String {
        match kind {
            FileKind::Object { shmem_id, pos } => format!("memory object #{shmem_id} @ {pos}"),
            _ => unreachable!("owns() chose this kind"),
        }
    }

    fn json(&self, kind: &FileKind) -> Value {
        match kind {
            FileKind::Object { shmem_id, pos } => {
                json!({"kind": "object", "object": shmem_id, "pos": pos})
            }
            _ => unreachable!("owns() chose this kind"),
        }
    }
}
