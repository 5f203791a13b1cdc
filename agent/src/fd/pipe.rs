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

use std::fs::File;
use std::io::Read;
use std::os::fd::{AsRawFd, OwnedFd};

use crate::sys::{self, SysError};

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
        // SAFETY: the pointer/length pair covers the rest of `data`.
        let n = unsafe {
            libc::write(
                w.as_raw_fd(),
                data[done..].as_ptr().cast(),
                data.len() - done,
            )
        };
        if n < 0 {
            return Err(SysError::last("write", "pipe data"));
        }
        done += n as usize;
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
