//! Wrappers for the system calls the agent makes itself (not injected).
//!
//! Kernel contract, call by call:
//! - `process_vm_readv` / `process_vm_writev`: Linux ≥ 3.2, PTRACE_MODE_ATTACH_REALCREDS
//!   over the target (the same user, or `CAP_SYS_PTRACE`);
//! - `pidfd_open` ≥ 5.3 (no capability); `pidfd_getfd` ≥ 5.6,
//!   PTRACE_MODE_ATTACH_REALCREDS over the target;
//! - `kcmp(KCMP_FILE)` ≥ 3.5, PTRACE_MODE_READ_REALCREDS over both processes, and a
//!   kernel with `CONFIG_KCMP` (or `CONFIG_CHECKPOINT_RESTORE` before 5.12);
//! - `get_robust_list` of another thread ≥ 2.6.17, PTRACE_MODE_READ_REALCREDS;
//! - `tee` ≥ 2.6.17; `F_GETPIPE_SZ` / `F_SETPIPE_SZ` ≥ 2.6.35 (above
//!   `/proc/sys/fs/pipe-max-size` needs `CAP_SYS_RESOURCE`); `FIONREAD` on a pipe;
//! - `kill` / `tgkill` of a process not ours: the same user, or `CAP_KILL`;
//! - `syncfs` ≥ 2.6.39; `xgetbv` (XCR0) needs a CPU with OSXSAVE set.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use libc::pid_t;

/// A failed system call: its name, the object it acted on, and the errno.
#[derive(Debug, thiserror::Error)]
#[error("{op}({what}): {source}")]
pub struct SysError {
    pub op: &'static str,
    pub what: String,
    #[source]
    pub source: io::Error,
}

impl SysError {
    pub fn last(op: &'static str, what: impl ToString) -> SysError {
        SysError {
            op,
            what: what.to_string(),
            source: io::Error::last_os_error(),
        }
    }
    pub fn errno(&self) -> Option<i32> {
        self.source.raw_os_error()
    }
    /// The failure of a call made through `nix`.
    pub fn nix(op: &'static str, what: impl ToString, e: nix::errno::Errno) -> SysError {
        SysError {
            op,
            what: what.to_string(),
            source: e.into(),
        }
    }
}

type Result<T> = std::result::Result<T, SysError>;

/// Read `len` bytes at `addr` of `pid` into `buf` with one copy. Returns the number of
/// bytes read, which is short if part of the range is unmapped or unreadable.
pub fn process_vm_readv(pid: pid_t, addr: u64, buf: &mut [u8]) -> Result<usize> {
    let remote = nix::sys::uio::RemoteIoVec {
        base: addr as usize,
        len: buf.len(),
    };
    nix::sys::uio::process_vm_readv(
        nix::unistd::Pid::from_raw(pid),
        &mut [io::IoSliceMut::new(buf)],
        &[remote],
    )
    .map_err(|e| SysError::nix("process_vm_readv", format!("pid {pid} at {addr:#x}"), e))
}

/// Write `buf` to `addr` of `pid`. Pages must be writable in the target.
pub fn process_vm_writev(pid: pid_t, addr: u64, buf: &[u8]) -> Result<usize> {
    let remote = nix::sys::uio::RemoteIoVec {
        base: addr as usize,
        len: buf.len(),
    };
    nix::sys::uio::process_vm_writev(
        nix::unistd::Pid::from_raw(pid),
        &[io::IoSlice::new(buf)],
        &[remote],
    )
    .map_err(|e| SysError::nix("process_vm_writev", format!("pid {pid} at {addr:#x}"), e))
}

/// pidfd_open(2): Linux ≥ 5.3.
pub fn pidfd_open(pid: pid_t) -> Result<OwnedFd> {
    // SAFETY: no pointers.
    let r = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if r < 0 {
        return Err(SysError::last("pidfd_open", pid));
    }
    // SAFETY: the kernel returned a fresh descriptor that we now own.
    Ok(unsafe { OwnedFd::from_raw_fd(r as RawFd) })
}

/// pidfd_getfd(2): a duplicate of descriptor `fd` of the process behind `pidfd`.
/// Linux ≥ 5.6, PTRACE_MODE_ATTACH_REALCREDS over the target.
pub fn pidfd_getfd(pidfd: &OwnedFd, pid: pid_t, fd: RawFd) -> Result<OwnedFd> {
    // SAFETY: no pointers.
    let r = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), fd, 0) };
    if r < 0 {
        return Err(SysError::last(
            "pidfd_getfd",
            format!("fd {fd} of pid {pid}"),
        ));
    }
    // SAFETY: fresh descriptor owned by us.
    Ok(unsafe { OwnedFd::from_raw_fd(r as RawFd) })
}

/// kcmp(KCMP_FILE): do the two descriptors share one open file description?
pub fn same_file_description(pid1: pid_t, fd1: RawFd, pid2: pid_t, fd2: RawFd) -> Result<bool> {
    Ok(file_description_order(pid1, fd1, pid2, fd2)? == std::cmp::Ordering::Equal)
}

