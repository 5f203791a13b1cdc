//! Descriptor tables — dump and restore.
//!
//! Dump: each descriptor is classified from `/proc/PID/fd/N` (the link and a `stat`
//! through it) and `/proc/PID/fdinfo/N` (position and flags); a socket also from
//! our duplicate of it (`pidfd_getfd`). Descriptors that share one open file
//! description, across processes too (dup, fork), are found with
//! `kcmp(KCMP_FILE)` and stored once, so the sharing comes back.
//!
//! Restore: the restorer opens every description itself ([`open_all`]), then each
//! husk takes its descriptors with an injected `pidfd_getfd` and `dup3`s them into
//! place. Descriptions shared between processes are shared again.
//!
//! Supported, one kind per file behind one trait ([`kind::Persist`], table
//! [`kind::STEPS`]):
//! - regular files (`file.rs`) and directories (`dir.rs`), reopened by path at their
//!   position, with their status flags;
//! - `/dev/{null,zero,random,urandom}` (`chardev.rs`);
//! - pipes and FIFOs, with the data buffered in them ([`pipe`]);
//! - eventfds, with their counter and semaphore mode (`eventfd.rs`);
//! - epoll instances, with their targets, events and data (`epoll.rs`);
//! - pseudo-terminal pairs inside the tree, with their settings, queues and
//!   controlling terminal (`pty.rs`, queues in `ptyq.rs`);
//! - timerfds, with their clock, time left, interval and the expirations not yet
//!   read (`timerfd.rs`), and signalfds with their mask (`signalfd.rs`);
//! - descriptors of memory objects (memfds, deleted files, tmpfs files the tree
//!   maps shared), whose content the image holds ([`object`]);
//! - established TCP connections, with their queues, read under the job's
//!   network lock with `TCP_REPAIR`, and listening TCP sockets without pending
//!   connections ([`tcp`]);
//! - UDP sockets, bound and connected, with their options; queued datagrams are
//!   not kept ([`udp`]).
//!
//! Descriptors 0–2 that lead out of the tree (a terminal, a pipe or a socket to
//! the shell) are inherited from the restore command (`inherited.rs`). Everything
//! else (inotify, other devices) is
//! refused at dump with a message naming the fd and the PID.

mod chardev;
mod dir;
mod epoll;
mod eventfd;
mod file;
mod inherited;
pub mod kind;
pub mod object;
pub mod pipe;
pub mod pty;
mod ptyq;
mod signalfd;
pub mod sockopt;
pub mod tcp;
mod tcp_reset;
mod timerfd;
pub mod udp;
mod unix;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

use ckpt_shared::image::{Fd, FileKind, OpenFile};
use libc::pid_t;

use crate::inject::{InjectError, Remote};
use crate::sys::{self, nr, proc, SysError};

pub use epoll::epoll_targets;

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

/// What of a descriptor's `stat` the kinds use.
#[derive(Debug, Clone, Copy)]
pub struct Meta {
    pub dev: u64,
    pub ino: u64,
    pub mode: u32,
    pub rdev: u64,
}

impl Meta {
    fn of(st: &libc::stat) -> Meta {
        Meta {
            dev: st.st_dev,
            ino: st.st_ino,
            mode: st.st_mode,
            rdev: st.st_rdev,
        }
    }

    /// Whether the file type (`S_IFMT` bits) is `fmt`.
    pub fn is(&self, fmt: libc::mode_t) -> bool {
        self.mode & libc::S_IFMT == fmt
    }
}

/// What `/proc` says of one descriptor (its link, its metadata, its position and
/// flags), and for a socket our duplicate and its kind.
type Looked = (String, Meta, (u64, u32), Option<(OwnedFd, tcp::Kind)>);

/// The one line `inspect` and `ckpt show` print for a description.
pub fn describe(kind: &FileKind) -> String {
    kind::of(kind).describe(kind)
}

