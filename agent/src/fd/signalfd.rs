//! signalfd: the signals it takes, from fdinfo (`sigmask:`, 16 hex digits, signal
//! `n` at bit `n - 1`), and its status flags. A signalfd holds nothing else: the
//! signals it will read are the process's and threads' pending ones, which the
//! process dump keeps. Restore makes a new one with the same mask.

use std::os::fd::OwnedFd;

use ckpt_shared::image::{FileKind, OpenFile};
use serde_json::{json, Value};

use super::kind::{Opening, Persist, Seen};
use super::{set_status_flags, FdError, FdTable};
use crate::sys::{proc, timer};

pub struct SignalFd;

impl Persist for SignalFd {
    fn dump(&self, _: &mut FdTable, seen: &mut Seen<'_>) -> Option<Result<FileKind, FdError>> {
        (seen.link == "anon_inode:[signalfd]").then(|| dump(seen))
    }

    fn owns(&self, kind: &FileKind) -> bool {
        matches!(kind, FileKind::SignalFd { .. })
    }

    fn open(&self, _: usize, f: &OpenFile, _: &mut Opening<'_>) -> Result<OwnedFd, FdError> {
        let FileKind::SignalFd { mask } = &f.kind else {
            unreachable!("owns() chose this kind")
        };
        let fd = timer::signalfd(*mask)?;
        set_status_flags(&fd, f.flags as i32)?;
        Ok(fd)
    }

    fn describe(&self, kind: &FileKind) -> String {
        match kind {
            FileKind::SignalFd { mask } => format!("signalfd for {}", signal_list(*mask)),
            _ => unreachable!("owns() chose this kind"),
        }
    }

    fn json(&self, kind: &FileKind) -> Value {
        match kind {
            FileKind::SignalFd { mask } => json!({"kind": "signalfd", "mask": mask}),
            _ => unreachable!("owns() chose this kind"),
        }
    }
}

/// `SIGUSR1 SIGRTMIN+2 ...` for the bits of `mask`.
fn signal_list(mask: u64) -> String {
    let names: Vec<String> = (1..=64)
        .filter(|n| mask & (1u64 << (n - 1)) != 0)
        .map(|n| match nix::sys::signal::Signal::try_from(n) {
            Ok(s) => s.as_str().to_string(),
            Err(_) => format!("signal {n}"),
        })
        .collect();
    if names.is_empty() {
        "no signal".into()
    } else {
        names.join(" ")
    }
}

fn dump(seen: &Seen<'_>) -> Result<FileKind, FdError> {
    let text = proc::fdinfo_text(seen.pid, seen.fd)?;
    let mask = parse(&text).ok_or_else(|| {
        seen.unsupported(format!("a signalfd whose fdinfo we cannot read: {text:?}"))
    })?;
    Ok(FileKind::SignalFd { mask })
}

/// The mask of fdinfo's `sigmask:` line (Linux ≥ 3.8).
fn parse(text: &str) -> Option<u64> {
    let v = text.lines().find_map(|l| l.strip_prefix("sigmask:"))?;
    u64::from_str_radix(v.trim(), 16).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_mask_and_names_its_signals() {
        let text =
            "pos:\t0\nflags:\t02004000\nmnt_id:\t15\nino:\t1057\nsigmask:\t0000000000000a00\n";
        let mask = parse(text).unwrap();
        assert_eq!(mask, (1 << 9) | (1 << 11));
        assert_eq!(signal_list(mask), "SIGUSR1 SIGUSR2");
        assert_eq!(parse("pos:\t0\n"), None);
    }
}
