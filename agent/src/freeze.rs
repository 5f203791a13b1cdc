//! Freezing a process tree from outside, and letting it go again.
//!
//! Every thread of every process under the root is `PTRACE_SEIZE`d, then the
//! process is sent SIGSTOP and its stop let through, so that the whole group is
//! in group-stop, each thread reporting it as a ptrace stop. We walk the tree
//! again until a pass finds no new thread or child: a stopped thread cannot
//! clone, so this ends.
//!
//! Why group-stop and not only `PTRACE_INTERRUPT`: a tracee whose tracer dies is
//! let run by the kernel, unless its group is stopped; then it stays stopped. So
//! if the agent is killed at any instant after the freeze (inside an injected
//! call, with every signal blocked), no thread runs on in that state; the
//! watchdog of [`crate::rescue`] puts back what the journal recorded and only
//! then sends SIGCONT. What the stop shows to the tree's parent is said there.
//!
//! Alternatives weighed: the v1 freezer cgroup freezes a whole tree atomically,
//! but needs the tree moved into a cgroup first (a visible side effect that fights
//! Slurm's own cgroups) and still needs ptrace afterwards to read registers.
//!
//! [`Frozen`] detaches every thread when dropped, so any error path of the dump
//! thaws the tree: registers that an injection changed are put back, normalised so
//! that an interrupted system call restarts as if nothing happened; the threads
//! are detached (still in group-stop), a `thawing` record is journaled, and then
//! SIGCONT lets them go.

use std::collections::BTreeMap;
use std::sync::Arc;

use libc::pid_t;
use tracing::{debug, warn};

use crate::rescue::{self, Journal, Record, SavedThread};
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
    #[error("cannot stop process {pid}: {source}")]
    Stop {
        pid: pid_t,
        #[source]
        source: sys::SysError,
    },
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
    #[error(transparent)]
    Journal(#[from] rescue::RescueError),
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
    /// Did we send it SIGSTOP (then it gets SIGCONT at the thaw).
    sent_stop: bool,
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
    /// Where the original state is recorded before each change (see
    /// [`crate::rescue`]); `None` for callers that run without a watchdog.
    journal: Option<Arc<Journal>>,
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

    pub fn journal(&self) -> Option<&Journal> {
        self.journal.as_deref()
    }

    /// Let the tree run on as if nothing happened.
    pub fn thaw(mut self) {
        self.release();
    }

    /// SIGKILL every process of the tree (the dump is complete) and wait until the
    /// threads are gone.
    pub fn kill(mut self) {
        for p in &self.procs {
            if let Err(e) = rescue::note(self.journal(), Record::Killing { pid: p.pid }) {
                warn!(%e, "journal");
            }
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
            // One thread stays attached to take our SIGCONT out of the queue before
            // the program's handler sees it (see [`continue_quietly`]).
            let keep = p.sent_stop.then(|| quiet_thread(p)).flatten();
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
                if keep.is_some() {
                    continue;
                }
                if let Err(e) = ptrace::detach(t.tid, 0) {
                    warn!(tid = t.tid, ?e, "detach failed");
                }
            }
            // Detached, the threads stay in group-stop until SIGCONT: announce it
            // first, so a watchdog never puts old registers into a running thread.
            if p.sent_stop {
                if let Err(e) = rescue::note(self.journal(), Record::Thawing { pid: p.pid }) {
                    warn!(pid = p.pid, %e, "journal");
                }
                let continued = match keep {
                    Some(tid) => {
                        let tids: Vec<pid_t> = p.threads.iter().map(|t| t.tid).collect();
                        continue_quietly(p.pid, tid, &tids)
                    }
                    None => sys::kill(p.pid, libc::SIGCONT).map_err(|e| e.to_string()),
                };
                if let Err(e) = continued {
                    warn!(pid = p.pid, %e, "could not continue the process");
                }
            }
            for &(tid, sig) in &p.swallowed {
                let _ = sys::tgkill(p.pid, tid, sig);
            }
        }
    }
}

/// The bit of SIGCONT in a signal set as /proc and ptrace show it.
const SIGCONT_BIT: u64 = 1 << (libc::SIGCONT - 1);

