//! The state of a TCP connection, read from outside with `TCP_REPAIR`
//! (../shared/DESIGN.md, "Consistent network cut").
//!
//! The agent holds a duplicate of the socket (`pidfd_getfd`) and puts it in repair
//! mode, in which the kernel lets it read what no application may: the sequence
//! numbers of both queues, the queues themselves (the send queue includes bytes
//! sent but not yet acknowledged, and bytes not sent at all), the window, and the
//! options negotiated at the handshake. Repair mode is left again with no window
//! probe, so reading changes nothing the peer can see.
//!
//! Read under the job's network lock ([`crate::netlock`]), with every rank frozen:
//! then nothing moves between the queues while they are read, and for each byte in
//! flight the cut holds it in the sender's write queue, in the receiver's read
//! queue, or (acknowledged after the lock) in both, and the sequence numbers say
//! which.
//!
//! [`rebuild`] makes the end again, in the restorer, on a new socket and possibly a
//! new 4-tuple: in repair mode it takes the old sequence numbers, options, window,
//! timestamp clock and receive queue, and is connected without a handshake. Its
//! send queue is written after repair mode is left, as ordinary data starting at
//! the first unacknowledged byte: so it is sent at once instead of waiting for a
//! retransmission timer, and a peer that had already received some of it drops the
//! repeat as TCP always does.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};

use ckpt_shared::image::{FileKind, OpenFile};
use serde_json::{json, Value};

use super::kind::{Persist, Seen};
use super::{set_status_flags, trimmed, FdError, FdTable, Moves, TcpDup};
use crate::sys::socket;

pub(super) const TCP_REPAIR_ON: libc::c_int = 1;
const TCP_REPAIR_OFF_NO_WP: libc::c_int = -1;
const TCP_RECV_QUEUE: libc::c_int = 1;
const TCP_SEND_QUEUE: libc::c_int = 2;
const TCP_TIMESTAMP: libc::c_int = 24;
const TCPI_OPT_TIMESTAMPS: u8 = 1;
const TCPI_OPT_SACK: u8 = 2;
const TCPI_OPT_WSCALE: u8 = 4;
/// `TCP_ESTABLISHED` in `tcp_info.tcpi_state`.
pub const TCP_ESTABLISHED: u8 = 1;

pub use ckpt_shared::image::{RepairWindow, TcpConn};

#[derive(Debug, thiserror::Error)]
pub enum TcpError {
    #[error("{what}: {source}")]
    Sys {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("the connection is in TCP state {state}, not established: only established connections are captured")]
    NotEstablished { state: u8 },
    #[error("a queue changed while it was read (is the network lock in place?)")]
    Moving,
}

/// `what` failed with `source`.
pub(super) fn sys(what: &'static str) -> impl FnOnce(std::io::Error) -> TcpError {
    move |source| TcpError::Sys { what, source }
}

pub(super) fn setopt(
    fd: i32,
    level: i32,
    opt: i32,
    val: libc::c_int,
    what: &'static str,
) -> Result<(), TcpError> {
    socket::setsockopt_int(fd, level, opt, val).map_err(sys(what))
}

/// setsockopt with an array of plain values (`struct tcp_repair_opt[]`, one
/// `struct tcp_repair_window`, one int).
pub(super) fn setopt_slice<T: socket::Plain>(
    fd: i32,
    level: i32,
    opt: i32,
    val: &[T],
    what: &'static str,
) -> Result<(), TcpError> {
    socket::setsockopt(fd, level, opt, val).map_err(sys(what))
}

pub(super) fn getopt<T: socket::Plain>(
    fd: i32,
    level: i32,
    opt: i32,
    what: &'static str,
) -> Result<T, TcpError> {
    socket::getsockopt(fd, level, opt).map_err(sys(what))
}

fn addr(fd: i32, peer: bool) -> Result<SocketAddr, TcpError> {
    use nix::sys::socket::{getpeername, getsockname, SockaddrStorage};
    let what = if peer { "getpeername" } else { "getsockname" };
    let s: SockaddrStorage = if peer {
        getpeername(fd)
    } else {
        getsockname(fd)
    }
    .map_err(|e| TcpError::Sys {
        what,
        source: e.into(),
    })?;
    if let Some(v4) = s.as_sockaddr_in() {
        Ok(SocketAddr::V4((*v4).into()))
    } else if let Some(v6) = s.as_sockaddr_in6() {
        Ok(SocketAddr::V6((*v6).into()))
    } else {
        Err(TcpError::Sys {
            what,
            source: std::io::Error::other("not an IP socket"),
        })
    }
}

