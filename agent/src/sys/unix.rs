//! UNIX sockets: what only the kernel's socket diagnostics say of one (its peer,
//! a listener's backlog and pending connections), and the copy of its receive
//! queue without consuming it.
//!
//! Kernel contract: `NETLINK_SOCK_DIAG` for `AF_UNIX` (`unix_diag`, Linux ≥ 3.3,
//! `CONFIG_UNIX_DIAG`), asked for one socket by inode in the network namespace of
//! the caller; `SO_PEEK_OFF` on UNIX sockets ≥ 3.4 (datagram and seqpacket too).
//!
//! Why the diagnostics and not `/proc/net/unix`: that file names no peer. CRIU
//! asks the same interface (`UNIX_DIAG_PEER`); this code is our own.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

const NETLINK_SOCK_DIAG: i32 = 4;
const SOCK_DIAG_BY_FAMILY: u16 = 20;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const UDIAG_SHOW_PEER: u32 = 0x4;
const UDIAG_SHOW_RQLEN: u32 = 0x10;
const UNIX_DIAG_PEER: u16 = 2;
const UNIX_DIAG_RQLEN: u16 = 4;
const UNIX_DIAG_SHUTDOWN: u16 = 6;

/// What the diagnostics say of one UNIX socket.
#[derive(Debug, Clone, Copy, Default)]
pub struct Diag {
    /// `TCP_LISTEN` (10), `TCP_ESTABLISHED` (1) or `TCP_CLOSE` (7).
    pub state: u8,
    /// The inode of the socket it is connected to (0: none).
    pub peer: u64,
    /// For a listener: connections not accepted yet, and the backlog; for the
    /// others: bytes queued to read and bytes written not read by the peer.
    pub rqueue: u32,
    pub wqueue: u32,
    /// `sk_shutdown`: 1 receive side shut, 2 send side (by shutdown(2) or the
    /// peer's); always reported.
    pub shutdown: u8,
}

/// The diagnostics of every UNIX socket of our network namespace, by inode: one
/// dump instead of one query per socket (the kernel finds a socket by inode by
/// walking all of them, so a query each is quadratic in a tree of thousands).
pub fn diag_all() -> io::Result<std::collections::HashMap<u64, Diag>> {
    let nl = diag_socket()?;
    let mut req = request(0);
    let flags = (libc::NLM_F_REQUEST | libc::NLM_F_DUMP) as u16;
    req[6..8].copy_from_slice(&flags.to_ne_bytes());
    super::socket::send(nl.as_raw_fd(), &req, 0)?;
    let mut all = std::collections::HashMap::new();
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let n = super::socket::recv(nl.as_raw_fd(), &mut buf, 0)?;
        let mut at = 0;
        while at + 16 <= n {
            let len = u32_at(&buf, at)? as usize;
            let ty = u32_at(&buf, at + 4)? as u16;
            if len < 16 || at + len > n {
                return Err(io::Error::other("a malformed sock_diag dump"));
            }
            if ty == NLMSG_DONE {
                return Ok(all);
            }
            let msg = &buf[at..at + len];
            let ino = u32_at(msg, 20)? as u64;
            all.insert(ino, parse(msg, ino)?);
            at += (len + 3) & !3;
        }
    }
}

/// A `NETLINK_SOCK_DIAG` socket.
fn diag_socket() -> io::Result<OwnedFd> {
    // SAFETY: socket(2) with plain arguments.
    let raw = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
            NETLINK_SOCK_DIAG,
        )
    };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor we own.
    let nl = unsafe { OwnedFd::from_raw_fd(raw) };
    Ok(nl)
}

/// `struct nlmsghdr` (16) + `struct unix_diag_req` (24) for socket `ino` (0: all).
fn request(ino: u64) -> [u8; 40] {
    let mut req = [0u8; 40];
    req[0..4].copy_from_slice(&40u32.to_ne_bytes());
    req[4..6].copy_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
    req[6..8].copy_from_slice(&(libc::NLM_F_REQUEST as u16).to_ne_bytes());
    req[16] = libc::AF_UNIX as u8;
    req[20..24].copy_from_slice(&u32::MAX.to_ne_bytes()); // every state
    req[24..28].copy_from_slice(&(ino as u32).to_ne_bytes());
    req[28..32].copy_from_slice(&(UDIAG_SHOW_PEER | UDIAG_SHOW_RQLEN).to_ne_bytes());
    req[32..40].copy_from_slice(&[0xff; 8]); // INET_DIAG_NOCOOKIE
    req
}

/// The diagnostics of the UNIX socket of inode `ino`, in our network namespace.
pub fn diag(ino: u64) -> io::Result<Diag> {
    let nl = diag_socket()?;
    let req = request(ino);
    super::socket::send(nl.as_raw_fd(), &req, 0)?;
    let mut buf = vec![0u8; 8192];
    let n = super::socket::recv(nl.as_raw_fd(), &mut buf, 0)?;
    parse(&buf[..n], ino)
}

fn u32_at(b: &[u8], at: usize) -> io::Result<u32> {
    b.get(at..at + 4)
        .map(|s| u32::from_ne_bytes(s.try_into().expect("4 bytes")))
        .ok_or_else(|| io::Error::other("a short sock_diag answer"))
}

