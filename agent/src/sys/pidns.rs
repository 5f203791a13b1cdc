//! Restoring into a fresh PID namespace (`restore --new-pid-ns`).
//!
//! Kernel contract: `clone3` (Linux ≥ 5.3) with `CLONE_NEWPID`, which needs
//! `CAP_SYS_ADMIN`; `setns(CLONE_NEWPID)` (PID namespaces: ≥ 3.8), which needs
//! `CAP_SYS_ADMIN` in our own user namespace and in the one that owns the target
//! namespace, and a target that is a descendant of our own PID namespace (the
//! init's is: we created it); `setns` back to our own namespace is allowed by the
//! same rule. The init itself uses `close_range` (≥ 5.9) and
//! `prctl(PR_SET_PDEATHSIG)`, which need nothing.
//!
//! The original PIDs may be taken on this node; in a new PID namespace they are all
//! free. A namespace needs an init (PID 1) that outlives the tree, so we fork one
//! with `CLONE_NEWPID`: it is a copy of the restorer, taken after the restorer opened
//! the tree's files, so it holds the same descriptors at the same numbers. Husks
//! inside the namespace cannot see the restorer, but they see PID 1, and take their
//! descriptors from it with `pidfd_getfd`. When the restore is over we write one
//! byte on a control pipe (the commit of the release); init then gives up the
//! parent-death signal that tied it to the restore, says so on a second pipe (the restorer waits for that before it goes
//! on: an init killed by its parent's exit would take the namespace down), closes
//! everything it holds (so pipes see EOF as they should), reaps what becomes its
//! child, and exits once no other process is left in the namespace.
//!
//! The pipe reaching end of file without that byte means the restorer died: init
//! exits at once, and the kernel kills every process of the namespace with it (it
//! must not take the end of file for the release: a dying restorer's descriptors
//! are closed before its children get their parent-death signal, so init would
//! otherwise give up the signal and keep a half-restored tree alive).
//!
//! The restorer joins the namespace for its children with `setns(CLONE_NEWPID)`, so
//! the root husk is created inside it with `clone3(set_tid)` and keeps its PID there.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use libc::pid_t;

use super::restorer::CloneArgs;
use super::SysError;

/// The restorer's side of the namespace init's pipes.
pub struct NsInit {
    ctl_w: OwnedFd,
    ack_r: OwnedFd,
}

impl NsInit {
    /// The restore is over: init may close the restore's descriptors and give up
    /// its parent-death signal. Waits (up to 10 s) until it has, so that the
    /// restorer may exit at once: init must not die with it, which would take the
    /// whole namespace, the restored tree included, down with it (seen under load).
    pub fn release(self) {
        let go = b'r';
        // SAFETY: a one-byte write from a local on our own descriptor.
        let wrote = unsafe { libc::write(self.ctl_w.as_raw_fd(), (&go as *const u8).cast(), 1) };
        if wrote != 1 {
            // Init is gone (it would have taken the namespace with it) or the
            // pipe is broken: nothing to release.
            return;
        }
        drop(self.ctl_w);
        let mut p = libc::pollfd {
            fd: self.ack_r.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: poll and read on our own descriptor into a local byte.
        unsafe {
            if libc::poll(&mut p, 1, 10_000) > 0 {
                let mut b = 0u8;
                libc::read(self.ack_r.as_raw_fd(), (&mut b as *mut u8).cast(), 1);
            }
        }
    }
}

fn pipe(what: &'static str) -> Result<[i32; 2], SysError> {
    let mut fds = [0; 2];
    // SAFETY: fds has room for two descriptors.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } < 0 {
        return Err(SysError::last("pipe2", what));
    }
    Ok(fds)
}

