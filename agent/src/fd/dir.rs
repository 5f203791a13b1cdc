//! Directories: reopened by path, at their position in the listing.

use std::os::fd::OwnedFd;

use ckpt_shared::image::{FileKind, OpenFile};
use serde_json::{json, Value};

use super::kind::{Opening, Persist, Seen};
use super::{FdError, FdTable};

pub struct Dir;

impl Persist for Dir {
    fn dump(&self, _: &mut FdTable, seen: &mut Seen<'_>) -> Option<Result<FileKind, FdError>> {
        seen.meta.is(libc::S_IFDIR).then(|| {
            Ok(FileKind::Directory {
                path: seen.link.to_string(),
                pos: seen.pos,
            })
        })
    }

    fn owns(&self, kind: &FileKind) -> bool {
        matches!(kind, FileKind::Directory { .. })
    }

    fn open(&self, _: usize, f: &OpenFile, _: &mut Opening<'_>) -> Result<OwnedFd, FdError> {
        let FileKind::Directory { path, pos } = &f.kind else {
            unreachable!("owns() chose this kind")
        };
        super::file::open_at(path, f.flags as i32, *pos)
    }

    fn describe(&self, kind: &FileKind) -> String {
        match kind {
            FileKind::Directory { path, .. } => format!("dir {path}"),
            _ => unreachable!("owns() chose this kind"),
        }
    }

    fn json(&self, kind: &FileKind) -> Value {
        match kind {
            FileKind::Directory { path, pos } => {
                json!({"kind": "directory", "path": path, "pos": pos})
            }
            _ => unreachable!("owns() chose this kind"),
        }
    }
}
