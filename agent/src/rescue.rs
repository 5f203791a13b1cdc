//! What becomes of a tree when the agent dies in the middle of an operation.
//!
//! A dump changes its tree while it reads it: each thread's signal mask is set to
//! block everything, its registers point at an injected system call, a few bytes
//! below its stack pointer hold the call's arguments, a TCP socket may be in repair
//! mode, an nftables table drops the tree's packets. If the agent is killed (SIGKILL,
//! the OOM killer, a crash) at any of those instants, the kernel detaches the
//! threads in that state, and a thread that runs on from an injected `syscall`
//! crashes or lives on with every signal blocked.
//!
//! # The mechanism, and why it covers every instant
//!
//! Two things together:
//!
//! 1. **The tree is held in group-stop, not only in ptrace stops.** [`crate::freeze`]
//!    sends each process SIGSTOP while its threads are seized and lets the stop take
//!    effect, before anything of the tree is touched. When a tracer dies, the kernel
//!    (`__ptrace_unlink`) puts a tracee of a group that is stopped back into the
//!    stop instead of letting it run: from that moment until someone sends SIGCONT,
//!    no thread of the tree executes a single user instruction, whatever state the
//!    agent left it in. A thread that was inside an injected call finishes that
//!    call in the kernel and stops on its way back to user mode. An injected call
//!    that had been delivered a signal cannot happen: every signal but SIGKILL and
//!    SIGSTOP is blocked during injections, and a pending signal stays pending.
//! 2. **A journal of what the original state was, written before each change**
//!    ([`Journal`], one file per operation), and a **watchdog**, a process of its own
//!    that is not the tracer ([`Watch`]): the agent starts it before its first
//!    operation; it waits for the agent to exit (a pidfd) and then puts back, from
//!    the journal, each thread's registers and mask, the stack bytes, closes the
//!    descriptors an injection may have created, takes sockets out of repair mode,
//!    removes the lock tables, and only then sends SIGCONT. The records come before
//!    the changes they undo, so at any instant the journal holds everything needed;
//!    a record cut short by the kill is the last line, and the change it announces
//!    was not made yet. Putting back is idempotent (the journal keeps the original
//!    values), so a watchdog killed while it works is replaced by the next
//!    `ckpt-agent serve` start or by `ckpt-agent rescue`, which sweep the journals
//!    whose owner and watchdog are both gone; until then the tree stays stopped,
//!    which is safe.
//!
//! The end of a dump is ordered the same way: registers back, threads detached
//! (they stay in group-stop), a `thawing` record, then SIGCONT. A watchdog that
//! finds `thawing` only sends SIGCONT again; one that does not find it knows the
//! tree never ran since the freeze, and may put the registers back.
//!
//! A restore (before its release) uses the journal too: [`Record::Husk`] names each
//! process built, [`Record::Released`] is the commit; a watchdog kills every husk of
//! a restore that was not released, and continues those of one that was.
//!
//! # What it costs and what it shows
//!
//! SIGSTOP is seen by the tree's real parent: a SIGCHLD with `CLD_STOPPED` at the
//! freeze and `CLD_CONTINUED` at the thaw (none where the parent set
//! `SA_NOCLDSTOP` or ignores SIGCHLD), and `waitpid(WUNTRACED)` reports the stop.
//! A SIGCONT handler of the program does not run: our SIGCONT is sent while the
//! threads are still traced and taken out of the queue by one of them before the
//! detach ([`crate::freeze::continue_quietly`]; it runs once only if the agent
//! dies and a watchdog continues the tree). slurmstepd, Open MPI's daemons and
//! shells without job control wait without `WUNTRACED` and see nothing; an
//! interactive shell with job control reports the job as stopped and then
//! continued in the background. We chose this over a freezer cgroup (a cgroup move
//! is visible too, and fights Slurm's own cgroups) and over an invisible
//! `PTRACE_INTERRUPT` (unsafe at the agent's death by construction).
//!
//! Not covered: a SIGSTOP sent by someone else and taken during an injection is
//! not sent again by a watchdog (the agent itself sends it again); a SIGCONT sent
//! by someone else while the tree is frozen ends the group-stop early, and with it
//! the guarantee, until the dump ends.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use libc::pid_t;
use serde::{Deserialize, Serialize};
use tracing::{debug, info, warn};

