//! Pseudo-terminal pairs inside the tree: `/dev/ptmx` masters and their
//! `/dev/pts/N` slaves (Open MPI's daemons hold two pairs per rank, for its
//! output).
//!
//! Dump: a master is claimed by its device number (5:2) and a duplicate of it is
//! kept; a slave (major 136–143) records its `N`. Once every process's table is
//! known ([`settle`], still frozen), each pair is read through the master
//! duplicate: the slave's settings (`TCGETS2`: a termios call on a master acts on
//! its slave), window size, packet mode, whether it is still locked, the session
//! it is the controlling terminal of (`TIOCGSID`) and its foreground group
//! (`TIOCGPGRP`), and the queues both ways, taken out and put back at once
//! ([`super::ptyq`]). A session must be led by a process of the tree; a
//! foreground group that no process of the tree is in any more (a job that ended)
//! is not kept, with a warning. A slave whose master is outside the tree (the
//! user's terminal) is inherited from the restore command on descriptors 0–2, as
//! before, and refused anywhere else.
//!
//! Restore: a new pair from the same path (its `N` may differ), unlocked unless it
//! was locked, its settings, window size and queues put back, then packet mode;
//! every slave description is opened through the new master (`TIOCGPTPEER`).
//! The controlling terminal is set in the session leader's husk right after its
//! `setsid`, before it forks the rest of its session, who inherit it
//! ([`set_ctty`]), and its foreground group once the groups exist
//! ([`set_foreground`]). The restorer holds one slave descriptor of each pair
//! until the husks have theirs; a pair whose slave was closed by everyone at the
//! dump is closed again by that.
//!
//! Not kept: a program's own idea of its slave's name (`ptsname`), which may now
//! name another pair; a slave held only by processes outside the tree, which the
//! dump does not see (the pair comes back as if its slave was never opened).

use std::collections::HashMap;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;

use ckpt_shared::image::{Fd, FileKind, OpenFile, PtyPair, WinSize};
use libc::pid_t;
use serde_json::{json, Value};
use tracing::warn;

use super::kind::{Opening, Persist, Seen};
use super::ptyq::{self, PtyError, LDISC_ROOM};
use super::{set_status_flags, FdError, FdTable};
use crate::inject::Remote;
use crate::sys::{self, nr, proc, tty};

pub struct Pty;

/// A master of the tree, kept from its dump until [`settle`] reads its pair.
pub struct HeldMaster {
    /// Its file (index in [`FdTable::files`]).
    file: u32,
    pid: pid_t,
    fd: i32,
    dup: OwnedFd,
    path: String,
}

/// A pair rebuilt by the restore.
pub struct Rebuilt {
    master: OwnedFd,
    /// Our descriptor of its slave, if the pair needs one open.
    peer: Option<OwnedFd>,
    session: Option<i32>,
    foreground: Option<i32>,
}

/// A controlling terminal to set in a session leader's husk: the restorer's
/// descriptor of its slave.
pub struct Ctty {
    pub session: i32,
    pub foreground: Option<i32>,
    pub slave: OwnedFd,
}

const PTMX: (u32, u32) = (5, 2);

fn is_slave_major(major: u32) -> bool {
    (136..=143).contains(&major)
}

impl Persist for Pty {
    fn dump(&self, t: &mut FdTable, seen: &mut Seen<'_>) -> Option<Result<FileKind, FdError>> {
        if !seen.meta.is(libc::S_IFCHR) {
            return None;
        }
        let rdev = seen.meta.rdev;
        let (major, minor) = (libc::major(rdev), libc::minor(rdev));
        if (major, minor) == PTMX {
            return Some(hold_master(t, seen));
        }
        if !is_slave_major(major) {
            return None;
        }
        Some(
            match seen.link.rsplit('/').next().and_then(|n| n.parse().ok()) {
                Some(index) => Ok(FileKind::PtySlave { index }),
                None => Err(seen.unsupported(format!("a terminal at {}", seen.link))),
            },
        )
    }

    fn owns(&self, kind: &FileKind) -> bool {
        matches!(kind, FileKind::PtyMaster { .. } | FileKind::PtySlave { .. })
    }

    fn prepare(&self, files: &[OpenFile], o: &mut Opening<'_>) -> Result<(), FdError> {
        for f in files {
            if let FileKind::PtyMaster { pty } = &f.kind {
                let slaves = files
                    .iter()
                    .any(|s| matches!(s.kind, FileKind::PtySlave { index } if index == pty.index));
                o.ptys.insert(pty.index, rebuild(pty, f.flags, slaves)?);
            }
        }
        Ok(())
    }