/// A description for `inspect --json`.
pub fn json(kind: &FileKind) -> serde_json::Value {
    kind::of(kind).json(kind)
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
    /// The files of each (dev, ino), in the kernel's order of their open file
    /// descriptions (kcmp): every anonymous-inode descriptor (eventfd, epoll,
    /// timerfd...) shares one inode, so finding a shared description must not
    /// compare a descriptor with each of them.
    by_inode: HashMap<(u64, u64), Vec<u32>>,
    /// What the socket diagnostics say of every UNIX socket, read once at the
    /// first UNIX socket of the dump (the tree is frozen: its sockets hold still).
    pub unix_diag: Option<HashMap<u64, crate::sys::unix::Diag>>,
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
    /// Our duplicates of the pty masters, read by [`FdTable::finish`].
    ptys: Vec<pty::HeldMaster>,
    /// The memory objects found behind descriptors (memfds, deleted files); the
    /// dump hands them on to the mappings' classification.
    pub shm: crate::mem::ShmemPlan,
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
        let pidfd = sys::pidfd_open(pid)?;
        let fds = proc::fds(pid)?;
        // What /proc says of each descriptor, and a duplicate of each socket: read
        // on a few threads at once (with a thousand sockets, /proc alone takes tens
        // of milliseconds, all of it while the tree stands still).
        let dirs = proc::FdDirs::open(pid)?;
        let looked = parallel_map(&fds, |&fd| look(pid, &pidfd, &dirs, fd));
        let mut out = Vec::with_capacity(fds.len());
        for (&fd, looked) in fds.iter().zip(looked) {
            let (link, meta, (pos, flags), mut sock) = looked?;
            if sock.is_some() {
                self.cloexec_later.push((pid, fd));
            }
            let cloexec = flags & libc::O_CLOEXEC as u32 != 0;
            let flags = flags & !(libc::O_CLOEXEC as u32);
            // Already seen this description (dup, fork)?
            let file = match self.search(pid, fd, &meta)? {
                Ok(i) => i,
                Err(at) => {
                    let mut seen = kind::Seen {
                        pid,
                        fd,
                        link: &link,
                        meta: &meta,
                        pos,
                        flags,
                        pidfd: &pidfd,
                        sock: &mut sock,
                    };
                    let kind = kind::dump(self, &mut seen)?;
                    self.add(at, pid, fd, &meta, flags, kind)
                }
            };
            out.push(Fd { fd, cloexec, file });
        }
        Ok(out)
    }

    /// Binary search of `fd` of `pid` among the files of its inode, in kcmp
    /// order: the file it shares its description with, or where it goes.
    fn search(&self, pid: pid_t, fd: RawFd, meta: &Meta) -> Result<Result<u32, usize>, FdError> {
        let Some(ids) = self.by_inode.get(&(meta.dev, meta.ino)) else {
            return Ok(Err(0));
        };
        let (mut lo, mut hi) = (0, ids.len());
        while lo < hi {
            let mid = (lo + hi) / 2;
            let (rp, rfd, _, _) = self.reps[ids[mid] as usize];
            match sys::file_description_order(pid, fd, rp, rfd)? {
                std::cmp::Ordering::Equal => return Ok(Ok(ids[mid])),
                std::cmp::Ordering::Less => hi = mid,
                std::cmp::Ordering::Greater => lo = mid + 1,
            }
        }
        Ok(Err(lo))
    }

    /// A new file, with descriptor `fd` of `pid` as its representative, at
    /// place `at` among its inode's files (from [`FdTable::search`]: no kind adds
    /// a file while the descriptor is classified, so the place still holds).
    fn add(
        &mut self,
        at: usize,
        pid: pid_t,
        fd: RawFd,
        meta: &Meta,
        flags: u32,
        kind: FileKind,
    ) -> u32 {
        let id = self.files.len() as u32;
        self.files.push(OpenFile { id, flags, kind });
        self.reps.push((pid, fd, meta.dev, meta.ino));
        self.by_inode
            .entry((meta.dev, meta.ino))
            .or_default()
            .insert(at, id);
        id
    }

    /// Each TCP socket found so far, as (process, descriptor).
    pub fn tcp_sockets(&self) -> Vec<(pid_t, RawFd)> {
        self.tcp.iter().map(|t| (t.pid, t.fd)).collect()
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

    /// Once the mappings are classified: a regular file that the tree also maps
    /// as a memory object (a tmpfs file mapped shared) is a descriptor of that
    /// object, so that it reaches the file the restore makes, not the path.
    pub fn adopt_objects(&mut self, objects: &crate::mem::ShmemPlan) {
        for (f, &(_, _, dev, ino)) in self.files.iter_mut().zip(&self.reps) {
            if let FileKind::Regular { pos, .. } = f.kind {
                if let Some(id) = objects.known(dev, ino) {
                    f.kind = FileKind::Object { shmem_id: id, pos };
                }
            }
        }
    }

    /// After every process: anonymous pipes and pty slaves with an end outside the
    /// tree can only be inherited stdio; epoll instances must watch descriptors
    /// still open where they are filled again; the pty pairs are read (still
    /// frozen).
    pub fn finish(&mut self, procs: &mut [(pid_t, &mut Vec<Fd>)]) -> Result<(), FdError> {
        epoll::check_targets_open(&self.files, procs)?;
        let reps: Vec<(pid_t, RawFd)> = self.reps.iter().map(|r| (r.0, r.1)).collect();
        unix::check_peers(&self.files, &reps)?;
        pty::settle(&mut self.files, &mut self.ptys, procs)?;
        pipe::settle_outside(&mut self.files, &self.pipes, procs)
    }
}

