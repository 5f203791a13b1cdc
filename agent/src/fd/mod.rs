//! Descriptor tables — dump and restore.
//!
//! Dump: each descriptor is classified from `/proc/PID/fd/N` (the link and a `stat`
//! through it) and `/proc/PID/fdinfo/N` (position and flags). Descriptors that share
//! one open file description, across processes too (dup, fork), are found with
//! `kcmp(KCMP_FILE)` and stored once, so the sharing comes back.
//!
//! Restore: the restorer opens every description itself ([`open_all`]), then each
//! husk takes its descriptors with an injected `pidfd_getfd` and `dup3`s them into
//! place. Descriptions shared between processes are shared again.
//!
//! Supported: regular files, directories, `/dev/{null,zero,random,urandom}`, pipes
//! and FIFOs (with the data buffered in them). Descriptors 0–2 that lead out of the
//! tree (a terminal, a pipe to the shell) are inherited from the restore command.
//! Everything else is refused at dump with a message naming the fd and the PID.

pub mod pipe;
pub mod tcp;
pub mod udp;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

use ckpt_shared::image::{Fd, FileKind, OpenFile};
use libc::pid_t;

use crate::inject::{InjectError, Remote};
use crate::sys::{self, nr, proc, SysError};

#[derive(Debug, thiserror::Error)]
pub enum FdError {
    #[error("unsupported: fd {fd} of PID {pid} is {what}")]
    Unsupported { pid: pid_t, fd: RawFd, what: String },
    #[error(transparent)]
    Proc(#[from] proc::ProcError),
    #[error(transparent)]
    Sys(#[from] SysError),
    #[error(transparent)]
    Inject(#[from] InjectError),
    #[error("cannot reopen {path} for fd restore: {source}")]
    Open {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// Character devices we can reopen by path: (major, minor).
const SAFE_CHARDEVS: [(u64, u64, &str); 4] = [
    (1, 3, "/dev/null"),
    (1, 5, "/dev/zero"),
    (1, 8, "/dev/random"),
    (1, 9, "/dev/urandom"),
];

fn major(rdev: u64) -> u64 {
    libc::major(rdev) as u64
}
fn minor(rdev: u64) -> u64 {
    libc::minor(rdev) as u64
}

/// What `/proc` says of one descriptor (its link, its metadata, its position and
/// flags), and for a socket our duplicate and its kind.
type Looked = (String, libc::stat, (u64, u32), Option<(OwnedFd, tcp::Kind)>);

fn mode_is(st: &libc::stat, fmt: libc::mode_t) -> bool {
    st.st_mode & libc::S_IFMT == fmt
}

/// The targets of an epoll instance from its fdinfo text (`tfd: 5 events: 19
/// data: 7f0000001000 pos:0 ino:... sdev:...` per target).
pub fn epoll_targets(text: &str) -> Option<Vec<ckpt_shared::image::EpollTarget>> {
    let mut out = Vec::new();
    for line in text.lines().filter(|l| l.starts_with("tfd:")) {
        let w: Vec<&str> = line.split_whitespace().collect();
        let at = |key: &str| w.iter().position(|x| *x == key).and_then(|i| w.get(i + 1));
        out.push(ckpt_shared::image::EpollTarget {
            fd: at("tfd:")?.parse().ok()?,
            events: u32::from_str_radix(at("events:")?, 16).ok()?,
            data: u64::from_str_radix(at("data:")?, 16).ok()?,
        });
    }
    Some(out)
}

/// `f` over `items`, in order, on up to four threads when there are many.
fn parallel_map<T: Sync, R: Send>(items: &[T], f: impl Fn(&T) -> R + Sync) -> Vec<R> {
    let threads = std::thread::available_parallelism()
        .map_or(2, |p| p.get())
        .clamp(1, 4)
        .min(items.len().div_ceil(64));
    if threads <= 1 {
        return items.iter().map(f).collect();
    }
    let per = items.len().div_ceil(threads);
    let f = &f;
    std::thread::scope(|s| {
        let handles: Vec<_> = items
            .chunks(per)
            .map(|part| s.spawn(move || part.iter().map(f).collect::<Vec<R>>()))
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().expect("a descriptor thread panicked"))
            .collect()
    })
}

/// The descriptions found so far in the tree.
#[derive(Default)]
pub struct FdTable {
    pub files: Vec<OpenFile>,
    /// For each file: a representative (pid, fd) and its (dev, ino) for kcmp.
    reps: Vec<(pid_t, RawFd, u64, u64)>,
    /// Pipe inodes → (seen a read end, seen a write end, is a FIFO).
    pipes: HashMap<u64, (bool, bool)>,
    /// Regular files behind descriptors (for the restore check).
    pub regular_paths: Vec<String>,
    /// Our duplicates of the established TCP sockets: captured together by
    /// [`capture_tcp`](Self::capture_tcp) and kept to silence the connections if
    /// the tree is killed.
    pub tcp: Vec<TcpDup>,
    /// Socket descriptors whose close-on-exec bit is still to be read (see
    /// [`read_cloexec`]).
    pub cloexec_later: Vec<(pid_t, RawFd)>,
}

/// Our duplicate of an established TCP socket of the tree.
pub struct TcpDup {
    /// The file (index in [`FdTable::files`]) it is.
    file: u32,
    /// Where it came from.
    pid: pid_t,
    fd: RawFd,
    pub dup: OwnedFd,
    /// Its 4-tuple, once [`FdTable::tcp_conns`] has read it for the lock: the
    /// capture does not ask again.
    tuple: Option<crate::netlock::Conn>,
}

/// Reads the close-on-exec bit of the descriptors `later` (from fdinfo) into the
/// processes' tables. A dump that lets the tree run on calls it once the tree runs
/// again: of a socket's descriptor nothing else is read from `/proc`, and the bit
/// is the slow part. If the application changed the bit in between, it did so
/// with an idempotent `fcntl(F_SETFD)` that the restored process makes again; a
/// descriptor closed meanwhile keeps the bit unset.
pub fn read_cloexec(later: &[(pid_t, RawFd)], procs: &mut [ckpt_shared::image::Process]) {
    let mut dirs: HashMap<pid_t, Option<proc::FdDirs>> = HashMap::new();
    for &(pid, fd) in later {
        let d = dirs
            .entry(pid)
            .or_insert_with(|| proc::FdDirs::open(pid).ok());
        let Some(Ok((_, flags))) = d.as_ref().map(|d| d.info(fd)) else {
            continue;
        };
        if let Some(p) = procs.iter_mut().find(|p| p.pid == pid) {
            if let Some(f) = p.fds.iter_mut().find(|f| f.fd == fd) {
                f.cloexec = flags & libc::O_CLOEXEC as u32 != 0;
            }
        }
    }
}

impl FdTable {
    /// Dump the descriptor table of `pid`.
    pub fn dump_process(&mut self, pid: pid_t) -> Result<Vec<Fd>, FdError> {
        let mut out = Vec::new();
        let pidfd = sys::pidfd_open(pid)?;
        let fds = proc::fds(pid)?;
        // What /proc says of each descriptor, and a duplicate of each socket: read
        // on a few threads at once (with a thousand sockets, /proc alone takes tens
        // of milliseconds, all of it while the tree stands still).
        let dirs = proc::FdDirs::open(pid)?;
        let looked = parallel_map(&fds, |&fd| -> Result<Looked, FdError> {
            let link = dirs.link(fd)?;
            let socket_ino = link
                .strip_prefix("socket:[")
                .and_then(|r| r.strip_suffix(']'))
                .and_then(|n| n.parse::<u64>().ok());
            let meta = match socket_ino {
                // A socket's inode is in its link, and nothing else of a stat is
                // used for it: one system call less per socket.
                Some(ino) => {
                    // SAFETY: stat is plain old data; all-zero is a valid value.
                    let mut st: libc::stat = unsafe { std::mem::zeroed() };
                    st.st_ino = ino;
                    st.st_mode = libc::S_IFSOCK;
                    st
                }
                None => dirs.stat(fd)?,
            };
            let sock = if socket_ino.is_some() {
                let dup = sys::pidfd_getfd(&pidfd, pid, fd)?;
                let kind = tcp::kind(dup.as_fd());
                Some((dup, kind))
            } else {
                None
            };
            // A socket's status flags are its description's, which our duplicate
            // shares (F_GETFL); only its close-on-exec bit needs fdinfo, which costs
            // ~40 µs a descriptor, and is read later (`cloexec_later`).
            let info = match &sock {
                Some((dup, _)) => {
                    // SAFETY: F_GETFL on our own descriptor.
                    let fl = unsafe { libc::fcntl(dup.as_raw_fd(), libc::F_GETFL) };
                    if fl < 0 {
                        return Err(SysError::last("fcntl(F_GETFL)", "a socket").into());
                    }
                    (0, fl as u32)
                }
                None => dirs.info(fd)?,
            };
            Ok((link, meta, info, sock))
        });
        for (&fd, looked) in fds.iter().zip(looked) {
            let (link, meta, (pos, flags), mut sock) = looked?;
            if sock.is_some() {
                self.cloexec_later.push((pid, fd));
            }
            let cloexec = flags & libc::O_CLOEXEC as u32 != 0;
            let flags = flags & !(libc::O_CLOEXEC as u32);
            let (dev, ino) = (meta.st_dev, meta.st_ino);
            // Already seen this description (dup, fork)?
            let mut found = None;
            for (i, &(rp, rfd, rdev, rino)) in self.reps.iter().enumerate() {
                if rdev == dev && rino == ino && sys::same_file_description(rp, rfd, pid, fd)? {
                    found = Some(i);
                    break;
                }
            }
            if let Some(i) = found {
                out.push(Fd {
                    fd,
                    cloexec,
                    file: i as u32,
                });
                continue;
            }
            let unsupported = |what: String| FdError::Unsupported { pid, fd, what };
            let kind = if link.starts_with("pipe:[") || mode_is(&meta, libc::S_IFIFO) {
                let dup = sys::pidfd_getfd(&pidfd, pid, fd)?;
                let (buffered, capacity) = pipe::peek(&dup, flags)?;
                let read_end = flags & libc::O_ACCMODE as u32 != libc::O_WRONLY as u32;
                let e = self.pipes.entry(ino).or_default();
                if read_end {
                    e.0 = true;
                }
                if flags & libc::O_ACCMODE as u32 != libc::O_RDONLY as u32 {
                    e.1 = true;
                }
                // The data is stored once per pipe: on the first description seen.
                let already = self
                    .files
                    .iter()
                    .any(|f| matches!(&f.kind, FileKind::Pipe { pipe_id, .. } if *pipe_id == ino));
                FileKind::Pipe {
                    pipe_id: ino,
                    read_end,
                    fifo_path: (!link.starts_with("pipe:[")).then(|| link.clone()),
                    buffered: if already { Vec::new() } else { buffered },
                    capacity,
                }
            } else if let Some((dup, kind)) = sock.take() {
                match kind {
                    // Read under the network lock the dump put in place, by
                    // capture_tcp, once every process's table is known.
                    tcp::Kind::Established => {
                        self.tcp.push(TcpDup {
                            file: self.files.len() as u32,
                            pid,
                            fd,
                            dup,
                            tuple: None,
                        });
                        FileKind::Inherited {
                            what: "a TCP connection not read yet".into(),
                        }
                    }
                    tcp::Kind::Listen { pending, .. } if pending > 0 => {
                        // Those connections live in no descriptor: they cannot be
                        // read, and dropping them would reset clients that believe
                        // they are connected.
                        return Err(unsupported(format!(
                            "a listening TCP socket with {pending} connection(s) not yet accepted; \
                             save again once the application has accepted them"
                        )));
                    }
                    tcp::Kind::Listen { backlog, .. } => FileKind::TcpListen {
                        addr: tcp::local_addr(dup.as_fd())
                            .map_err(|e| unsupported(format!("a listening socket: {e}")))?,
                        backlog,
                    },
                    tcp::Kind::Other(state) => {
                        return Err(unsupported(format!(
                            "a TCP socket in state {state} (only established and listening ones are saved)"
                        )))
                    }
                    tcp::Kind::NotTcp if fd <= 2 => FileKind::Inherited { what: link.clone() },
                    tcp::Kind::NotTcp
                        if matches!(
                            sys::socket_domain_type(dup.as_raw_fd())?,
                            (libc::AF_INET | libc::AF_INET6, libc::SOCK_DGRAM)
                        ) =>
                    {
                        let (local, remote, opts) = udp::capture(dup.as_fd())
                            .map_err(|e| unsupported(format!("a UDP socket: {e}")))?;
                        FileKind::Udp {
                            local,
                            remote,
                            opts,
                        }
                    }
                    tcp::Kind::NotTcp => {
                        let (domain, _) = sys::socket_domain_type(dup.as_raw_fd())?;
                        return Err(unsupported(format!("a {} socket", domain_name(domain))));
                    }
                }
            } else if link == "anon_inode:[eventfd]" {
                let text = proc::fdinfo_text(pid, fd)?;
                let field = |name: &str| {
                    text.lines()
                        .find_map(|l| l.strip_prefix(name))
                        .map(|v| v.trim().to_string())
                };
                let count = field("eventfd-count:")
                    .and_then(|v| u64::from_str_radix(&v, 16).ok())
                    .ok_or_else(|| {
                        unsupported("an eventfd whose count /proc does not show".into())
                    })?;
                FileKind::EventFd {
                    count,
                    semaphore: field("eventfd-semaphore:").is_some_and(|v| v == "1"),
                }
            } else if link == "anon_inode:[eventpoll]" {
                let text = proc::fdinfo_text(pid, fd)?;
                FileKind::Epoll {
                    targets: epoll_targets(&text).ok_or_else(|| {
                        unsupported("an epoll instance /proc does not show".into())
                    })?,
                }
            } else if let Some(rest) = link.strip_prefix("anon_inode:") {
                return Err(unsupported(format!(
                    "an {} (anon inode)",
                    rest.trim_matches(|c| c == '[' || c == ']')
                )));
            } else if link.ends_with(" (deleted)") {
                return Err(unsupported(format!("a deleted file ({link})")));
            } else if mode_is(&meta, libc::S_IFDIR) {
                FileKind::Directory {
                    path: link.clone(),
                    pos,
                }
            } else if mode_is(&meta, libc::S_IFREG) {
                self.regular_paths.push(link.clone());
                FileKind::Regular {
                    path: link.clone(),
                    pos,
                    check: u32::MAX,
                }
            } else if mode_is(&meta, libc::S_IFCHR) {
                let rdev = meta.st_rdev;
                if let Some(&(_, _, p)) = SAFE_CHARDEVS
                    .iter()
                    .find(|(ma, mi, _)| *ma == major(rdev) && *mi == minor(rdev))
                {
                    FileKind::CharDevice {
                        path: p.to_string(),
                        rdev,
                    }
                } else if fd <= 2 {
                    FileKind::Inherited { what: link.clone() }
                } else {
                    return Err(unsupported(format!("the character device {link}")));
                }
            } else {
                return Err(unsupported(format!("{link} (not a supported file type)")));
            };
            let id = self.files.len() as u32;
            self.files.push(OpenFile { id, flags, kind });
            self.reps.push((pid, fd, dev, ino));
            out.push(Fd {
                fd,
                cloexec,
                file: id,
            });
        }
        Ok(out)
    }

    /// The 4-tuple of every established TCP connection found so far: what the
    /// network lock holds.
    pub fn tcp_conns(&mut self) -> Vec<crate::netlock::Conn> {
        for t in &mut self.tcp {
            let fd = t.dup.as_fd();
            t.tuple = (|| {
                let local = tcp::local_addr(fd).ok()?;
                let remote = tcp::remote_addr(fd).ok()?;
                Some(crate::netlock::Conn { local, remote })
            })();
        }
        self.tcp.iter().filter_map(|t| t.tuple).collect()
    }

    /// Reads every established TCP connection found by
    /// [`dump_process`](Self::dump_process), on a few threads at once: the tree is
    /// frozen meanwhile, and with a thousand connections the reading is most of
    /// its standstill.
    pub fn capture_tcp(&mut self) -> Result<(), FdError> {
        let got = parallel_map(&self.tcp, |t| tcp::capture_on(t.dup.as_fd(), t.tuple));
        for (t, conn) in self.tcp.iter().zip(got) {
            let conn = conn.map_err(|e| FdError::Unsupported {
                pid: t.pid,
                fd: t.fd,
                what: format!("a TCP connection that could not be read: {e}"),
            })?;
            self.files[t.file as usize].kind = FileKind::Tcp {
                conn: Box::new(conn),
            };
        }
        Ok(())
    }

    /// After every process: anonymous pipes with an end outside the tree can only be
    /// inherited stdio.
    pub fn finish(&mut self, procs: &mut [(pid_t, &mut Vec<Fd>)]) -> Result<(), FdError> {
        // An epoll instance is filled again by the first process that holds it,
        // with that process's descriptor numbers: each must still be open there.
        let mut seen = std::collections::HashSet::new();
        for (pid, fds) in procs.iter() {
            let open: std::collections::HashSet<i32> = fds.iter().map(|f| f.fd).collect();
            for fd in fds.iter() {
                if let FileKind::Epoll { targets } = &self.files[fd.file as usize].kind {
                    if !seen.insert(fd.file) {
                        continue;
                    }
                    if let Some(t) = targets.iter().find(|t| !open.contains(&t.fd)) {
                        return Err(FdError::Unsupported {
                            pid: *pid,
                            fd: fd.fd,
                            what: format!(
                                "an epoll instance watching descriptor {}, which this process \
                                 has closed (the file lives on elsewhere)",
                                t.fd
                            ),
                        });
                    }
                }
            }
        }
        for (pid, fds) in procs.iter_mut() {
            for fd in fds.iter() {
                let f = &mut self.files[fd.file as usize];
                if let FileKind::Pipe {
                    pipe_id,
                    fifo_path: None,
                    ..
                } = f.kind
                {
                    let (r, w) = self.pipes.get(&pipe_id).copied().unwrap_or_default();
                    if !(r && w) {
                        if fd.fd <= 2 {
                            f.kind = FileKind::Inherited {
                                what: format!("pipe:[{pipe_id}]"),
                            };
                        } else {
                            return Err(FdError::Unsupported {
                                pid: *pid,
                                fd: fd.fd,
                                what: format!(
                                    "a pipe to a process outside the tree (pipe:[{pipe_id}])"
                                ),
                            });
                        }
                    }
                }
            }
        }
        Ok(())
    }
}

fn domain_name(d: i32) -> String {
    match d {
        libc::AF_UNIX => "UNIX".into(),
        libc::AF_INET => "TCP/UDP IPv4".into(),
        libc::AF_INET6 => "TCP/UDP IPv6".into(),
        libc::AF_NETLINK => "netlink".into(),
        libc::AF_PACKET => "packet".into(),
        other => format!("family-{other}"),
    }
}

/// What [`open_all`] made: our descriptor for each file id; FIFO holders (kept open
/// until the husks took their ends); and the TCP connections, rebuilt in repair
/// mode, to be finished (repair off, send queue written) at the release, once every
/// end of every connection exists.
pub struct Opened {
    pub fds: Vec<OwnedFd>,
    pub holders: Vec<OwnedFd>,
    pub tcp: Vec<tcp::Rebuilt>,
}

/// New addresses for TCP endpoints at a restore on another node (the controller
/// plans them: `ckpt_controller::readdress`): connections by their old 4-tuple,
/// listeners by their old address.
#[derive(Debug, Clone, Default)]
pub struct Moves {
    pub conns: Vec<(ckpt_shared::proto::ConnRef, ckpt_shared::proto::ConnRef)>,
    pub listen: Vec<(std::net::SocketAddr, std::net::SocketAddr)>,
    /// For connections whose other end is in another rank of the job (by old
    /// 4-tuple): that end's `rcv_nxt` at the cut. Pairs within one image are
    /// found by [`open_all`] itself.
    pub peer_recv: Vec<(ckpt_shared::proto::ConnRef, u32)>,
    /// Connections to peers outside the job, saved under `--external-tcp close`
    /// (by old 4-tuple): they come back as sockets reset by their peer.
    pub reset: Vec<ckpt_shared::proto::ConnRef>,
}

impl Moves {
    fn is_reset(&self, conn: &tcp::TcpConn) -> bool {
        self.reset
            .iter()
            .any(|c| c.local == conn.local && c.remote == conn.remote)
    }

    /// The 4-tuple that the connection `conn` is rebuilt on.
    pub fn tuple_of(&self, conn: &tcp::TcpConn) -> (SocketAddr, SocketAddr) {
        self.conns
            .iter()
            .find(|(old, _)| old.local == conn.local && old.remote == conn.remote)
            .map_or((conn.local, conn.remote), |(_, new)| {
                (new.local, new.remote)
            })
    }

    /// The 4-tuples of every connection of `files` as it will be rebuilt: what the
    /// restore's network lock holds.
    pub fn tuples(&self, files: &[OpenFile]) -> Vec<crate::netlock::Conn> {
        files
            .iter()
            .filter_map(|f| match &f.kind {
                FileKind::Tcp { conn } if !self.is_reset(conn) => {
                    let (local, remote) = self.tuple_of(conn);
                    Some(crate::netlock::Conn { local, remote })
                }
                _ => None,
            })
            .collect()
    }
}

/// Where the restored send queue of `conn` starts, given `peer_rcv_nxt`, the next
/// byte the other end expects: bytes the other end received after the network lock
/// was taken (and whose acknowledgement the lock dropped) are in both queues, and
/// the sender's copy goes. Sending them again would be harmless to the data, but
/// the other end acknowledges past what the rebuilt sender has sent, and TCP drops
/// an acknowledgement of unsent data together with any data it carries: the stream
/// stalls until timers recover it. `None`: nothing to drop, or the numbers do not
/// fit this connection (the other end has bytes this one never wrote), which is
/// left to TCP.
pub fn overlap(conn: &tcp::TcpConn, peer_rcv_nxt: u32) -> Option<usize> {
    let skip = peer_rcv_nxt.wrapping_sub(conn.send_una()) as i32;
    (skip > 0 && skip as usize <= conn.send_queue.len()).then_some(skip as usize)
}

/// `conn` with its send queue starting at `peer_rcv_nxt` (see [`overlap`]).
pub fn trimmed(
    conn: &tcp::TcpConn,
    peer_rcv_nxt: Option<u32>,
) -> std::borrow::Cow<'_, tcp::TcpConn> {
    match peer_rcv_nxt.and_then(|seq| overlap(conn, seq)) {
        Some(skip) => {
            let mut c = conn.clone();
            c.send_queue.drain(..skip);
            c.unsent = c.unsent.min(c.send_queue.len() as u32);
            std::borrow::Cow::Owned(c)
        }
        None => std::borrow::Cow::Borrowed(conn),
    }
}

/// Open every description of the image in the restorer.
pub fn open_all(files: &[OpenFile], moves: &Moves) -> Result<Opened, FdError> {
    // Pipes first: one rebuilt pipe (or one FIFO holder) per pipe, filled with the
    // data that the dump stored on one of its descriptions.
    let mut data: HashMap<u64, (&[u8], u32, Option<&str>)> = HashMap::new();
    for f in files {
        if let FileKind::Pipe {
            pipe_id,
            fifo_path,
            buffered,
            capacity,
            ..
        } = &f.kind
        {
            let e = data
                .entry(*pipe_id)
                .or_insert((&[], *capacity, fifo_path.as_deref()));
            if !buffered.is_empty() {
                e.0 = buffered;
            }
        }
    }
    let mut pipes: HashMap<u64, pipe::RebuiltPipe> = HashMap::new();
    let mut holders = Vec::new();
    for (id, (bytes, capacity, fifo)) in data {
        match fifo {
            Some(path) => {
                // Holding the FIFO open read-write lets the ends open without
                // blocking and keeps the data until every husk has its end.
                let h = pipe::open_fifo(path, libc::O_RDWR)?;
                pipe::write_all(&h, bytes)?;
                holders.push(h);
            }
            None => {
                pipes.insert(id, pipe::rebuild(bytes, capacity)?);
            }
        }
    }
    // TCP: listeners bound first (not listening yet), then the connections, some
    // of which share a listener's port, then the listeners listen.
    let tcp_err = |e: tcp::TcpError| FdError::Open {
        path: "a TCP socket".into(),
        source: std::io::Error::other(e.to_string()),
    };
    let mut listeners: HashMap<usize, tcp::Listener> = HashMap::new();
    for (i, f) in files.iter().enumerate() {
        if let FileKind::TcpListen { addr, backlog } = &f.kind {
            let at = moves
                .listen
                .iter()
                .find(|(old, _)| old == addr)
                .map_or(*addr, |(_, new)| *new);
            listeners.insert(i, tcp::Listener::bind(at, *backlog).map_err(tcp_err)?);
        }
    }
    // The other end's rcv_nxt for each connection: from the controller, or from
    // the other end when it is in this image too.
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
    let mut rebuilt: HashMap<usize, OwnedFd> = HashMap::new();
    let mut held = Vec::new();
    for (i, f) in files.iter().enumerate() {
        if let FileKind::Tcp { conn } = &f.kind {
            if moves.is_reset(conn) {
                rebuilt.insert(i, tcp::reset(conn.local.is_ipv6()).map_err(tcp_err)?);
                continue;
            }
            let conn = trimmed(conn, peer_recv.get(&(conn.local, conn.remote)).copied());
            let (local, remote) = moves.tuple_of(&conn);
            let r = tcp::rebuild(&conn, local, remote).map_err(tcp_err)?;
            let dup = r
                .as_fd()
                .try_clone_to_owned()
                .map_err(|source| FdError::Open {
                    path: format!("TCP {} -> {}", conn.local, conn.remote),
                    source,
                })?;
            rebuilt.insert(i, dup);
            held.push(r);
        }
    }
    let mut listening: HashMap<usize, OwnedFd> = HashMap::new();
    for (i, l) in listeners {
        listening.insert(i, l.listen().map_err(tcp_err)?);
    }
    let mut out = Vec::with_capacity(files.len());
    for (i, f) in files.iter().enumerate() {
        let flags = f.flags as i32;
        let fd: OwnedFd = match &f.kind {
            FileKind::Tcp { .. } => {
                let fd = rebuilt.remove(&i).expect("rebuilt above");
                set_status_flags(&fd, flags)?;
                fd
            }
            FileKind::TcpListen { .. } => {
                let fd = listening.remove(&i).expect("bound above");
                set_status_flags(&fd, flags)?;
                fd
            }
            FileKind::EventFd { count, semaphore } => {
                let sem = if *semaphore { libc::EFD_SEMAPHORE } else { 0 };
                // SAFETY: eventfd(2) with plain arguments.
                let raw = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | sem) };
                if raw < 0 {
                    return Err(SysError::last("eventfd", "an eventfd").into());
                }
                // SAFETY: a fresh descriptor we own.
                let fd = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(raw) };
                // The counter (64 bits; eventfd's initial value has only 32) is
                // added by a write.
                // SAFETY: an 8-byte write from a local to our own eventfd.
                if *count != 0 && unsafe { libc::write(raw, (count as *const u64).cast(), 8) } != 8
                {
                    return Err(SysError::last("write", "an eventfd's counter").into());
                }
                set_status_flags(&fd, flags)?;
                fd
            }
            FileKind::Epoll { .. } => {
                // SAFETY: epoll_create1 with a constant flag.
                let raw = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
                if raw < 0 {
                    return Err(SysError::last("epoll_create1", "an epoll instance").into());
                }
                // SAFETY: a fresh descriptor we own.
                let fd = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(raw) };
                set_status_flags(&fd, flags)?;
                fd
            }
            FileKind::Udp {
                local,
                remote,
                opts,
            } => {
                // A bound address moves like a listener's.
                let at = moves
                    .listen
                    .iter()
                    .find(|(old, _)| old == local)
                    .map_or(*local, |(_, new)| *new);
                let fd = udp::rebuild(at, *remote, opts).map_err(|source| FdError::Open {
                    path: format!("UDP {local}"),
                    source,
                })?;
                set_status_flags(&fd, flags)?;
                fd
            }
            FileKind::Regular { path, pos, .. } | FileKind::Directory { path, pos } => {
                let file = open_path(path, flags)?;
                if *pos != 0 {
                    // SAFETY: plain lseek on a descriptor we own.
                    if unsafe { libc::lseek(file.as_raw_fd(), *pos as i64, libc::SEEK_SET) } < 0 {
                        return Err(SysError::last("lseek", path).into());
                    }
                }
                file
            }
            FileKind::CharDevice { path, .. } => open_path(path, flags)?,
            FileKind::Pipe {
                pipe_id,
                read_end,
                fifo_path,
                ..
            } => {
                if let Some(path) = fifo_path {
                    let fd = pipe::open_fifo(path, flags)?;
                    set_status_flags(&fd, flags)?;
                    fd
                } else {
                    let p = &pipes[pipe_id];
                    let src = if *read_end { &p.read } else { &p.write };
                    let dup = src.try_clone().map_err(|source| FdError::Open {
                        path: format!("pipe:[{pipe_id}]"),
                        source,
                    })?;
                    set_status_flags(&dup, flags)?;
                    dup
                }
            }
            FileKind::Inherited { .. } => {
                // Which fd number inherits is decided by the descriptor slot; any of
                // 0..=2 of ours stands in. The slot picks it at install time.
                let own = std::fs::File::open("/dev/null").map_err(|source| FdError::Open {
                    path: "/dev/null".into(),
                    source,
                })?;
                own.into()
            }
        };
        out.push(fd);
    }
    Ok(Opened {
        fds: out,
        holders,
        tcp: held,
    })
}