    fn open(&self, _: usize, f: &OpenFile, o: &mut Opening<'_>) -> Result<OwnedFd, FdError> {
        let index = match &f.kind {
            FileKind::PtyMaster { pty } => pty.index,
            FileKind::PtySlave { index } => *index,
            _ => unreachable!("owns() chose this kind"),
        };
        let what = format!("/dev/pts/{index} (restored)");
        let pair = o.ptys.get(&index).ok_or_else(|| FdError::Open {
            path: what.clone(),
            source: std::io::Error::other("its master is not in the image"),
        })?;
        let fd = match &f.kind {
            FileKind::PtyMaster { .. } => pair
                .master
                .try_clone()
                .map_err(|source| FdError::Open { path: what, source })?,
            _ => tty::open_peer(pair.master.as_fd(), f.flags as i32 & libc::O_ACCMODE)?,
        };
        set_status_flags(&fd, f.flags as i32)?;
        Ok(fd)
    }

    fn describe(&self, kind: &FileKind) -> String {
        match kind {
            FileKind::PtyMaster { pty } => describe_pair(pty),
            FileKind::PtySlave { index } => format!("pty slave /dev/pts/{index}"),
            _ => unreachable!("owns() chose this kind"),
        }
    }

    fn json(&self, kind: &FileKind) -> Value {
        match kind {
            FileKind::PtyMaster { pty } => json!({
                "kind": "pty-master", "index": pty.index, "path": pty.path,
                "rows": pty.winsize.rows, "cols": pty.winsize.cols,
                "canonical": pty.termios.lflag & libc::ICANON != 0,
                "packet": pty.packet, "locked": pty.locked, "slave_closed": pty.slave_closed,
                "input_lines": pty.input.lines.len(), "input_rest": pty.input.rest.len(),
                "output": pty.output.len(), "session": pty.session,
                "foreground": pty.foreground,
            }),
            FileKind::PtySlave { index } => json!({"kind": "pty-slave", "index": index}),
            _ => unreachable!("owns() chose this kind"),
        }
    }
}

fn describe_pair(p: &PtyPair) -> String {
    let input: usize =
        p.input.lines.iter().map(|l| l.bytes.len()).sum::<usize>() + p.input.rest.len();
    format!(
        "pty master {} (pts {}), {}x{}, {}{}{}, {input} bytes queued in, {} out{}",
        p.path,
        p.index,
        p.winsize.cols,
        p.winsize.rows,
        if p.termios.lflag & libc::ICANON != 0 {
            "canonical"
        } else {
            "raw"
        },
        if p.packet { ", packet mode" } else { "" },
        if p.locked {
            ", locked"
        } else if p.slave_closed {
            ", slave closed"
        } else {
            ""
        },
        p.output.len(),
        p.session
            .map(|s| format!(", controlling terminal of session {s}"))
            .unwrap_or_default(),
    )
}

/// Dump: a master, kept (duplicated) until [`settle`] reads its pair.
fn hold_master(t: &mut FdTable, seen: &Seen<'_>) -> Result<FileKind, FdError> {
    let dup = sys::pidfd_getfd(seen.pidfd, seen.pid, seen.fd)?;
    t.ptys.push(HeldMaster {
        file: t.files.len() as u32,
        pid: seen.pid,
        fd: seen.fd,
        dup,
        path: seen.link.to_string(),
    });
    Ok(FileKind::Inherited {
        what: "a pty master not read yet".into(),
    })
}

/// After every process, still frozen: slaves whose master is outside the tree
/// are inherited (0–2) or refused; every pair of the tree is read.
pub(super) fn settle(
    files: &mut [OpenFile],
    held: &mut Vec<HeldMaster>,
    procs: &[(pid_t, &mut Vec<Fd>)],
) -> Result<(), FdError> {
    let mut indices = Vec::with_capacity(held.len());
    for h in held.iter() {
        indices.push(tty::pty_index(h.dup.as_fd())?);
    }
    let outside =
        |k: &FileKind| matches!(k, FileKind::PtySlave { index } if !indices.contains(index));
    for (pid, fds) in procs {
        for fd in fds.iter() {
            let f = &files[fd.file as usize];
            if fd.fd > 2 && outside(&f.kind) {
                let FileKind::PtySlave { index } = f.kind else {
                    unreachable!()
                };
                return Err(FdError::Unsupported {
                    pid: *pid,
                    fd: fd.fd,
                    what: format!("a terminal whose master is outside the tree (/dev/pts/{index})"),
                });
            }
        }
    }
    for f in files.iter_mut() {
        if let FileKind::PtySlave { index } = f.kind {
            if outside(&f.kind) {
                f.kind = FileKind::Inherited {
                    what: format!("/dev/pts/{index}"),
                };
            }
        }
    }
    let mut groups = Vec::with_capacity(procs.len());
    for (pid, _) in procs {
        let st = proc::stat(*pid)?;
        groups.push((*pid, st.pgid, st.sid));
    }
    for (h, index) in held.drain(..).zip(indices) {
        let slaves = files
            .iter()
            .any(|f| matches!(f.kind, FileKind::PtySlave { index: i } if i == index));
        let refuse = |what: String| FdError::Unsupported {
            pid: h.pid,
            fd: h.fd,
            what: format!("the pty master of /dev/pts/{index}, but {what}"),
        };
        let pair = read_pair(&h, index, slaves, &groups).map_err(|e| match e {
            PairError::Pty(PtyError::Unsupported(what)) => refuse(what),
            PairError::Pty(PtyError::Sys(e)) => FdError::Sys(e),
        })?;
        files[h.file as usize].kind = FileKind::PtyMaster {
            pty: Box::new(pair),
        };
    }
    Ok(())
}