use crate::sys::{self, proc, ptrace};

/// Where journals live unless told otherwise.
pub const DEFAULT_DIR: &str = "/run/ckpt/rescue";

#[derive(Debug, thiserror::Error)]
pub enum RescueError {
    #[error("rescue journal {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot start the rescue watchdog: {0}")]
    Spawn(#[source] std::io::Error),
    #[error("the rescue watchdog did not start: {0}")]
    NotReady(String),
    #[error("bad owner {0:?}: expected PID.START_TIME")]
    BadOwner(String),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> RescueError + '_ {
    move |source| RescueError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// A thread's state as it was before anything of it was changed.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SavedThread {
    pub tid: pid_t,
    #[serde(with = "hexbytes")]
    pub regs: Vec<u8>,
    pub sigmask: u64,
}

/// One line of a journal. Each announces a change before it is made (or, for
/// `Thawing`, `Released` and the `*Off` records, that a change is over).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "r", rename_all = "snake_case")]
pub enum Record {
    /// A process about to be stopped (SIGSTOP) unless it was stopped already.
    Process {
        pid: pid_t,
        start_time: u64,
        stopped_before: bool,
    },
    /// Its threads as they stopped, before any of them is changed.
    Threads {
        pid: pid_t,
        threads: Vec<SavedThread>,
    },
    /// Stack bytes of `tid` about to be used as scratch for injections.
    Scratch {
        pid: pid_t,
        tid: pid_t,
        addr: u64,
        #[serde(with = "hexbytes")]
        bytes: Vec<u8>,
    },
    /// A userfaultfd about to be created inside `pid`; `before` lists the
    /// userfaultfd descriptors it had already (they are its own).
    Uffd {
        pid: pid_t,
        before: Vec<i32>,
    },
    UffdClosed {
        pid: pid_t,
    },
    /// TCP sockets (`pid`, descriptor) about to be put in repair mode.
    Repair {
        sockets: Vec<(pid_t, i32)>,
    },
    RepairOff,
    /// An nftables table (`inet NAME`) about to be made.
    NetLock {
        table: String,
    },
    NetUnlock {
        table: String,
    },
    /// Registers and masks of `pid` are back and its threads detached: it only
    /// needs SIGCONT.
    Thawing {
        pid: pid_t,
    },
    /// The image is committed: `pid` is about to be killed (kill mode).
    Killing {
        pid: pid_t,
    },
    /// A process built by a restore (it must not outlive an unreleased restore).
    Husk {
        pid: pid_t,
        start_time: u64,
    },
    /// The restore's commit point: every husk is complete and detached, stopped.
    Released,
}

mod hexbytes {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(b: &[u8], s: S) -> Result<S::Ok, S::Error> {
        const DIGITS: &[u8; 16] = b"0123456789abcdef";
        let mut out = Vec::with_capacity(b.len() * 2);
        for x in b {
            out.push(DIGITS[(x >> 4) as usize]);
            out.push(DIGITS[(x & 15) as usize]);
        }
        s.serialize_str(std::str::from_utf8(&out).expect("hex digits are ASCII"))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let s = String::deserialize(d)?;
        if s.len() % 2 != 0 {
            return Err(serde::de::Error::custom("odd number of hex digits"));
        }
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).map_err(serde::de::Error::custom))
            .collect()
    }
}

/// One operation's journal. Removed when the last handle drops: the agent lived
/// to the end (or to its own clean-up) of the operation. A killed agent leaves it
/// to its watchdog.
#[derive(Debug)]
pub struct Journal {
    file: File,
    path: PathBuf,
}

