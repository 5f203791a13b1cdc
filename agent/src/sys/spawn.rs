//! Starting and watching our own helper processes: the write-tracking holder gets
//! descriptors at fixed numbers in a session of its own, and waits on pidfds; the
//! restorer reaps the husks it killed.
//!
//! Kernel contract: `pidfd_open` and polling a pidfd for its exit (Linux ≥ 5.3);
//! `dup2`, `setsid`, `prctl(PR_SET_CHILD_SUBREAPER)` and `waitpid` of our own child. No capability: the processes
//! are our own.

use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command};

use libc::pid_t;

/// Spawns `cmd` with `fds` as its descriptors 3, 4, … (in that order), in a new
/// session.
pub fn spawn_with_fds(cmd: &mut Command, fds: &[&OwnedFd]) -> std::io::Result<Child> {
    let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
    // SAFETY: between fork and exec the closure makes only async-signal-safe calls
    // (dup2, close, setsid) on descriptors the child inherited, and allocates
    // nothing (`raw` was built before the fork).
    unsafe {
        cmd.pre_exec(move || {
            // Above every descriptor we pass, so no dup2 overwrites a source.
            let base = raw.iter().copied().max().unwrap_or(0).max(99) + 1;
            for (i, &fd) in raw.iter().enumerate() {
                if libc::dup2(fd, base + i as RawFd) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            for i in 0..raw.len() {
                if libc::dup2(base + i as RawFd, 3 + i as RawFd) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                libc::close(base + i as RawFd);
            }
            libc::setsid();
            Ok(())
        });
    }
    cmd.spawn()
}

/// Blocks until every process behind `pidfds` has exited (or polling fails).
pub fn wait_all_exited(pidfds: &[OwnedFd]) {
    let mut fds: Vec<libc::pollfd> = pidfds
        .iter()
        .map(|p| libc::pollfd {
            fd: p.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    while !fds.is_empty() {
        // SAFETY: `fds` is a valid array of pollfd for the call, over descriptors
        // that `pidfds` keeps open.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
        if n < 0 {
            if std::io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            return;
        }
        fds.retain(|f| f.revents == 0);
    }
}

/// Reaps our child `pid` if it has exited (`waitpid` with `WNOHANG`); whether it
/// was reaped.
pub fn reap_if_exited(pid: pid_t) -> bool {
    let mut status = 0;
    // SAFETY: waitpid on one PID with WNOHANG into a local int; no memory shared.
    unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) == pid }
}

/// Makes this process the reaper of its orphaned descendants
/// (`prctl(PR_SET_CHILD_SUBREAPER)`, Linux ≥ 3.4, no capability): a restore that
/// fails kills its husks, and the zombies of those whose parent husk died first
/// come to us, to be reaped before the command returns, instead of to a reaper
/// outside that may take its time.
pub fn become_subreaper() -> std::io::Result<()> {
    // SAFETY: prctl with integer arguments only; no memory is passed.
    let r = unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    if r == -1 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Reaps `pid` if it is a child of ours (of any kind: `__WALL`) that has exited;
/// whether it was reaped.
pub fn reap_exited_any(pid: pid_t) -> bool {
    let mut status = 0;
    // SAFETY: waitpid on one PID with WNOHANG into a local int; no memory shared.
    unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG | libc::__WALL) == pid }
}