/// Fork the namespace's init. Returns its PID (in our namespace) and our ends of
/// its pipes: [`NsInit::release`] lets init close the restore's descriptors.
pub fn spawn_ns_init() -> Result<(pid_t, NsInit), SysError> {
    let fds = pipe("pid namespace control")?;
    let ack = pipe("pid namespace acknowledgement")?;
    let args = CloneArgs {
        flags: libc::CLONE_NEWPID as u64,
        exit_signal: libc::SIGCHLD as u64,
        ..Default::default()
    };
    // SAFETY: a fork (no CLONE_VM); the child makes only raw system calls and never
    // returns into Rust code that could take a lock or allocate.
    let r = unsafe { super::restorer::clone3(&args) };
    if r == 0 {
        // SAFETY: raw system calls only; see above.
        unsafe { ns_init(fds[0], fds[1], ack[0], ack[1]) }
    }
    if r < 0 {
        return Err(SysError::last("clone3(CLONE_NEWPID)", "namespace init"));
    }
    // SAFETY: closing our copies of init's ends; the other ends are ours.
    unsafe {
        libc::close(fds[0]);
        libc::close(ack[1]);
        Ok((
            r as pid_t,
            NsInit {
                ctl_w: OwnedFd::from_raw_fd(fds[1]),
                ack_r: OwnedFd::from_raw_fd(ack[0]),
            },
        ))
    }
}

/// The body of the namespace init.
///
/// # Safety
/// Must only run in the freshly forked child.
unsafe fn ns_init(ctl_r: i32, ctl_w: i32, ack_r: i32, ack_w: i32) -> ! {
    // SAFETY: raw system calls on our own descriptors and children.
    unsafe {
        libc::syscall(libc::SYS_close, ctl_w);
        libc::syscall(libc::SYS_close, ack_r);
        // Our parent dying means the restore failed: die with it.
        libc::syscall(libc::SYS_prctl, libc::PR_SET_PDEATHSIG, libc::SIGKILL);
        let mut b = 0u8;
        loop {
            let n = libc::syscall(libc::SYS_read, ctl_r, &mut b as *mut u8, 1);
            if n == 1 {
                break; // The release.
            }
            if n < 0 && *libc::__errno_location() == libc::EINTR {
                continue;
            }
            // End of file without the byte: the restorer died. Leaving takes
            // the namespace, every husk in it, down with us.
            libc::syscall(libc::SYS_exit_group, 1);
        }
        libc::syscall(libc::SYS_prctl, libc::PR_SET_PDEATHSIG, 0);
        // Tell the restorer it may go now.
        libc::syscall(libc::SYS_write, ack_w, &b as *const u8, 1);
        libc::syscall(libc::SYS_close_range, 0u32, u32::MAX, 0u32);
        // The restored root was forked by the restorer, so it is not our child:
        // reap whatever becomes ours, and leave once nothing else lives in the
        // namespace (kill(-1, 0) reaches every process of it but us).
        loop {
            while libc::syscall(
                libc::SYS_wait4,
                -1,
                0usize,
                libc::__WALL | libc::WNOHANG,
                0usize,
            ) > 0
            {}
            if libc::syscall(libc::SYS_kill, -1, 0) < 0 {
                libc::syscall(libc::SYS_exit_group, 0);
            }
            let ts = libc::timespec {
                tv_sec: 0,
                tv_nsec: 50_000_000,
            };
            libc::syscall(libc::SYS_nanosleep, &ts as *const libc::timespec, 0usize);
        }
    }
}

/// Make our next children be born in `init`'s PID namespace. Returns our own
/// namespace, to go back to with [`leave`].
pub fn enter(init: pid_t) -> Result<std::fs::File, SysError> {
    let ours = std::fs::File::open("/proc/self/ns/pid").map_err(|source| SysError {
        op: "open",
        what: "/proc/self/ns/pid".into(),
        source,
    })?;
    let f = std::fs::File::open(format!("/proc/{init}/ns/pid")).map_err(|source| SysError {
        op: "open",
        what: format!("/proc/{init}/ns/pid"),
        source,
    })?;
    nix::sched::setns(&f, nix::sched::CloneFlags::CLONE_NEWPID)
        .map_err(|e| SysError::nix("setns(CLONE_NEWPID)", init, e))?;
    Ok(ours)
}

/// Children are born in our own PID namespace again.
pub fn leave(ours: std::fs::File) -> Result<(), SysError> {
    nix::sched::setns(&ours, nix::sched::CloneFlags::CLONE_NEWPID)
        .map_err(|e| SysError::nix("setns(CLONE_NEWPID)", "our own namespace", e))
}