impl Journal {
    fn create(path: PathBuf) -> Result<Arc<Journal>, RescueError> {
        let file = OpenOptions::new()
            .create_new(true)
            .append(true)
            .mode(0o600)
            .open(&path)
            .map_err(io(&path))?;
        Ok(Arc::new(Journal { file, path }))
    }

    /// Appends `r` with one write. Nothing is synced: a killed process loses none
    /// of what it wrote, and a crashed machine loses the tree as well.
    pub fn note(&self, r: &Record) -> Result<(), RescueError> {
        let mut line = serde_json::to_vec(r).expect("a record serializes");
        line.push(b'\n');
        (&self.file).write_all(&line).map_err(io(&self.path))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for Journal {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_file(&self.path) {
            warn!(path = %self.path.display(), %e, "could not remove a finished journal");
        }
    }
}

/// Notes `r` in `j`, if there is one.
pub fn note(j: Option<&Journal>, r: Record) -> Result<(), RescueError> {
    match j {
        Some(j) => j.note(&r),
        None => Ok(()),
    }
}

/// The agent's side: its journal directory and the watchdog that watches it.
#[derive(Debug)]
pub struct Watch {
    dir: PathBuf,
    next: AtomicU64,
    watchdog: pid_t,
}

fn owner_name(pid: pid_t) -> Result<String, RescueError> {
    let st = proc::stat(pid).map_err(|e| RescueError::NotReady(e.to_string()))?;
    Ok(format!("{pid}.{}", st.start_time))
}

fn parse_owner(name: &str) -> Option<(pid_t, u64)> {
    let (p, s) = name.split_once('.')?;
    Some((p.parse().ok()?, s.parse().ok()?))
}

fn alive(pid: pid_t, start_time: u64) -> bool {
    proc::stat(pid)
        .map(|s| s.start_time == start_time && s.state != 'Z' && s.state != 'X')
        .unwrap_or(false)
}

impl Watch {
    /// Makes this process's journal directory under `base` and starts its
    /// watchdog (`ckpt-agent rescue --watch`), in a process group of its own so
    /// that a Ctrl-C meant for us does not reach it. Returns once it watches.
    pub fn start(base: &Path) -> Result<Watch, RescueError> {
        std::fs::create_dir_all(base).map_err(io(base))?;
        let me = std::process::id() as pid_t;
        let owner = owner_name(me)?;
        let dir = base.join(&owner);
        std::fs::create_dir_all(&dir).map_err(io(&dir))?;
        let exe = std::env::current_exe().map_err(RescueError::Spawn)?;
        let mut cmd = std::process::Command::new(exe);
        cmd.arg("rescue")
            .arg("--dir")
            .arg(base)
            .arg("--watch")
            .arg(&owner)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::inherit());
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        let mut child = cmd.spawn().map_err(RescueError::Spawn)?;
        let mut line = String::new();
        let out = child.stdout.take().expect("piped");
        BufReader::new(out)
            .read_line(&mut line)
            .map_err(|e| RescueError::NotReady(e.to_string()))?;
        if line.trim() != "watching" {
            let _ = child.kill();
            let _ = child.wait();
            return Err(RescueError::NotReady(format!(
                "it said {:?} instead of \"watching\"",
                line.trim()
            )));
        }
        let watchdog = child.id() as pid_t;
        // It outlives us on purpose; init reaps it.
        std::mem::forget(child);
        Ok(Watch {
            dir,
            next: AtomicU64::new(1),
            watchdog,
        })
    }

    /// A new journal for one operation (`what` names it in the file name).
    pub fn journal(&self, what: &str) -> Result<Arc<Journal>, RescueError> {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        Journal::create(self.dir.join(format!("{n:06}-{what}.journal")))
    }

    pub fn watchdog_pid(&self) -> pid_t {
        self.watchdog
    }
}