#[derive(Debug)]
enum PairError {
    Pty(PtyError),
}

impl From<PtyError> for PairError {
    fn from(e: PtyError) -> Self {
        PairError::Pty(e)
    }
}

impl From<sys::SysError> for PairError {
    fn from(e: sys::SysError) -> Self {
        PairError::Pty(PtyError::Sys(e))
    }
}

fn unsupported(what: impl Into<String>) -> PairError {
    PairError::Pty(PtyError::Unsupported(what.into()))
}

/// One pair of the tree, through our duplicate of its master; `slaves`: whether
/// the tree holds a descriptor of its slave; `groups`: (pid, pgid, sid) of
/// every process of the tree.
fn read_pair(
    h: &HeldMaster,
    index: u32,
    slaves: bool,
    groups: &[(pid_t, pid_t, pid_t)],
) -> Result<PtyPair, PairError> {
    let m = h.dup.as_fd();
    let t = tty::get_termios(m)?;
    let locked = tty::pty_locked(m)?;
    let packet = tty::packet_mode(m)?;
    let w = tty::get_winsize(m)?;
    if t.c_lflag & libc::EXTPROC != 0 {
        return Err(unsupported("its slave is in EXTPROC mode"));
    }
    let (session, foreground) = session_of(m, index, groups)?;
    if packet && tty::poll(m, 0)?.status {
        return Err(unsupported("its packet-mode status was not read yet"));
    }
    let peer = if slaves && !locked {
        Some(tty::open_peer(m, libc::O_RDWR | libc::O_NONBLOCK)?)
    } else {
        None
    };
    let (input, in_err) = match &peer {
        Some(p) => ptyq::take_input(p.as_fd(), &t),
        None => Default::default(),
    };
    let mut output = Vec::new();
    let closed = ptyq::take_output(m, packet, &mut output);
    // Beyond what the master takes back at once, the rest goes through the slave.
    let temp = match (&peer, output.len() > LDISC_ROOM && !locked) {
        (None, true) => Some(tty::open_peer(m, libc::O_RDWR | libc::O_NONBLOCK)?),
        _ => None,
    };
    let slave = peer.as_ref().or(temp.as_ref()).map(|p| p.as_fd());
    ptyq::put_back(m, slave, &t, &input, &output)?;
    if let Some(e) = in_err {
        return Err(e.into());
    }
    Ok(PtyPair {
        index,
        path: h.path.clone(),
        termios: ptyq::to_image(&t),
        winsize: WinSize {
            rows: w[0],
            cols: w[1],
            xpixel: w[2],
            ypixel: w[3],
        },
        packet,
        locked,
        slave_closed: closed?,
        input,
        output,
        session,
        foreground,
    })
}

/// The session the pair's slave is the controlling terminal of (its leader must
/// be in the tree) and its foreground group (kept if the tree has it).
fn session_of(
    m: std::os::fd::BorrowedFd<'_>,
    index: u32,
    groups: &[(pid_t, pid_t, pid_t)],
) -> Result<(Option<i32>, Option<i32>), PairError> {
    let Some(sid) = tty::session(m)? else {
        return Ok((None, None));
    };
    if !groups.iter().any(|&(pid, _, s)| pid == sid && s == sid) {
        return Err(unsupported(format!(
            "it is the controlling terminal of session {sid}, whose leader is not in the tree"
        )));
    }
    let fg = tty::foreground(m)?;
    let kept = fg.filter(|&g| groups.iter().any(|&(_, pg, s)| pg == g && s == sid));
    if let (Some(g), None) = (fg, kept) {
        warn!(
            pty = index,
            session = sid,
            pgrp = g,
            "the foreground process group of the pty has no process in the tree; the session leader's group will be the foreground at restore"
        );
    }
    Ok((Some(sid), kept))
}

