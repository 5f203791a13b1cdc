//! Terminal calls on the agent's own descriptors of pseudo-terminals: settings,
//! window size, the pair's lock and packet mode, opening the slave through the
//! master, and the queues (read, poll, `TIOCSTI`).
//!
//! Kernel contract: Unix 98 ptys (`/dev/ptmx`, devpts); `TIOCGPTPEER` Linux ≥
//! 4.13, `TIOCGPKT` / `TIOCGPTLCK` ≥ 3.8, `TCGETS2` ≥ 2.6.20. `TIOCSTI` needs
//! `CAP_SYS_ADMIN` on a terminal that is not the caller's controlling one (and,
//! since 6.2, wherever `dev.tty.legacy_tiocsti` is 0). A termios call on a master
//! acts on its slave, the kernel's rule for ptys; so do `TIOCGSID` and
//! `TIOCGPGRP`, which on a master need no controlling terminal.

use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

use super::SysError;

type Result<T> = std::result::Result<T, SysError>;

fn ioctl_ret(r: libc::c_int, op: &'static str) -> Result<libc::c_int> {
    if r < 0 {
        return Err(SysError::last(op, "a pseudo-terminal"));
    }
    Ok(r)
}

/// ioctl(`fd`, `req`, &mut int): the int.
fn get_int(fd: BorrowedFd<'_>, req: libc::Ioctl, op: &'static str) -> Result<libc::c_int> {
    let mut v: libc::c_int = 0;
    // SAFETY: the request writes one int to the pointer, which lives across the call.
    ioctl_ret(unsafe { libc::ioctl(fd.as_raw_fd(), req, &mut v) }, op)?;
    Ok(v)
}

/// ioctl(`fd`, `req`, &int).
fn set_int(fd: BorrowedFd<'_>, req: libc::Ioctl, v: libc::c_int, op: &'static str) -> Result<()> {
    // SAFETY: the request reads one int from the pointer, which lives across the call.
    ioctl_ret(unsafe { libc::ioctl(fd.as_raw_fd(), req, &v) }, op)?;
    Ok(())
}

/// TCGETS2: the terminal's settings (on a master: its slave's).
pub fn get_termios(fd: BorrowedFd<'_>) -> Result<libc::termios2> {
    // SAFETY: all-zero bytes are a valid termios2.
    let mut t: libc::termios2 = unsafe { std::mem::zeroed() };
    // SAFETY: TCGETS2 writes one termios2 to the pointer, which lives across the call.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TCGETS2, &mut t) };
    ioctl_ret(r, "ioctl(TCGETS2)")?;
    Ok(t)
}

/// TCSETS2: sets the settings now (on a master: its slave's).
pub fn set_termios(fd: BorrowedFd<'_>, t: &libc::termios2) -> Result<()> {
    // SAFETY: TCSETS2 reads one termios2 from the pointer, which lives across the call.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TCSETS2, t) };
    ioctl_ret(r, "ioctl(TCSETS2)")?;
    Ok(())
}

/// TIOCGWINSZ: (rows, cols, xpixel, ypixel).
pub fn get_winsize(fd: BorrowedFd<'_>) -> Result<[u16; 4]> {
    // SAFETY: all-zero bytes are a valid winsize.
    let mut w: libc::winsize = unsafe { std::mem::zeroed() };
    // SAFETY: TIOCGWINSZ writes one winsize to the pointer, which lives across the call.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCGWINSZ, &mut w) };
    ioctl_ret(r, "ioctl(TIOCGWINSZ)")?;
    Ok([w.ws_row, w.ws_col, w.ws_xpixel, w.ws_ypixel])
}

/// TIOCSWINSZ.
pub fn set_winsize(fd: BorrowedFd<'_>, w: [u16; 4]) -> Result<()> {
    let ws = libc::winsize {
        ws_row: w[0],
        ws_col: w[1],
        ws_xpixel: w[2],
        ws_ypixel: w[3],
    };
    // SAFETY: TIOCSWINSZ reads one winsize from the pointer, which lives across the call.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCSWINSZ, &ws) };
    ioctl_ret(r, "ioctl(TIOCSWINSZ)")?;
    Ok(())
}

/// TIOCGPTN: the pair's `N` of `/dev/pts/N` (master only).
pub fn pty_index(master: BorrowedFd<'_>) -> Result<u32> {
    Ok(get_int(master, libc::TIOCGPTN, "ioctl(TIOCGPTN)")? as u32)
}

/// TIOCGPTLCK: whether the pair is still locked (`unlockpt` not called).
pub fn pty_locked(master: BorrowedFd<'_>) -> Result<bool> {
    Ok(get_int(master, libc::TIOCGPTLCK, "ioctl(TIOCGPTLCK)")? != 0)
}

/// TIOCSPTLCK: locks or unlocks the pair.
pub fn set_pty_locked(master: BorrowedFd<'_>, locked: bool) -> Result<()> {
    set_int(
        master,
        libc::TIOCSPTLCK,
        locked as libc::c_int,
        "ioctl(TIOCSPTLCK)",
    )
}

