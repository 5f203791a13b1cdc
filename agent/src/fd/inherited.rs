//! Descriptors 0–2 that lead out of the tree (a terminal, a pipe or a socket to
//! the shell): not saved, but replaced at restore by the restore command's own
//! descriptor of the same number. The dump claims here a stdio socket that is not
//! TCP; the character-device and pipe kinds make terminals and pipes to the
//! outside inherited themselves.

use std::os::fd::OwnedFd;

use ckpt_shared::image::{FileKind, OpenFile};
use serde_json::{json, Value};

use super::kind::{Opening, Persist, Seen};
use super::{tcp, FdError, FdTable};

pub struct Inherited;

impl Persist for Inherited {
    fn dump(&self, _: &mut FdTable, seen: &mut Seen<'_>) -> Option<Result<FileKind, FdError>> {
        (matches!(seen.socket_kind(), Some(tcp::Kind::NotTcp)) && seen.fd <= 2).then(|| {
            Ok(FileKind::Inherited {
                what: seen.link.to_string(),
            })
        })
    }

    fn owns(&self, kind: &FileKind) -> bool {
        matches!(kind, FileKind::Inherited { .. })
    }

    fn open(&self, _: usize, _: &OpenFile, _: &mut Opening<'_>) -> Result<OwnedFd, FdError> {
        // Which fd number inherits is decided by the descriptor slot; any of
        // 0..=2 of ours stands in. The slot picks it at install time.
        let own = std::fs::File::open("/dev/null").map_err(|source| FdError::Open {
            path: "/dev/null".into(),
            source,
        })?;
        Ok(own.into())
    }

    fn describe(&self, kind: &FileKind) -> String {
        match kind {
            FileKind::Inherited { what } => format!("inherited from the restorer ({what})"),
            _ => unreachable!("owns() chose this kind"),
        }
    }

    fn json(&self, kind: &FileKind) -> Value {
        match kind {
            FileKind::Inherited { what } => json!({"kind": "inherited", "what": what}),
            _ => unreachable!("owns() chose this kind"),
        }
    }
}
