//! UNIX sockets inside the tree: socketpairs, named (a path) and abstract
//! sockets; stream, datagram and seqpacket; listening, connected, or neither;
//! the data queued for each to read, and `SO_PASSCRED`.
//!
//! The dump reads each socket from our duplicate (`pidfd_getfd`): its type and
//! name (`getsockname`), its peer's inode and a listener's backlog from the
//! kernel's socket diagnostics ([`crate::sys::unix::diag`]; `/proc/net/unix`
//! names no peer), and its receive queue by peeking at a moving `SO_PEEK_OFF`
//! ([`crate::sys::unix::peek_queue`]), which keeps message boundaries and consumes
//! nothing. A UNIX socket has no send queue: what one end wrote and the other has
//! not read is in the reader's receive queue, so that one queue per socket is all
//! the data in flight.
//!
//! Refused, naming the process and descriptor, the tree running on: descriptors
//! in flight (`SCM_RIGHTS`: restoring them would need the whole descriptor table
//! of a process that does not exist), a peer outside the tree or closed, a
//! listener with connections not accepted yet, a datagram socket with messages
//! queued and no peer to write them back from, a name bound at a relative path, a
//! socket shut down (by `shutdown(2)`, or a stream whose peer has shut its side).
//!
//! The restore makes each connected pair again with `socketpair` (both ends of a
//! pair are in the image): the ends are then unnamed, where an accepted end of a
//! named listener had the listener's name (what `getsockname`/`getpeername` return
//! changes; the data does not). We weighed binding and connecting named ends
//! again, through a listener, and left it: an accepted end shares its listener's
//! name and cannot be bound to it. Named sockets that are not in a pair are bound
//! again at their name (a stale socket file left by the killed process is removed,
//! only if it is a socket), listeners listen again, and a datagram socket
//! connected to a named one connects again. Then each socket's queue is written
//! back by its peer, message by message, so each end reads what it would have read.

use std::collections::{HashMap, HashSet};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};

use ckpt_shared::image::{FileKind, OpenFile, UnixName, UnixSock};
use libc::pid_t;
use serde_json::{json, Value};

use super::kind::{Opening as Open, Persist, Seen};
use super::{set_status_flags, FdError, FdTable};
use crate::sys::{socket, unix as sys_unix};

const TCP_ESTABLISHED: u8 = 1;
const TCP_LISTEN: u8 = 10;

pub struct Unix;

/// What the restore made of the image's UNIX sockets, by file index.
#[derive(Default)]
pub struct Opening {
    made: HashMap<usize, OwnedFd>,
}

fn type_name(ty: i32) -> &'static str {
    match ty {
        libc::SOCK_STREAM => "stream",
        libc::SOCK_DGRAM => "dgram",
        _ => "seqpacket",
    }
}

impl Persist for Unix {
    fn dump(&self, t: &mut FdTable, seen: &mut Seen<'_>) -> Option<Result<FileKind, FdError>> {
        let (dup, _) = seen.sock.as_ref()?;
        let ty = match crate::sys::socket_domain_type(dup.as_raw_fd()) {
            Ok((libc::AF_UNIX, ty)) => ty,
            Ok(_) => return None,
            Err(e) => return Some(Err(e.into())),
        };
        Some(capture(seen, &mut t.unix_diag, dup.as_fd(), ty).map(|s| FileKind::Unix(Box::new(s))))
    }

    fn owns(&self, kind: &FileKind) -> bool {
        matches!(kind, FileKind::Unix(_))
    }

    fn prepare(&self, files: &[OpenFile], o: &mut Open<'_>) -> Result<(), FdError> {
        let socks: Vec<(usize, &UnixSock)> = files
            .iter()
            .enumerate()
            .filter_map(|(i, f)| match &f.kind {
                FileKind::Unix(s) => Some((i, &**s)),
                _ => None,
            })
            .collect();
        if socks.is_empty() {
            return Ok(());
        }
        let made = rebuild(&socks).map_err(|e| FdError::Open {
            path: "a UNIX socket".into(),
            source: e,
        })?;
        o.unix.made = made;
        Ok(())
    }

    fn open(&self, i: usize, f: &OpenFile, o: &mut Open<'_>) -> Result<OwnedFd, FdError> {
        let fd = o.unix.made.remove(&i).expect("made in prepare");
        set_status_flags(&fd, f.flags as i32)?;
        Ok(fd)
    }

