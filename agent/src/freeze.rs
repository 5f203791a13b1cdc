//! Freezing a process tree from outside, and letting it go again.
//!
//! Every thread of every process under the root is `PTRACE_SEIZE`d and
//! `PTRACE_INTERRUPT`ed. Seizing does not stop or signal anything by itself, so a
//! tree we fail to freeze is left as it was. We walk the tree again until a pass
//! finds no new thread or child: a stopped thread cannot clone, so this ends.
//!
//! Alternatives weighed: the v1 freezer cgroup freezes a whole tree atomically, but
//! needs the tree moved into a cgroup first (a visible side effect) and still needs
//! ptrace afterwards to read registers; SIGSTOP is visible to the parent and to the
//! program. Seize + interrupt is invisible and reaches threads blocked in the kernel.
//!
//! [`Frozen`] detaches every thread when dropped, so any error path of the dump thaws
//! the tree: registers that an injection changed are put back, normalised so that
//! an interrupted system call restarts as if nothing happened.

use std::collections::BTreeMap;

use libc::pid_t;
use tracing::{debug, warn};

use crate::sys::{self, proc, ptrace, ptrace::Stop};

#[derive(Debug, thiserror::Error)]
pub enum FreezeError {
    #[error("process {pid} does not exist (or it is not visible here)")]
    NoSuchProcess { pid: pid_t },
    #[error("cannot freeze thread {tid} of process {pid}: {source}")]
    Seize {
        pid: pid_t,
        tid: pid_t,
        #[source]
        source: ptrace::PtraceError,
    },
    #[error("process {pid} is a zombie: zombies in the tree are not supported yet")]
    Zombie { pid: pid_t },
    #[error(
        "PID {pid} is no longer the process that was meant: that one started at tick \
         {expected} after boot, the process at PID {pid} now at tick {found}. It exited \
         and its PID was taken by another process, which was left as it was"
    )]
    NotTheProcess {
        pid: pid_t,
        expected: u64,
        found: u64,
    },
    #[error(transparent)]
    Proc(#[from] proc::ProcError),
}

/// One frozen thread.
pub struct FrozenThread {
    pub tid: pid_t,
    /// Registers as the thread stopped, before any injection.
    pub regs: libc::user_regs_struct,
    /// Blocked signals as the thread stopped.
    pub sigmask: u64,
    /// Whether we changed the registers or the mask (injections): they must be put
    /// back before detaching.
    pub touched: bool,
}

pub struct FrozenProcess {
    pub pid: pid_t,
    /// Was the process stopped by job control before we came.
    pub stopped: bool,
    pub threads: Vec<FrozenThread>,
    /// Signals swallowed during injections, to send again at thaw.
    pub swallowed: Vec<(pid_t, i32)>,
}

/// A frozen tree; parents come before their children.
impl FrozenProcess {
    /// Puts back the registers and signal masks of the threads that
    /// injected system calls changed, while they stay frozen. Done as soon as the
    /// injections are over: if the agent dies before it thaws the tree, the kernel
    /// detaches the threads and they must resume where they were, not inside an
    /// injected call (they would crash).
    pub fn settle(&self) {
        for t in self.threads.iter().filter(|t| t.touched) {
            let mut r = t.regs;
            normalize_restart(&mut r);
            if let Err(e) = ptrace::set_regs(t.tid, &r) {
                warn!(tid = t.tid, ?e, "could not put registers back");
            }
            if let Err(e) = ptrace::set_sigmask(t.tid, t.sigmask) {
                warn!(tid = t.tid, ?e, "could not put the signal mask back");
            }
        }
    }
}

pub struct Frozen {
    pub procs: Vec<FrozenProcess>,
    released: bool,
}

impl Frozen {
    pub fn root(&self) -> pid_t {
        self.procs[0].pid
    }

    pub fn process(&self, pid: pid_t) -> Option<&FrozenProcess> {
        self.procs.iter().find(|p| p.pid == pid)
    }