/// Copies queue `queue` (selected in repair mode) without consuming it.
fn peek_queue(fd: i32, queue: libc::c_int, len: usize) -> Result<Vec<u8>, TcpError> {
    setopt(
        fd,
        libc::IPPROTO_TCP,
        libc::TCP_REPAIR_QUEUE,
        queue,
        "TCP_REPAIR_QUEUE",
    )?;
    let mut buf = vec![0u8; len];
    if len == 0 {
        return Ok(buf);
    }
    let n = socket::recv(fd, &mut buf, libc::MSG_PEEK | libc::MSG_DONTWAIT)
        .map_err(sys("recv(MSG_PEEK) of a repair queue"))?;
    if n != len {
        return Err(TcpError::Moving);
    }
    Ok(buf)
}

/// Reads the state of the established connection `fd` (a duplicate the agent
/// holds), leaving it as it was.
pub fn capture(fd: BorrowedFd<'_>) -> Result<TcpConn, TcpError> {
    capture_on(fd, None)
}

/// [`capture`], with the 4-tuple when it is already known (the dump reads it once,
/// for the lock, and does not ask each socket again under the freeze).
pub fn capture_on(
    fd: BorrowedFd<'_>,
    known: Option<crate::netlock::Conn>,
) -> Result<TcpConn, TcpError> {
    let borrowed = fd;
    let fd = fd.as_raw_fd();
    let info: libc::tcp_info = getopt_info(fd)?;
    if info.tcpi_state != TCP_ESTABLISHED {
        return Err(TcpError::NotEstablished {
            state: info.tcpi_state,
        });
    }
    let (local, remote) = match known {
        Some(c) => (c.local, c.remote),
        None => (addr(fd, false)?, addr(fd, true)?),
    };
    // Sizes before repair mode: the ioctls answer for a normal socket.
    let outq = socket::ioctl_outq(fd).map_err(sys("SIOCOUTQ"))?;
    let unsent = socket::ioctl_outq_nsd(fd).map_err(sys("SIOCOUTQNSD"))?;
    let inq = socket::ioctl_inq(fd).map_err(sys("SIOCINQ"))?;
    let mss: libc::c_int = getopt(fd, libc::IPPROTO_TCP, libc::TCP_MAXSEG, "TCP_MAXSEG")?;
    let sndbuf: libc::c_int = getopt(fd, libc::SOL_SOCKET, libc::SO_SNDBUF, "SO_SNDBUF")?;
    let rcvbuf: libc::c_int = getopt(fd, libc::SOL_SOCKET, libc::SO_RCVBUF, "SO_RCVBUF")?;
    let opts = super::sockopt::capture(borrowed, false).map_err(sys("the socket options"))?;
    setopt(
        fd,
        libc::IPPROTO_TCP,
        libc::TCP_REPAIR,
        TCP_REPAIR_ON,
        "TCP_REPAIR on (needs CAP_NET_ADMIN)",
    )?;
    let sizes = Sizes {
        outq,
        unsent,
        inq,
        mss,
        sndbuf,
        rcvbuf,
        opts,
    };
    let got = read_repaired(fd, &info, (local, remote), &sizes);
    // Whatever happened, leave repair mode: the peer sees nothing of the reading.
    leave_repair_unseen(fd)?;
    got
}

/// What a socket tells of its queues and buffers outside repair mode.
struct Sizes {
    outq: u32,
    unsent: u32,
    inq: u32,
    mss: libc::c_int,
    sndbuf: libc::c_int,
    rcvbuf: libc::c_int,
    opts: ckpt_shared::image::SockOpts,
}

