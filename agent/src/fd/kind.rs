//! One trait for every kind of descriptor, and the table of kinds.
//!
//! Each kind (regular file, pipe, TCP connection, ...) lives in its own file with
//! its dump, its restore and its description, as Firecracker keeps a device's
//! `Persist` beside the device. [`FdTable::dump_process`] and [`super::open_all`]
//! only walk [`STEPS`]: supporting a new kind (a timerfd, say) means one new file
//! implementing [`Persist`] and one line in that table.
//!
//! We weighed one `match` over `FileKind` per operation (what this replaced: two
//! matches of ~200 lines each, one per direction, and a third in `inspect`) and a
//! trait with an associated state type per kind (which a table of trait objects
//! cannot hold). The restore state that crosses descriptions (a pipe's two ends,
//! TCP listeners that must be bound before the connections sharing their port)
//! lives in [`Opening`], filled by each kind's [`Persist::prepare`] before any
//! description is opened.

use std::collections::HashMap;
use std::os::fd::{OwnedFd, RawFd};

use ckpt_shared::image::{FileKind, OpenFile};
use libc::pid_t;
use serde_json::Value;

use super::{
    chardev, dir, epoll, eventfd, file, inherited, object, pipe, pty, signalfd, tcp, timerfd, udp,
    unix,
};
use super::{FdError, FdTable, Meta, Moves};

/// What the dump has read of one descriptor of `pid` before a kind claims it.
pub struct Seen<'a> {
    pub pid: pid_t,
    pub fd: RawFd,
    /// The target of `/proc/PID/fd/N`.
    pub link: &'a str,
    pub meta: &'a Meta,
    /// The file position (fdinfo; 0 for a socket).
    pub pos: u64,
    /// The status flags, without `O_CLOEXEC`.
    pub flags: u32,
    /// A pidfd of `pid`, to take duplicates with.
    pub pidfd: &'a OwnedFd,
    /// For a socket: our duplicate and what TCP says of it. A kind that keeps the
    /// duplicate takes it.
    pub sock: &'a mut Option<(OwnedFd, tcp::Kind)>,
}

impl Seen<'_> {
    /// The dump's refusal of this descriptor: `what` it is.
    pub fn unsupported(&self, what: String) -> FdError {
        FdError::Unsupported {
            pid: self.pid,
            fd: self.fd,
            what,
        }
    }

    /// What TCP says of the socket, if this is one.
    pub fn socket_kind(&self) -> Option<&tcp::Kind> {
        self.sock.as_ref().map(|(_, k)| k)
    }
}

/// What the restore has made so far for descriptions that need more than
/// themselves: filled by [`Persist::prepare`], used by [`Persist::open`].
pub struct Opening<'a> {
    pub moves: &'a Moves,
    /// Rebuilt anonymous pipes, by pipe id.
    pub pipes: HashMap<u64, pipe::RebuiltPipe>,
    /// FIFO holders, kept open until every husk has its end.
    pub holders: Vec<OwnedFd>,
    pub tcp: tcp::Opening,
    pub unix: unix::Opening,
    /// Rebuilt pseudo-terminal pairs, by their `N` at the dump.
    pub ptys: HashMap<u32, pty::Rebuilt>,
    /// The restorer's descriptors of the image's memory objects, by id.
    pub objects: &'a HashMap<u32, OwnedFd>,
}