/// TIOCGPKT: whether the master is in packet mode.
pub fn packet_mode(master: BorrowedFd<'_>) -> Result<bool> {
    Ok(get_int(master, libc::TIOCGPKT, "ioctl(TIOCGPKT)")? != 0)
}

/// TIOCPKT: turns packet mode on or off.
pub fn set_packet_mode(master: BorrowedFd<'_>, on: bool) -> Result<()> {
    set_int(master, libc::TIOCPKT, on as libc::c_int, "ioctl(TIOCPKT)")
}

/// TIOCGSID on a master: the session its slave is the controlling terminal of,
/// `None` if of none.
pub fn session(master: BorrowedFd<'_>) -> Result<Option<i32>> {
    match get_int(master, libc::TIOCGSID, "ioctl(TIOCGSID)") {
        Ok(sid) => Ok(Some(sid)),
        Err(e) if e.errno() == Some(libc::ENOTTY) => Ok(None),
        Err(e) => Err(e),
    }
}

/// TIOCGPGRP on a master: the slave's foreground process group, `None` if none.
pub fn foreground(master: BorrowedFd<'_>) -> Result<Option<i32>> {
    match get_int(master, libc::TIOCGPGRP, "ioctl(TIOCGPGRP)") {
        Ok(0) => Ok(None),
        Ok(pg) => Ok(Some(pg)),
        Err(e) if e.errno() == Some(libc::ENOTTY) => Ok(None),
        Err(e) => Err(e),
    }
}

/// TIOCGPTPEER: a new open file description of the master's slave, with `flags`
/// (`O_NOCTTY` is always added: it never becomes our controlling terminal).
pub fn open_peer(master: BorrowedFd<'_>, flags: i32) -> Result<OwnedFd> {
    let fl = flags | libc::O_NOCTTY | libc::O_CLOEXEC;
    // SAFETY: TIOCGPTPEER takes its flags by value and returns a new descriptor.
    let raw = unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCGPTPEER, fl) };
    let raw = ioctl_ret(raw, "ioctl(TIOCGPTPEER)")?;
    // SAFETY: a fresh descriptor we own.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

/// TIOCSTI: `c` as if it had just arrived at the terminal, through its line
/// discipline with its settings now, at once (no flip buffer in between). On a
/// master it lands in what the master reads, with the master's own raw settings.
pub fn inject_byte(fd: BorrowedFd<'_>, c: u8) -> Result<()> {
    // SAFETY: TIOCSTI reads one byte from the pointer, which lives across the call.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCSTI, &c) };
    ioctl_ret(r, "ioctl(TIOCSTI)")?;
    Ok(())
}

/// What poll(2) says of a terminal descriptor right now.
#[derive(Debug, Clone, Copy, Default)]
pub struct Ready {
    pub input: bool,
    /// `POLLPRI`: on a master in packet mode, a status byte waits.
    pub status: bool,
    pub hangup: bool,
    pub output: bool,
}

/// poll(2) on `fd` for up to `timeout_ms`. On a terminal, poll first lets the line
/// discipline take in what its flip buffer holds when nothing is readable yet.
pub fn poll(fd: BorrowedFd<'_>, timeout_ms: i32) -> Result<Ready> {
    let mut p = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN | libc::POLLPRI | libc::POLLOUT,
        revents: 0,
    };
    loop {
        // SAFETY: one pollfd, writable, living across the call.
        let r = unsafe { libc::poll(&mut p, 1, timeout_ms) };
        if r >= 0 {
            break;
        }
        let e = SysError::last("poll", "a pseudo-terminal");
        if e.errno() != Some(libc::EINTR) {
            return Err(e);
        }
    }
    let has = |bit: libc::c_short| p.revents & bit != 0;
    Ok(Ready {
        input: has(libc::POLLIN),
        status: has(libc::POLLPRI),
        hangup: has(libc::POLLHUP) || has(libc::POLLERR),
        output: has(libc::POLLOUT),
    })
}

/// One read(2) of a terminal.
#[derive(Debug, PartialEq, Eq)]
pub enum Read {
    Bytes(usize),
    /// Nothing to read now (`EAGAIN`).
    Empty,
    /// `EIO`: a master whose slave is closed by everyone, once its queue is empty.
    Closed,
}

/// read(2) into `buf`.
pub fn read(fd: BorrowedFd<'_>, buf: &mut [u8]) -> Result<Read> {
    loop {
        // SAFETY: `buf` is writable for its length.
        let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n >= 0 {
            return Ok(Read::Bytes(n as usize));
        }
        let e = SysError::last("read", "a pseudo-terminal");
        match e.errno() {
            Some(libc::EINTR) => continue,
            Some(libc::EAGAIN) => return Ok(Read::Empty),
            Some(libc::EIO) => return Ok(Read::Closed),
            _ => return Err(e),
        }
    }
}

/// FIONREAD: what the line discipline holds for a read (in canonical mode: the
/// complete lines).
pub fn queued(fd: BorrowedFd<'_>) -> Result<usize> {
    Ok(get_int(fd, libc::FIONREAD, "ioctl(FIONREAD)")? as usize)
}
