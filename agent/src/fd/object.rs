//! Descriptors of memory objects ([`crate::mem::object`]): memfds, files deleted
//! while held, and tmpfs files the tree also maps shared.
//!
//! Dump: a memfd or deleted file is registered with the tree's objects here (its
//! content is stored with the memory, once, whoever holds or maps it); a tmpfs
//! file first looks like a regular file and becomes an object's descriptor once
//! the mappings are classified ([`FdTable::adopt_objects`]).
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
        if !memfd && !seen.link.ends_with(" (deleted)") {
            return None;
        }
        let got = (|| {
            let file = open_seen(seen)?;
            let link = seen.link;
            let id = t
                .shm
                .object(file, link, |f, st| {
                    if memfd {
                        mem::memfd::backing(link, f)
                    } else {
                        mem::deleted::backing(link, st)
                    }
                })
                .map_err(|e| refusal(seen, e))?;
            Ok(FileKind::Object {
                shmem_id: id,
                pos: seen.pos,
            })
        })();
        Some(got)
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