/// Save and restore of one kind of open file description.
pub trait Persist: Sync {
    /// Dump: `None` when `seen` is not of this kind; else how the image keeps it,
    /// or why it cannot be saved.
    fn dump(&self, t: &mut FdTable, seen: &mut Seen<'_>) -> Option<Result<FileKind, FdError>>;

    /// Whether the image's `kind` is one of this kind's.
    fn owns(&self, kind: &FileKind) -> bool;

    /// Restore, before any description is opened: what needs the whole image.
    fn prepare(&self, _files: &[OpenFile], _o: &mut Opening<'_>) -> Result<(), FdError> {
        Ok(())
    }

    /// Restore: the description `files[i]` (`f`, owned by this kind), opened in
    /// the restorer, for [`super::install`] to hand to the husks.
    fn open(&self, i: usize, f: &OpenFile, o: &mut Opening<'_>) -> Result<OwnedFd, FdError>;

    /// The one line `inspect` and `ckpt show` print for `kind`.
    fn describe(&self, kind: &FileKind) -> String;

    /// `kind` for `inspect --json`.
    fn json(&self, kind: &FileKind) -> Value;
}

/// One step of the dump's classification.
pub enum Step {
    /// A kind that may claim the descriptor.
    Kind(&'static dyn Persist),
    /// A refusal, at the point in the order where it is decided: `Some` error
    /// refuses the descriptor.
    Refuse(fn(&Seen<'_>) -> Option<FdError>),
}

/// Every kind, in the order the dump tries them: the first that claims a
/// descriptor takes it. The order matters where tests overlap: the sockets before
/// everything else, a stdio socket that is not TCP inherited before UDP is
/// considered, the anonymous inodes and deleted files refused before the file
/// types are looked at.
pub const STEPS: &[Step] = &[
    Step::Kind(&pipe::Pipe),
    Step::Kind(&tcp::Tcp),
    Step::Kind(&inherited::Inherited),
    Step::Kind(&udp::Udp),
    Step::Kind(&unix::Unix),
    Step::Refuse(other_socket),
    Step::Kind(&eventfd::EventFd),
    Step::Kind(&epoll::Epoll),
    Step::Kind(&timerfd::TimerFd),
    Step::Kind(&signalfd::SignalFd),
    Step::Refuse(other_anon_inode),
    Step::Kind(&object::Object),
    Step::Refuse(deleted),
    Step::Kind(&dir::Dir),
    Step::Kind(&file::File),
    Step::Kind(&pty::Pty),
    Step::Kind(&chardev::CharDev),
];

/// The kinds of [`STEPS`].
pub fn kinds() -> impl Iterator<Item = &'static dyn Persist> {
    STEPS.iter().filter_map(|s| match s {
        Step::Kind(k) => Some(*k),
        Step::Refuse(_) => None,
    })
}

/// The kind that owns the image's `kind`.
pub fn of(kind: &FileKind) -> &'static dyn Persist {
    kinds()
        .find(|k| k.owns(kind))
        .expect("every FileKind has its kind in STEPS")
}

/// Dump: how the image keeps the descriptor `seen`, by the first kind that claims
/// it.
pub fn dump(t: &mut FdTable, seen: &mut Seen<'_>) -> Result<FileKind, FdError> {
    for step in STEPS {
        match step {
            Step::Kind(k) => {
                if let Some(got) = k.dump(t, seen) {
                    return got;
                }
            }
            Step::Refuse(refuse) => {
                if let Some(e) = refuse(seen) {
                    return Err(e);
                }
            }
        }
    }
    Err(seen.unsupported(format!("{} (not a supported file type)", seen.link)))
}

/// A socket no kind took.
fn other_socket(seen: &Seen<'_>) -> Option<FdError> {
    let (dup, _) = seen.sock.as_ref()?;
    Some(
        match crate::sys::socket_domain_type(std::os::fd::AsRawFd::as_raw_fd(dup)) {
            Ok((domain, _)) => seen.unsupported(format!("a {} socket", domain_name(domain))),
            Err(e) => e.into(),
        },
    )
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

/// An anonymous inode no kind took (inotify, fanotify, userfaultfd, ...).
fn other_anon_inode(seen: &Seen<'_>) -> Option<FdError> {
    let rest = seen.link.strip_prefix("anon_inode:")?;
    Some(seen.unsupported(format!(
        "an {} (anon inode)",
        rest.trim_matches(|c| c == '[' || c == ']')
    )))
}

/// A file deleted since it was opened that the object kind did not take (not a
/// regular file): nothing to open again by path.
fn deleted(seen: &Seen<'_>) -> Option<FdError> {
    seen.link
        .ends_with(" (deleted)")
        .then(|| seen.unsupported(format!("a deleted file ({})", seen.link)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use ckpt_shared::image::{EpollTarget, UdpOpts};

    /// One of each `FileKind`: the table must own every one exactly once, or the
    /// restore of that kind would panic in [`of`] (or pick the wrong kind).
    #[test]
    fn every_file_kind_has_exactly_one_owner() {
        let addr: std::net::SocketAddr = "127.0.0.1:1".parse().unwrap();
        let all = [
            FileKind::Regular {
                path: "/f".into(),
                pos: 0,
                check: 0,
            },
            FileKind::Directory {
                path: "/".into(),
                pos: 0,
            },
            FileKind::CharDevice {
                path: "/dev/null".into(),
                rdev: 0,
            },
            FileKind::Pipe {
                pipe_id: 1,
                read_end: true,
                fifo_path: None,
                buffered: vec![],
                capacity: 0,
            },
            FileKind::Inherited { what: "tty".into() },
            FileKind::Tcp {
                conn: Box::new(tcp::TcpConn {
                    local: addr,
                    remote: addr,
                    send_seq: 0,
                    recv_seq: 0,
                    send_queue: vec![],
                    unsent: 0,
                    recv_queue: vec![],
                    mss: 1460,
                    snd_wscale: None,
                    rcv_wscale: None,
                    sack: false,
                    timestamps: false,
                    timestamp: 0,
                    window: Default::default(),
                    sndbuf: 0,
                    rcvbuf: 0,
                    opts: Default::default(),
                }),
            },
            FileKind::TcpListen {
                addr,
                backlog: 1,
                opts: Default::default(),
            },
            FileKind::Udp {
                local: addr,
                remote: None,
                opts: UdpOpts::default(),
            },
            FileKind::EventFd {
                count: 0,
                semaphore: false,
            },
            FileKind::Unix(Box::new(ckpt_shared::image::UnixSock {
                ino: 1,
                ty: libc::SOCK_STREAM,
                name: None,
                listen: None,
                peer: None,
                queue: vec![],
                passcred: false,
                sndbuf: 0,
                rcvbuf: 0,
            })),
            FileKind::Object {
                shmem_id: 0,
                pos: 0,
            },
            FileKind::Epoll {
                targets: vec![EpollTarget {
                    fd: 1,
                    events: 1,
                    data: 0,
                }],
            },
            FileKind::TimerFd {
                clock: libc::CLOCK_MONOTONIC,
                flags: 0,
                value_ns: 1,
                interval_ns: 0,
                ticks: 0,
                deadline_ns: None,
            },
            FileKind::SignalFd { mask: 1 << 9 },
            FileKind::PtyMaster {
                pty: Box::new(ckpt_shared::image::PtyPair {
                    index: 3,
                    path: "/dev/ptmx".into(),
                    termios: ckpt_shared::image::Termios {
                        iflag: 0,
                        oflag: 0,
                        cflag: 0,
                        lflag: 0,
                        line: 0,
                        cc: vec![0; 19],
                        ispeed: 0,
                        ospeed: 0,
                    },
                    winsize: Default::default(),
                    packet: false,
                    locked: false,
                    slave_closed: false,
                    input: Default::default(),
                    output: vec![],
                    session: None,
                    foreground: None,
                }),
            },
            FileKind::PtySlave { index: 3 },
        ];
        for k in &all {
            assert_eq!(kinds().filter(|p| p.owns(k)).count(), 1, "{k:?}");
            assert!(!of(k).describe(k).is_empty());
        }
    }
}
