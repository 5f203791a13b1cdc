//! A stand-in for a TCP connection that cannot be moved: a socket whose
//! connection was reset by its peer (`--external-tcp close`); and the silencing
//! of connections that are given up.

use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};

use super::tcp::{setopt, setopt_slice, sys, tcp_socket, Listener, TcpError, TCP_REPAIR_ON};
use crate::sys::socket;

/// A TCP socket whose connection was reset by its peer, of the family of an IPv6
/// or an IPv4 connection: the next read gives ECONNRESET, a write EPIPE, as when a
/// server goes away. It stands in for a connection to a peer outside the job
/// (`--external-tcp close`), which cannot be moved. Made over this namespace's
/// loopback: a connection whose accepted end is closed with a zero linger time.
pub fn reset(v6: bool) -> Result<std::os::fd::OwnedFd, TcpError> {
    use nix::sys::socket::{connect, getsockname, SockaddrStorage};
    let lo: SocketAddr = if v6 {
        "[::1]:0".parse().expect("address")
    } else {
        "127.0.0.1:0".parse().expect("address")
    };
    let nix_err = |what: &'static str| {
        move |e: nix::errno::Errno| TcpError::Sys {
            what,
            source: e.into(),
        }
    };
    let l = Listener::bind(lo, 1, &Default::default())?.listen()?;
    let at: SockaddrStorage = getsockname(l.as_raw_fd()).map_err(nix_err("getsockname"))?;
    let c = tcp_socket(lo)?;
    connect(c.as_raw_fd(), &at).map_err(nix_err(
        "connect over loopback (is the loopback interface up?)",
    ))?;
    let a = socket::accept(l.as_fd()).map_err(sys("accept"))?;
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    setopt_slice(
        a.as_raw_fd(),
        libc::SOL_SOCKET,
        libc::SO_LINGER,
        std::slice::from_ref(&linger),
        "SO_LINGER",
    )?;
    drop(a);
    // The reset has arrived once the socket reports the error as pending; reading
    // SO_ERROR would clear it, so poll for it instead.
    let _ = socket::poll_one(c.as_fd(), libc::POLLIN, 1000);
    Ok(c)
}

/// Puts `fd`'s connection in repair mode for good: closing it afterwards sends
/// nothing to the peer (no FIN, no RST). For the sockets of a tree that is killed
/// after its dump, or of a husk that is given up.
pub fn silence(fd: BorrowedFd<'_>) -> Result<(), TcpError> {
    setopt(
        fd.as_raw_fd(),
        libc::IPPROTO_TCP,
        libc::TCP_REPAIR,
        TCP_REPAIR_ON,
        "TCP_REPAIR on",
    )
}