/// `ckpt-agent rescue --watch OWNER`: waits for OWNER (`PID.START_TIME`) to exit,
/// then puts back every tree its journals name, and removes its directory.
pub fn watch(base: &Path, owner: &str) -> Result<(), RescueError> {
    let (pid, start) = parse_owner(owner).ok_or_else(|| RescueError::BadOwner(owner.into()))?;
    let dir = base.join(owner);
    let me = owner_name(std::process::id() as pid_t)?;
    std::fs::write(dir.join("watchdog"), &me).map_err(io(&dir))?;
    let _ = std::env::set_current_dir("/");
    let pidfd = match sys::pidfd_open(pid) {
        Ok(fd) if alive(pid, start) => Some(fd),
        _ => None,
    };
    {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "watching");
        let _ = out.flush();
    }
    // Nobody reads further: stdout closes with this process's copy.
    if let Some(fd) = pidfd {
        sys::spawn::wait_all_exited(&[fd]);
    }
    recover_dir(&dir);
    Ok(())
}

/// Recovers every journal under `base` whose owner and watchdog are both gone
/// (`ckpt-agent rescue`, and `serve` at its start). Returns how many were.
pub fn sweep(base: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(base) else {
        return 0;
    };
    let mut n = 0;
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some((pid, start)) = parse_owner(&name) else {
            continue;
        };
        if alive(pid, start) {
            continue;
        }
        let dir = e.path();
        let watched = std::fs::read_to_string(dir.join("watchdog"))
            .ok()
            .and_then(|w| parse_owner(w.trim()))
            .is_some_and(|(p, s)| alive(p, s));
        if watched {
            continue;
        }
        n += recover_dir(&dir);
    }
    n
}

/// Recovers each journal of `dir` (oldest first), then removes `dir`. Returns how
/// many journals there were.
fn recover_dir(dir: &Path) -> usize {
    let mut journals: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|x| x == "journal"))
                .collect()
        })
        .unwrap_or_default();
    journals.sort();
    for j in &journals {
        match recover(j) {
            Ok(()) => {
                let _ = std::fs::remove_file(j);
            }
            Err(e) => warn!(journal = %j.display(), %e, "rescue incomplete: journal kept"),
        }
    }
    let _ = std::fs::remove_file(dir.join("watchdog"));
    let _ = std::fs::remove_dir(dir);
    journals.len()
}

/// Reads a journal; a last line cut short by the kill is dropped (the change it
/// announced was not made).
pub fn read(path: &Path) -> Result<Vec<Record>, RescueError> {
    let f = File::open(path).map_err(io(path))?;
    let mut out = Vec::new();
    for line in BufReader::new(f).split(b'\n') {
        let line = line.map_err(io(path))?;
        match serde_json::from_slice::<Record>(&line) {
            Ok(r) => out.push(r),
            Err(e) => {
                debug!(path = %path.display(), %e, "journal line cut short: ignored");
                break;
            }
        }
    }
    Ok(out)
}

#[derive(Default)]
struct ProcPlan {
    start_time: u64,
    stopped_before: bool,
    threads: Vec<SavedThread>,
    scratch: Vec<(pid_t, u64, Vec<u8>)>,
    uffd_before: Option<Vec<i32>>,
    thawing: bool,
    killing: bool,
}

