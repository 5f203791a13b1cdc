//! Regular files: reopened by path at their position, with their status flags.
//!
//! The file itself is not saved: the restore checks that it is still the file the
//! dump saw (`FileCheck`, filled by the dump from [`FdTable::regular_paths`]).

use std::os::fd::{AsFd, OwnedFd};

use ckpt_shared::image::{FileKind, OpenFile};
use serde_json::{json, Value};

use super::kind::{Opening, Persist, Seen};
use super::{open_path, FdError, FdTable};
use crate::sys;

pub struct File;

impl Persist for File {
    fn dump(&self, t: &mut FdTable, seen: &mut Seen<'_>) -> Option<Result<FileKind, FdError>> {
        if !seen.meta.is(libc::S_IFREG) {
            return None;
        }
        t.regular_paths.push(seen.link.to_string());
        Some(Ok(FileKind::Regular {
            path: seen.link.to_string(),
            pos: seen.pos,
            check: u32::MAX,
        }))
    }

    fn owns(&self, kind: &FileKind) -> bool {
        matches!(kind, FileKind::Regular { .. })
    }

    fn open(&self, _: usize, f: &OpenFile, _: &mut Opening<'_>) -> Result<OwnedFd, FdError> {
        let FileKind::Regular { path, pos, .. } = &f.kind else {
            unreachable!("owns() chose this kind")
        };
        open_at(path, f.flags as i32, *pos)
    }

    fn describe(&self, kind: &FileKind) -> String {
        match kind {
            FileKind::Regular { path, pos, .. } => format!("file {path} @ {pos}"),
            _ => unreachable!("owns() chose this kind"),
        }
    }

    fn json(&self, kind: &FileKind) -> Value {
        match kind {
            FileKind::Regular { path, pos, .. } => {
                json!({"kind": "file", "path": path, "pos": pos})
            }
            _ => unreachable!("owns() chose this kind"),
        }
    }
}

/// `path` opened as `flags` say, at `pos` (for directories too).
pub(super) fn open_at(path: &str, flags: i32, pos: u64) -> Result<OwnedFd, FdError> {
    let file = open_path(path, flags)?;
    if pos != 0 {
        sys::fd::seek_to(file.as_fd(), pos, path)?;
    }
    Ok(file)
}
