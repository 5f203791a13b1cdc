//! Wrappers for the system calls the agent makes itself (not injected).

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
}

type Result<T> = std::result::Result<T, SysError>;

/// Read `len` bytes at `addr` of `pid` into `buf` with one copy. Returns the number of
/// bytes read, which is short if part of the range is unmapped or unreadable.
pub fn process_vm_readv(pid: pid_t, addr: u64, buf: &mut [u8]) -> Result<usize> {
    let local = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    let remote = libc::iovec {
        iov_base: addr as *mut libc::c_void,
        iov_len: buf.len(),
    };
    // SAFETY: `local` covers exactly `buf`, which we own mutably; `remote` is only
    // interpreted in the target's address space.
    let r = unsafe { libc::process_vm_readv(pid, &local, 1, &remote, 1, 0) };
    if r < 0 {
        return Err(SysError::last(
            "process_vm_readv",
            format!("pid {pid} at {addr:#x}"),
        ));
    }
    Ok(r as usize)
}

/// Write `buf` to `addr` of `pid`. Pages must be writable in the target.
pub fn process_vm_writev(pid: pid_t, addr: u64, buf: &[u8]) -> Result<usize> {
    let local = libc::iovec {
        iov_base: buf.as_ptr().cast_mut().cast(),
        iov_len: buf.len(),
    };
    let remote = libc::iovec {
        iov_base: addr as *mut libc::c_void,
        iov_len: buf.len(),
    };
    // SAFETY: the kernel only reads from `local`, which covers `buf`.
    let r = unsafe { libc::process_vm_writev(pid, &local, 1, &remote, 1, 0) };
    if r < 0 {
        return Err(SysError::last(
            "process_vm_writev",
            format!("pid {pid} at {addr:#x}"),
        ));
    }
    Ok(r as usize)
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
    Ok(r == 0)
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
    let mut fds = [0; 2];
    // SAFETY: fds has room for two descriptors.
    let r = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) };
    if r < 0 {
        return Err(SysError::last("pipe2", ""));
    }
    // SAFETY: two fresh descriptors that we now own.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// getsockopt(SO_DOMAIN) and (SO_TYPE).
