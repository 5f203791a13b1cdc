//! Pipes and FIFOs: the data buffered in them survives, and nothing is consumed.
//!
//! Dump: `pidfd_getfd` lends us a duplicate of one end. If it is a write end, we
//! open a read end of the same pipe through `/proc/self/fd/N` (pipefs inodes can be
//! opened like a FIFO). Then `tee(2)` copies what is buffered into a pipe of our own,
//! which we read: the target's pipe is left exactly as it was.
//!
//! Restore: we make a pipe (or open the FIFO by path) in the restorer, set its
//! capacity, write the buffered bytes back, and hand the ends to the husks with
//! `pidfd_getfd`.

use std::collections::HashMap;
use std::fs::File;
use std::io::Read;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};

use ckpt_shared::image::{Fd, FileKind, OpenFile};
use libc::pid_t;
use serde_json::{json, Value};

use super::kind::{Opening, Persist, Seen};
use super::{set_status_flags, FdError, FdTable};
use crate::sys::{self, SysError};

pub struct Pipe;

impl Persist for Pipe {
    fn dump(&self, t: &mut FdTable, seen: &mut Seen<'_>) -> Option<Result<FileKind, FdError>> {
        (seen.link.starts_with("pipe:[") || seen.meta.is(libc::S_IFIFO)).then(|| dump(t, seen))
    }

    fn owns(&self, kind: &FileKind) -> bool {
        matches!(kind, FileKind::Pipe { .. })
    }

    /// One rebuilt pipe (or one FIFO holder) per pipe, filled with the data that
    /// the dump stored on one of its descriptions.
    fn prepare(&self, files: &[OpenFile], o: &mut Opening<'_>) -> Result<(), FdError> {
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
        for (id, (bytes, capacity, fifo)) in data {
            match fifo {
                Some(path) => {
                    // Holding the FIFO open read-write lets the ends open without
                    // blocking and keeps the data until every husk has its end.
                    let h = open_fifo(path, libc::O_RDWR)?;
                    write_all(&h, bytes)?;
                    o.holders.push(h);
                }
                None => {
                    o.pipes.insert(id, rebuild(bytes, capacity)?);
                }
            }
        }
        Ok(())
    }

    fn open(&self, _: usize, f: &OpenFile, o: &mut Opening<'_>) -> Result<OwnedFd, FdError> {
        let FileKind::Pipe {
            pipe_id,
            read_end,
            fifo_path,
            ..
        } = &f.kind
        else {
            unreachable!("owns() chose this kind")
        };
        let flags = f.flags as i32;
        if let Some(path) = fifo_path {
            let fd = open_fifo(path, flags)?;
            set_status_flags(&fd, flags)?;
            Ok(fd)
        } else {
            let p = &o.pipes[pipe_id];
            let src = if *read_end { &p.read } else { &p.write };
            let dup = src.try_clone().map_err(|source| FdError::Open {
                path: format!("pipe:[{pipe_id}]"),
                source,
            })?;
            set_status_flags(&dup, flags)?;
            Ok(dup)
        }
    }

    fn describe(&self, kind: &FileKind) -> String {
        let FileKind::Pipe {
            pipe_id,
            read_end,
            fifo_path,
            buffered,
            ..
        } = kind
        else {
            unreachable!("owns() chose this kind")
        };
        format!(
            "{} {} end{}{}",
            if fifo_path.is_some() { "fifo" } else { "pipe" },
            if *read_end { "read" } else { "write" },
            fifo_path
                .as_ref()
                .map(|p| format!(" {p}"))
                .unwrap_or_else(|| format!(" [{pipe_id}]")),
            if buffered.is_empty() {
                String::new()
            } else {
                format!(
                    ", {} buffered",
                    crate::inspect::human(buffered.len() as u64)
                )
            }
        )
    }

    fn json(&self, kind: &FileKind) -> Value {
        let FileKind::Pipe {
            pipe_id,
            read_end,
            fifo_path,
            buffered,
            capacity,
        } = kind
        else {
            unreachable!("owns() chose this kind")
        };
        json!({
            "kind": if fifo_path.is_some() { "fifo" } else { "pipe" }, "pipe": pipe_id,
            "end": if *read_end { "read" } else { "write" }, "path": fifo_path,
            "buffered": buffered.len(), "capacity": capacity,
        })
    }
}

/// One end of a pipe or FIFO, with the data buffered in it if this is the first
/// description of the pipe the dump sees (the data is stored once per pipe).
fn dump(t: &mut FdTable, seen: &Seen<'_>) -> Result<FileKind, FdError> {
    let (flags, ino) = (seen.flags, seen.meta.ino);
    let dup = sys::pidfd_getfd(seen.pidfd, seen.pid, seen.fd)?;
    let (buffered, capacity) = peek(&dup, flags)?;
    let read_end = flags & libc::O_ACCMODE as u32 != libc::O_WRONLY as u32;
    let e = t.pipes.entry(ino).or_default();
    if read_end {
        e.0 = true;
    }
    if flags & libc::O_ACCMODE as u32 != libc::O_RDONLY as u32 {
        e.1 = true;
    }
    let already = t
        .files
        .iter()
        .any(|f| matches!(&f.kind, FileKind::Pipe { pipe_id, .. } if *pipe_id == ino));
    Ok(FileKind::Pipe {
        pipe_id: ino,
        read_end,
        fifo_path: (!seen.link.starts_with("pipe:[")).then(|| seen.link.to_string()),
        buffered: if already { Vec::new() } else { buffered },
        capacity,
    })
}

