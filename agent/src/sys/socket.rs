//! Sockets: the options, ioctls and calls that the TCP and UDP descriptor kinds
//! make on the agent's own sockets (duplicates of the tree's, or rebuilt ones).
//!
//! Kernel contract: `TCP_REPAIR`, `TCP_REPAIR_QUEUE`, `TCP_QUEUE_SEQ` and
//! `TCP_REPAIR_OPTIONS` Linux ≥ 3.5 and CAP_NET_ADMIN in the socket's network
//! namespace; `TCP_REPAIR_WINDOW` ≥ 4.8; leaving repair mode without a window probe
//! (`TCP_REPAIR_OFF_NO_WP`) ≥ 4.19; `SIOCOUTQNSD` ≥ 2.6.38; `SO_SNDBUFFORCE` /
//! `SO_RCVBUFFORCE` need CAP_NET_ADMIN; `SO_DOMAIN` ≥ 2.6.32.
//!
//! Errors are plain `io::Error`s: the callers name the option in their own error
//! (`TcpError::Sys { what, .. }`), as they did when they made the calls themselves.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use super::SysError;

type Result<T> = std::result::Result<T, SysError>;

/// A value the kernel may fill byte by byte: plain old data, every bit pattern
/// valid, no padding the kernel would leave uninitialised.
///
/// # Safety
/// Implement only for `repr(C)` types made of integers.
pub unsafe trait Plain: Copy {}
// SAFETY: integers.
unsafe impl Plain for i32 {}
// SAFETY: integers.
unsafe impl Plain for u32 {}
// SAFETY: `struct tcp_info`, repr(C), all integer fields.
unsafe impl Plain for libc::tcp_info {}
// SAFETY: `struct tcp_repair_window`, repr(C), five u32s.
unsafe impl Plain for ckpt_shared::image::RepairWindow {}
// SAFETY: `struct tcp_repair_opt`, two u32s.
unsafe impl Plain for [u32; 2] {}
// SAFETY: `struct linger`, repr(C), two ints.
unsafe impl Plain for libc::linger {}

fn ret(r: libc::c_int) -> io::Result<()> {
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// setsockopt(2) with an array of plain values (`struct tcp_repair_opt[]`, one
/// `struct tcp_repair_window`, one int).
pub fn setsockopt<T: Plain>(fd: RawFd, level: i32, opt: i32, val: &[T]) -> io::Result<()> {
    // SAFETY: setsockopt reads `size_of_val(val)` bytes from a live slice of plain
    // values.
    ret(unsafe {
        libc::setsockopt(
            fd,
            level,
            opt,
            val.as_ptr().cast(),
            std::mem::size_of_val(val) as libc::socklen_t,
        )
    })
}

/// setsockopt(2) of one int.
pub fn setsockopt_int(fd: RawFd, level: i32, opt: i32, val: libc::c_int) -> io::Result<()> {
    setsockopt(fd, level, opt, std::slice::from_ref(&val))
}

/// getsockopt(2) of one plain value.
pub fn getsockopt<T: Plain>(fd: RawFd, level: i32, opt: i32) -> io::Result<T> {
    let mut v = std::mem::MaybeUninit::<T>::zeroed();
    let mut len = std::mem::size_of::<T>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `v`, which has that size.
    ret(unsafe { libc::getsockopt(fd, level, opt, v.as_mut_ptr().cast(), &mut len) })?;
    // SAFETY: zeroed, then (partly) written by the kernel; every bit pattern of a
    // `Plain` type is valid.
    Ok(unsafe { v.assume_init() })
}

/// getsockopt(2) of one int.
pub fn getsockopt_int(fd: RawFd, level: i32, opt: i32) -> io::Result<libc::c_int> {
    getsockopt(fd, level, opt)
}

/// `TCP_INFO` of a TCP socket (IPv4 or IPv6); fails for any other socket.
pub fn tcp_info(fd: RawFd) -> io::Result<libc::tcp_info> {
    getsockopt(fd, libc::IPPROTO_TCP, libc::TCP_INFO)
}

fn ioctl_int(fd: RawFd, req: libc::c_ulong) -> io::Result<u32> {
    let mut v: libc::c_int = 0;
    // SAFETY: these ioctls write one int.
    ret(unsafe { libc::ioctl(fd, req as _, &mut v) })?;
    Ok(v as u32)
}

/// `SIOCINQ`: bytes in the receive queue.
pub fn ioctl_inq(fd: RawFd) -> io::Result<u32> {
    ioctl_int(fd, 0x541B)
}

/// `SIOCOUTQ`: bytes in the send queue (sent and not acknowledged, or not sent).
pub fn ioctl_outq(fd: RawFd) -> io::Result<u32> {
    ioctl_int(fd, 0x5411)
}

/// `SIOCOUTQNSD`: bytes in the send queue not sent yet.
pub fn ioctl_outq_nsd(fd: RawFd) -> io::Result<u32> {
    ioctl_int(fd, 0x894B)
}

/// socket(2): a new close-on-exec socket of `domain` and `ty`.
pub fn socket(domain: i32, ty: i32) -> io::Result<OwnedFd> {
    // SAFETY: socket(2) with plain arguments.
    let raw = unsafe { libc::socket(domain, ty | libc::SOCK_CLOEXEC, 0) };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor we own.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

/// listen(2).
pub fn listen(fd: BorrowedFd<'_>, backlog: i32) -> io::Result<()> {
    // SAFETY: listen(2) on a live socket.
    ret(unsafe { libc::listen(fd.as_raw_fd(), backlog) })
}

/// accept(2), close-on-exec.
pub fn accept(fd: BorrowedFd<'_>) -> io::Result<OwnedFd> {
    // SAFETY: accept4 with no address to fill.
    let raw = unsafe {
        libc::accept4(
            fd.as_raw_fd(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            libc::SOCK_CLOEXEC,
        )
    };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor from accept, ours.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

/// recv(2) into `buf`: the bytes received.
pub fn recv(fd: RawFd, buf: &mut [u8], flags: i32) -> io::Result<usize> {
    // SAFETY: recv into our own buffer of `buf.len()` bytes.
    let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), flags) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}

/// send(2) of `buf`: the bytes sent (0 when the kernel took none).
pub fn send(fd: RawFd, buf: &[u8], flags: i32) -> io::Result<usize> {
    // SAFETY: send from our own buffer.
    let n = unsafe { libc::send(fd, buf.as_ptr().cast(), buf.len(), flags) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}

/// poll(2) of one descriptor for `events`, up to `timeout_ms`: its `revents`
/// (0 on a timeout).
pub fn poll_one(fd: BorrowedFd<'_>, events: i16, timeout_ms: i32) -> io::Result<i16> {
    let mut p = libc::pollfd {
        fd: fd.as_raw_fd(),
        events,
        revents: 0,
    };
    // SAFETY: poll on one pollfd of ours.
    if unsafe { libc::poll(&mut p, 1, timeout_ms) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(p.revents)
}

/// getsockopt(SO_DOMAIN) and (SO_TYPE).
pub fn socket_domain_type(fd: RawFd) -> Result<(i32, i32)> {
    let get = |opt| {
        getsockopt_int(fd, libc::SOL_SOCKET, opt).map_err(|source| SysError {
            op: "getsockopt",
            what: format!("fd {fd}"),
            source,
        })
    };
    Ok((get(libc::SO_DOMAIN)?, get(libc::SO_TYPE)?))
}