/// What `/proc` says of descriptor `fd` of `pid`, and for a socket our duplicate
/// and its kind.
fn look(pid: pid_t, pidfd: &OwnedFd, dirs: &proc::FdDirs, fd: RawFd) -> Result<Looked, FdError> {
    let link = dirs.link(fd)?;
    let socket_ino = link
        .strip_prefix("socket:[")
        .and_then(|r| r.strip_suffix(']'))
        .and_then(|n| n.parse::<u64>().ok());
    let Some(ino) = socket_ino else {
        let meta = Meta::of(&dirs.stat(fd)?);
        return Ok((link, meta, dirs.info(fd)?, None));
    };
    // A socket's inode is in its link, and nothing else of a stat is used for it:
    // one system call less per socket.
    let meta = Meta {
        dev: 0,
        ino,
        mode: libc::S_IFSOCK,
        rdev: 0,
    };
    let dup = sys::pidfd_getfd(pidfd, pid, fd)?;
    let kind = tcp::kind(dup.as_fd());
    // A socket's status flags are its description's, which our duplicate shares
    // (F_GETFL); only its close-on-exec bit needs fdinfo, which costs ~40 µs a
    // descriptor, and is read later (`cloexec_later`).
    let fl = sys::fd::get_status_flags(dup.as_fd(), "a socket")?;
    Ok((link, meta, (0, fl), Some((dup, kind))))
}

/// What [`open_all`] made: our descriptor for each file id; FIFO holders (kept open
/// until the husks took their ends); and the TCP connections, rebuilt in repair
/// mode, to be finished (repair off, send queue written) at the release, once every
/// end of every connection exists.
pub struct Opened {
    pub fds: Vec<OwnedFd>,
    pub holders: Vec<OwnedFd>,
    pub tcp: Vec<tcp::Rebuilt>,
    /// Controlling terminals to set in session leaders' husks.
    pub ctty: Vec<pty::Ctty>,
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

/// Open every description of the image in the restorer: first what needs the
/// whole image (pipes, then TCP), then each description by its kind.
pub fn open_all(
    files: &[OpenFile],
    moves: &Moves,
    objects: &HashMap<u32, OwnedFd>,
) -> Result<Opened, FdError> {
    let mut o = kind::Opening {
        moves,
        objects,
        pipes: HashMap::new(),
        holders: Vec::new(),
        tcp: tcp::Opening::default(),
        unix: unix::Opening::default(),
        ptys: HashMap::new(),
    };
    for k in kind::kinds() {
        k.prepare(files, &mut o)?;
    }
    let mut fds = Vec::with_capacity(files.len());
    for (i, f) in files.iter().enumerate() {
        fds.push(kind::of(&f.kind).open(i, f, &mut o)?);
    }
    let ctty = pty::finish_open(o.ptys, &mut o.holders);
    Ok(Opened {
        fds,
        holders: o.holders,
        tcp: o.tcp.held,
        ctty,
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
    Ok(sys::fd::set_status_flags(fd.as_fd(), flags & settable)?)
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