/// The state of connection `fd`, in repair mode, with `info` and `sizes` read
/// before it.
fn read_repaired(
    fd: i32,
    info: &libc::tcp_info,
    (local, remote): (SocketAddr, SocketAddr),
    sizes: &Sizes,
) -> Result<TcpConn, TcpError> {
    let send_queue = peek_queue(fd, TCP_SEND_QUEUE, sizes.outq as usize)?;
    let send_seq: u32 = getopt(
        fd,
        libc::IPPROTO_TCP,
        libc::TCP_QUEUE_SEQ,
        "TCP_QUEUE_SEQ (send)",
    )?;
    let recv_queue = peek_queue(fd, TCP_RECV_QUEUE, sizes.inq as usize)?;
    let recv_seq: u32 = getopt(
        fd,
        libc::IPPROTO_TCP,
        libc::TCP_QUEUE_SEQ,
        "TCP_QUEUE_SEQ (recv)",
    )?;
    let window: RepairWindow = getopt(
        fd,
        libc::IPPROTO_TCP,
        libc::TCP_REPAIR_WINDOW,
        "TCP_REPAIR_WINDOW",
    )?;
    let timestamp: u32 = getopt(fd, libc::IPPROTO_TCP, TCP_TIMESTAMP, "TCP_TIMESTAMP")?;
    let wscale = info.tcpi_options & TCPI_OPT_WSCALE != 0;
    Ok(TcpConn {
        local,
        remote,
        send_seq,
        recv_seq,
        send_queue,
        unsent: sizes.unsent,
        recv_queue,
        mss: sizes.mss as u32,
        snd_wscale: wscale.then_some(info.tcpi_snd_rcv_wscale & 0xf),
        rcv_wscale: wscale.then_some(info.tcpi_snd_rcv_wscale >> 4),
        sack: info.tcpi_options & TCPI_OPT_SACK != 0,
        timestamps: info.tcpi_options & TCPI_OPT_TIMESTAMPS != 0,
        timestamp,
        window,
        sndbuf: sizes.sndbuf as u32,
        rcvbuf: sizes.rcvbuf as u32,
        opts: sizes.opts,
    })
}

/// Takes a socket out of repair mode, unseen by the peer (a socket left in it by
/// an agent that died: see [`crate::rescue`]).
pub fn leave_repair(fd: BorrowedFd<'_>) -> Result<(), TcpError> {
    leave_repair_unseen(fd.as_raw_fd())
}

/// Leaves repair mode without a window probe, no queue selected.
fn leave_repair_unseen(fd: i32) -> Result<(), TcpError> {
    let _ = setopt(
        fd,
        libc::IPPROTO_TCP,
        libc::TCP_REPAIR_QUEUE,
        0,
        "TCP_REPAIR_QUEUE",
    );
    setopt(
        fd,
        libc::IPPROTO_TCP,
        libc::TCP_REPAIR,
        TCP_REPAIR_OFF_NO_WP,
        "TCP_REPAIR off",
    )
}

const TCP_REPAIR_OFF: libc::c_int = 0;
const TCP_NO_QUEUE: libc::c_int = 0;
const TCPOPT_MAXSEG: u32 = 2;
const TCPOPT_WINDOW: u32 = 3;
const TCPOPT_SACK_PERM: u32 = 4;
const TCPOPT_TIMESTAMP: u32 = 8;

/// An end rebuilt and still in repair mode: it sends nothing, and a peer's packets
/// get no reset from it. [`finish`](Rebuilt::finish) it only once both ends of the
/// connection exist (the job's RELEASE): an end that left repair mode while its peer
/// did not exist yet would be reset by the peer's host. Dropped unfinished, it
/// closes silently.
#[derive(Debug)]
pub struct Rebuilt {
    fd: std::os::fd::OwnedFd,
    send_queue: Vec<u8>,
    opts: ckpt_shared::image::SockOpts,
}

impl Rebuilt {
    pub fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// Leaves repair mode (with a window probe) and sends, at once, what the peer
    /// may still lack. The socket is blocking and close-on-exec.
    pub fn finish(self) -> Result<std::os::fd::OwnedFd, TcpError> {
        let fd = self.fd.as_raw_fd();
        setopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_REPAIR,
            TCP_REPAIR_OFF,
            "TCP_REPAIR off",
        )?;
        send_all(fd, &self.send_queue, "restoring the send queue")?;
        super::sockopt::after(self.fd.as_fd(), &self.opts).map_err(sys("the socket options"))?;
        Ok(self.fd)
    }
}