    fn describe(&self, kind: &FileKind) -> String {
        let FileKind::Unix(s) = kind else {
            unreachable!("owns() chose this kind")
        };
        let bytes: usize = s.queue.iter().map(|m| m.len()).sum();
        let state = match (s.listen, s.peer) {
            (Some(b), _) => format!(" listening (backlog {b})"),
            (None, Some(p)) => format!(" connected to socket:[{p}]"),
            (None, None) => String::new(),
        };
        let queued = match s.ty {
            libc::SOCK_STREAM => format!("{} queued to read", crate::inspect::human(bytes as u64)),
            _ => format!(
                "{} message(s) ({bytes} bytes) queued to read",
                s.queue.len()
            ),
        };
        format!(
            "unix {} socket:[{}]{}{state}, {queued}{}",
            type_name(s.ty),
            s.ino,
            name_text(&s.name)
                .map(|n| format!(" at {n}"))
                .unwrap_or_default(),
            if s.passcred { ", passcred" } else { "" }
        )
    }

    fn json(&self, kind: &FileKind) -> Value {
        let FileKind::Unix(s) = kind else {
            unreachable!("owns() chose this kind")
        };
        json!({
            "kind": "unix", "type": type_name(s.ty), "ino": s.ino,
            "name": name_text(&s.name), "listen": s.listen, "peer": s.peer,
            "queued_messages": s.queue.len(),
            "queued_bytes": s.queue.iter().map(|m| m.len()).sum::<usize>(),
            "passcred": s.passcred, "sndbuf": s.sndbuf, "rcvbuf": s.rcvbuf,
        })
    }
}

/// The diagnostics of socket `ino`: from the dump of every socket (read at the
/// first call), or asked alone for a socket the dump does not hold.
fn diag_of(
    diags: &mut Option<HashMap<u64, sys_unix::Diag>>,
    ino: u64,
) -> std::io::Result<sys_unix::Diag> {
    if diags.is_none() {
        *diags = Some(sys_unix::diag_all().unwrap_or_default());
    }
    match diags.as_ref().and_then(|m| m.get(&ino)) {
        Some(d) => Ok(*d),
        None => sys_unix::diag(ino),
    }
}

fn name_text(n: &Option<UnixName>) -> Option<String> {
    match n {
        Some(UnixName::Path(p)) => Some(p.clone()),
        Some(UnixName::Abstract(b)) => Some(format!("@{}", String::from_utf8_lossy(b))),
        None => None,
    }
}

/// The UNIX socket `fd` (our duplicate of `seen`), of type `ty`.
fn capture(
    seen: &Seen<'_>,
    diags: &mut Option<HashMap<u64, sys_unix::Diag>>,
    fd: BorrowedFd<'_>,
    ty: i32,
) -> Result<UnixSock, FdError> {
    let err = |what: String| seen.unsupported(format!("a UNIX socket ({what})"));
    if ![libc::SOCK_STREAM, libc::SOCK_DGRAM, libc::SOCK_SEQPACKET].contains(&ty) {
        return Err(err(format!("of socket type {ty}")));
    }
    let ino = seen.meta.ino;
    let d = diag_of(diags, ino).map_err(|e| err(format!("its peer cannot be read: {e}")))?;
    let name = name_of(fd).map_err(err)?;
    let listen = (d.state == TCP_LISTEN).then_some(d.wqueue);
    if listen.is_some() && d.rqueue > 0 {
        return Err(err(format!(
            "listening, with {} connection(s) not yet accepted; save again once the \
             application has accepted them",
            d.rqueue
        )));
    }
    if d.shutdown != 0 {
        return Err(err(format!(
            "shut down {} (by shutdown(2), or its peer closed): a shutdown is not saved",
            ["", "for reading", "for writing", "both ways"][(d.shutdown & 3) as usize]
        )));
    }
    if ty != libc::SOCK_DGRAM && d.state == TCP_ESTABLISHED && d.peer == 0 {
        return Err(err("connected, and its peer has closed".into()));
    }
    let queue = if listen.is_some() {
        Vec::new()
    } else {
        queue_of(fd, ty == libc::SOCK_STREAM).map_err(err)?
    };
    if !queue.is_empty() && d.peer == 0 {
        return Err(err(format!(
            "{} message(s) queued to read and no peer to write them back from",
            queue.len()
        )));
    }
    let get = |opt, what| {
        socket::getsockopt_int(fd.as_raw_fd(), libc::SOL_SOCKET, opt)
            .map_err(|e| err(format!("getsockopt {what}: {e}")))
    };
    Ok(UnixSock {
        ino,
        ty,
        name,
        listen,
        peer: (d.peer != 0).then_some(d.peer),
        queue: queue.into_iter().map(serde_bytes::ByteBuf::from).collect(),
        passcred: get(libc::SO_PASSCRED, "SO_PASSCRED")? != 0,
        sndbuf: get(libc::SO_SNDBUF, "SO_SNDBUF")? as u32,
        rcvbuf: get(libc::SO_RCVBUF, "SO_RCVBUF")? as u32,
    })
}

