//! The restorer's own system calls: forking a husk with a chosen PID, the
//! trampoline pages it maps in itself, its memfds for shared memory, reading its
//! own vDSO.
//!
//! Kernel contract: `clone3` with `set_tid` (Linux ≥ 5.5); choosing a PID needs
//! `CAP_SYS_ADMIN`, or (since 5.9) `CAP_CHECKPOINT_RESTORE`, in every user
//! namespace that owns one of the target PID namespaces. `PTRACE_TRACEME` in the
//! child needs nothing (its parent is the tracer). `MAP_FIXED_NOREPLACE`
//! (≥ 4.17; an older kernel takes it as a hint, which [`map_trampoline`] checks),
//! `memfd_create` (≥ 3.17); these and `ftruncate` on our own memfd need no
//! capability.

use std::ffi::CString;
use std::os::fd::OwnedFd;

use libc::pid_t;

use super::SysError;

/// `struct clone_args` up to `cgroup` (CLONE_ARGS_SIZE_VER2).
#[repr(C)]
#[derive(Default)]
pub struct CloneArgs {
    pub flags: u64,
    pub pidfd: u64,
    pub child_tid: u64,
    pub parent_tid: u64,
    pub exit_signal: u64,
    pub stack: u64,
    pub stack_size: u64,
    pub tls: u64,
    pub set_tid: u64,
    pub set_tid_size: u64,
    pub cgroup: u64,
}

/// The raw `clone3` system call: the child's return is 0, the parent's the
/// child's PID, an error is negative (errno in `errno`).
///
/// # Safety
/// Without `CLONE_VM` this forks a copy of a multi-threaded process: the child
/// must make only raw system calls (no allocation, no lock, no return into code
/// that may take one) until it execs or exits.
pub unsafe fn clone3(args: &CloneArgs) -> i64 {
    // SAFETY: `args` is a valid clone_args of the size we pass; the caller keeps
    // the child to raw system calls (see above).
    unsafe {
        libc::syscall(
            libc::SYS_clone3,
            args as *const CloneArgs,
            std::mem::size_of::<CloneArgs>(),
        )
    }
}

/// Forks a child with PID `pid` (in our PID namespace for children) that asks to
/// be traced and stops itself with SIGSTOP; it never runs anything else. Returns
/// its PID, or the `clone3` error (`EEXIST`: the PID is taken).
///
/// The child dies with the calling thread from its first instruction: it sets
/// `PR_SET_PDEATHSIG` to SIGKILL, then checks that its parent is still the one
/// that forked it (`getppid()` is `parent_seen`: our PID, or 0 when the child is
/// born in a PID namespace where we are invisible) and exits otherwise, so a
/// restorer killed between the `clone3` and the `prctl` leaves nothing either.
/// The caller sets `PTRACE_O_EXITKILL` at the child's first stop; from then on
/// either mechanism kills it with us.
pub fn fork_traced(pid: pid_t, in_new_ns: bool) -> std::io::Result<pid_t> {
    let set_tid: [pid_t; 1] = [pid];
    // Read before the fork: the child may not call into libc's caches.
    let parent_seen: i64 = if in_new_ns {
        0
    } else {
        // SAFETY: getpid takes no argument and touches no memory.
        unsafe { libc::syscall(libc::SYS_getpid) }
    };
    let args = CloneArgs {
        exit_signal: libc::SIGCHLD as u64,
        set_tid: set_tid.as_ptr() as u64,
        set_tid_size: 1,
        ..Default::default()
    };
    // SAFETY: clone3 without CLONE_VM forks; the child only makes raw system calls
    // (no allocation, no locks) before it stops under ptrace, so the copy of a
    // multi-threaded address space is never used beyond that.
    let r = unsafe { clone3(&args) };
    if r == 0 {
        // SAFETY: raw system calls in the child; see above.
        unsafe {
            libc::syscall(
                libc::SYS_prctl,
                libc::PR_SET_PDEATHSIG,
                libc::SIGKILL as libc::c_ulong,
            );
            if libc::syscall(libc::SYS_getppid) != parent_seen {
                // Our parent died before the prctl could take effect.
                libc::syscall(libc::SYS_exit_group, 1);
            }
            libc::syscall(libc::SYS_ptrace, libc::PTRACE_TRACEME, 0, 0, 0);
            libc::syscall(
                libc::SYS_kill,
                libc::syscall(libc::SYS_getpid),
                libc::SIGSTOP,
            );
            loop {
                libc::syscall(libc::SYS_pause);
            }
        }
    }
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(r as pid_t)
}

/// Maps `len` bytes read-write-execute at exactly `addr` in our own process, if
/// nothing of ours is there, and puts `code` at its start. `None`: the range is
/// taken.
pub fn map_trampoline(addr: u64, len: u64, code: &[u8]) -> Option<u64> {
    assert!(code.len() as u64 <= len);
    // SAFETY: MAP_FIXED_NOREPLACE never replaces an existing mapping of ours; the
    // result is checked.
    let p = unsafe {
        libc::mmap(
            addr as *mut libc::c_void,
            len as usize,
            libc::PROT_READ | libc::PROT_WRITE | libc::PROT_EXEC,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED_NOREPLACE,
            -1,
            0,
        )
    };
    if p as u64 == addr {
        // SAFETY: we just mapped `len` ≥ code.len() bytes read-write at `addr`.
        unsafe { std::ptr::copy_nonoverlapping(code.as_ptr(), addr as *mut u8, code.len()) };
        return Some(addr);
    }
    if p != libc::MAP_FAILED {
        // SAFETY: unmapping what mmap just returned to us (an older kernel may
        // take MAP_FIXED_NOREPLACE as a hint).
        unsafe { libc::munmap(p, len as usize) };
    }
    None
}

/// Unmaps a trampoline that [`map_trampoline`] mapped.
pub fn unmap_trampoline(addr: u64, len: u64) {
    // SAFETY: the pages at `addr` are the trampoline we mapped, and nothing of ours
    // points into them (only husks executed there).
    unsafe { libc::munmap(addr as *mut libc::c_void, len as usize) };
}

/// A close-on-exec memfd named `name`, `size` bytes long.
pub fn memfd_sized(name: &str, size: u64) -> Result<OwnedFd, SysError> {
    let cname = CString::new(name).expect("no NUL in a memfd name");
    let fd =
        nix::sys::memfd::memfd_create(cname.as_c_str(), nix::sys::memfd::MFdFlags::MFD_CLOEXEC)
            .map_err(|e| SysError::nix("memfd_create", name, e))?;
    nix::unistd::ftruncate(&fd, size as i64).map_err(|e| SysError::nix("ftruncate", name, e))?;
    Ok(fd)
}

/// A copy of `[start, end)` of our own memory, a mapping that stays mapped (our
/// vDSO).
pub fn own_mapping_bytes(start: u64, end: u64) -> Vec<u8> {
    // SAFETY: the caller names one of our own readable mappings that stays mapped
    // for the life of the process (the [vdso]), read for its whole length.
    unsafe { std::slice::from_raw_parts(start as *const u8, (end - start) as usize) }.to_vec()
}