/// After every process: an anonymous pipe with an end outside the tree can only
/// be inherited stdio. `ends` holds, per pipe, whether the tree has a read end
/// and a write end.
pub(super) fn settle_outside(
    files: &mut [OpenFile],
    ends: &HashMap<u64, (bool, bool)>,
    procs: &mut [(pid_t, &mut Vec<Fd>)],
) -> Result<(), FdError> {
    for (pid, fds) in procs.iter_mut() {
        for fd in fds.iter() {
            let f = &mut files[fd.file as usize];
            let FileKind::Pipe {
                pipe_id,
                fifo_path: None,
                ..
            } = f.kind
            else {
                continue;
            };
            let (r, w) = ends.get(&pipe_id).copied().unwrap_or_default();
            if r && w {
                continue;
            }
            if fd.fd <= 2 {
                f.kind = FileKind::Inherited {
                    what: format!("pipe:[{pipe_id}]"),
                };
            } else {
                return Err(FdError::Unsupported {
                    pid: *pid,
                    fd: fd.fd,
                    what: format!("a pipe to a process outside the tree (pipe:[{pipe_id}])"),
                });
            }
        }
    }
    Ok(())
}

/// Copy the bytes buffered in the pipe behind `end` without consuming them.
/// Returns (bytes, capacity).
pub fn peek(end: &OwnedFd, fd_flags: u32) -> Result<(Vec<u8>, u32), SysError> {
    let fd = end.as_raw_fd();
    let capacity = sys::pipe_capacity(fd)?;
    // A read end to tee from.
    let reader: Option<OwnedFd> = if fd_flags & libc::O_ACCMODE as u32 == libc::O_WRONLY as u32 {
        let f = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags_nonblock()
            .open(format!("/proc/self/fd/{fd}"))
            .map_err(|source| SysError {
                op: "open",
                what: format!("read end of pipe fd {fd}"),
                source,
            })?;
        Some(f.into())
    } else {
        None
    };
    let rfd = reader.as_ref().map_or(fd, |r| r.as_raw_fd());
    let queued = sys::fionread(rfd)?;
    if queued == 0 {
        return Ok((Vec::new(), capacity as u32));
    }
    let (tr, tw) = sys::pipe()?;
    sys::set_pipe_capacity(tw.as_raw_fd(), capacity.max(queued))?;
    // One tee duplicates every buffer up to our pipe's capacity, which we made
    // large enough; the data stays queued in the target's pipe.
    let total = sys::tee(rfd, tw.as_raw_fd(), queued)?;
    if total != queued {
        return Err(SysError {
            op: "tee",
            what: format!("pipe fd {fd}"),
            source: std::io::Error::other(format!("copied {total} of {queued} buffered bytes")),
        });
    }
    drop(tw);
    let mut data = Vec::with_capacity(total);
    File::from(tr)
        .read_to_end(&mut data)
        .map_err(|source| SysError {
            op: "read",
            what: "tee copy of pipe".into(),
            source,
        })?;
    Ok((data, capacity as u32))
}

trait NonBlock {
    fn custom_flags_nonblock(&mut self) -> &mut Self;
}

impl NonBlock for std::fs::OpenOptions {
    fn custom_flags_nonblock(&mut self) -> &mut Self {
        use std::os::unix::fs::OpenOptionsExt;
        self.custom_flags(libc::O_NONBLOCK)
    }
}

/// A pipe rebuilt in the restorer: both ends, blocking, with its data.
pub struct RebuiltPipe {
    pub read: OwnedFd,
    pub write: OwnedFd,
}

pub fn rebuild(data: &[u8], capacity: u32) -> Result<RebuiltPipe, SysError> {
    let (r, w) = sys::pipe()?;
    if capacity as usize > 0 {
        // Growing past /proc/sys/fs/pipe-max-size needs CAP_SYS_RESOURCE, which
        // the restorer has; a smaller pipe would only change timing, so don't fail.
        let _ = sys::set_pipe_capacity(w.as_raw_fd(), (capacity as usize).max(data.len()));
    }
    write_all(&w, data)?;
    Ok(RebuiltPipe { read: r, write: w })
}

pub fn write_all(w: &OwnedFd, data: &[u8]) -> Result<(), SysError> {
    let mut done = 0;
    while done < data.len() {
        done += sys::fd::write(w.as_fd(), &data[done..], "pipe data")?;
    }
    Ok(())
}

/// Open a FIFO by path without blocking on the other side.
pub fn open_fifo(path: &str, flags: i32) -> Result<OwnedFd, SysError> {
    use std::os::unix::fs::OpenOptionsExt;
    let acc = flags & libc::O_ACCMODE;
    let mut o = std::fs::OpenOptions::new();
    o.read(acc == libc::O_RDONLY || acc == libc::O_RDWR);
    o.write(acc == libc::O_WRONLY || acc == libc::O_RDWR);
    o.custom_flags(libc::O_NONBLOCK);
    let f = o.open(path).map_err(|source| SysError {
        op: "open",
        what: format!("FIFO {path}"),
        source,
    })?;
    Ok(f.into())
}
