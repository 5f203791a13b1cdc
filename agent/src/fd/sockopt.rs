//! The socket options of TCP sockets (listeners and connections) that a restore
//! sets again: `IPV6_V6ONLY`, `SO_REUSEADDR`, `SO_REUSEPORT`, `SO_KEEPALIVE`,
//! `SO_LINGER`, `TCP_NODELAY`, `TCP_KEEPIDLE` / `TCP_KEEPINTVL` / `TCP_KEEPCNT`,
//! and a listener's buffers where its application set them.
//!
//! `IPV6_V6ONLY` is what lets a program listen on `0.0.0.0:P` and on `[::]:P` at
//! once (Open MPI's tcp BTL does): an IPv6 listener that came back dual-stack would
//! take the IPv4 port too, and the second `listen` would fail. It, `SO_REUSEADDR`
//! and `SO_REUSEPORT` decide the bind, so they are set before it
//! ([`before_bind`]); the rest once the socket is made ([`after`]): for a rebuilt
//! connection that is after it leaves repair mode, so that no keepalive timer or
//! push runs against a half-made connection.
//!
//! The kernel cannot say whether a tuning value (keepalive times, buffer sizes) was
//! set by the application or is the system's default: both read the same. We keep a
//! value only where it differs from a fresh socket's, made here in the agent's
//! network namespace, so that a restore on another host keeps that host's defaults.
//! (A value set to exactly the default is then not kept, which changes nothing.)

use std::os::fd::{AsRawFd, BorrowedFd, RawFd};

use ckpt_shared::image::SockOpts;
use serde_json::{json, Value};

use crate::sys::socket;

fn get(fd: RawFd, level: i32, opt: i32, what: &str) -> std::io::Result<i32> {
    socket::getsockopt_int(fd, level, opt)
        .map_err(|e| std::io::Error::new(e.kind(), format!("getsockopt {what}: {e}")))
}

fn set(fd: RawFd, level: i32, opt: i32, v: i32, what: &str) -> std::io::Result<()> {
    socket::setsockopt_int(fd, level, opt, v)
        .map_err(|e| std::io::Error::new(e.kind(), format!("setsockopt {what}: {e}")))
}

/// The tuning values of a socket, compared with a fresh one's.
struct Tuning {
    keepidle: i32,
    keepintvl: i32,
    keepcnt: i32,
    sndbuf: i32,
    rcvbuf: i32,
}

fn tuning(fd: RawFd) -> std::io::Result<Tuning> {
    let tcp = libc::IPPROTO_TCP;
    Ok(Tuning {
        keepidle: get(fd, tcp, libc::TCP_KEEPIDLE, "TCP_KEEPIDLE")?,
        keepintvl: get(fd, tcp, libc::TCP_KEEPINTVL, "TCP_KEEPINTVL")?,
        keepcnt: get(fd, tcp, libc::TCP_KEEPCNT, "TCP_KEEPCNT")?,
        sndbuf: get(fd, libc::SOL_SOCKET, libc::SO_SNDBUF, "SO_SNDBUF")?,
        rcvbuf: get(fd, libc::SOL_SOCKET, libc::SO_RCVBUF, "SO_RCVBUF")?,
    })
}

/// The options of TCP socket `fd` (a duplicate the agent holds); `buffers`: keep
/// the buffer sizes where they were set (listeners; a connection keeps its own).
pub fn capture(fd: BorrowedFd<'_>, buffers: bool) -> std::io::Result<SockOpts> {
    let raw = fd.as_raw_fd();
    let (domain, _) = crate::sys::socket_domain_type(raw).map_err(std::io::Error::other)?;
    let sol = libc::SOL_SOCKET;
    let v6only = domain == libc::AF_INET6
        && get(raw, libc::IPPROTO_IPV6, libc::IPV6_V6ONLY, "IPV6_V6ONLY")? != 0;
    let linger: libc::linger = socket::getsockopt(raw, sol, libc::SO_LINGER)
        .map_err(|e| std::io::Error::new(e.kind(), format!("getsockopt SO_LINGER: {e}")))?;
    let now = tuning(raw)?;
    let fresh = tuning(socket::socket(domain, libc::SOCK_STREAM)?.as_raw_fd())?;
    let differs = |a: i32, b: i32| (a != b).then_some(a as u32);
    Ok(SockOpts {
        v6only,
        reuseaddr: get(raw, sol, libc::SO_REUSEADDR, "SO_REUSEADDR")? != 0,
        reuseport: get(raw, sol, libc::SO_REUSEPORT, "SO_REUSEPORT")? != 0,
        keepalive: get(raw, sol, libc::SO_KEEPALIVE, "SO_KEEPALIVE")? != 0,
        linger: (linger.l_onoff != 0).then_some(linger.l_linger as u32),
        nodelay: get(raw, libc::IPPROTO_TCP, libc::TCP_NODELAY, "TCP_NODELAY")? != 0,
        keepidle: differs(now.keepidle, fresh.keepidle),
        keepintvl: differs(now.keepintvl, fresh.keepintvl),
        keepcnt: differs(now.keepcnt, fresh.keepcnt),
        sndbuf: differs(now.sndbuf, fresh.sndbuf).filter(|_| buffers),
        rcvbuf: differs(now.rcvbuf, fresh.rcvbuf).filter(|_| buffers),
    })
}