/// Makes the end `c` again on a new socket bound to `local` and connected to
/// `remote` (the old addresses, or new ones given to both ends of the pair), with no
/// handshake, and leaves it in repair mode (see [`Rebuilt`]). Needs CAP_NET_ADMIN.
pub fn rebuild(c: &TcpConn, local: SocketAddr, remote: SocketAddr) -> Result<Rebuilt, TcpError> {
    use nix::sys::socket::{bind, connect, SockaddrStorage};
    let owned = tcp_socket(local)?;
    let fd = owned.as_raw_fd();
    let tcp = libc::IPPROTO_TCP;
    setopt(
        fd,
        tcp,
        libc::TCP_REPAIR,
        TCP_REPAIR_ON,
        "TCP_REPAIR on (needs CAP_NET_ADMIN)",
    )?;
    setopt(fd, libc::SOL_SOCKET, libc::SO_REUSEADDR, 1, "SO_REUSEADDR")?;
    super::sockopt::before_bind(owned.as_fd(), &c.opts).map_err(sys("the socket options"))?;
    set_buffers(fd, c)?;
    set_sequences(fd, c)?;
    let sa = |a: SocketAddr| SockaddrStorage::from(a);
    bind(fd, &sa(local)).map_err(|e| TcpError::Sys {
        what: "bind of a rebuilt connection",
        source: e.into(),
    })?;
    connect(fd, &sa(remote)).map_err(|e| TcpError::Sys {
        what: "connect in repair mode",
        source: e.into(),
    })?;
    set_options(fd, c)?;
    fill_receive_side(fd, c)?;
    Ok(Rebuilt {
        fd: owned,
        send_queue: c.send_queue.clone(),
        opts: c.opts,
    })
}

/// The buffers of the rebuilt end `c`.
fn set_buffers(fd: i32, c: &TcpConn) -> Result<(), TcpError> {
    // The buffers as they were (the kernel doubles what is asked), and at least
    // room for the queues: the receive window was offered against that space.
    for (opt, had, queue, what) in [
        (
            libc::SO_SNDBUFFORCE,
            c.sndbuf,
            c.send_queue.len(),
            "SO_SNDBUFFORCE",
        ),
        (
            libc::SO_RCVBUFFORCE,
            c.rcvbuf,
            c.recv_queue.len(),
            "SO_RCVBUFFORCE",
        ),
    ] {
        let want = ((had / 2) as usize).max(queue * 2).min(i32::MAX as usize) as i32;
        setopt(fd, libc::SOL_SOCKET, opt, want, what)?;
    }
    Ok(())
}

/// Where the send and receive queues of the rebuilt end `c` start.
fn set_sequences(fd: i32, c: &TcpConn) -> Result<(), TcpError> {
    let tcp = libc::IPPROTO_TCP;
    setopt(
        fd,
        tcp,
        libc::TCP_REPAIR_QUEUE,
        TCP_SEND_QUEUE,
        "TCP_REPAIR_QUEUE",
    )?;
    setopt(
        fd,
        tcp,
        libc::TCP_QUEUE_SEQ,
        c.send_una() as i32,
        "TCP_QUEUE_SEQ (send)",
    )?;
    setopt(
        fd,
        tcp,
        libc::TCP_REPAIR_QUEUE,
        TCP_RECV_QUEUE,
        "TCP_REPAIR_QUEUE",
    )?;
    let rcv_start = c.recv_seq.wrapping_sub(c.recv_queue.len() as u32);
    setopt(
        fd,
        tcp,
        libc::TCP_QUEUE_SEQ,
        rcv_start as i32,
        "TCP_QUEUE_SEQ (recv)",
    )
}

/// The options negotiated at the handshake of `c`, and its timestamp clock.
fn set_options(fd: i32, c: &TcpConn) -> Result<(), TcpError> {
    let tcp = libc::IPPROTO_TCP;
    let mut opts: Vec<[u32; 2]> = vec![[TCPOPT_MAXSEG, c.mss]];
    if let (Some(s), Some(r)) = (c.snd_wscale, c.rcv_wscale) {
        opts.push([TCPOPT_WINDOW, s as u32 | (r as u32) << 16]);
    }
    if c.sack {
        opts.push([TCPOPT_SACK_PERM, 0]);
    }
    if c.timestamps {
        opts.push([TCPOPT_TIMESTAMP, 0]);
    }
    // struct tcp_repair_opt { u32 opt_code; u32 opt_val; }, one per option.
    setopt_slice(
        fd,
        tcp,
        libc::TCP_REPAIR_OPTIONS,
        &opts,
        "TCP_REPAIR_OPTIONS",
    )?;
    if c.timestamps {
        setopt(fd, tcp, TCP_TIMESTAMP, c.timestamp as i32, "TCP_TIMESTAMP")?;
    }
    Ok(())
}

