//! userfaultfd(2) from the outside: the descriptor is created inside the target (it
//! binds to the creator's mm) and taken from there with `pidfd_getfd`; registration
//! and `UFFDIO_COPY` act on that mm from any process holding the descriptor
//! (`fs/userfaultfd.c` uses `ctx->mm`, not `current->mm`). A restore fills private
//! anonymous memory with `UFFDIO_COPY`: each page is allocated and written once,
//! where populate-then-copy zeroes it first and writes it a second time.
//!
//! Kernel contract: userfaultfd Linux ≥ 4.3 (`UFFD_USER_MODE_ONLY` 5.11, which
//! needs no privilege; without it, `CAP_SYS_PTRACE` or
//! `vm.unprivileged_userfaultfd = 1`); write-protect registration ≥ 5.7; asynchronous
//! write protection (`UFFD_FEATURE_WP_ASYNC`) and `PAGEMAP_SCAN` ≥ 6.7. Reading
//! another process's `/proc/PID/pagemap` needs PTRACE_MODE_READ over it.

use std::os::fd::{AsRawFd, BorrowedFd, RawFd};

use super::SysError;

type Result<T> = std::result::Result<T, SysError>;

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

fn ioctl<T>(fd: RawFd, req: u64, arg: &mut T, op: &'static str, what: u64) -> Result<()> {
    // SAFETY: `arg` is the repr(C) struct that `req` encodes, valid and writable.
    if unsafe { libc::ioctl(fd, req as _, arg as *mut T) } < 0 {
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
    ioctl(fd.as_raw_fd(), UFFDIO_API, &mut a, "UFFDIO_API", features)
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
        fd.as_raw_fd(),
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
    ioctl(fd.as_raw_fd(), UFFDIO_REGISTER, &mut r, op, start)
}

/// Allocates the pages at `dst` in the descriptor's mm and copies `src` into them.
/// A page already present fails with EEXIST (the caller writes that one another
/// way); a partial copy is continued.
///
/// `fd` may be a descriptor the caller holds by number (the restorer keeps its
/// userfaultfds open until every copy is done): a stale one fails with EBADF.
pub fn copy(fd: impl AsRawFd, dst: u64, src: &[u8]) -> Result<()> {
    let fd = fd.as_raw_fd();
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

/// `PAGEMAP_SCAN` (Linux 6.7) on `/proc/PID/pagemap`: the ranges of pages in
/// `[start, end)` written since they were write-protected through a userfaultfd in
/// async mode (see [`FEATURE_WP_ASYNC`]). With `reprotect`, the same call
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
