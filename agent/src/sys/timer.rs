//! timerfd and signalfd: the calls the dump makes on its duplicates of them and the
//! restore on new ones, and the clocks their deadlines are read against.
//!
//! Kernel contract: `timerfd_create` / `timerfd_settime` / `timerfd_gettime`
//! Linux ≥ 2.6.25; `TFD_IOC_SET_TICKS` ≥ 3.17 with `CONFIG_CHECKPOINT_RESTORE`
//! (the expirations not yet read); `signalfd4` ≥ 2.6.27. A timer on an `_ALARM`
//! clock needs `CAP_WAKE_ALARM`; nothing else needs a capability.

use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

use super::SysError;

type Result<T> = std::result::Result<T, SysError>;

/// `_IOW('T', 0, __u64)`: sets a timerfd's count of expirations not yet read.
const TFD_IOC_SET_TICKS: libc::c_ulong = 0x4008_5400;

const NS: u64 = 1_000_000_000;

fn timespec(ns: u64) -> libc::timespec {
    libc::timespec {
        tv_sec: (ns / NS) as libc::time_t,
        tv_nsec: (ns % NS) as libc::c_long,
    }
}

fn nanos(ts: &libc::timespec) -> u64 {
    ts.tv_sec as u64 * NS + ts.tv_nsec as u64
}

/// timerfd_create(`clock`, non-blocking, close-on-exec): a disarmed timer.
pub fn timerfd_create(clock: i32) -> Result<OwnedFd> {
    // SAFETY: plain integer arguments.
    let raw = unsafe { libc::timerfd_create(clock, libc::TFD_NONBLOCK | libc::TFD_CLOEXEC) };
    if raw < 0 {
        return Err(SysError::last("timerfd_create", format!("clock {clock}")));
    }
    // SAFETY: a fresh descriptor we own.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

/// timerfd_settime(`fd`, `flags`, {`value_ns`, `interval_ns`}): `value_ns` is
/// relative, or a time of the timer's clock with `TFD_TIMER_ABSTIME`; 0 disarms.
pub fn timerfd_settime(
    fd: BorrowedFd<'_>,
    flags: i32,
    value_ns: u64,
    interval_ns: u64,
) -> Result<()> {
    let new = libc::itimerspec {
        it_interval: timespec(interval_ns),
        it_value: timespec(value_ns),
    };
    // SAFETY: `new` is a valid itimerspec for the call; the old value is not asked.
    let r = unsafe { libc::timerfd_settime(fd.as_raw_fd(), flags, &new, std::ptr::null_mut()) };
    if r < 0 {
        return Err(SysError::last("timerfd_settime", "a timerfd"));
    }
    Ok(())
}

/// timerfd_gettime: (time left to the next expiration, interval), in ns. On a
/// periodic timer that expired and was not read, the kernel first moves it on to
/// its next expiration and adds the intervals that passed to its count of
/// expirations not yet read (what a read would do, without consuming them).
pub fn timerfd_gettime(fd: BorrowedFd<'_>) -> Result<(u64, u64)> {
    // SAFETY: all-zero bytes are a valid itimerspec.
    let mut cur: libc::itimerspec = unsafe { std::mem::zeroed() };
    // SAFETY: `cur` is writable and lives across the call.
    let r = unsafe { libc::timerfd_gettime(fd.as_raw_fd(), &mut cur) };
    if r < 0 {
        return Err(SysError::last("timerfd_gettime", "a timerfd"));
    }
    Ok((nanos(&cur.it_value), nanos(&cur.it_interval)))
}

/// `TFD_IOC_SET_TICKS`: sets the expirations not yet read of `fd` to `ticks`.
pub fn timerfd_set_ticks(fd: BorrowedFd<'_>, ticks: u64) -> Result<()> {
    // SAFETY: the ioctl reads one u64 from a pointer to `ticks`, which lives
    // across the call.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), TFD_IOC_SET_TICKS as _, &ticks) };
    if r < 0 {
        return Err(SysError::last(
            "ioctl(TFD_IOC_SET_TICKS)",
            "a timerfd (the kernel needs CONFIG_CHECKPOINT_RESTORE)",
        ));
    }
    Ok(())
}

/// Reads the expirations a non-blocking timerfd counted (and resets them): 0 if
/// none.
pub fn timerfd_take_ticks(fd: BorrowedFd<'_>) -> Result<u64> {
    let mut ticks = 0u64;
    // SAFETY: 8 writable bytes at `ticks`.
    let n = unsafe { libc::read(fd.as_raw_fd(), (&mut ticks as *mut u64).cast(), 8) };
    if n < 0 {
        let e = std::io::Error::last_os_error();
        if e.kind() == std::io::ErrorKind::WouldBlock {
            return Ok(0);
        }
        return Err(SysError {
            op: "read",
            what: "a timerfd's expirations".into(),
            source: e,
        });
    }
    Ok(ticks)
}

/// clock_gettime(`clock`), in ns.
pub fn clock_now_ns(clock: i32) -> Result<u64> {
    // SAFETY: all-zero bytes are a valid timespec.
    let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
    // SAFETY: `ts` is writable and lives across the call.
    let r = unsafe { libc::clock_gettime(clock, &mut ts) };
    if r < 0 {
        return Err(SysError::last("clock_gettime", format!("clock {clock}")));
    }
    Ok(nanos(&ts))
}

/// signalfd4(-1, `mask`, non-blocking, close-on-exec): a new signalfd taking the
/// signals of `mask` (bit `n - 1` for signal `n`).
pub fn signalfd(mask: u64) -> Result<OwnedFd> {
    // SAFETY: the kernel reads 8 bytes of sigset from `mask`, which lives across
    // the call.
    let raw = unsafe {
        libc::syscall(
            libc::SYS_signalfd4,
            -1,
            &mask as *const u64,
            8usize,
            libc::SFD_NONBLOCK | libc::SFD_CLOEXEC,
        )
    };
    if raw < 0 {
        return Err(SysError::last("signalfd4", format!("mask {mask:#x}")));
    }
    // SAFETY: a fresh descriptor we own.
    Ok(unsafe { OwnedFd::from_raw_fd(raw as i32) })
}