/// The receive queue of `c` and the window it was offered against.
fn fill_receive_side(fd: i32, c: &TcpConn) -> Result<(), TcpError> {
    let tcp = libc::IPPROTO_TCP;
    // The receive queue: data the application has not read yet.
    setopt(
        fd,
        tcp,
        libc::TCP_REPAIR_QUEUE,
        TCP_RECV_QUEUE,
        "TCP_REPAIR_QUEUE",
    )?;
    send_all(fd, &c.recv_queue, "restoring the receive queue")?;
    setopt(
        fd,
        tcp,
        libc::TCP_REPAIR_QUEUE,
        TCP_NO_QUEUE,
        "TCP_REPAIR_QUEUE",
    )?;
    setopt_slice(
        fd,
        tcp,
        libc::TCP_REPAIR_WINDOW,
        std::slice::from_ref(&c.window),
        "TCP_REPAIR_WINDOW",
    )
}

/// A new blocking, close-on-exec TCP socket of `addr`'s family.
pub(super) fn tcp_socket(addr: SocketAddr) -> Result<std::os::fd::OwnedFd, TcpError> {
    let domain = if addr.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    socket::socket(domain, libc::SOCK_STREAM).map_err(sys("socket"))
}

fn send_all(fd: i32, mut data: &[u8], what: &'static str) -> Result<(), TcpError> {
    while !data.is_empty() {
        let n = socket::send(fd, data, libc::MSG_NOSIGNAL).map_err(sys(what))?;
        if n == 0 {
            return Err(sys(what)(std::io::ErrorKind::WriteZero.into()));
        }
        data = &data[n..];
    }
    Ok(())
}

pub use super::tcp_reset::{reset, silence};

/// What a socket of a frozen tree is, as far as TCP is concerned.
pub enum Kind {
    Established,
    /// `pending`: connections the kernel completed that the application has not
    /// accepted yet.
    Listen {
        backlog: u32,
        pending: u32,
    },
    /// Another TCP state (SYN_SENT, FIN_WAIT, ...): not captured.
    Other(u8),
    NotTcp,
}

/// Classifies the socket `fd` (a duplicate the agent holds).
pub fn kind(fd: BorrowedFd<'_>) -> Kind {
    let raw = fd.as_raw_fd();
    // TCP_INFO answers only for a TCP socket (IPv4 or IPv6).
    match getopt_info(raw) {
        Ok(i) if i.tcpi_state == TCP_ESTABLISHED => Kind::Established,
        // For a listener the kernel reports its backlog in tcpi_sacked and the
        // length of its accept queue in tcpi_unacked.
        Ok(i) if i.tcpi_state == TCP_LISTEN => Kind::Listen {
            backlog: i.tcpi_sacked,
            pending: i.tcpi_unacked,
        },
        Ok(i) => Kind::Other(i.tcpi_state),
        Err(_) => Kind::NotTcp,
    }
}

/// `TCP_LISTEN` in `tcp_info.tcpi_state`.
pub const TCP_LISTEN: u8 = 10;

/// The bound address of a socket.
pub fn local_addr(fd: BorrowedFd<'_>) -> Result<SocketAddr, TcpError> {
    addr(fd.as_raw_fd(), false)
}

/// The peer's address of a connected socket.
pub fn remote_addr(fd: BorrowedFd<'_>) -> Result<SocketAddr, TcpError> {
    addr(fd.as_raw_fd(), true)
}

/// Makes a listening socket again: bound to `addr` now, listening only on
/// [`Listener::listen`], once the connections accepted from it (which share its
/// port) are bound too.
pub struct Listener {
    fd: std::os::fd::OwnedFd,
    backlog: u32,
    opts: ckpt_shared::image::SockOpts,
}