/// The receive queue of `fd`, or why it cannot be kept.
fn queue_of(fd: BorrowedFd<'_>, stream: bool) -> Result<Vec<Vec<u8>>, String> {
    match sys_unix::peek_queue(fd, stream).map_err(|e| format!("its queue: {e}"))? {
        sys_unix::Queued::Data(q) => Ok(q),
        sys_unix::Queued::Rights(at) => Err(format!(
            "with descriptors in flight (SCM_RIGHTS) in queued message {}: passing \
             descriptors is not saved; save again once they are received",
            at + 1
        )),
        sys_unix::Queued::Odd(what) => Err(format!("{what} queued")),
    }
}

/// The name `fd` is bound to.
fn name_of(fd: BorrowedFd<'_>) -> Result<Option<UnixName>, String> {
    use nix::sys::socket::{getsockname, UnixAddr};
    let a: UnixAddr = getsockname(fd.as_raw_fd()).map_err(|e| format!("getsockname: {e}"))?;
    if let Some(b) = a.as_abstract() {
        return Ok(Some(UnixName::Abstract(b.to_vec())));
    }
    let Some(p) = a.path() else {
        return Ok(None);
    };
    let s = p.to_string_lossy().into_owned();
    if !s.starts_with('/') {
        return Err(format!(
            "bound at the relative path {s:?}, which cannot be found again"
        ));
    }
    Ok(Some(UnixName::Path(s)))
}

/// After every process: each peer is in the tree. `reps` gives each file's
/// (pid, fd) for the message.
pub fn check_peers(files: &[OpenFile], reps: &[(pid_t, RawFd)]) -> Result<(), FdError> {
    let inos: HashSet<u64> = files
        .iter()
        .filter_map(|f| match &f.kind {
            FileKind::Unix(s) => Some(s.ino),
            _ => None,
        })
        .collect();
    for (f, &(pid, fd)) in files.iter().zip(reps) {
        if let FileKind::Unix(s) = &f.kind {
            if let Some(p) = s.peer.filter(|p| !inos.contains(p)) {
                return Err(FdError::Unsupported {
                    pid,
                    fd,
                    what: format!(
                        "a UNIX socket connected to socket:[{p}], which no process of \
                         the tree holds (a peer outside the tree is not saved)"
                    ),
                });
            }
        }
    }
    Ok(())
}

type Socks<'a> = [(usize, &'a UnixSock)];

/// Every UNIX socket of the image made again, by file index, with its queue.
fn rebuild(socks: &Socks<'_>) -> std::io::Result<HashMap<usize, OwnedFd>> {
    let by_ino: HashMap<u64, (usize, &UnixSock)> =
        socks.iter().map(|&(i, s)| (s.ino, (i, s))).collect();
    let peer_of = |s: &UnixSock| s.peer.and_then(|p| by_ino.get(&p).copied());
    let mutual = |s: &UnixSock| peer_of(s).is_some_and(|(_, p)| p.peer == Some(s.ino));
    let mut made: HashMap<usize, OwnedFd> = HashMap::new();
    for &(i, s) in socks {
        if made.contains_key(&i) {
            continue;
        }
        match peer_of(s).filter(|_| mutual(s)) {
            Some((j, _)) if j != i => {
                let (a, b) = pair(s.ty)?;
                made.insert(i, a);
                made.insert(j, b);
            }
            _ => {
                made.insert(i, lone(s)?);
            }
        }
    }
    // A datagram socket connected to a named one that is not connected back.
    for &(i, s) in socks {
        if let Some((_, p)) = peer_of(s).filter(|_| !mutual(s)) {
            let name = p.name.as_ref().ok_or_else(|| {
                std::io::Error::other(format!("socket:[{}] is connected to an unnamed one", s.ino))
            })?;
            nix::sys::socket::connect(made[&i].as_raw_fd(), &addr(name)?)
                .map_err(|e| ctx(e.into(), "connect of a UNIX socket"))?;
        }
    }
    for &(i, s) in socks {
        if let Some((j, _)) = peer_of(s) {
            let to = (!mutual(s)).then_some(s.name.as_ref()).flatten();
            refill(made[&j].as_fd(), to, s)?;
        }
        finish(made[&i].as_fd(), s)?;
    }
    Ok(made)
}

fn ctx(e: std::io::Error, what: &str) -> std::io::Error {
    std::io::Error::new(e.kind(), format!("{what}: {e}"))
}

fn sock_type(ty: i32) -> nix::sys::socket::SockType {
    use nix::sys::socket::SockType;
    match ty {
        libc::SOCK_STREAM => SockType::Stream,
        libc::SOCK_DGRAM => SockType::Datagram,
        _ => SockType::SeqPacket,
    }
}

