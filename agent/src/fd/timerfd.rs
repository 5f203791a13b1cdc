//! timerfd: its clock, flags, time left, interval and the expirations not yet
//! read.
//!
//! Dump: fdinfo shows `clockid`, `ticks`, `settime flags`, `it_value` (the time
//! left, even for an absolute timer) and `it_interval`, read together under the
//! timer's lock. A periodic timer that expired while nobody read it is only moved
//! on by the kernel when it is read: until then fdinfo shows it at 0 left and one
//! tick, however many intervals passed. So the dump first calls
//! `timerfd_gettime` on its duplicate, which moves it on and adds the intervals
//! that passed to `ticks` exactly as a read would, without consuming them (the
//! program's next read returns the same count it would have). If the timer
//! expires again between that call and fdinfo, fdinfo shows 0 left on a periodic
//! timer once more, and the two are read again.
//!
//! Restore: a new timerfd on the same clock, set with what it had left and its
//! interval, then `TFD_IOC_SET_TICKS` for the expirations not yet read. Setting a
//! timer clears its count, so the count is set after it, to the saved one plus
//! any the new timer counted meanwhile (read and added: an expiration that falls
//! in the microseconds between that read and the ioctl is the only one that can
//! be lost, and only for a timer set to expire within them).
//!
//! How time passes across the dump (what an application can expect):
//! - a relative timer, and any timer on `CLOCK_MONOTONIC` or `CLOCK_BOOTTIME`,
//!   comes back with the time it had left at the dump: the time the tree spent
//!   saved, killed and restored does not count, as a suspended machine's
//!   `CLOCK_MONOTONIC` does not count the suspension. Counting it would fire every
//!   timer at once after a long outage, and a periodic one would report all the
//!   intervals it missed, which a program reads as time it lost computing. The
//!   restoring host's monotonic clock is not the dumping host's anyway: an
//!   absolute monotonic timer keeps `TFD_TIMER_ABSTIME`, set to the restoring
//!   host's clock now plus what it had left;
//! - an absolute timer on `CLOCK_REALTIME` (or `_ALARM`) is a wall-clock
//!   deadline (an alarm at noon): it keeps it. If the deadline passed while the
//!   tree was down, it fires at once, and a periodic one counts the intervals
//!   that passed, as the kernel does when the clock is set forward.
//!   `TFD_TIMER_CANCEL_ON_SET` is set again; a cancellation already reported but
//!   not read is not kept.

use std::os::fd::{AsFd, OwnedFd};

use ckpt_shared::image::{FileKind, OpenFile};
use serde_json::{json, Value};

use super::kind::{Opening, Persist, Seen};
use super::{set_status_flags, FdError, FdTable};
use crate::sys::{self, proc, timer};

pub struct TimerFd;

const ABSTIME: u32 = libc::TFD_TIMER_ABSTIME as u32;

fn is_realtime(clock: i32) -> bool {
    clock == libc::CLOCK_REALTIME || clock == libc::CLOCK_REALTIME_ALARM
}

impl Persist for TimerFd {
    fn dump(&self, _: &mut FdTable, seen: &mut Seen<'_>) -> Option<Result<FileKind, FdError>> {
        (seen.link == "anon_inode:[timerfd]").then(|| dump(seen))
    }

    fn owns(&self, kind: &FileKind) -> bool {
        matches!(kind, FileKind::TimerFd { .. })
    }

    fn open(&self, _: usize, f: &OpenFile, _: &mut Opening<'_>) -> Result<OwnedFd, FdError> {
        let FileKind::TimerFd {
            clock,
            flags,
            value_ns,
            interval_ns,
            ticks,
            deadline_ns,
        } = &f.kind
        else {
            unreachable!("owns() chose this kind")
        };
        let fd = timer::timerfd_create(*clock)?;
        let value = match (*value_ns, *flags & ABSTIME != 0) {
            (0, _) => 0,
            (left, false) => left,
            (left, true) => match deadline_ns {
                Some(d) if is_realtime(*clock) => (*d).max(1),
                _ => timer::clock_now_ns(*clock)? + left,
            },
        };
        if value != 0 {
            timer::timerfd_settime(fd.as_fd(), *flags as i32, value, *interval_ns)?;
        }
        let meanwhile = timer::timerfd_take_ticks(fd.as_fd())?;
        if *ticks + meanwhile != 0 {
            timer::timerfd_set_ticks(fd.as_fd(), *ticks + meanwhile)?;
        }
        set_status_flags(&fd, f.flags as i32)?;
        Ok(fd)
    }