/// Restore: a new pair for `p`, with its settings and queues; `slaves`: whether
/// the image holds descriptions of its slave.
fn rebuild(p: &PtyPair, flags: u32, slaves: bool) -> Result<Rebuilt, FdError> {
    let master: OwnedFd = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOCTTY | libc::O_CLOEXEC)
        .open(&p.path)
        .map_err(|source| FdError::Open {
            path: p.path.clone(),
            source,
        })?
        .into();
    let m = master.as_fd();
    if !p.locked {
        tty::set_pty_locked(m, false)?;
    }
    let t = ptyq::from_image(&p.termios);
    tty::set_termios(m, &t)?;
    let w = &p.winsize;
    tty::set_winsize(m, [w.rows, w.cols, w.xpixel, w.ypixel])?;
    let need_peer = !p.locked
        && (slaves
            || p.session.is_some()
            || p.slave_closed
            || !ptyq::input_is_empty(&p.input)
            || p.output.len() > LDISC_ROOM);
    let peer = if need_peer {
        Some(tty::open_peer(m, libc::O_RDWR | libc::O_NONBLOCK)?)
    } else {
        None
    };
    ptyq::put_back(m, peer.as_ref().map(|p| p.as_fd()), &t, &p.input, &p.output).map_err(|e| {
        FdError::Open {
            path: format!("{} (pts {} at the dump)", p.path, p.index),
            source: std::io::Error::other(format!("putting its queues back: {e}")),
        }
    })?;
    if p.packet {
        tty::set_packet_mode(m, true)?;
    }
    set_status_flags(&master, flags as i32)?;
    Ok(Rebuilt {
        master,
        peer,
        session: p.session,
        foreground: p.foreground,
    })
}

/// Restore, once every description is open: the slaves the restorer keeps open
/// until the husks have theirs (`holders`), and the controlling terminals to set.
pub fn finish_open(ptys: HashMap<u32, Rebuilt>, holders: &mut Vec<OwnedFd>) -> Vec<Ctty> {
    let mut ctty = Vec::new();
    for (_, r) in ptys {
        holders.push(r.master);
        match (r.session, r.peer) {
            (Some(session), Some(slave)) => ctty.push(Ctty {
                session,
                foreground: r.foreground,
                slave,
            }),
            (_, Some(peer)) => holders.push(peer),
            (_, None) => {}
        }
    }
    ctty
}

/// In the husk `r` of a session leader, right after its `setsid`: makes `c`'s
/// slave its controlling terminal (`TIOCSCTTY`), through a descriptor taken
/// from the restorer (`src_pid`, in the husk's PID namespace) and closed again.
pub fn set_ctty(r: &mut Remote, src_pid: pid_t, c: &Ctty) -> Result<(), FdError> {
    let pidfd = r.syscall(nr::PIDFD_OPEN, [src_pid as u64, 0, 0, 0, 0, 0])?;
    let fd = r.syscall(
        nr::PIDFD_GETFD,
        [pidfd, c.slave.as_raw_fd() as u64, 0, 0, 0, 0],
    );
    r.syscall(nr::CLOSE, [pidfd, 0, 0, 0, 0, 0])?;
    let fd = fd?;
    let set = r.syscall(nr::IOCTL, [fd, libc::TIOCSCTTY, 0, 0, 0, 0]);
    r.syscall(nr::CLOSE, [fd, 0, 0, 0, 0, 0])?;
    set?;
    Ok(())
}

/// In the session leader's husk `r`, once the process groups exist: makes `c`'s
/// foreground group the terminal's (`TIOCSPGRP`). `pidfd_slot` is the husk's
/// pidfd of the restorer.
pub fn set_foreground(r: &mut Remote, pidfd_slot: u64, c: &Ctty) -> Result<(), FdError> {
    let Some(pgrp) = c.foreground else {
        return Ok(());
    };
    let fd = r.syscall(
        nr::PIDFD_GETFD,
        [pidfd_slot, c.slave.as_raw_fd() as u64, 0, 0, 0, 0],
    )?;
    let a = r.put(0, &pgrp.to_ne_bytes())?;
    let set = r.syscall(nr::IOCTL, [fd, libc::TIOCSPGRP, a, 0, 0, 0]);
    r.syscall(nr::CLOSE, [fd, 0, 0, 0, 0, 0])?;
    set?;
    Ok(())
}
