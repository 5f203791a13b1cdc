//! Character devices: the few whose state is nothing but their identity
//! (`/dev/{null,zero,random,urandom}`), reopened by path. A terminal on
//! descriptors 0–2 is the restore command's own (inherited); any other device is
//! refused, since its state is in a driver we cannot read.

use std::os::fd::OwnedFd;

use ckpt_shared::image::{FileKind, OpenFile};
use serde_json::{json, Value};

use super::kind::{Opening, Persist, Seen};
use super::{open_path, FdError, FdTable};

/// Character devices we can reopen by path: (major, minor).
const SAFE_CHARDEVS: [(u64, u64, &str); 4] = [
    (1, 3, "/dev/null"),
    (1, 5, "/dev/zero"),
    (1, 8, "/dev/random"),
    (1, 9, "/dev/urandom"),
];

fn major(rdev: u64) -> u64 {
    libc::major(rdev) as u64
}
fn minor(rdev: u64) -> u64 {
    libc::minor(rdev) as u64
}

pub struct CharDev;

impl Persist for CharDev {
    fn dump(&self, _: &mut FdTable, seen: &mut Seen<'_>) -> Option<Result<FileKind, FdError>> {
        if !seen.meta.is(libc::S_IFCHR) {
            return None;
        }
        let rdev = seen.meta.rdev;
        Some(
            if let Some(&(_, _, p)) = SAFE_CHARDEVS
                .iter()
                .find(|(ma, mi, _)| *ma == major(rdev) && *mi == minor(rdev))
            {
                Ok(FileKind::CharDevice {
                    path: p.to_string(),
                    rdev,
                })
            } else if seen.fd <= 2 {
                Ok(FileKind::Inherited {
                    what: seen.link.to_string(),
                })
            } else {
                Err(seen.unsupported(format!("the character device {}", seen.link)))
            },
        )
    }

    fn owns(&self, kind: &FileKind) -> bool {
        matches!(kind, FileKind::CharDevice { .. })
    }

    fn open(&self, _: usize, f: &OpenFile, _: &mut Opening<'_>) -> Result<OwnedFd, FdError> {
        let FileKind::CharDevice { path, .. } = &f.kind else {
            unreachable!("owns() chose this kind")
        };
        open_path(path, f.flags as i32)
    }

    fn describe(&self, kind: &FileKind) -> String {
        match kind {
            FileKind::CharDevice { path, .. } => format!("chardev {path}"),
            _ => unreachable!("owns() chose this kind"),
        }
    }

    fn json(&self, kind: &FileKind) -> Value {
        match kind {
            FileKind::CharDevice { path, .. } => json!({"kind": "chardev", "path": path}),
            _ => unreachable!("owns() chose this kind"),
        }
    }
}
