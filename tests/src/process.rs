//! Processes a test started: guards that kill them, and readers of `/proc`.
//!
//! Guards kill by PID with SIGKILL, never by name. To avoid killing an unrelated
//! process that was given a recycled PID, a guard remembers each process's start
//! time (`/proc/PID/stat` field 22) when it starts guarding it and leaves alone a
//! PID whose start time has changed. A restored process has a new start time, so a
//! test re-arms its guards ([`ProcGuard::set_pid`], [`PidsGuard::rearm`]) right
//! after the restore.
//!
//! Reaping: a guard reaps what is our child (`waitpid(pid, WNOHANG)`, never
//! `waitpid(-1)`); thanks to [`become_subreaper`] that includes the orphans of the
//! trees we started and the trees `ckpt-agent restore` left behind. What is not our
//! child is only waited for until it is gone or a zombie.

use std::fs;
use std::io;
use std::process::{Child, ExitStatus};
use std::sync::Once;
use std::time::Duration;

use crate::wait_for;

/// How long a guard waits for a killed process to disappear.
const KILL_WAIT: Duration = Duration::from_secs(10);

/// Marks this process as a child subreaper (once). See the crate docs for why.
pub fn become_subreaper() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // SAFETY: PR_SET_CHILD_SUBREAPER takes an integer flag and touches no memory
        // of ours.
        let r = unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1 as libc::c_ulong, 0, 0, 0) };
        if r != 0 {
            eprintln!(
                "ckpt-tests: PR_SET_CHILD_SUBREAPER failed: {}",
                io::Error::last_os_error()
            );
        }
    });
}

/// The fields of `/proc/PID/stat` after the command name: index 0 is the state
/// (field 3), index 1 the parent PID (field 4), ..., index 19 the start time.
fn stat_fields(pid: i32) -> Option<Vec<String>> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 1..];
    Some(rest.split_whitespace().map(str::to_owned).collect())
}

/// The state letter of `/proc/PID/stat` (`R`, `S`, `D`, `T`, `t`, `Z`, ...), or
/// `None` if there is no such process.
pub fn proc_state(pid: i32) -> Option<char> {
    stat_fields(pid)?.first()?.chars().next()
}

/// The parent PID of `pid`.
pub fn proc_ppid(pid: i32) -> Option<i32> {
    stat_fields(pid)?.get(1)?.parse().ok()
}

/// Start time of `pid` in clock ticks since boot; identifies one incarnation of a PID.
pub fn start_time(pid: i32) -> Option<u64> {
    stat_fields(pid)?.get(19)?.parse().ok()
}

/// True if `pid` exists and is not a zombie: `kill(pid, 0)` succeeds and its state
/// in `/proc/PID/stat` is neither `Z` nor `X`.
pub fn is_alive(pid: i32) -> bool {
    if pid <= 0 {
        return false;
    }
    // SAFETY: signal 0 only checks that the process exists; nothing is sent.
    if unsafe { libc::kill(pid, 0) } != 0 {
        return false;
    }
    !matches!(proc_state(pid), None | Some('Z') | Some('X'))
}

/// True if `pid` is stopped by job control (state `T`), not merely traced (`t`).
pub fn is_stopped(pid: i32) -> bool {
    proc_state(pid) == Some('T')
}