fn pair(ty: i32) -> std::io::Result<(OwnedFd, OwnedFd)> {
    use nix::sys::socket::{socketpair, AddressFamily, SockFlag};
    socketpair(
        AddressFamily::Unix,
        sock_type(ty),
        None,
        SockFlag::SOCK_CLOEXEC,
    )
    .map_err(|e| ctx(e.into(), "socketpair"))
}

fn addr(name: &UnixName) -> std::io::Result<nix::sys::socket::UnixAddr> {
    use nix::sys::socket::UnixAddr;
    match name {
        UnixName::Path(p) => UnixAddr::new(p.as_str()),
        UnixName::Abstract(b) => UnixAddr::new_abstract(b),
    }
    .map_err(|e| ctx(e.into(), "a UNIX socket name"))
}

/// A socket not in a pair: bound at its name, listening if it was.
fn lone(s: &UnixSock) -> std::io::Result<OwnedFd> {
    let fd = socket::socket(libc::AF_UNIX, s.ty)?;
    if let Some(name) = &s.name {
        if let UnixName::Path(p) = name {
            remove_stale(p)?;
        }
        nix::sys::socket::bind(fd.as_raw_fd(), &addr(name)?).map_err(|e| {
            ctx(
                e.into(),
                &format!(
                    "bind of a UNIX socket at {}",
                    name_text(&s.name).unwrap_or_default()
                ),
            )
        })?;
    }
    if let Some(backlog) = s.listen {
        socket::listen(fd.as_fd(), backlog.max(1) as i32).map_err(|e| ctx(e, "listen"))?;
    }
    Ok(fd)
}

/// Removes the socket file left at `path` by the killed process: only a socket.
fn remove_stale(path: &str) -> std::io::Result<()> {
    use std::os::unix::fs::FileTypeExt;
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => std::fs::remove_file(path),
        Ok(_) => Err(std::io::Error::new(
            std::io::ErrorKind::AlreadyExists,
            format!("{path} exists and is not a socket: not removed, the socket cannot be bound"),
        )),
        Err(_) => Ok(()),
    }
}

/// The queue of `s` written again by its peer `from` (to `s`'s name when the peer
/// is not connected to it), with room enough in the peer's send buffer.
fn refill(from: BorrowedFd<'_>, to: Option<&UnixName>, s: &UnixSock) -> std::io::Result<()> {
    if s.queue.is_empty() {
        return Ok(());
    }
    let bytes: usize = s.queue.iter().map(|m| m.len() + 512).sum();
    let raw = from.as_raw_fd();
    let room = (bytes * 2 + (64 << 10)).min(i32::MAX as usize / 2) as i32;
    let old = socket::getsockopt_int(raw, libc::SOL_SOCKET, libc::SO_SNDBUF)?;
    socket::setsockopt_int(raw, libc::SOL_SOCKET, libc::SO_SNDBUFFORCE, room.max(old))?;
    let to = to.map(addr).transpose()?;
    for m in &s.queue {
        let flags =
            nix::sys::socket::MsgFlags::MSG_DONTWAIT | nix::sys::socket::MsgFlags::MSG_NOSIGNAL;
        let n = match &to {
            Some(a) => nix::sys::socket::sendto(raw, m, a, flags),
            None => nix::sys::socket::send(raw, m, flags),
        }
        .map_err(|e| {
            ctx(
                e.into(),
                &format!("writing back the queue of socket:[{}]", s.ino),
            )
        })?;
        if n != m.len() {
            return Err(std::io::Error::other(format!(
                "writing back the queue of socket:[{}]: {n} of {} bytes taken",
                s.ino,
                m.len()
            )));
        }
    }
    socket::setsockopt_int(raw, libc::SOL_SOCKET, libc::SO_SNDBUFFORCE, old / 2)
}

/// `SO_PASSCRED` and the buffers of `s` on `fd`.
fn finish(fd: BorrowedFd<'_>, s: &UnixSock) -> std::io::Result<()> {
    let raw = fd.as_raw_fd();
    let sol = libc::SOL_SOCKET;
    socket::setsockopt_int(raw, sol, libc::SO_PASSCRED, s.passcred as i32)
        .map_err(|e| ctx(e, "SO_PASSCRED"))?;
    socket::setsockopt_int(raw, sol, libc::SO_SNDBUFFORCE, (s.sndbuf / 2) as i32)
        .map_err(|e| ctx(e, "SO_SNDBUFFORCE"))?;
    socket::setsockopt_int(raw, sol, libc::SO_RCVBUFFORCE, (s.rcvbuf / 2) as i32)
        .map_err(|e| ctx(e, "SO_RCVBUFFORCE"))
}