/// A thread of `p` that can take SIGCONT for its process, if the program
/// catches SIGCONT (its handler would run once for our SIGCONT otherwise) and
/// one thread does not block it.
fn quiet_thread(p: &FrozenProcess) -> Option<pid_t> {
    let status = proc::status(p.pid).ok()?;
    if status.sig_cgt & SIGCONT_BIT == 0 {
        return None;
    }
    p.threads
        .iter()
        .find(|t| t.sigmask & SIGCONT_BIT == 0)
        .map(|t| t.tid)
}

/// Ends the group-stop of `pid` without running the program's SIGCONT handler.
/// Every thread of the process (`tids`) is still traced, in a ptrace stop with
/// its registers back, so none can run, let alone dequeue a signal: SIGCONT is
/// sent, then thread `tid` (one that does not block it) alone is resumed. It
/// dequeues the SIGCONT before any user instruction, which stops it for us as a
/// signal-delivery stop, and detaching it with no signal discards it; then the
/// other threads are detached. A signal dequeued before it (a lower number,
/// SIGCHLD say) is delivered as it would have been. If we die in between, the
/// kernel detaches the threads and the handler runs once: what a plain SIGCONT
/// does.
pub fn continue_quietly(pid: pid_t, tid: pid_t, tids: &[pid_t]) -> Result<(), String> {
    let taken = take_sigcont(pid, tid);
    for &t in tids {
        if t != tid || taken.is_err() {
            let _ = ptrace::detach(t, 0);
        }
    }
    taken
}