/// kcmp(KCMP_FILE) as an order: the kernel orders open file descriptions (by
/// their obfuscated addresses, the same order for every caller while they live),
/// so a table of them can be searched in O(log n) comparisons instead of
/// compared with each one.
pub fn file_description_order(
    pid1: pid_t,
    fd1: RawFd,
    pid2: pid_t,
    fd2: RawFd,
) -> Result<std::cmp::Ordering> {
    const KCMP_FILE: i32 = 0;
    // SAFETY: no pointers.
    let r = unsafe {
        libc::syscall(
            libc::SYS_kcmp,
            pid1,
            pid2,
            KCMP_FILE,
            fd1 as u64,
            fd2 as u64,
        )
    };
    if r < 0 {
        return Err(SysError::last(
            "kcmp",
            format!("fd {fd1} of {pid1} / fd {fd2} of {pid2}"),
        ));
    }
    match r {
        0 => Ok(std::cmp::Ordering::Equal),
        1 => Ok(std::cmp::Ordering::Less),
        2 => Ok(std::cmp::Ordering::Greater),
        _ => Err(SysError {
            op: "kcmp",
            what: format!("fd {fd1} of {pid1} / fd {fd2} of {pid2}"),
            source: io::Error::other(format!("returned {r}: unequal, but no order")),
        }),
    }
}

/// get_robust_list(2) of another thread: (head, len).
pub fn get_robust_list(tid: pid_t) -> Result<(u64, u64)> {
    let mut head: u64 = 0;
    let mut len: usize = 0;
    // SAFETY: both out-pointers are valid.
    let r = unsafe {
        libc::syscall(
            libc::SYS_get_robust_list,
            tid,
            &mut head as *mut u64,
            &mut len as *mut usize,
        )
    };
    if r < 0 {
        return Err(SysError::last("get_robust_list", tid));
    }
    Ok((head, len as u64))
}

/// Duplicate up to `len` bytes buffered in pipe `from` into pipe `to` without
/// consuming them (tee(2)).
pub fn tee(from: RawFd, to: RawFd, len: usize) -> Result<usize> {
    // SAFETY: no pointers.
    let r = unsafe { libc::tee(from, to, len, libc::SPLICE_F_NONBLOCK) };
    if r < 0 {
        return Err(SysError::last("tee", format!("fd {from}")));
    }
    Ok(r as usize)
}

/// Bytes waiting in a pipe (FIONREAD).
pub fn fionread(fd: RawFd) -> Result<usize> {
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD writes one int.
    let r = unsafe { libc::ioctl(fd, libc::FIONREAD, &mut n) };
    if r < 0 {
        return Err(SysError::last("ioctl(FIONREAD)", format!("fd {fd}")));
    }
    Ok(n as usize)
}

pub fn pipe_capacity(fd: RawFd) -> Result<usize> {
    // SAFETY: no pointers.
    let r = unsafe { libc::fcntl(fd, libc::F_GETPIPE_SZ) };
    if r < 0 {
        return Err(SysError::last("fcntl(F_GETPIPE_SZ)", format!("fd {fd}")));
    }
    Ok(r as usize)
}

pub fn set_pipe_capacity(fd: RawFd, size: usize) -> Result<()> {
    // SAFETY: no pointers.
    let r = unsafe { libc::fcntl(fd, libc::F_SETPIPE_SZ, size as libc::c_int) };
    if r < 0 {
        return Err(SysError::last(
            "fcntl(F_SETPIPE_SZ)",
            format!("fd {fd} to {size}"),
        ));
    }
    Ok(())
}

/// pipe2(O_CLOEXEC): (read end, write end).
pub fn pipe() -> Result<(OwnedFd, OwnedFd)> {
    nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| SysError::nix("pipe2", "", e))
}

/// XCR0 of this CPU: which XSAVE state components the OS enabled.
pub fn host_xcr0() -> u64 {
    // SAFETY: xgetbv with ECX=0 is always valid where OSXSAVE is set, which every
    // x86_64 Linux with XSAVE (all that we support) has; it only reads a register.
    unsafe { std::arch::x86_64::_xgetbv(0) }
}

pub fn kill(pid: pid_t, sig: i32) -> Result<()> {
    // SAFETY: no pointers.
    if unsafe { libc::kill(pid, sig) } < 0 {
        return Err(SysError::last("kill", pid));
    }
    Ok(())
}

pub fn tgkill(pid: pid_t, tid: pid_t, sig: i32) -> Result<()> {
    // SAFETY: no pointers.
    if unsafe { libc::syscall(libc::SYS_tgkill, pid, tid, sig) } < 0 {
        return Err(SysError::last("tgkill", tid));
    }
    Ok(())
}

/// syncfs(2) of the file system holding `fd`.
pub fn syncfs(fd: RawFd) -> Result<()> {
    // SAFETY: no pointers.
    if unsafe { libc::syncfs(fd) } < 0 {
        return Err(SysError::last("syncfs", fd));
    }
    Ok(())
}