/// The answer to [`diag`]: one `unix_diag_msg` and its attributes, or an error.
fn parse(b: &[u8], ino: u64) -> io::Result<Diag> {
    let ty = u32_at(b, 4)? as u16;
    if ty == NLMSG_ERROR {
        let errno = -(u32_at(b, 16)? as i32);
        return Err(if errno == libc::ENOENT {
            io::Error::new(
                io::ErrorKind::NotFound,
                format!("UNIX socket {ino} is not in the agent's network namespace"),
            )
        } else {
            io::Error::from_raw_os_error(errno)
        });
    }
    let len = (u32_at(b, 0)? as usize).min(b.len());
    let mut d = Diag {
        state: *b.get(18).ok_or_else(|| io::Error::other("short"))?,
        ..Diag::default()
    };
    // Attributes after nlmsghdr (16) and unix_diag_msg (16).
    let mut at = 32;
    while at + 4 <= len {
        let alen = u16::from_ne_bytes([b[at], b[at + 1]]) as usize;
        let aty = u16::from_ne_bytes([b[at + 2], b[at + 3]]);
        if alen < 4 {
            break;
        }
        match aty {
            UNIX_DIAG_PEER => d.peer = u32_at(b, at + 4)? as u64,
            UNIX_DIAG_RQLEN => {
                d.rqueue = u32_at(b, at + 4)?;
                d.wqueue = u32_at(b, at + 8)?;
            }
            UNIX_DIAG_SHUTDOWN => d.shutdown = *b.get(at + 4).unwrap_or(&0),
            _ => {}
        }
        at += (alen + 3) & !3;
    }
    Ok(d)
}

/// What [`peek_queue`] found queued.
pub enum Queued {
    /// The messages (for a stream: its bytes in chunks), in order.
    Data(Vec<Vec<u8>>),
    /// Descriptors in flight (`SCM_RIGHTS`), at the message of this index: they
    /// cannot be saved. (The peek gave us duplicates of them; they are closed.)
    Rights(usize),
    /// A datagram longer than we can peek, or of zero length.
    Odd(&'static str),
}

/// Copies the receive queue of UNIX socket `fd` (our duplicate) without consuming
/// it: peeks at a moving `SO_PEEK_OFF`, one message (or stream chunk) at a time,
/// then puts the socket's peek offset back as it was.
pub fn peek_queue(fd: BorrowedFd<'_>, stream: bool) -> io::Result<Queued> {
    let raw = fd.as_raw_fd();
    let old = super::socket::getsockopt_int(raw, libc::SOL_SOCKET, libc::SO_PEEK_OFF)?;
    super::socket::setsockopt_int(raw, libc::SOL_SOCKET, libc::SO_PEEK_OFF, 0)?;
    let got = peek_all(raw, stream);
    super::socket::setsockopt_int(raw, libc::SOL_SOCKET, libc::SO_PEEK_OFF, old)?;
    got
}

fn peek_all(raw: RawFd, stream: bool) -> io::Result<Queued> {
    let mut out = Vec::new();
    let mut buf = vec![0u8; 256 << 10];
    loop {
        let (n, flags, rights) = match peek_one(raw, &mut buf) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(Queued::Data(out)),
            other => other?,
        };
        if rights {
            return Ok(Queued::Rights(out.len()));
        }
        if flags & libc::MSG_TRUNC != 0 {
            return Ok(Queued::Odd("a datagram of more than 256 KiB"));
        }
        if n == 0 {
            // A stream at its end (the peer shut it down); a datagram of no bytes,
            // which the peek offset cannot step over.
            return Ok(if stream {
                Queued::Data(out)
            } else {
                Queued::Odd("a datagram of zero bytes")
            });
        }
        out.push(buf[..n].to_vec());
    }
}

/// One recvmsg(MSG_PEEK): the bytes, the message flags, and whether descriptors
/// came with it (closed here).
fn peek_one(raw: RawFd, buf: &mut [u8]) -> io::Result<(usize, i32, bool)> {
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    let mut ctl = [0u64; 512];
    // SAFETY: an all-zero msghdr is valid; its pointers are set below.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = ctl.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&ctl);
    let flags = libc::MSG_PEEK | libc::MSG_DONTWAIT | libc::MSG_CMSG_CLOEXEC;
    // SAFETY: recvmsg writes into our buffer and control area, both live and of
    // the sizes given.
    let n = unsafe { libc::recvmsg(raw, &mut msg, flags) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut rights = false;
    // SAFETY: walking the control messages the kernel wrote, within msg_controllen.
    let mut c = unsafe { libc::CMSG_FIRSTHDR(&msg) };
    while !c.is_null() {
        // SAFETY: `c` points at a cmsghdr inside our control area.
        let h = unsafe { &*c };
        if h.cmsg_level == libc::SOL_SOCKET && h.cmsg_type == libc::SCM_RIGHTS {
            rights = true;
            // SAFETY: CMSG_LEN(0) is the header's size.
            let data_len = h.cmsg_len as usize - unsafe { libc::CMSG_LEN(0) } as usize;
            for i in 0..data_len / 4 {
                // SAFETY: the data of an SCM_RIGHTS message is an array of ints,
                // descriptors now ours; each is closed once.
                unsafe {
                    let p = libc::CMSG_DATA(c).cast::<i32>().add(i);
                    libc::close(p.read_unaligned());
                }
            }
        }
        // SAFETY: the next header within the area, or null.
        c = unsafe { libc::CMSG_NXTHDR(&msg, c) };
    }
    Ok((n as usize, msg.msg_flags, rights))
}