    fn describe(&self, kind: &FileKind) -> String {
        let FileKind::TimerFd {
            clock,
            flags,
            value_ns,
            interval_ns,
            ticks,
            ..
        } = kind
        else {
            unreachable!("owns() chose this kind")
        };
        let ms = |ns: &u64| format!("{:.3} ms", *ns as f64 / 1e6);
        format!(
            "timerfd {}{}, {}, interval {}, {ticks} expirations unread",
            clock_name(*clock),
            if flags & ABSTIME != 0 {
                " (absolute)"
            } else {
                ""
            },
            if *value_ns == 0 {
                "disarmed".to_string()
            } else {
                format!("{} left", ms(value_ns))
            },
            ms(interval_ns),
        )
    }

    fn json(&self, kind: &FileKind) -> Value {
        let FileKind::TimerFd {
            clock,
            flags,
            value_ns,
            interval_ns,
            ticks,
            deadline_ns,
        } = kind
        else {
            unreachable!("owns() chose this kind")
        };
        json!({
            "kind": "timerfd", "clock": clock, "flags": flags, "value_ns": value_ns,
            "interval_ns": interval_ns, "ticks": ticks, "deadline_ns": deadline_ns,
        })
    }
}

fn clock_name(clock: i32) -> String {
    match clock {
        libc::CLOCK_REALTIME => "CLOCK_REALTIME".into(),
        libc::CLOCK_MONOTONIC => "CLOCK_MONOTONIC".into(),
        libc::CLOCK_BOOTTIME => "CLOCK_BOOTTIME".into(),
        libc::CLOCK_REALTIME_ALARM => "CLOCK_REALTIME_ALARM".into(),
        libc::CLOCK_BOOTTIME_ALARM => "CLOCK_BOOTTIME_ALARM".into(),
        other => format!("clock {other}"),
    }
}

/// What fdinfo says of a timerfd.
#[derive(Debug, PartialEq, Eq)]
struct Info {
    clock: i32,
    ticks: u64,
    flags: u32,
    value_ns: u64,
    interval_ns: u64,
}

fn dump(seen: &Seen<'_>) -> Result<FileKind, FdError> {
    let dup = sys::pidfd_getfd(seen.pidfd, seen.pid, seen.fd)?;
    let mut tries = 0;
    let info = loop {
        timer::timerfd_gettime(dup.as_fd())?;
        let text = proc::fdinfo_text(seen.pid, seen.fd)?;
        let info = parse(&text).ok_or_else(|| {
            seen.unsupported(format!("a timerfd whose fdinfo we cannot read: {text:?}"))
        })?;
        tries += 1;
        // A periodic timer shown at 0 left has expired since timerfd_gettime moved
        // it on: move it on again (see the module doc).
        if !(info.value_ns == 0 && info.interval_ns != 0) || tries == 10 {
            break info;
        }
    };
    if info.value_ns == 0 && info.interval_ns != 0 {
        return Err(seen.unsupported(format!(
            "a periodic timerfd (interval {} ns) that keeps expiring while it is read",
            info.interval_ns
        )));
    }
    let deadline_ns = if info.flags & ABSTIME != 0 && is_realtime(info.clock) && info.value_ns != 0
    {
        Some(timer::clock_now_ns(libc::CLOCK_REALTIME)? + info.value_ns)
    } else {
        None
    };
    Ok(FileKind::TimerFd {
        clock: info.clock,
        flags: info.flags,
        value_ns: info.value_ns,
        interval_ns: info.interval_ns,
        ticks: info.ticks,
        deadline_ns,
    })
}

/// Parses the timerfd lines of fdinfo (Linux ≥ 3.17):
/// `clockid: 1`, `ticks: 0`, `settime flags: 01`, `it_value: (0, 499)`,
/// `it_interval: (0, 10000000)`.
fn parse(text: &str) -> Option<Info> {
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|v| v.trim())
    };
    let pair = |name: &str| -> Option<u64> {
        let v = field(name)?.strip_prefix('(')?.strip_suffix(')')?;
        let (s, ns) = v.split_once(',')?;
        Some(s.trim().parse::<u64>().ok()? * 1_000_000_000 + ns.trim().parse::<u64>().ok()?)
    };
    Some(Info {
        clock: field("clockid:")?.parse().ok()?,
        ticks: field("ticks:")?.parse().ok()?,
        flags: u32::from_str_radix(field("settime flags:")?, 8).ok()?,
        value_ns: pair("it_value:")?,
        interval_ns: pair("it_interval:")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_fdinfo_of_a_timerfd() {
        let text = "pos:\t0\nflags:\t02004002\nmnt_id:\t15\nino:\t1057\nclockid: 1\n\
                    ticks: 7\nsettime flags: 01\nit_value: (2, 500)\nit_interval: (0, 10000000)\n";
        assert_eq!(
            parse(text),
            Some(Info {
                clock: 1,
                ticks: 7,
                flags: 1,
                value_ns: 2_000_000_500,
                interval_ns: 10_000_000,
            })
        );
        assert_eq!(parse("clockid: 1\nticks: 0\n"), None);
    }
}