    pub fn process_mut(&mut self, pid: pid_t) -> Option<&mut FrozenProcess> {
        self.procs.iter_mut().find(|p| p.pid == pid)
    }

    /// Let the tree run on as if nothing happened.
    pub fn thaw(mut self) {
        self.release();
    }

    /// SIGKILL every process of the tree (the dump is complete) and wait until the
    /// threads are gone.
    pub fn kill(mut self) {
        for p in &self.procs {
            let _ = sys::kill(p.pid, libc::SIGKILL);
        }
        for p in &self.procs {
            // Other threads first: the kernel holds back the leader's exit until the
            // tracer has collected every other thread of the group.
            for t in p.threads.iter().rev() {
                // The tracer sees each traced thread's exit; collect them so the
                // PIDs are released as soon as the parents reap.
                loop {
                    match ptrace::wait(t.tid) {
                        Ok(Stop::Exited(_)) | Ok(Stop::Killed(_)) | Err(_) => break,
                        Ok(_) => {
                            let _ = ptrace::cont(t.tid, 0);
                        }
                    }
                }
            }
        }
        self.released = true;
    }

    fn release(&mut self) {
        if self.released {
            return;
        }
        self.released = true;
        for p in &self.procs {
            for t in &p.threads {
                if t.touched {
                    let mut r = t.regs;
                    normalize_restart(&mut r);
                    if let Err(e) = ptrace::set_regs(t.tid, &r) {
                        warn!(tid = t.tid, ?e, "could not put registers back");
                    }
                    if let Err(e) = ptrace::set_sigmask(t.tid, t.sigmask) {
                        warn!(tid = t.tid, ?e, "could not put the signal mask back");
                    }
                }
                if let Err(e) = ptrace::detach(t.tid, 0) {
                    warn!(tid = t.tid, ?e, "detach failed");
                }
            }
            for &(tid, sig) in &p.swallowed {
                let _ = sys::tgkill(p.pid, tid, sig);
            }
        }
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        self.release();
    }
}

/// Rewrite registers of a thread stopped inside an interrupted, restartable system
/// call so that resuming it re-issues the call, as the kernel's signal path would
/// (arch/x86/kernel/signal.c). An interrupted `restart_syscall` block (nanosleep and
/// friends) resumes through `restart_syscall`, which in a restored process (no
/// restart block) returns EINTR, as after any signal.
pub fn normalize_restart(r: &mut libc::user_regs_struct) {
    const ERESTARTSYS: i64 = -512;
    const ERESTARTNOINTR: i64 = -513;
    const ERESTARTNOHAND: i64 = -514;
    const ERESTART_RESTARTBLOCK: i64 = -516;
    if (r.orig_rax as i64) < 0 {
        return;
    }
    match r.rax as i64 {
        ERESTARTSYS | ERESTARTNOINTR | ERESTARTNOHAND => {
            r.rax = r.orig_rax;
            r.rip -= 2;
        }
        ERESTART_RESTARTBLOCK => {
            r.rax = crate::sys::nr::RESTART_SYSCALL;
            r.rip -= 2;
        }
        _ => {}
    }
    r.orig_rax = u64::MAX;
}

/// Freeze the tree rooted at `root`.
pub fn freeze(root: pid_t) -> Result<Frozen, FreezeError> {
    freeze_process(root, None)
}