fn open_path(path: &str, flags: i32) -> Result<OwnedFd, FdError> {
    let acc = flags & libc::O_ACCMODE;
    let keep = flags
        & !(libc::O_ACCMODE
            | libc::O_CREAT
            | libc::O_EXCL
            | libc::O_TRUNC
            | libc::O_NOCTTY
            | libc::O_CLOEXEC);
    let f = std::fs::OpenOptions::new()
        .read(acc == libc::O_RDONLY || acc == libc::O_RDWR)
        .write(acc == libc::O_WRONLY || acc == libc::O_RDWR)
        .custom_flags(keep)
        .open(path)
        .map_err(|source| FdError::Open {
            path: path.to_string(),
            source,
        })?;
    Ok(f.into())
}

/// Set O_NONBLOCK/O_APPEND/... as the image says (status flags live in the
/// description, so every sharer sees them).
fn set_status_flags(fd: &OwnedFd, flags: i32) -> Result<(), FdError> {
    let settable =
        libc::O_APPEND | libc::O_NONBLOCK | libc::O_ASYNC | libc::O_DIRECT | libc::O_NOATIME;
    // SAFETY: F_SETFL on a descriptor we own.
    if unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags & settable) } < 0 {
        return Err(SysError::last("fcntl(F_SETFL)", fd.as_raw_fd()).into());
    }
    Ok(())
}