/// The part of [`continue_quietly`] that resumes `tid` until it has dequeued
/// SIGCONT, and detaches it then.
fn take_sigcont(pid: pid_t, tid: pid_t) -> Result<(), String> {
    let err = |e: ptrace::PtraceError| e.to_string();
    sys::kill(pid, libc::SIGCONT).map_err(|e| e.to_string())?;
    ptrace::cont(tid, 0).map_err(err)?;
    loop {
        match ptrace::wait(tid).map_err(err)? {
            Stop::Signal(libc::SIGCONT) => return ptrace::detach(tid, 0).map_err(err),
            Stop::Signal(sig) => ptrace::cont(tid, sig).map_err(err)?,
            // The trap that tells a seizing tracer the group-stop ended.
            Stop::Event { .. } | Stop::Syscall => ptrace::cont(tid, 0).map_err(err)?,
            Stop::Exited(_) | Stop::Killed(_) => return Ok(()),
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

/// How the tree is held while frozen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Hold {
    /// In group-stop as well as in ptrace stops: safe at the agent's death (see
    /// the module doc). The default, and the only way the CLI offers.
    #[default]
    GroupStop,
    /// `PTRACE_INTERRUPT` only: invisible to the parent, but a tree whose agent
    /// dies runs on from wherever the agent left it. Kept to measure what the
    /// group-stop costs (the engine bench); not for use.
    InterruptOnly,
}

/// Freeze the tree rooted at `root`, journaling in `journal` what a watchdog needs
/// to put it back (each process before it is stopped, the threads' registers and
/// masks before anything changes them). `root` must be the process that started
/// at `start_time` (`/proc/PID/stat` field 22) when that is given, or else the one
/// found at the first look: a PID taken over by another process is refused before
/// it is seized and again right after, before it is stopped (a seized process
/// cannot be reaped, so from then on the PID stays the one checked).
pub fn freeze(
    root: pid_t,
    start_time: Option<u64>,
    journal: Option<Arc<Journal>>,
    hold: Hold,
) -> Result<Frozen, FreezeError> {
    let mut want = start_time;
    if std::fs::metadata(format!("/proc/{root}")).is_err() {
        return Err(FreezeError::NoSuchProcess { pid: root });
    }
    let mut frozen = Frozen {
        procs: Vec::new(),
        released: false,
        journal,
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
            let first = !index.contains_key(&pid);
            if first {
                let stopped = st.state == 'T';
                rescue::note(
                    frozen.journal(),
                    Record::Process {
                        pid,
                        start_time: st.start_time,
                        stopped_before: stopped,
                    },
                )?;
                frozen.procs.push(FrozenProcess {
                    pid,
                    stopped,
                    sent_stop: false,
                    threads: Vec::new(),
                    swallowed: Vec::new(),
                });
                index.insert(pid, frozen.procs.len() - 1);
            }
            let fp = &mut frozen.procs[index[&pid]];
            let check = if pid == root { want } else { None };
            if stop_process(fp, first, hold, check)? {
                changed = true;
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
            journal_threads(&frozen)?;
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

/// Journals every thread's registers and mask as they stopped, before anything
/// changes them.
fn journal_threads(frozen: &Frozen) -> Result<(), FreezeError> {
    for p in &frozen.procs {
        let threads = p
            .threads
            .iter()
            .map(|t| SavedThread {
                tid: t.tid,
                regs: ptrace::regs_as_bytes(&t.regs).to_vec(),
                sigmask: t.sigmask,
            })
            .collect();
        rescue::note(
            frozen.journal(),
            Record::Threads {
                pid: p.pid,
                threads,
            },
        )?;
    }
    Ok(())
}

/// Seizes the threads of `fp` not seized yet, stops the process the first time
/// (SIGSTOP, unless job control had stopped it already) and waits until each new
/// thread reports its stop. Whether a thread was added. With `check`, the
/// process must still be the one that started then once its threads are seized;
/// if not, they are let go untouched.
fn stop_process(
    fp: &mut FrozenProcess,
    first: bool,
    hold: Hold,
    check: Option<u64>,
) -> Result<bool, FreezeError> {
    let pid = fp.pid;
    let mut new = Vec::new();
    for tid in proc::tasks(pid)? {
        if fp.threads.iter().any(|t| t.tid == tid) {
            continue;
        }
        match ptrace::seize(tid, ptrace::O_TRACESYSGOOD) {
            Ok(()) if hold == Hold::InterruptOnly => {
                ptrace::interrupt(tid).map_err(|source| FreezeError::Seize { pid, tid, source })?;
                new.push(tid);
            }
            Ok(()) => new.push(tid),
            // The thread exited meanwhile.
            Err(e) if e.source.raw_os_error() == Some(libc::ESRCH) => {}
            Err(source) => return Err(FreezeError::Seize { pid, tid, source }),
        }
    }
    if let Some(w) = check {
        let now = proc::stat(pid).map(|s| s.start_time).unwrap_or(0);
        if let Err(e) = same_process(pid, w, now) {
            for &tid in &new {
                let_go(tid);
            }
            return Err(e);
        }
    }
    if first && !fp.stopped && hold == Hold::GroupStop {
        sys::kill(pid, libc::SIGSTOP).map_err(|source| FreezeError::Stop { pid, source })?;
        fp.sent_stop = true;
    }
    let mut added = false;
    for tid in new {
        if let Some(t) = wait_stopped(pid, tid)? {
            fp.threads.push(t);
            added = true;
        }
    }
    Ok(added)
}

/// Detaches a thread seized but not stopped yet, leaving it as it was.
fn let_go(tid: pid_t) {
    if ptrace::interrupt(tid).is_err() {
        return;
    }
    loop {
        match ptrace::wait(tid) {
            Ok(Stop::Signal(sig)) => {
                // Delivered as it would have been; the interrupt stops it next.
                let _ = ptrace::cont(tid, sig);
            }
            Ok(Stop::Event { .. }) | Ok(Stop::Syscall) => break,
            _ => return,
        }
    }
    let _ = ptrace::detach(tid, 0);
}

/// Waits until seized thread `tid` is in its group-stop, and reads its state.
/// `None` if it exited meanwhile.
fn wait_stopped(pid: pid_t, tid: pid_t) -> Result<Option<FrozenThread>, FreezeError> {
    let err = |source| FreezeError::Seize { pid, tid, source };
    loop {
        match ptrace::wait(tid).map_err(err)? {
            Stop::Event { .. } | Stop::Syscall => break,
            Stop::Signal(sig) => {
                // Our SIGSTOP, let through, starts the group-stop. Any other
                // signal was already on its way: the kernel delivers it exactly as
                // it would have, and the stop comes before any more user code.
                ptrace::cont(tid, sig).map_err(err)?;
            }
            Stop::Exited(_) | Stop::Killed(_) => return Ok(None),
        }
    }
    let regs = ptrace::get_regs(tid).map_err(err)?;
    let sigmask = ptrace::get_sigmask(tid).map_err(err)?;
    Ok(Some(FrozenThread {
        tid,
        regs,
        sigmask,
        touched: false,
    }))
}