/// Sends `sig` to `pid`.
pub fn send_signal(pid: i32, sig: libc::c_int) -> io::Result<()> {
    // SAFETY: kill(2) with plain integers; it touches no memory of ours.
    if unsafe { libc::kill(pid, sig) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Thread IDs of `pid` (`/proc/PID/task`), sorted.
pub fn thread_ids(pid: i32) -> Vec<i32> {
    let mut tids: Vec<i32> = fs::read_dir(format!("/proc/{pid}/task"))
        .map(|d| {
            d.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    tids.sort_unstable();
    tids
}

/// The direct children of `pid`, from every thread's `children` file, sorted.
pub fn children(pid: i32) -> Vec<i32> {
    let mut kids = Vec::new();
    for tid in thread_ids(pid) {
        if let Ok(s) = fs::read_to_string(format!("/proc/{pid}/task/{tid}/children")) {
            kids.extend(s.split_whitespace().filter_map(|p| p.parse::<i32>().ok()));
        }
    }
    kids.sort_unstable();
    kids.dedup();
    kids
}

/// `root` and all its descendants, parents before children (breadth first).
pub fn tree_pids(root: i32) -> Vec<i32> {
    let mut out = vec![root];
    let mut i = 0;
    while i < out.len() {
        for kid in children(out[i]) {
            if !out.contains(&kid) {
                out.push(kid);
            }
        }
        i += 1;
    }
    out
}

/// For every thread of `pid`, its `TracerPid` (0 when not traced).
pub fn tracer_pids(pid: i32) -> Vec<(i32, i32)> {
    thread_ids(pid)
        .into_iter()
        .filter_map(|tid| {
            let status = fs::read_to_string(format!("/proc/{pid}/task/{tid}/status")).ok()?;
            let tracer = status
                .lines()
                .find_map(|l| l.strip_prefix("TracerPid:"))?
                .trim()
                .parse()
                .ok()?;
            Some((tid, tracer))
        })
        .collect()
}

/// Waits up to `timeout` until no thread of `pid` is traced (a tracer may take a
/// moment to let go after the agent exits); fails naming the tracers otherwise.
pub fn ensure_untraced(pid: i32, timeout: Duration) -> anyhow::Result<()> {
    let untraced = wait_for(|| tracer_pids(pid).iter().all(|&(_, t)| t == 0), timeout);
    anyhow::ensure!(
        untraced,
        "process {pid} is still traced: {:?}",
        tracer_pids(pid)
    );
    Ok(())
}

/// What `waitpid(pid, WNOHANG)` said.
enum Reap {
    /// Our child, now reaped.
    Reaped,
    /// Our child, still running (or stopped).
    Running,
    /// Not our child (or no such process).
    NotOurs,
}

fn try_reap(pid: i32) -> Reap {
    let mut status = 0;
    // SAFETY: waitpid writes only to `status`, a valid local; WNOHANG never blocks.
    let r = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG | libc::__WALL) };
    match r {
        0 => Reap::Running,
        r if r == pid => Reap::Reaped,
        _ => Reap::NotOurs,
    }
}

/// Waits until `pid` is gone or a zombie, reaping it if it is our child. Returns
/// whether that happened within `timeout`.
pub fn wait_gone(pid: i32, timeout: Duration) -> bool {
    wait_for(
        || match try_reap(pid) {
            Reap::Reaped => true,
            Reap::Running => false,
            Reap::NotOurs => !is_alive(pid),
        },
        timeout,
    )
}

/// SIGKILLs `pid` if it is still the incarnation that started at `start` (any
/// incarnation when `start` is `None`), then waits for it as [`wait_gone`] does.
fn kill_incarnation(pid: i32, start: Option<u64>) -> bool {
    if pid <= 0 {
        return true;
    }
    let now = start_time(pid);
    if now.is_none() {
        // Gone already; reap it in case it is our zombie.
        let _ = try_reap(pid);
        return true;
    }
    if start.is_some() && now != start {
        return true; // The PID was recycled for another process: not ours to kill.
    }
    let _ = send_signal(pid, libc::SIGKILL);
    wait_gone(pid, KILL_WAIT)
}

/// Guards one process: SIGKILLs and reaps it when dropped.
///
/// It holds either a [`Child`] we spawned (reaped through it) or a bare PID, such
/// as a restored root (then reaped with `waitpid(pid)` if it has become our child).
#[derive(Debug, Default)]
pub struct ProcGuard {
    child: Option<Child>,
    pid: Option<i32>,
    start: Option<u64>,
}

impl ProcGuard {
    /// Guards a child we spawned.
    pub fn new(child: Child) -> Self {
        let pid = child.id() as i32;
        ProcGuard {
            start: start_time(pid),
            pid: Some(pid),
            child: Some(child),
        }
    }

    /// Guards a process by PID.
    pub fn adopt(pid: i32) -> Self {
        let mut g = ProcGuard::default();
        g.set_pid(pid);
        g
    }

    /// The guarded PID, if any.
    pub fn pid(&self) -> Option<i32> {
        self.pid
    }

    /// The guarded PID; panics if the guard guards nothing.
    pub fn id(&self) -> i32 {
        self.pid.expect("ProcGuard guards no process")
    }

    /// Waits until the process has exited, up to `timeout`. For a child we spawned
    /// this reaps it and returns its exit status; for an adopted PID it returns
    /// `Ok(None)` once the PID is gone or a zombie (reaped if it was ours). The
    /// guard keeps the PID (so a later restore of the same PID is killed too once
    /// it is re-armed with [`set_pid`](Self::set_pid)).
    pub fn wait_exit(&mut self, timeout: Duration) -> io::Result<Option<ExitStatus>> {
        if let Some(child) = self.child.as_mut() {
            let mut status = None;
            wait_for(
                || {
                    status = child.try_wait().ok().flatten();
                    status.is_some()
                },
                timeout,
            );
            return match status {
                Some(s) => {
                    self.child = None;
                    Ok(Some(s))
                }
                None => Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("process {} still runs after {timeout:?}", self.id()),
                )),
            };
        }
        match self.pid {
            Some(pid) if !wait_gone(pid, timeout) => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("process {pid} still runs after {timeout:?}"),
            )),
            _ => Ok(None),
        }
    }

    /// Stops guarding; returns the PID that was guarded. A spawned child is left
    /// running (and will be reaped by nobody until the test process exits).
    pub fn forget(&mut self) -> Option<i32> {
        if let Some(child) = self.child.take() {
            drop(child); // dropping a Child neither kills nor waits
        }
        self.start = None;
        self.pid.take()
    }

    /// Points the guard at `pid` (a restored process, typically with the PID the
    /// guard had before), remembering its current start time. A spawned child still
    /// held is killed and reaped first.
    pub fn set_pid(&mut self, pid: i32) {
        self.kill_child();
        self.pid = Some(pid);
        self.start = start_time(pid);
    }

    /// Kills the guarded process now and waits for it (as on drop).
    pub fn kill(&mut self) {
        self.kill_child();
        if let Some(pid) = self.pid {
            if !kill_incarnation(pid, self.start) {
                eprintln!("ckpt-tests: process {pid} survived SIGKILL for {KILL_WAIT:?}");
            }
        }
    }

    fn kill_child(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for ProcGuard {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Guards a list of processes (a tree's descendants, a restored tree): when dropped,
/// SIGKILLs them last to first (so a tree listed parents first dies leaves first and
/// no child sees its parent vanish while it still runs), then reaps those that are
/// our children.
#[derive(Debug, Default)]
pub struct PidsGuard {
    pids: Vec<(i32, Option<u64>)>,
}

impl PidsGuard {
    /// Guards `pids`, as they are now.
    pub fn new(pids: impl IntoIterator<Item = i32>) -> Self {
        let mut g = PidsGuard::default();
        for pid in pids {
            g.push(pid);
        }
        g
    }

    /// Guards one more process.
    pub fn push(&mut self, pid: i32) {
        self.pids.push((pid, start_time(pid)));
    }

    /// The guarded PIDs, in order.
    pub fn pids(&self) -> Vec<i32> {
        self.pids.iter().map(|&(p, _)| p).collect()
    }

    /// Re-reads each PID's start time: call it right after a restore brought the
    /// same PIDs back.
    pub fn rearm(&mut self) {
        for (pid, start) in &mut self.pids {
            *start = start_time(*pid);
        }
    }

    /// Waits until every guarded process is gone or a zombie, reaping our children.
    /// Returns the PIDs still alive at `timeout`.
    pub fn wait_gone(&self, timeout: Duration) -> Vec<i32> {
        let mut left = self.pids();
        wait_for(
            || {
                left.retain(|&p| !wait_gone(p, Duration::ZERO));
                left.is_empty()
            },
            timeout,
        );
        left
    }

    /// Stops guarding; returns the PIDs.
    pub fn forget(&mut self) -> Vec<i32> {
        let pids = self.pids();
        self.pids.clear();
        pids
    }

    /// Kills every guarded process now (as on drop).
    pub fn kill_all(&mut self) {
        // Send every SIGKILL before waiting for any, so that none of them runs on
        // while its neighbours die.
        for &(pid, start) in self.pids.iter().rev() {
            if start.is_none() || start_time(pid) == start {
                let _ = send_signal(pid, libc::SIGKILL);
            }
        }
        for &(pid, start) in self.pids.iter().rev() {
            if !kill_incarnation(pid, start) {
                eprintln!("ckpt-tests: process {pid} survived SIGKILL for {KILL_WAIT:?}");
            }
        }
    }
}

impl Drop for PidsGuard {
    fn drop(&mut self) {
        self.kill_all();
    }
}

/// The largest mapping of `pid` with no name (anonymous, not the heap or stack),
/// as `(start, end)`, from `/proc/PID/maps`.
pub fn largest_anon_mapping(pid: i32) -> io::Result<(u64, u64)> {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps"))?;
    maps.lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let range = f.next()?;
            if f.nth(4).is_some() {
                return None;
            }
            let (a, b) = range.split_once('-')?;
            Some((
                u64::from_str_radix(a, 16).ok()?,
                u64::from_str_radix(b, 16).ok()?,
            ))
        })
        .max_by_key(|(a, b)| b - a)
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::NotFound,
                format!("PID {pid} has no anonymous mapping"),
            )
        })
}