pub fn socket_domain_type(fd: RawFd) -> Result<(i32, i32)> {
    let get = |opt| {
        let mut v: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: v and len are valid out-pointers of the right size.
        let r = unsafe {
            libc::getsockopt(
                fd,
                libc::SOL_SOCKET,
                opt,
                (&mut v as *mut libc::c_int).cast(),
                &mut len,
            )
        };
        if r < 0 {
            return Err(SysError::last("getsockopt", format!("fd {fd}")));
        }
        Ok(v)
    };
    Ok((get(libc::SO_DOMAIN)?, get(libc::SO_TYPE)?))
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

/// userfaultfd(2) from the outside: the descriptor is created inside the target (it
/// binds to the creator's mm) and taken from there with `pidfd_getfd`; registration
/// and `UFFDIO_COPY` act on that mm from any process holding the descriptor
/// (`fs/userfaultfd.c` uses `ctx->mm`, not `current->mm`). A restore fills private
/// anonymous memory with `UFFDIO_COPY`: each page is allocated and written once,
/// where populate-then-copy zeroes it first and writes it a second time.
pub mod uffd {
    use super::{Result, SysError};
    use std::os::fd::{AsRawFd, BorrowedFd};

    /// `userfaultfd(2)` flags: only faults from user mode are reported, so creating
    /// one needs no privilege (`vm.unprivileged_userfaultfd`), and we never handle
    /// faults anyway.
    pub const USER_MODE_ONLY: u64 = 1;
    const API: u64 = 0xAA;
    // _IOWR(0xAA, 0x3F, struct uffdio_api), _IOWR(0xAA, 0x00, struct uffdio_register),
    // _IOWR(0xAA, 0x03, struct uffdio_copy).
    const UFFDIO_API: u64 = 0xC018_AA3F;
    const UFFDIO_REGISTER: u64 = 0xC020_AA00;
    const UFFDIO_COPY: u64 = 0xC028_AA03;
    const REGISTER_MODE_MISSING: u64 = 1;
    const REGISTER_MODE_WP: u64 = 2;
    // _IOWR(0xAA, 0x06, struct uffdio_writeprotect)
    const UFFDIO_WRITEPROTECT: u64 = 0xC018_AA06;
    const WRITEPROTECT_MODE_WP: u64 = 1;
    const COPY_MODE_DONTWAKE: u64 = 1;

    #[repr(C)]
    struct Api {
        api: u64,
        features: u64,
        ioctls: u64,
    }
    #[repr(C)]
    struct Range {
        start: u64,
        len: u64,
    }
    #[repr(C)]
    struct Register {
        range: Range,
        mode: u64,
        ioctls: u64,
    }
    #[repr(C)]
    struct Copy {
        dst: u64,
        src: u64,
        len: u64,
        mode: u64,
        copy: i64,
    }

    fn ioctl<T>(
        fd: BorrowedFd<'_>,
        req: u64,
        arg: &mut T,
        op: &'static str,
        what: u64,
    ) -> Result<()> {
        // SAFETY: `arg` is the repr(C) struct that `req` encodes, valid and writable.
        if unsafe { libc::ioctl(fd.as_raw_fd(), req as _, arg as *mut T) } < 0 {
            return Err(SysError::last(op, format!("{what:#x}")));
        }
        Ok(())
    }

    /// Asynchronous write protection (Linux 6.7): a write to a protected page is
    /// let through by the kernel itself, which only clears the page's protection;
    /// `PAGEMAP_SCAN` then reports the page as written. Nobody handles faults.
    /// Unpopulated pages are protected too, so a first write to one is seen.
    pub const FEATURE_WP_ASYNC: u64 = (1 << 15) | (1 << 13);

    /// The API handshake every new descriptor needs before anything else, asking
    /// for `features` (0 for plain missing-page filling).
    pub fn handshake_with(fd: BorrowedFd<'_>, features: u64) -> Result<()> {
        let mut a = Api {
            api: API,
            features,
            ioctls: 0,
        };
        ioctl(fd, UFFDIO_API, &mut a, "UFFDIO_API", features)
    }

    /// Registers `[start, start+len)` for write-protect tracking.
    pub fn register_wp(fd: BorrowedFd<'_>, start: u64, len: u64) -> Result<()> {
        register_mode(fd, start, len, REGISTER_MODE_WP, "UFFDIO_REGISTER(WP)")
    }

    /// Write-protects `[start, start+len)` (registered for WP).
    pub fn write_protect(fd: BorrowedFd<'_>, start: u64, len: u64) -> Result<()> {
        #[repr(C)]
        struct Wp {
            range: Range,
            mode: u64,
        }
        let mut w = Wp {
            range: Range { start, len },
            mode: WRITEPROTECT_MODE_WP,
        };
        ioctl(
            fd,
            UFFDIO_WRITEPROTECT,
            &mut w,
            "UFFDIO_WRITEPROTECT",
            start,
        )
    }

    /// Registers `[start, start+len)` of the descriptor's mm for missing-page filling.
    pub fn register(fd: BorrowedFd<'_>, start: u64, len: u64) -> Result<()> {
        register_mode(fd, start, len, REGISTER_MODE_MISSING, "UFFDIO_REGISTER")
    }

    fn register_mode(
        fd: BorrowedFd<'_>,
        start: u64,
        len: u64,
        mode: u64,
        op: &'static str,
    ) -> Result<()> {
        let mut r = Register {
            range: Range { start, len },
            mode,
            ioctls: 0,
        };
        ioctl(fd, UFFDIO_REGISTER, &mut r, op, start)
    }

    /// Allocates the pages at `dst` in the descriptor's mm and copies `src` into them.
    /// A page already present fails with EEXIST (the caller writes that one another
    /// way); a partial copy is continued.
    pub fn copy(fd: BorrowedFd<'_>, dst: u64, src: &[u8]) -> Result<()> {
        let mut done = 0u64;
        let len = src.len() as u64;
        let mut retries = 0;
        while done < len {
            let mut c = Copy {
                dst: dst + done,
                src: src.as_ptr() as u64 + done,
                len: len - done,
                mode: COPY_MODE_DONTWAKE,
                copy: 0,
            };
            match ioctl(fd, UFFDIO_COPY, &mut c, "UFFDIO_COPY", dst + done) {
                Ok(()) => return Ok(()),
                Err(e) if e.errno() == Some(libc::EAGAIN) => {
                    if c.copy > 0 {
                        done += c.copy as u64;
                        retries = 0;
                    } else {
                        // The target's layout is changing (it is stopped, so this
                        // is transient); try again a bounded number of times.
                        retries += 1;
                        if retries > 1000 {
                            return Err(e);
                        }
                        std::thread::yield_now();
                    }
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

/// `PAGEMAP_SCAN` (Linux 6.7) on `/proc/PID/pagemap`: the ranges of pages in
/// `[start, end)` written since they were write-protected through a userfaultfd in
/// async mode (see [`uffd::FEATURE_WP_ASYNC`]). With `reprotect`, the same call
/// write-protects them again, atomically with the report. VMAs not registered for
/// write protection are skipped by the kernel: callers scan registered ranges only.
pub fn pagemap_scan_written(
    pagemap: &std::fs::File,
    start: u64,
    end: u64,
    reprotect: bool,
) -> Result<Vec<(u64, u64)>> {
    #[repr(C)]
    #[derive(Clone, Copy, Default)]
    struct Region {
        start: u64,
        end: u64,
        categories: u64,
    }
    #[repr(C)]
    struct Arg {
        size: u64,
        flags: u64,
        start: u64,
        end: u64,
        walk_end: u64,
        vec: u64,
        vec_len: u64,
        max_pages: u64,
        category_inverted: u64,
        category_mask: u64,
        category_anyof_mask: u64,
        return_mask: u64,
    }
    // _IOWR('f', 16, struct pm_scan_arg)
    const PAGEMAP_SCAN: u64 = 0xC060_6610;
    const PAGE_IS_WRITTEN: u64 = 1 << 1;
    const PM_SCAN_WP_MATCHING: u64 = 1 << 0;
    let mut vec = vec![Region::default(); 4096];
    let mut out: Vec<(u64, u64)> = Vec::new();
    let mut at = start;
    while at < end {
        let mut a = Arg {
            size: std::mem::size_of::<Arg>() as u64,
            flags: if reprotect { PM_SCAN_WP_MATCHING } else { 0 },
            start: at,
            end,
            walk_end: 0,
            vec: vec.as_mut_ptr() as u64,
            vec_len: vec.len() as u64,
            max_pages: 0,
            category_inverted: 0,
            category_mask: PAGE_IS_WRITTEN,
            category_anyof_mask: 0,
            return_mask: PAGE_IS_WRITTEN,
        };
        // SAFETY: `a` is a valid pm_scan_arg whose vec points at `vec` (vec_len
        // entries) for the duration of the call.
        let n = unsafe { libc::ioctl(pagemap.as_raw_fd(), PAGEMAP_SCAN as _, &mut a as *mut Arg) };
        if n < 0 {
            return Err(SysError::last("PAGEMAP_SCAN", format!("{at:#x}")));
        }
        for r in &vec[..n as usize] {
            match out.last_mut() {
                Some(last) if last.1 == r.start => last.1 = r.end,
                _ => out.push((r.start, r.end)),
            }
        }
        if a.walk_end <= at {
            break;
        }
        at = a.walk_end;
    }
    Ok(out)
}