/// Freeze the tree rooted at `root`, which must be the process that started at
/// `start_time` (`/proc/PID/stat` field 22) when that is given, or else the one
/// found at the first look: a PID taken over by another process is refused, before
/// it is seized and again right after (a seized process cannot be reaped, so from
/// then on the PID stays the one checked).
pub fn freeze_process(root: pid_t, start_time: Option<u64>) -> Result<Frozen, FreezeError> {
    let mut want = start_time;
    if std::fs::metadata(format!("/proc/{root}")).is_err() {
        return Err(FreezeError::NoSuchProcess { pid: root });
    }
    let mut frozen = Frozen {
        procs: Vec::new(),
        released: false,
    };
    let mut index: BTreeMap<pid_t, usize> = BTreeMap::new();
    loop {
        let mut changed = false;
        let mut queue = vec![root];
        let mut order = Vec::new();
        while let Some(pid) = queue.pop() {
            order.push(pid);
            let st = proc::stat(pid).map_err(|e| {
                if pid == root {
                    FreezeError::NoSuchProcess { pid }
                } else {
                    e.into()
                }
            })?;
            if st.state == 'Z' || st.state == 'X' {
                return Err(FreezeError::Zombie { pid });
            }
            if pid == root {
                same_process(root, *want.get_or_insert(st.start_time), st.start_time)?;
            }
            let i = *index.entry(pid).or_insert_with(|| {
                frozen.procs.push(FrozenProcess {
                    pid,
                    stopped: st.state == 'T',
                    threads: Vec::new(),
                    swallowed: Vec::new(),
                });
                frozen.procs.len() - 1
            });
            for tid in proc::tasks(pid)? {
                if frozen.procs[i].threads.iter().any(|t| t.tid == tid) {
                    continue;
                }
                match seize_thread(pid, tid)? {
                    Some(t) => {
                        frozen.procs[i].threads.push(t);
                        changed = true;
                    }
                    None => continue, // the thread exited meanwhile
                }
            }
            if let (true, Some(w)) = (pid == root, want) {
                // Dropping `frozen` on this error lets go of what was seized.
                let now = proc::stat(root).map_err(|_| FreezeError::NoSuchProcess { pid: root })?;
                same_process(root, w, now.start_time)?;
            }
            let mut kids = proc::children(pid)?;
            kids.reverse();
            queue.extend(kids);
        }
        if !changed {
            // Parents before children, in discovery order.
            frozen
                .procs
                .sort_by_key(|p| order.iter().position(|&x| x == p.pid).unwrap_or(usize::MAX));
            // The thread-group leader first.
            for p in &mut frozen.procs {
                p.threads.sort_by_key(|t| (t.tid != p.pid, t.tid));
            }
            debug!(procs = frozen.procs.len(), "tree frozen");
            return Ok(frozen);
        }
    }
}

fn same_process(pid: pid_t, expected: u64, found: u64) -> Result<(), FreezeError> {
    if expected != found {
        return Err(FreezeError::NotTheProcess {
            pid,
            expected,
            found,
        });
    }
    Ok(())
}

fn seize_thread(pid: pid_t, tid: pid_t) -> Result<Option<FrozenThread>, FreezeError> {
    if let Err(e) = ptrace::seize(tid, ptrace::O_TRACESYSGOOD) {
        if e.source.raw_os_error() == Some(libc::ESRCH) {
            return Ok(None);
        }
        return Err(FreezeError::Seize {
            pid,
            tid,
            source: e,
        });
    }
    ptrace::interrupt(tid).map_err(|source| FreezeError::Seize { pid, tid, source })?;
    loop {
        match ptrace::wait(tid).map_err(|source| FreezeError::Seize { pid, tid, source })? {
            Stop::Event { .. } | Stop::Syscall => break,
            Stop::Signal(sig) => {
                // A signal was already on its way: let the kernel deliver it exactly as
                // it would have, and the pending interrupt stops the thread before any
                // user code runs.
                ptrace::cont(tid, sig).map_err(|source| FreezeError::Seize { pid, tid, source })?;
            }
            Stop::Exited(_) | Stop::Killed(_) => return Ok(None),
        }
    }
    let regs = ptrace::get_regs(tid).map_err(|source| FreezeError::Seize { pid, tid, source })?;
    let sigmask =
        ptrace::get_sigmask(tid).map_err(|source| FreezeError::Seize { pid, tid, source })?;
    Ok(Some(FrozenThread {
        tid,
        regs,
        sigmask,
        touched: false,
    }))
}