/// Starts `program` with `args` as a new process with PID `pid` (which must be
/// free: a process that just exited and was reaped), with `clone3(set_tid)`
/// (Linux ≥ 5.5, CAP_CHECKPOINT_RESTORE or root); its output goes to `log`. The
/// PID-reuse tests use it to hand a rank's PID to a stranger at once. A PID taken
/// meanwhile by some other process of the machine is an error (EEXIST).
pub fn spawn_at_pid(
    pid: i32,
    program: &std::path::Path,
    args: &[&str],
    log: &std::path::Path,
) -> io::Result<ProcGuard> {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    let bad = |_| io::Error::from(io::ErrorKind::InvalidInput);
    let prog = CString::new(program.as_os_str().as_bytes()).map_err(bad)?;
    let mut argv: Vec<CString> = vec![prog.clone()];
    for a in args {
        argv.push(CString::new(*a).map_err(bad)?);
    }
    let mut argv_ptrs: Vec<*const libc::c_char> = argv.iter().map(|a| a.as_ptr()).collect();
    argv_ptrs.push(std::ptr::null());
    let out = fs::OpenOptions::new().create(true).append(true).open(log)?;
    let out_fd = std::os::fd::AsRawFd::as_raw_fd(&out);
    let set_tid = [pid as libc::pid_t];
    /// struct clone_args of clone3(2), up to `cgroup` (CLONE_ARGS_SIZE_VER2).
    #[repr(C)]
    #[derive(Default)]
    struct CloneArgs {
        flags: u64,
        pidfd: u64,
        child_tid: u64,
        parent_tid: u64,
        exit_signal: u64,
        stack: u64,
        stack_size: u64,
        tls: u64,
        set_tid: u64,
        set_tid_size: u64,
        cgroup: u64,
    }
    let cl = CloneArgs {
        exit_signal: libc::SIGCHLD as u64,
        set_tid: set_tid.as_ptr() as u64,
        set_tid_size: 1,
        ..Default::default()
    };
    become_subreaper();
    // SAFETY: a fork (no CLONE_VM) whose child only makes async-signal-safe calls
    // (dup2, execv, _exit) on memory prepared above; the parent reads nothing the
    // child writes.
    let r = unsafe {
        libc::syscall(
            libc::SYS_clone3,
            &cl as *const CloneArgs,
            std::mem::size_of::<CloneArgs>(),
        )
    };
    if r == 0 {
        // SAFETY: see above; the child never returns into Rust.
        unsafe {
            libc::dup2(out_fd, 1);
            libc::dup2(out_fd, 2);
            libc::execv(prog.as_ptr(), argv_ptrs.as_ptr());
            libc::_exit(127);
        }
    }
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    assert_eq!(r as i32, pid, "clone3 gave another PID than set_tid asked");
    Ok(ProcGuard::adopt(pid))
}