/// Puts back what one journal's operation changed (see the module doc).
pub fn recover(path: &Path) -> Result<(), RescueError> {
    let records = read(path)?;
    if records.is_empty() {
        return Ok(());
    }
    info!(journal = %path.display(), records = records.len(), "rescuing a tree after its agent died");
    let mut procs: BTreeMap<pid_t, ProcPlan> = BTreeMap::new();
    let mut order = Vec::new();
    let mut tables = BTreeSet::new();
    let mut repair: Vec<(pid_t, i32)> = Vec::new();
    let mut husks = Vec::new();
    let mut released = false;
    for r in records {
        match r {
            Record::Process {
                pid,
                start_time,
                stopped_before,
            } => {
                order.push(pid);
                let p = procs.entry(pid).or_default();
                p.start_time = start_time;
                p.stopped_before = stopped_before;
            }
            Record::Threads { pid, threads } => procs.entry(pid).or_default().threads = threads,
            Record::Scratch {
                pid,
                tid,
                addr,
                bytes,
            } => procs
                .entry(pid)
                .or_default()
                .scratch
                .push((tid, addr, bytes)),
            Record::Uffd { pid, before } => {
                procs.entry(pid).or_default().uffd_before = Some(before)
            }
            Record::UffdClosed { pid } => procs.entry(pid).or_default().uffd_before = None,
            Record::Repair { sockets } => repair = sockets,
            Record::RepairOff => repair.clear(),
            Record::NetLock { table } => {
                tables.insert(table);
            }
            Record::NetUnlock { table } => {
                tables.remove(&table);
            }
            Record::Thawing { pid } => procs.entry(pid).or_default().thawing = true,
            Record::Killing { pid } => procs.entry(pid).or_default().killing = true,
            Record::Husk { pid, start_time } => husks.push((pid, start_time)),
            Record::Released => released = true,
        }
    }
    for (pid, start) in &husks {
        if alive(*pid, *start) {
            let sig = if released {
                libc::SIGCONT
            } else {
                libc::SIGKILL
            };
            let _ = sys::kill(*pid, sig);
        }
    }
    for (pid, fd) in &repair {
        if let Err(e) = leave_repair(*pid, *fd) {
            warn!(pid, fd, %e, "could not take a socket out of repair mode");
        }
    }
    for t in &tables {
        crate::netlock::delete_table(t);
    }
    let mut failed = None;
    for pid in order {
        let p = &procs[&pid];
        if !alive(pid, p.start_time) {
            continue;
        }
        if p.killing {
            let _ = sys::kill(pid, libc::SIGKILL);
            continue;
        }
        if !p.thawing {
            if let Err(e) = put_back(pid, p) {
                // It stays stopped, which is safe; the journal is kept, and an
                // operator can retry with `ckpt-agent rescue`.
                warn!(pid, %e, "could not put the process back: left stopped");
                failed.get_or_insert(e);
                continue;
            }
        }
        if !p.stopped_before {
            let _ = sys::kill(pid, libc::SIGCONT);
        }
        info!(pid, "process put back and running");
    }
    failed.map_or(Ok(()), Err)
}

fn leave_repair(pid: pid_t, fd: i32) -> Result<(), Box<dyn std::error::Error>> {
    let pidfd = sys::pidfd_open(pid)?;
    let dup = sys::pidfd_getfd(&pidfd, pid, fd)?;
    use std::os::fd::AsFd;
    crate::fd::tcp::leave_repair(dup.as_fd())?;
    Ok(())
}

fn sys_err(what: &'static str, pid: pid_t, e: impl std::fmt::Display) -> RescueError {
    RescueError::Io {
        path: PathBuf::from(format!("/proc/{pid}")),
        source: std::io::Error::other(format!("{what}: {e}")),
    }
}

