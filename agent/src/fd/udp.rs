//! UDP sockets: the bound address, the connected peer and the options, read from
//! a duplicate of the socket and set again on a new one. Queued datagrams are not
//! read: UDP may lose them, and a peek sees only the first.

use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};

use ckpt_shared::image::{FileKind, OpenFile, UdpOpts};
use serde_json::{json, Value};

use super::kind::{Opening, Persist, Seen};
use super::{set_status_flags, tcp, FdError, FdTable};

pub struct Udp;

impl Persist for Udp {
    fn dump(&self, _: &mut FdTable, seen: &mut Seen<'_>) -> Option<Result<FileKind, FdError>> {
        let Some(tcp::Kind::NotTcp) = seen.socket_kind() else {
            return None;
        };
        let (dup, _) = seen.sock.as_ref()?;
        match crate::sys::socket_domain_type(dup.as_raw_fd()) {
            Ok((libc::AF_INET | libc::AF_INET6, libc::SOCK_DGRAM)) => {}
            Ok(_) => return None,
            Err(e) => return Some(Err(e.into())),
        }
        Some(
            capture(dup.as_fd())
                .map_err(|e| seen.unsupported(format!("a UDP socket: {e}")))
                .map(|(local, remote, opts)| FileKind::Udp {
                    local,
                    remote,
                    opts,
                }),
        )
    }

    fn owns(&self, kind: &FileKind) -> bool {
        matches!(kind, FileKind::Udp { .. })
    }

    fn open(&self, _: usize, f: &OpenFile, o: &mut Opening<'_>) -> Result<OwnedFd, FdError> {
        let FileKind::Udp {
            local,
            remote,
            opts,
        } = &f.kind
        else {
            unreachable!("owns() chose this kind")
        };
        // A bound address moves like a listener's.
        let at = o
            .moves
            .listen
            .iter()
            .find(|(old, _)| old == local)
            .map_or(*local, |(_, new)| *new);
        let fd = rebuild(at, *remote, opts).map_err(|source| FdError::Open {
            path: format!("UDP {local}"),
            source,
        })?;
        set_status_flags(&fd, f.flags as i32)?;
        Ok(fd)
    }

    fn describe(&self, kind: &FileKind) -> String {
        use crate::inspect::human;
        let FileKind::Udp {
            local,
            remote,
            opts,
        } = kind
        else {
            unreachable!("owns() chose this kind")
        };
        format!(
            "udp {local}{}{}{}{}{} (buffers {} send, {} receive)",
            remote
                .map(|r| format!(" connected to {r}"))
                .unwrap_or_default(),
            if opts.reuseaddr { " reuseaddr" } else { "" },
            if opts.reuseport { " reuseport" } else { "" },
            if opts.broadcast { " broadcast" } else { "" },
            if opts.v6only { " v6only" } else { "" },
            human(opts.sndbuf as u64),
            human(opts.rcvbuf as u64)
        )
    }

    fn json(&self, kind: &FileKind) -> Value {
        let FileKind::Udp {
            local,
            remote,
            opts,
        } = kind
        else {
            unreachable!("owns() chose this kind")
        };
        json!({
            "kind": "udp", "local": local.to_string(),
            "remote": remote.map(|r| r.to_string()),
            "reuseaddr": opts.reuseaddr, "reuseport": opts.reuseport,
            "broadcast": opts.broadcast, "v6only": opts.v6only, "sndbuf": opts.sndbuf, "rcvbuf": opts.rcvbuf,
        })
    }
}

/// An int socket option, through the TCP module's wrappers.
fn get_int(fd: i32, opt: i32, what: &'static str) -> std::io::Result<i32> {
    super::tcp::getopt(fd, libc::SOL_SOCKET, opt, what).map_err(std::io::Error::other)
}