/// What decides the bind of the new socket `fd`: `IPV6_V6ONLY` (set either way on
/// an IPv6 socket, so the host's `bindv6only` default does not decide it) and
/// `SO_REUSEPORT`. The caller sets `SO_REUSEADDR` for the bind (a restored port
/// may still have connections in TIME_WAIT); [`after`] puts it back as it was.
pub fn before_bind(fd: BorrowedFd<'_>, o: &SockOpts) -> std::io::Result<()> {
    let raw = fd.as_raw_fd();
    let (domain, _) = crate::sys::socket_domain_type(raw).map_err(std::io::Error::other)?;
    if domain == libc::AF_INET6 {
        set_v6only(fd, o.v6only)?;
    }
    if o.reuseport {
        set(raw, libc::SOL_SOCKET, libc::SO_REUSEPORT, 1, "SO_REUSEPORT")?;
    }
    Ok(())
}

/// `IPV6_V6ONLY` of the IPv6 socket `fd` (before it is bound).
pub fn set_v6only(fd: BorrowedFd<'_>, on: bool) -> std::io::Result<()> {
    let v = on as i32;
    set(
        fd.as_raw_fd(),
        libc::IPPROTO_IPV6,
        libc::IPV6_V6ONLY,
        v,
        "IPV6_V6ONLY",
    )
}

/// `IPV6_V6ONLY` of the IPv6 socket `fd`.
pub fn v6only(fd: BorrowedFd<'_>) -> std::io::Result<bool> {
    Ok(get(
        fd.as_raw_fd(),
        libc::IPPROTO_IPV6,
        libc::IPV6_V6ONLY,
        "IPV6_V6ONLY",
    )? != 0)
}

/// The other options of `o` on the socket `fd`, once it is bound (and, for a
/// connection, out of repair mode).
pub fn after(fd: BorrowedFd<'_>, o: &SockOpts) -> std::io::Result<()> {
    let raw = fd.as_raw_fd();
    let (sol, tcp) = (libc::SOL_SOCKET, libc::IPPROTO_TCP);
    set(
        raw,
        sol,
        libc::SO_REUSEADDR,
        o.reuseaddr as i32,
        "SO_REUSEADDR",
    )?;
    set(
        raw,
        sol,
        libc::SO_KEEPALIVE,
        o.keepalive as i32,
        "SO_KEEPALIVE",
    )?;
    set(raw, tcp, libc::TCP_NODELAY, o.nodelay as i32, "TCP_NODELAY")?;
    if let Some(secs) = o.linger {
        let l = libc::linger {
            l_onoff: 1,
            l_linger: secs as i32,
        };
        socket::setsockopt(raw, sol, libc::SO_LINGER, std::slice::from_ref(&l))
            .map_err(|e| std::io::Error::new(e.kind(), format!("setsockopt SO_LINGER: {e}")))?;
    }
    for (v, opt, what) in [
        (o.keepidle, libc::TCP_KEEPIDLE, "TCP_KEEPIDLE"),
        (o.keepintvl, libc::TCP_KEEPINTVL, "TCP_KEEPINTVL"),
        (o.keepcnt, libc::TCP_KEEPCNT, "TCP_KEEPCNT"),
    ] {
        if let Some(v) = v {
            set(raw, tcp, opt, v as i32, what)?;
        }
    }
    // The kernel doubles what is asked; FORCE, as root, past the sysctl maximum
    // the application may have been allowed by its own CAP_NET_ADMIN.
    for (v, opt, what) in [
        (o.sndbuf, libc::SO_SNDBUFFORCE, "SO_SNDBUFFORCE"),
        (o.rcvbuf, libc::SO_RCVBUFFORCE, "SO_RCVBUFFORCE"),
    ] {
        if let Some(v) = v {
            set(raw, sol, opt, (v / 2) as i32, what)?;
        }
    }
    Ok(())
}

/// The options that are on, for `inspect`: "" when none, else " [v6only, ...]".
pub fn describe(o: &SockOpts) -> String {
    let mut on: Vec<String> = Vec::new();
    for (flag, name) in [
        (o.v6only, "v6only"),
        (o.reuseaddr, "reuseaddr"),
        (o.reuseport, "reuseport"),
        (o.keepalive, "keepalive"),
        (o.nodelay, "nodelay"),
    ] {
        if flag {
            on.push(name.into());
        }
    }
    for (v, name) in [
        (o.linger, "linger"),
        (o.keepidle, "keepidle"),
        (o.keepintvl, "keepintvl"),
        (o.keepcnt, "keepcnt"),
        (o.sndbuf, "sndbuf"),
        (o.rcvbuf, "rcvbuf"),
    ] {
        if let Some(v) = v {
            on.push(format!("{name} {v}"));
        }
    }
    if on.is_empty() {
        String::new()
    } else {
        format!(" [{}]", on.join(", "))
    }
}

/// `o` for `inspect --json`.
pub fn json(o: &SockOpts) -> Value {
    json!({
        "v6only": o.v6only, "reuseaddr": o.reuseaddr, "reuseport": o.reuseport,
        "keepalive": o.keepalive, "linger": o.linger, "nodelay": o.nodelay,
        "keepidle": o.keepidle, "keepintvl": o.keepintvl, "keepcnt": o.keepcnt,
        "sndbuf": o.sndbuf, "rcvbuf": o.rcvbuf,
    })
}