/// Seizes every thread of a stopped process (once its dead tracer let go),
/// puts back what the journal saved, and detaches: it stays in group-stop.
fn put_back(pid: pid_t, p: &ProcPlan) -> Result<(), RescueError> {
    let tids = proc::tasks(pid).map_err(|e| sys_err("threads", pid, e))?;
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut seized = Vec::new();
    let result = (|| {
        for &tid in &tids {
            loop {
                match ptrace::seize(tid, ptrace::O_TRACESYSGOOD) {
                    Ok(()) => break,
                    // Still traced: the dead tracer's exit is not over yet.
                    Err(e) if e.source.raw_os_error() == Some(libc::EPERM) => {
                        if Instant::now() > deadline {
                            return Err(sys_err("seize", tid, e));
                        }
                        std::thread::sleep(Duration::from_millis(5));
                    }
                    Err(e) if e.source.raw_os_error() == Some(libc::ESRCH) => break,
                    Err(e) => return Err(sys_err("seize", tid, e)),
                }
            }
            seized.push(tid);
            ptrace::interrupt(tid).map_err(|e| sys_err("interrupt", tid, e))?;
            loop {
                match ptrace::wait(tid).map_err(|e| sys_err("wait", tid, e))? {
                    ptrace::Stop::Event { .. } | ptrace::Stop::Syscall => break,
                    ptrace::Stop::Signal(sig) => {
                        // Only SIGSTOP can be taken here (the rest is blocked or
                        // was put back): pass it on, it keeps the group stopped.
                        ptrace::cont(tid, sig).map_err(|e| sys_err("cont", tid, e))?;
                    }
                    ptrace::Stop::Exited(_) | ptrace::Stop::Killed(_) => break,
                }
            }
        }
        if let Some(before) = &p.uffd_before {
            close_new_uffds(pid, p, before)?;
        }
        for (tid, addr, bytes) in &p.scratch {
            if let Err(e) = sys::process_vm_writev(*tid, *addr, bytes) {
                warn!(tid, %e, "stack scratch not put back");
            }
        }
        for t in &p.threads {
            let Some(mut r) = ptrace::regs_from_bytes(&t.regs) else {
                warn!(tid = t.tid, "saved registers have the wrong size");
                continue;
            };
            crate::freeze::normalize_restart(&mut r);
            ptrace::set_regs(t.tid, &r).map_err(|e| sys_err("set registers", t.tid, e))?;
            ptrace::set_sigmask(t.tid, t.sigmask).map_err(|e| sys_err("set mask", t.tid, e))?;
        }
        Ok(())
    })();
    for tid in seized {
        let _ = ptrace::detach(tid, 0);
    }
    result
}

/// Userfaultfd descriptors of `pid` now.
pub fn uffd_fds(pid: pid_t) -> Vec<i32> {
    let Ok(d) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return Vec::new();
    };
    let mut out: Vec<i32> = d
        .flatten()
        .filter(|e| {
            std::fs::read_link(e.path())
                .map(|l| l.to_string_lossy() == "anon_inode:[userfaultfd]")
                .unwrap_or(false)
        })
        .filter_map(|e| e.file_name().to_string_lossy().parse().ok())
        .collect();
    out.sort_unstable();
    out
}

/// Closes, by a system call injected into the leader, the userfaultfds created
/// by an injection that the agent did not live to close.
fn close_new_uffds(pid: pid_t, p: &ProcPlan, before: &[i32]) -> Result<(), RescueError> {
    let extra: Vec<i32> = uffd_fds(pid)
        .into_iter()
        .filter(|fd| !before.contains(fd))
        .collect();
    if extra.is_empty() {
        return Ok(());
    }
    let leader = p
        .threads
        .iter()
        .find(|t| t.tid == pid)
        .and_then(|t| ptrace::regs_from_bytes(&t.regs))
        .ok_or_else(|| sys_err("leader registers", pid, "not in the journal"))?;
    let vmas = proc::smaps(pid).map_err(|e| sys_err("maps", pid, e))?;
    let (ip, _) = crate::dump::find_vdso(pid, &vmas).map_err(|e| sys_err("vdso", pid, e))?;
    let mut r = crate::inject::Remote {
        tid: pid,
        syscall_ip: ip,
        base: leader,
        scratch: 0,
        scratch_len: 0,
        new_children: Vec::new(),
        swallowed: Vec::new(),
    };
    for fd in extra {
        r.syscall(crate::sys::nr::CLOSE, [fd as u64, 0, 0, 0, 0, 0])
            .map_err(|e| sys_err("close an injected userfaultfd", pid, e))?;
        info!(pid, fd, "closed a userfaultfd the dead agent had made");
    }
    Ok(())
}