fn set_int(fd: i32, opt: i32, v: i32, what: &'static str) -> std::io::Result<()> {
    super::tcp::setopt(fd, libc::SOL_SOCKET, opt, v, what).map_err(std::io::Error::other)
}

/// The bound address, the peer (if connected) and the options of UDP socket `fd`.
pub fn capture(fd: BorrowedFd<'_>) -> std::io::Result<(SocketAddr, Option<SocketAddr>, UdpOpts)> {
    use nix::sys::socket::{getpeername, getsockname, SockaddrStorage};
    let raw = fd.as_raw_fd();
    let to_addr = |s: SockaddrStorage| -> Option<SocketAddr> {
        if let Some(v4) = s.as_sockaddr_in() {
            Some(SocketAddr::V4((*v4).into()))
        } else {
            s.as_sockaddr_in6().map(|v6| SocketAddr::V6((*v6).into()))
        }
    };
    let local = getsockname::<SockaddrStorage>(raw)
        .ok()
        .and_then(to_addr)
        .ok_or_else(|| std::io::Error::other("getsockname of a UDP socket"))?;
    let remote = getpeername::<SockaddrStorage>(raw).ok().and_then(to_addr);
    let opts = UdpOpts {
        reuseaddr: get_int(raw, libc::SO_REUSEADDR, "SO_REUSEADDR")? != 0,
        reuseport: get_int(raw, libc::SO_REUSEPORT, "SO_REUSEPORT")? != 0,
        broadcast: get_int(raw, libc::SO_BROADCAST, "SO_BROADCAST")? != 0,
        sndbuf: get_int(raw, libc::SO_SNDBUF, "SO_SNDBUF")? as u32,
        rcvbuf: get_int(raw, libc::SO_RCVBUF, "SO_RCVBUF")? as u32,
        v6only: local.is_ipv6() && super::sockopt::v6only(fd)?,
    };
    Ok((local, remote, opts))
}

/// A new UDP socket like the one captured: options, then bound to `local` (unless
/// it was never bound), then connected to `remote` (if it was). Close-on-exec and
/// blocking; the caller sets the status flags.
pub fn rebuild(
    local: SocketAddr,
    remote: Option<SocketAddr>,
    opts: &UdpOpts,
) -> std::io::Result<OwnedFd> {
    use nix::sys::socket::{bind, connect, SockaddrStorage};
    let domain = if local.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    let fd = crate::sys::socket::socket(domain, libc::SOCK_DGRAM)?;
    let raw = fd.as_raw_fd();
    if local.is_ipv6() {
        super::sockopt::set_v6only(fd.as_fd(), opts.v6only)?;
    }
    // The buffers: the kernel doubles what is asked.
    for (opt, v, what) in [
        (libc::SO_REUSEADDR, opts.reuseaddr as i32, "SO_REUSEADDR"),
        (libc::SO_REUSEPORT, opts.reuseport as i32, "SO_REUSEPORT"),
        (libc::SO_BROADCAST, opts.broadcast as i32, "SO_BROADCAST"),
        (
            libc::SO_SNDBUFFORCE,
            (opts.sndbuf / 2) as i32,
            "SO_SNDBUFFORCE",
        ),
        (
            libc::SO_RCVBUFFORCE,
            (opts.rcvbuf / 2) as i32,
            "SO_RCVBUFFORCE",
        ),
    ] {
        set_int(raw, opt, v, what)?;
    }
    if local.port() != 0 || !local.ip().is_unspecified() {
        bind(raw, &SockaddrStorage::from(local)).map_err(|e| {
            std::io::Error::new(
                std::io::ErrorKind::AddrInUse,
                format!("bind of a UDP socket to {local} (is the port taken on this node?): {e}"),
            )
        })?;
    }
    if let Some(r) = remote {
        connect(raw, &SockaddrStorage::from(r))
            .map_err(|e| std::io::Error::other(format!("connect of a UDP socket to {r}: {e}")))?;
    }
    Ok(fd)
}
