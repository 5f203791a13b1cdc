//! Calls on the agent's own descriptors that are no one kind's: status flags,
//! positions, writes, and the anonymous-inode files the restore makes
//! (eventfd, epoll).
//!
//! Kernel contract: nothing beyond Linux 2.6.27 (`eventfd2`, `epoll_create1`);
//! no capability.

use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use super::SysError;

type Result<T> = std::result::Result<T, SysError>;

/// fcntl(F_GETFL): the status flags (and access mode) of the description.
pub fn get_status_flags(fd: BorrowedFd<'_>, what: &str) -> Result<u32> {
    let fl = nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_GETFL)
        .map_err(|e| SysError::nix("fcntl(F_GETFL)", what, e))?;
    Ok(fl as u32)
}

/// fcntl(F_SETFL).
pub fn set_status_flags(fd: BorrowedFd<'_>, flags: i32) -> Result<()> {
    let flags = nix::fcntl::OFlag::from_bits_retain(flags);
    nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_SETFL(flags))
        .map_err(|e| SysError::nix("fcntl(F_SETFL)", fd.as_raw_fd(), e))?;
    Ok(())
}

/// lseek(SEEK_SET) to `pos`.
pub fn seek_to(fd: BorrowedFd<'_>, pos: u64, what: &str) -> Result<()> {
    nix::unistd::lseek(fd, pos as i64, nix::unistd::Whence::SeekSet)
        .map_err(|e| SysError::nix("lseek", what, e))?;
    Ok(())
}

/// write(2) of `buf`: the bytes written.
pub fn write(fd: BorrowedFd<'_>, buf: &[u8], what: &str) -> Result<usize> {
    nix::unistd::write(fd, buf).map_err(|e| SysError::nix("write", what, e))
}

/// pwrite(2) of all of `buf` at `off` of `fd`, which the caller keeps open for the
/// call (a descriptor it holds by number: a memfd of the restorer's).
pub fn pwrite_all(fd: RawFd, mut buf: &[u8], mut off: u64) -> std::io::Result<()> {
    while !buf.is_empty() {
        // SAFETY: the pointer/length pair covers `buf`; a stale descriptor number
        // fails with EBADF and writes nothing of ours.
        let n = unsafe { libc::pwrite(fd, buf.as_ptr().cast(), buf.len(), off as i64) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        buf = &buf[n as usize..];
        off += n as u64;
    }
    Ok(())
}

/// eventfd(2) with counter 0 and `flags` (close-on-exec added).
pub fn eventfd(flags: i32) -> Result<OwnedFd> {
    // SAFETY: eventfd(2) with plain arguments.
    let raw = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | flags) };
    if raw < 0 {
        return Err(SysError::last("eventfd", "an eventfd"));
    }
    // SAFETY: a fresh descriptor we own.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

/// epoll_create1(EPOLL_CLOEXEC): an empty epoll instance.
pub fn epoll_create() -> Result<OwnedFd> {
    // SAFETY: epoll_create1 with a constant flag.
    let raw = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
    if raw < 0 {
        return Err(SysError::last("epoll_create1", "an epoll instance"));
    }
    // SAFETY: a fresh descriptor we own.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}
