//! epoll instances: their targets (descriptor number, event mask, user data)
//! from fdinfo, registered again from inside the husk once all its descriptors
//! are installed ([`super::register_epoll`]): an epoll item is keyed by the
//! descriptor number it was added with, so it must be added with the process's
//! own numbers. Events already pending are not kept: the targets report them
//! again when level-triggered, and an edge-triggered waiter sees the next edge.

use std::os::fd::{OwnedFd, RawFd};

use ckpt_shared::image::{EpollTarget, Fd, FileKind, OpenFile};
use libc::pid_t;
use serde_json::{json, Value};

use super::kind::{Opening, Persist, Seen};
use super::{set_status_flags, FdError, FdTable};
use crate::sys::proc;

pub struct Epoll;

impl Persist for Epoll {
    fn dump(&self, _: &mut FdTable, seen: &mut Seen<'_>) -> Option<Result<FileKind, FdError>> {
        (seen.link == "anon_inode:[eventpoll]").then(|| {
            let text = proc::fdinfo_text(seen.pid, seen.fd)?;
            Ok(FileKind::Epoll {
                targets: epoll_targets(&text).ok_or_else(|| {
                    seen.unsupported("an epoll instance /proc does not show".into())
                })?,
            })
        })
    }

    fn owns(&self, kind: &FileKind) -> bool {
        matches!(kind, FileKind::Epoll { .. })
    }

    fn open(&self, _: usize, f: &OpenFile, _: &mut Opening<'_>) -> Result<OwnedFd, FdError> {
        // Empty: the husk fills it (see the module doc).
        let fd = crate::sys::fd::epoll_create()?;
        set_status_flags(&fd, f.flags as i32)?;
        Ok(fd)
    }

    fn describe(&self, kind: &FileKind) -> String {
        match kind {
            FileKind::Epoll { targets } => format!(
                "epoll watching fds {}",
                targets
                    .iter()
                    .map(|t| format!("{} ({:#x})", t.fd, t.events))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            _ => unreachable!("owns() chose this kind"),
        }
    }

    fn json(&self, kind: &FileKind) -> Value {
        match kind {
            FileKind::Epoll { targets } => json!({
                "kind": "epoll",
                "targets": targets.iter().map(|t| json!({
                    "fd": t.fd, "events": t.events, "data": t.data,
                })).collect::<Vec<_>>(),
            }),
            _ => unreachable!("owns() chose this kind"),
        }
    }
}

/// The targets of an epoll instance from its fdinfo text (`tfd: 5 events: 19
/// data: 7f0000001000 pos:0 ino:... sdev:...` per target).
pub fn epoll_targets(text: &str) -> Option<Vec<EpollTarget>> {
    let mut out = Vec::new();
    for line in text.lines().filter(|l| l.starts_with("tfd:")) {
        let w: Vec<&str> = line.split_whitespace().collect();
        let at = |key: &str| w.iter().position(|x| *x == key).and_then(|i| w.get(i + 1));
        out.push(EpollTarget {
            fd: at("tfd:")?.parse().ok()?,
            events: u32::from_str_radix(at("events:")?, 16).ok()?,
            data: u64::from_str_radix(at("data:")?, 16).ok()?,
        });
    }
    Some(out)
}

/// An epoll instance is filled again by the first process that holds it, with
/// that process's descriptor numbers: each target must still be open there.
pub(super) fn check_targets_open(
    files: &[OpenFile],
    procs: &[(pid_t, &mut Vec<Fd>)],
) -> Result<(), FdError> {
    let mut seen = std::collections::HashSet::new();
    for (pid, fds) in procs.iter() {
        let open: std::collections::HashSet<RawFd> = fds.iter().map(|f| f.fd).collect();
        for fd in fds.iter() {
            let FileKind::Epoll { targets } = &files[fd.file as usize].kind else {
                continue;
            };
            if !seen.insert(fd.file) {
                continue;
            }
            if let Some(t) = targets.iter().find(|t| !open.contains(&t.fd)) {
                return Err(FdError::Unsupported {
                    pid: *pid,
                    fd: fd.fd,
                    what: format!(
                        "an epoll instance watching descriptor {}, which this process \
                         has closed (the file lives on elsewhere)",
                        t.fd
                    ),
                });
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn epoll_fdinfo_gives_each_target_with_its_events_and_data() {
        let text = "pos:\t0\nflags:\t02000002\nmnt_id:\t15\nino:\t1057\n\
                    tfd:        5 events:       19 data:     7f2a1c000b70  pos:0 ino:3f2 sdev:8\n\
                    tfd:       12 events: 80000001 data:                9  pos:0 ino:3f9 sdev:e\n";
        let t = epoll_targets(text).unwrap();
        assert_eq!(t.len(), 2);
        assert_eq!(
            (t[0].fd, t[0].events, t[0].data),
            (5, 0x19, 0x7f2a_1c00_0b70)
        );
        assert_eq!((t[1].fd, t[1].events, t[1].data), (12, 0x8000_0001, 9));
        assert_eq!(epoll_targets("pos:\t0\n").unwrap(), vec![]);
        assert!(epoll_targets("tfd: x events: 1 data: 2\n").is_none());
    }
}