/// Install the descriptors of one husk. `pidfd_slot` is the husk's descriptor for a
/// pidfd of the restorer; `ours` maps a file id to the restorer's descriptor.
pub fn install(
    r: &mut Remote,
    pidfd_slot: u64,
    fds: &[Fd],
    files: &[OpenFile],
    ours: &[OwnedFd],
) -> Result<(), FdError> {
    for fd in fds {
        let src: RawFd = match files[fd.file as usize].kind {
            // Inherited descriptors come from the restore command's own 0..=2.
            FileKind::Inherited { .. } => fd.fd,
            _ => ours[fd.file as usize].as_raw_fd(),
        };
        let tmp = r.syscall(nr::PIDFD_GETFD, [pidfd_slot, src as u64, 0, 0, 0, 0])?;
        if tmp as RawFd == fd.fd {
            let v = if fd.cloexec { libc::FD_CLOEXEC } else { 0 };
            r.syscall(nr::FCNTL, [tmp, libc::F_SETFD as u64, v as u64, 0, 0, 0])?;
        } else {
            let fl = if fd.cloexec { libc::O_CLOEXEC } else { 0 };
            r.syscall(nr::DUP3, [tmp, fd.fd as u64, fl as u64, 0, 0, 0])?;
            r.syscall(nr::CLOSE, [tmp, 0, 0, 0, 0, 0])?;
        }
    }
    Ok(())
}

