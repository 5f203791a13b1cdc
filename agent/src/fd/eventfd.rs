//! eventfd: its 64-bit counter and its semaphore mode, read from fdinfo
//! (`eventfd-count:` in hex, `eventfd-semaphore:`; Linux ≥ 5.2 shows the latter),
//! and set again on a new eventfd by a write.

use std::os::fd::{AsFd, OwnedFd};

use ckpt_shared::image::{FileKind, OpenFile};
use serde_json::{json, Value};

use super::kind::{Opening, Persist, Seen};
use super::{set_status_flags, FdError, FdTable};
use crate::sys::{self, proc};

pub struct EventFd;

impl Persist for EventFd {
    fn dump(&self, _: &mut FdTable, seen: &mut Seen<'_>) -> Option<Result<FileKind, FdError>> {
        (seen.link == "anon_inode:[eventfd]").then(|| dump(seen))
    }

    fn owns(&self, kind: &FileKind) -> bool {
        matches!(kind, FileKind::EventFd { .. })
    }

    fn open(&self, _: usize, f: &OpenFile, _: &mut Opening<'_>) -> Result<OwnedFd, FdError> {
        let FileKind::EventFd { count, semaphore } = &f.kind else {
            unreachable!("owns() chose this kind")
        };
        let sem = if *semaphore { libc::EFD_SEMAPHORE } else { 0 };
        let fd = sys::fd::eventfd(sem)?;
        // The counter (64 bits; eventfd's initial value has only 32) is
        // added by a write, which an eventfd takes whole or not at all.
        if *count != 0 {
            sys::fd::write(fd.as_fd(), &count.to_ne_bytes(), "an eventfd's counter")?;
        }
        set_status_flags(&fd, f.flags as i32)?;
        Ok(fd)
    }

    fn describe(&self, kind: &FileKind) -> String {
        match kind {
            FileKind::EventFd { count, semaphore } => format!(
                "eventfd count {count}{}",
                if *semaphore { " (semaphore)" } else { "" }
            ),
            _ => unreachable!("owns() chose this kind"),
        }
    }

    fn json(&self, kind: &FileKind) -> Value {
        match kind {
            FileKind::EventFd { count, semaphore } => {
                json!({"kind": "eventfd", "count": count, "semaphore": semaphore})
            }
            _ => unreachable!("owns() chose this kind"),
        }
    }
}

fn dump(seen: &Seen<'_>) -> Result<FileKind, FdError> {
    let text = proc::fdinfo_text(seen.pid, seen.fd)?;
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|v| v.trim().to_string())
    };
    let count = field("eventfd-count:")
        .and_then(|v| u64::from_str_radix(&v, 16).ok())
        .ok_or_else(|| seen.unsupported("an eventfd whose count /proc does not show".into()))?;
    Ok(FileKind::EventFd {
        count,
        semaphore: field("eventfd-semaphore:").is_some_and(|v| v == "1"),
    })
}