impl Listener {
    pub fn bind(
        addr: SocketAddr,
        backlog: u32,
        opts: &ckpt_shared::image::SockOpts,
    ) -> Result<Listener, TcpError> {
        let fd = tcp_socket(addr)?;
        let raw = fd.as_raw_fd();
        setopt(raw, libc::SOL_SOCKET, libc::SO_REUSEADDR, 1, "SO_REUSEADDR")?;
        super::sockopt::before_bind(fd.as_fd(), opts).map_err(sys("the socket options"))?;
        nix::sys::socket::bind(raw, &nix::sys::socket::SockaddrStorage::from(addr)).map_err(
            |e| TcpError::Sys {
                what: "bind of a listening socket (is its port taken on this node?)",
                source: e.into(),
            },
        )?;
        Ok(Listener {
            fd,
            backlog,
            opts: *opts,
        })
    }

    pub fn listen(self) -> Result<std::os::fd::OwnedFd, TcpError> {
        socket::listen(self.fd.as_fd(), self.backlog.max(1) as i32).map_err(sys("listen"))?;
        super::sockopt::after(self.fd.as_fd(), &self.opts).map_err(sys("the socket options"))?;
        Ok(self.fd)
    }

    pub fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

fn getopt_info(fd: i32) -> Result<libc::tcp_info, TcpError> {
    socket::tcp_info(fd).map_err(sys("TCP_INFO"))
}

/// TCP in the descriptor table: established connections (captured later, under
/// the network lock, by [`FdTable::capture_tcp`]) and listening sockets.
pub struct Tcp;

/// What the restore made of the image's TCP sockets before opening descriptions.
#[derive(Default)]
pub struct Opening {
    /// Connections by file index: our duplicate of each.
    rebuilt: HashMap<usize, OwnedFd>,
    /// Listening sockets by file index.
    listening: HashMap<usize, OwnedFd>,
    /// The rebuilt connections, still in repair mode (see [`super::Opened::tcp`]).
    pub held: Vec<Rebuilt>,
}

fn open_err(e: TcpError) -> FdError {
    FdError::Open {
        path: "a TCP socket".into(),
        source: std::io::Error::other(e.to_string()),
    }
}

impl Persist for Tcp {
    fn dump(&self, t: &mut FdTable, seen: &mut Seen<'_>) -> Option<Result<FileKind, FdError>> {
        Some(match seen.socket_kind()? {
            Kind::NotTcp => return None,
            // Read under the network lock the dump put in place, by
            // capture_tcp, once every process's table is known.
            Kind::Established => {
                let (dup, _) = seen.sock.take().expect("a socket");
                t.tcp.push(TcpDup {
                    file: t.files.len() as u32,
                    pid: seen.pid,
                    fd: seen.fd,
                    dup,
                    tuple: None,
                });
                Ok(FileKind::Inherited {
                    what: "a TCP connection not read yet".into(),
                })
            }
            // Those connections live in no descriptor: they cannot be read, and
            // dropping them would reset clients that believe they are connected.
            &Kind::Listen { pending, .. } if pending > 0 => Err(seen.unsupported(format!(
                "a listening TCP socket with {pending} connection(s) not yet accepted; \
                 save again once the application has accepted them"
            ))),
            &Kind::Listen { backlog, .. } => {
                let (dup, _) = seen.sock.as_ref().expect("a socket");
                let opts = super::sockopt::capture(dup.as_fd(), true).map_err(sys("options"));
                local_addr(dup.as_fd())
                    .and_then(|addr| Ok((addr, opts?)))
                    .map_err(|e| seen.unsupported(format!("a listening socket: {e}")))
                    .map(|(addr, opts)| FileKind::TcpListen {
                        addr,
                        backlog,
                        opts,
                    })
            }
            Kind::Other(state) => Err(seen.unsupported(format!(
                "a TCP socket in state {state} (only established and listening ones are saved)"
            ))),
        })
    }

    fn owns(&self, kind: &FileKind) -> bool {
        matches!(kind, FileKind::Tcp { .. } | FileKind::TcpListen { .. })
    }