/// Registers the targets of the epoll instances among `fds` again, from inside
/// the husk, once all its descriptors are installed: an epoll item is keyed by the
/// descriptor number it was added with, so it must be added with the process's
/// own numbers. An instance shared by several processes is filled once, by the
/// first (`done` holds the files already filled).
pub fn register_epoll(
    r: &mut Remote,
    fds: &[Fd],
    files: &[OpenFile],
    done: &mut std::collections::HashSet<u32>,
) -> Result<(), FdError> {
    for fd in fds {
        let FileKind::Epoll { targets } = &files[fd.file as usize].kind else {
            continue;
        };
        if !done.insert(fd.file) {
            continue;
        }
        for t in targets {
            // struct epoll_event is packed on x86-64: u32 events, u64 data.
            let mut ev = [0u8; 12];
            ev[..4].copy_from_slice(&t.events.to_ne_bytes());
            ev[4..].copy_from_slice(&t.data.to_ne_bytes());
            let a = r.put(0, &ev)?;
            r.syscall(
                nr::EPOLL_CTL,
                [
                    fd.fd as u64,
                    libc::EPOLL_CTL_ADD as u64,
                    t.fd as u64,
                    a,
                    0,
                    0,
                ],
            )?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod epoll_tests {
    use super::*;

    #[test]
    fn epoll_fdinfo_gives_each_target_with_its_events_and_data() {
        let text = "pos:\t0\nflags:\t02000002\nmnt_id:\t15\nino:\t1057\n\
                    tfd:        5 events:       19 data:     7f2a1c000b70  pos:0 ino:3f2 sdev:8\n\
                    tfd:       12 events: 80000001 data:                9  pos:0 ino:3f9 sdev:e\n";
        let t = epoll_targets(text).unwrap();
        assert_eq!(t.len(), 2);
        assert_eq!(
            (t[0].fd, t[0].events, t[0].data),
            (5, 0x19, 0x7f2a_1c00_0b70)
        );
        assert_eq!((t[1].fd, t[1].events, t[1].data), (12, 0x8000_0001, 9));
        assert_eq!(epoll_targets("pos:\t0\n").unwrap(), vec![]);
        assert!(epoll_targets("tfd: x events: 1 data: 2\n").is_none());
    }
}