    /// Listeners bound first (not listening yet), then the connections, some of
    /// which share a listener's port, then the listeners listen.
    fn prepare(&self, files: &[OpenFile], o: &mut super::kind::Opening<'_>) -> Result<(), FdError> {
        let moves = o.moves;
        let mut listeners: HashMap<usize, Listener> = HashMap::new();
        for (i, f) in files.iter().enumerate() {
            if let FileKind::TcpListen {
                addr,
                backlog,
                opts,
            } = &f.kind
            {
                let at = moves
                    .listen
                    .iter()
                    .find(|(old, _)| old == addr)
                    .map_or(*addr, |(_, new)| *new);
                let l = Listener::bind(at, *backlog, opts).map_err(open_err)?;
                listeners.insert(i, l);
            }
        }
        let peer_recv = peer_recv(files, moves);
        for (i, f) in files.iter().enumerate() {
            if let FileKind::Tcp { conn } = &f.kind {
                let fd = rebuild_one(conn, moves, &peer_recv, &mut o.tcp.held)?;
                o.tcp.rebuilt.insert(i, fd);
            }
        }
        for (i, l) in listeners {
            o.tcp.listening.insert(i, l.listen().map_err(open_err)?);
        }
        Ok(())
    }

    fn open(
        &self,
        i: usize,
        f: &OpenFile,
        o: &mut super::kind::Opening<'_>,
    ) -> Result<OwnedFd, FdError> {
        let fd = match f.kind {
            FileKind::Tcp { .. } => o.tcp.rebuilt.remove(&i).expect("rebuilt above"),
            _ => o.tcp.listening.remove(&i).expect("bound above"),
        };
        set_status_flags(&fd, f.flags as i32)?;
        Ok(fd)
    }

    fn describe(&self, kind: &FileKind) -> String {
        use crate::inspect::human;
        match kind {
            FileKind::Tcp { conn } => format!(
                "tcp {} -> {}, {} queued to send ({} unsent), {} received unread{}",
                conn.local,
                conn.remote,
                human(conn.send_queue.len() as u64),
                human(conn.unsent as u64),
                human(conn.recv_queue.len() as u64),
                super::sockopt::describe(&conn.opts)
            ),
            FileKind::TcpListen {
                addr,
                backlog,
                opts,
            } => format!(
                "tcp listening on {addr} (backlog {backlog}){}",
                super::sockopt::describe(opts)
            ),
            _ => unreachable!("owns() chose this kind"),
        }
    }

    fn json(&self, kind: &FileKind) -> Value {
        match kind {
            FileKind::Tcp { conn } => json!({
                "kind": "tcp", "local": conn.local.to_string(), "remote": conn.remote.to_string(),
                "send_queue": conn.send_queue.len(), "unsent": conn.unsent,
                "recv_queue": conn.recv_queue.len(),
                "opts": super::sockopt::json(&conn.opts),
            }),
            FileKind::TcpListen {
                addr,
                backlog,
                opts,
            } => json!({
                "kind": "tcp-listen", "addr": addr.to_string(), "backlog": backlog,
                "opts": super::sockopt::json(opts),
            }),
            _ => unreachable!("owns() chose this kind"),
        }
    }
}

/// The other end's rcv_nxt for each connection (by its 4-tuple here): from the
/// controller, or from the other end when it is in this image too.
fn peer_recv(files: &[OpenFile], moves: &Moves) -> HashMap<(SocketAddr, SocketAddr), u32> {
    let mut peer_recv: HashMap<(SocketAddr, SocketAddr), u32> = moves
        .peer_recv
        .iter()
        .map(|(c, seq)| ((c.local, c.remote), *seq))
        .collect();
    for f in files {
        if let FileKind::Tcp { conn } = &f.kind {
            peer_recv.insert((conn.remote, conn.local), conn.recv_seq);
        }
    }
    peer_recv
}

/// The connection `conn` made again (or, saved under `--external-tcp close`, a
/// reset socket in its place): our duplicate of it; the rebuilt end, still in
/// repair mode, goes to `held`.
fn rebuild_one(
    conn: &TcpConn,
    moves: &Moves,
    peer_recv: &HashMap<(SocketAddr, SocketAddr), u32>,
    held: &mut Vec<Rebuilt>,
) -> Result<OwnedFd, FdError> {
    if moves.is_reset(conn) {
        return reset(conn.local.is_ipv6()).map_err(open_err);
    }
    let conn = trimmed(conn, peer_recv.get(&(conn.local, conn.remote)).copied());
    let (local, remote) = moves.tuple_of(&conn);
    let r = rebuild(&conn, local, remote).map_err(open_err)?;
    let dup = r
        .as_fd()
        .try_clone_to_owned()
        .map_err(|source| FdError::Open {
            path: format!("TCP {} -> {}", conn.local, conn.remote),
            source,
        })?;
    held.push(r);
    Ok(dup)
}
