//! SIGKILL of `ckpt-agent restore` at many moments before the release (issue 13):
//! no process of the image may be left, not even a zombie holding a PID, none may
//! have executed an instruction of the image (its log does not grow), and a retry
//! of the same restore succeeds and the program runs on correctly.
//!
//! The kills land three ways, for each workload (a tree of four processes joined by
//! pipes; one process of 61 threads; a 64 MiB heap; the tree again in a new PID
//! namespace; a parent and child joined by a loopback TCP connection, whose
//! restore holds an nftables lock table until the release):
//! - at every pause point of the restore (`CKPT_TEST_PAUSE`, see
//!   `ckpt_agent::restore::PAUSE_POINTS`): the agent says it hangs there, and is
//!   killed;
//! - when a window is seen from outside: the root husk traced by the agent, half
//!   the threads of a process cloned, a quarter of the heap filled (by
//!   userfaultfd, where the pause point `restore:filling` covers the populate
//!   fill);
//! - after delays spread over the length of a whole restore (measured first).
//!
//! After each kill the test reaps what became its own zombie child (it is the
//! subreaper of what it starts: the orphaned husks are reparented to it, and the
//! parent reaps), then checks that nothing is left: no descendant of the test, no
//! process holding one of the image's PIDs, no lock table of the restore. Then it
//! retries the restore, checks the tree's shape and that it ticks on with no gap
//! or repeat after the dump, and kills it. The count of kills is printed.
//!
//! Between the first detach and the commit of the release (`restore:detaching`,
//! `restore:detached`) the detached processes are stopped (they never ran): the
//! rescue watchdog kills them (in a new PID namespace, its init's death does). A
//! kill past the commit (`restore:committed`) must leave the tree running: the
//! watchdog continues it, and the test checks it ticks on.
//!
//! The cases share the test process's children and subreaper role, so they run
//! one at a time (a lock), whatever `--test-threads` says.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use ckpt_tests::process::become_subreaper;
use ckpt_tests::{
    check_continuity, children, expect_killed_by_dump, last_line_pid, path_str, proc_ppid,
    proc_state, read_log_lines, require_root, run_dump, run_restore, spawn_workload, thread_ids,
    tracer_pids, tree_pids, wait_for, wait_for_tick, PidsGuard, ProcGuard,
};
use tempfile::TempDir;

mod common;
use common::{agent, WAIT};

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// Ticks a retried restore must make.
const MORE: u64 = 5;
/// Timed kills per case.
const TIMED: usize = 8;
/// How long killed husks may take to be gone.
const GONE: Duration = Duration::from_secs(10);

#[derive(Clone, Copy)]
struct Case {
    name: &'static str,
    args: &'static [&'static str],
    procs: usize,
    /// Threads of the process that has the most.
    threads: usize,
    new_pid_ns: bool,
}

const TREE: Case = Case {
    name: "fork_pipes",
    args: &[],
    procs: 4,
    threads: 1,
    new_pid_ns: false,
};
const THREADS: Case = Case {
    name: "threads",
    args: &["60"],
    procs: 1,
    threads: 61,
    new_pid_ns: false,
};
/// 64 MiB of heap: a fill long enough to be caught from outside.
const HEAP: Case = Case {
    name: "heap_checksum",
    args: &["64"],
    procs: 1,
    threads: 1,
    new_pid_ns: false,
};
/// A parent and child joined by a loopback TCP connection with data in flight:
/// the restore locks it in an nftables table until the release.
const TCP: Case = Case {
    name: "tcp_pair",
    args: &[],
    procs: 2,
    threads: 1,
    new_pid_ns: false,
};
const TREE_NS: Case = Case {
    new_pid_ns: true,
    ..TREE
};

/// The dumped image of a case and what it was.
struct Dumped {
    case: Case,
    _dir: TempDir,
    log: PathBuf,
    image: PathBuf,
    pids: Vec<i32>,
    /// The log's lines when the tree was dumped (and killed).
    at_dump: Vec<String>,
    log_size: u64,
}

fn our_pid() -> i32 {
    std::process::id() as i32
}

impl Dumped {
    fn new(case: Case) -> Result<Dumped> {
        let dir = tempfile::Builder::new()
            .prefix(&format!("ckpt-rkill-{}-", case.name))
            .tempdir()?;
        let log = dir.path().join("log");
        let image = dir.path().join("img");
        let mut root = spawn_workload(case.name, case.args, &log)?;
        wait_for_tick(&log, 5, WAIT)?;
        let pids = tree_pids(root.id());
        ensure!(
            pids.len() == case.procs,
            "{}: expected {} processes, found {pids:?}",
            case.name,
            case.procs
        );
        let most = pids.iter().map(|&p| thread_ids(p).len()).max().unwrap_or(0);
        ensure!(
            most == case.threads,
            "{}: expected {} threads, found {most}",
            case.name,
            case.threads
        );
        let descendants = PidsGuard::new(pids.iter().copied().skip(1));
        let run = run_dump(agent(), root.id(), &image, &[], &[])?.ok()?;
        expect_killed_by_dump(&run, &mut root, &descendants, &image, WAIT)?;
        let at_dump = read_log_lines(&log)?;
        let log_size = std::fs::metadata(&log)?.len();
        let mut sorted = pids.clone();
        sorted.sort_unstable();
        Ok(Dumped {
            case,
            _dir: dir,
            log,
            image,
            pids: sorted,
            at_dump,
            log_size,
        })
    }

    fn restore_args(&self) -> Result<Vec<String>> {
        let mut a = vec![
            "restore".to_string(),
            "--image".into(),
            path_str(&self.image)?.into(),
        ];
        if self.case.new_pid_ns {
            a.push("--new-pid-ns".into());
        }
        Ok(a)
    }

    /// Cuts the log back to what it was at the dump: the restore refuses a file
    /// (the log is the tree's stdout) that differs from the dumped one.
    fn reset_log(&self) {
        if let Ok(f) = std::fs::OpenOptions::new().write(true).open(&self.log) {
            let _ = f.set_len(self.log_size);
        }
    }

    fn lines(&self) -> usize {
        read_log_lines(&self.log).map(|l| l.len()).unwrap_or(0)
    }
}

/// A `ckpt-agent restore` we kill; its stderr lines arrive on `lines`.
struct Restorer {
    child: Child,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Restorer {
    fn start(d: &Dumped, env: &[(&str, &str)]) -> Result<Restorer> {
        become_subreaper();
        let mut cmd = Command::new(agent());
        cmd.args(d.restore_args()?)
            .env_remove("CKPT_FAULT")
            .env_remove("CKPT_FILL")
            .env_remove("CKPT_TEST_PAUSE")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().context("starting ckpt-agent restore")?;
        let err = child.stderr.take().expect("piped stderr");
        let (tx, lines) = mpsc::channel();
        // Not joined: a husk left behind would hold the pipe open.
        std::thread::spawn(move || {
            for l in BufReader::new(err).lines() {
                let Ok(l) = l else { return };
                if tx.send(l).is_err() {
                    return;
                }
            }
        });
        Ok(Restorer {
            child,
            lines,
            seen: Vec::new(),
        })
    }

    fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Waits until the agent says it hangs at `point`.
    fn wait_pause(&mut self, point: &str) -> Result<()> {
        let want = format!("ckpt-agent: test pause at {point} ");
        let deadline = Instant::now() + WAIT;
        while Instant::now() < deadline {
            match self.lines.recv_timeout(Duration::from_millis(50)) {
                Ok(l) => {
                    let hit = l.starts_with(&want);
                    self.seen.push(l);
                    if hit {
                        return Ok(());
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    if let Some(st) = self.child.try_wait()? {
                        bail!(
                            "the restore ended ({st}) before pause {point}:\n{}",
                            self.seen.join("\n")
                        );
                    }
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    bail!(
                        "the restore closed stderr before pause {point}:\n{}",
                        self.seen.join("\n")
                    )
                }
            }
        }
        bail!("no pause at {point} in {WAIT:?}:\n{}", self.seen.join("\n"))
    }

    /// SIGKILLs the agent and reaps it; whether it was still running (false: it
    /// had finished on its own, successfully or not).
    fn kill(mut self) -> Result<(bool, std::process::ExitStatus)> {
        let ran = self.child.try_wait()?.is_none();
        if ran {
            self.child.kill()?;
        }
        let st = self.child.wait()?;
        Ok((ran, st))
    }
}

/// Reaps the zombies among our children (by PID: the orphans of a killed restore
/// are reparented to us) and returns our descendants still there.
fn reap_ours() -> Vec<i32> {
    for kid in children(our_pid()) {
        if proc_state(kid) == Some('Z') {
            let mut status = 0;
            // SAFETY: waitpid on one PID, WNOHANG, into a local int.
            unsafe { libc::waitpid(kid, &mut status, libc::WNOHANG | libc::__WALL) };
        }
    }
    tree_pids(our_pid()).into_iter().skip(1).collect()
}

/// The nftables tables whose name starts with `prefix`.
fn lock_tables(prefix: &str) -> Vec<String> {
    let out = Command::new("nft")
        .args(["list", "tables"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    out.lines()
        .filter_map(|l| l.split_whitespace().nth(2))
        .filter(|t| t.starts_with(prefix))
        .map(str::to_string)
        .collect()
}

fn describe(pids: &[i32]) -> String {
    pids.iter()
        .map(|&p| {
            let comm = std::fs::read_to_string(format!("/proc/{p}/comm")).unwrap_or_default();
            format!(
                "{p} ({}, state {:?}, parent {:?}, tracers {:?})",
                comm.trim(),
                proc_state(p),
                proc_ppid(p),
                tracer_pids(p)
            )
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// After a kill: nothing of the image left (reaping what is ours), the log
/// untouched.
fn expect_nothing_left(d: &Dumped, lines_before: usize, what: &str) -> Result<()> {
    let mut left = Vec::new();
    let gone = wait_for(
        || {
            left = reap_ours();
            // A process holding an image PID, in any state (a zombie included).
            let holders: Vec<i32> = d
                .pids
                .iter()
                .copied()
                .filter(|&p| !d.case.new_pid_ns && proc_state(p).is_some())
                .filter(|p| !left.contains(p))
                .collect();
            left.extend(holders);
            left.is_empty()
        },
        GONE,
    );
    ensure!(
        gone,
        "{what}: processes left after the restore was killed: {}",
        describe(&left)
    );
    // The restore's lock table (`ckpt_r<root PID>_<time>`) is gone too.
    let prefix = format!("ckpt_r{}_", d.pids[0]);
    let mut tables = Vec::new();
    let no_table = wait_for(
        || {
            tables = lock_tables(&prefix);
            tables.is_empty()
        },
        GONE,
    );
    ensure!(
        no_table,
        "{what}: lock tables left after the restore was killed: {tables:?}"
    );
    let now = d.lines();
    ensure!(
        now == lines_before,
        "{what}: the log grew from {lines_before} to {now} lines: a husk ran code of the image:\n{}",
        read_log_lines(&d.log)
            .unwrap_or_default()
            .get(lines_before..)
            .unwrap_or_default()
            .join("\n")
    );
    Ok(())
}

/// The retry: restores, checks the tree and that it ticks on from the dump, kills it.
fn retry(d: &Dumped, what: &str) -> Result<()> {
    let offset = d.lines();
    let extra: &[&str] = if d.case.new_pid_ns {
        &["--new-pid-ns"]
    } else {
        &[]
    };
    let run = run_restore(agent(), &d.image, extra, &[])?;
    let root = run
        .clone()
        .ok()
        .with_context(|| format!("{what}: the retry failed"))
        .and_then(|run| last_line_pid(&run));
    expect_running(d, &format!("{what}, retried"), offset, root)
}

/// Checks that the tree of `root` is the dumped one and ticks on from the dump
/// (the log's lines from `offset` on continue those of the dump), then kills it
/// and waits until nothing of ours is left.
fn expect_running(d: &Dumped, what: &str, offset: usize, root: Result<i32>) -> Result<()> {
    let mut guard = ProcGuard::default();
    let mut tree = PidsGuard::default();
    let check = || -> Result<()> {
        let pid = root?;
        guard = ProcGuard::adopt(pid);
        let pids = tree_pids(pid);
        tree = PidsGuard::new(pids.iter().copied().skip(1));
        if !d.case.new_pid_ns {
            let mut sorted = pids.clone();
            sorted.sort_unstable();
            ensure!(
                sorted == d.pids,
                "{what}: the tree is {pids:?}, the dumped one was {:?}",
                d.pids
            );
        }
        ensure!(pids.len() == d.case.procs, "{what}: the tree is {pids:?}");
        let most = pids.iter().map(|&p| thread_ids(p).len()).max().unwrap_or(0);
        ensure!(
            most == d.case.threads,
            "{what}: the tree has {most} threads at most"
        );
        let target = ckpt_tests::ticks::last_tick_of(&d.at_dump).unwrap_or(0) + MORE;
        wait_for_tick(&d.log, target, WAIT)?;
        let lines = read_log_lines(&d.log)?;
        let mut joined = d.at_dump.clone();
        joined.extend_from_slice(lines.get(offset..).unwrap_or_default());
        check_continuity(&joined).with_context(|| format!("{what}: ticking on"))?;
        Ok(())
    };
    let r = check();
    tree.kill_all();
    guard.kill();
    // The namespace init (new PID namespace) leaves once its namespace is empty.
    let mut left = Vec::new();
    let empty = wait_for(
        || {
            left = reap_ours();
            left.is_empty()
        },
        GONE,
    );
    d.reset_log();
    r?;
    ensure!(
        empty,
        "{what}: left after killing the tree: {}",
        describe(&left)
    );
    Ok(())
}

/// After a kill past the commit: the restored root, our child now (its parent,
/// the agent, is dead), once the watchdog has continued the tree.
fn released_root(d: &Dumped) -> Result<i32> {
    let mut root = None;
    wait_for(
        || {
            root = children(our_pid()).into_iter().find(|&p| {
                let comm = std::fs::read_to_string(format!("/proc/{p}/comm")).unwrap_or_default();
                comm.trim() != "ckpt-agent" && proc_state(p) != Some('T')
            });
            root.is_some()
        },
        WAIT,
    );
    let root = root.with_context(|| {
        format!(
            "no running restored root among our children: {}",
            describe(&children(our_pid()))
        )
    })?;
    ensure!(
        d.case.new_pid_ns || root == d.pids[0],
        "the restored root is {root}, the dumped one was {}",
        d.pids[0]
    );
    Ok(root)
}

/// The kills of one case; returns how many landed on a running restore.
fn kill_everywhere(case: Case) -> Result<usize> {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let d = Dumped::new(case)?;
    // The dump's rescue watchdog leaves once the dump has.
    let mut left = Vec::new();
    ensure!(
        wait_for(
            || {
                left = reap_ours();
                left.is_empty()
            },
            GONE
        ),
        "processes of ours before the first restore: {}",
        describe(&left)
    );
    let mut kills = 0;
    let mut at_points = 0;

    // A whole restore, checked, then one timed: the span the timed kills are
    // spread over.
    retry(&d, "the first restore")?;
    let t0 = Instant::now();
    let r = Restorer::start(&d, &[])?;
    r.wait_success().context("the timed restore")?;
    let whole = t0.elapsed();
    let left = reap_after_success(&d);
    ensure!(left.is_empty(), "left: {}", describe(&left));

    // 1. At every pause point (the last one is past the commit: the watchdog
    // continues the tree).
    for &point in ckpt_agent::restore::PAUSE_POINTS {
        if (point == "restore:cloning-threads" && case.threads <= 2)
            || (point == "restore:detaching" && case.procs < 2)
        {
            continue;
        }
        let mut env = vec![("CKPT_TEST_PAUSE", point)];
        if point == "restore:filling" {
            env.push(("CKPT_FILL", "populate"));
        }
        let before = d.lines();
        let mut r = Restorer::start(&d, &env)?;
        let paused = r.wait_pause(point);
        let (ran, st) = r.kill()?;
        paused?;
        ensure!(
            ran,
            "the restore ended ({st}) instead of hanging at {point}"
        );
        kills += 1;
        at_points += 1;
        let what = format!("{}: killed at {point}", case.name);
        if point == "restore:committed" {
            expect_running(&d, &what, before, released_root(&d))?;
            continue;
        }
        expect_nothing_left(&d, before, &what)?;
        retry(&d, &what)?;
    }

    // 2. At windows seen from outside.
    if !case.new_pid_ns {
        let root = d.pids[0];
        let windows: [(&str, Spotter); 3] = [
            (
                "root husk traced",
                Box::new(move |agent| tracer_pids(root).iter().any(|&(_, t)| t == agent)),
            ),
            (
                "threads being cloned",
                Box::new(move |_| {
                    half_the_threads(root, case.threads)
                        && tracer_pids(root).iter().all(|&(_, t)| t != 0)
                }),
            ),
            (
                "memory being filled",
                // A quarter of the heap in (by userfaultfd, the default), the
                // husk still traced.
                Box::new(move |agent| {
                    rss_kib(root) >= 16 << 10 && tracer_pids(root).iter().any(|&(_, t)| t == agent)
                }),
            ),
        ];
        for (name, seen) in windows.iter() {
            if (*name == "threads being cloned" && case.threads <= 2)
                || (*name == "memory being filled" && case.name != HEAP.name)
            {
                continue;
            }
            let before = d.lines();
            let r = Restorer::start(&d, &[])?;
            let agent_pid = r.pid();
            let spotted = wait_for(|| seen(agent_pid), WAIT);
            let (ran, st) = r.kill()?;
            let what = format!("{}: killed when {name}", case.name);
            if ran && spotted {
                kills += 1;
                expect_nothing_left(&d, before, &what)?;
            } else {
                ensure!(st.success(), "{what}: the restore failed ({st})");
                eprintln!("{what}: the window passed unseen; the restore finished");
                let left = reap_after_success(&d);
                ensure!(left.is_empty(), "left: {}", describe(&left));
            }
            retry(&d, &what)?;
        }
    }

    // 3. After delays spread over a whole restore.
    let mut finished = 0;
    let mut timed = 0;
    for i in 0..TIMED {
        let delay = whole.mul_f64((i as f64 + 0.5) / TIMED as f64);
        let before = d.lines();
        let r = Restorer::start(&d, &[])?;
        std::thread::sleep(delay);
        let (ran, st) = r.kill()?;
        let what = format!("{}: killed after {delay:?} (of {whole:?})", case.name);
        if ran && committed_and_running(&d, before) {
            // Killed between the commit and its exit: the tree must run on whole.
            eprintln!("{what}: the kill came after the commit; the whole tree runs on");
            finished += 1;
            let left = reap_after_success(&d);
            ensure!(left.is_empty(), "left: {}", describe(&left));
        } else if ran {
            kills += 1;
            timed += 1;
            expect_nothing_left(&d, before, &what)?;
        } else {
            ensure!(st.success(), "{what}: the restore failed ({st})");
            finished += 1;
            let left = reap_after_success(&d);
            ensure!(left.is_empty(), "left: {}", describe(&left));
        }
        retry(&d, &what)?;
    }
    eprintln!(
        "{}{}: {kills} kills of a running restore, each left nothing and was retried \
         (whole restore {whole:?}; {finished} timed kills came after it finished)",
        case.name,
        if case.new_pid_ns { " (new PID ns)" } else { "" }
    );
    ensure!(
        at_points >= 8 && timed >= 1,
        "{}: too few kills landed: {at_points} at pause points, {timed} timed",
        case.name
    );
    Ok(kills)
}

/// `VmRSS` of `pid` in KiB (0 if unknown).
fn rss_kib(pid: i32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

/// Whether a window of the restore is seen, given the agent's PID.
type Spotter = Box<dyn Fn(i32) -> bool>;

/// Whether `pid` has at least half of `threads` threads.
fn half_the_threads(pid: i32, threads: usize) -> bool {
    thread_ids(pid).len() * 2 >= threads
}

/// After a restore that finished on its own: kill the tree it left running and
/// wait for our descendants to be gone; returns those left.
/// After a restorer was killed at a timed instant: whether it had committed (the
/// restored tree runs: its log grows, and every process of the image is there)
/// rather than left nothing. A delay measured on an earlier, slower restore can
/// land after the commit; a tree that runs in part is neither, and fails the
/// check that follows.
fn committed_and_running(d: &Dumped, lines_before: usize) -> bool {
    let grew = || d.lines() >= lines_before + 3;
    wait_for(|| reap_ours().is_empty() || grew(), GONE);
    grew() && reap_ours().len() >= d.pids.len()
}

fn reap_after_success(d: &Dumped) -> Vec<i32> {
    let mut all = PidsGuard::new(tree_pids(our_pid()).into_iter().skip(1));
    all.kill_all();
    let mut left = Vec::new();
    wait_for(
        || {
            left = reap_ours();
            left.is_empty()
        },
        GONE,
    );
    d.reset_log();
    left
}

impl Restorer {
    /// Waits for the agent to end; fails with its stderr unless it succeeded.
    fn wait_success(mut self) -> Result<()> {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(st) = self.child.try_wait()? {
                if !st.success() {
                    std::thread::sleep(Duration::from_millis(100));
                    self.seen.extend(self.lines.try_iter());
                    bail!("the restore failed ({st}):\n{}", self.seen.join("\n"));
                }
                return Ok(());
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                bail!("the restore ran past {WAIT:?}");
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

fn report(name: &str, kills: usize) {
    println!("{name}: {kills} kills survived");
}

#[test]
fn restore_killed_anywhere_before_the_release_of_a_process_tree_leaves_nothing() -> Result<()> {
    require_root!(Ok(()));
    let n = kill_everywhere(TREE)?;
    report("tree", n);
    Ok(())
}

#[test]
fn restore_killed_anywhere_before_the_release_of_61_threads_leaves_nothing() -> Result<()> {
    require_root!(Ok(()));
    let n = kill_everywhere(THREADS)?;
    report("threads", n);
    Ok(())
}

#[test]
fn restore_killed_anywhere_before_the_release_of_a_64mib_heap_leaves_nothing() -> Result<()> {
    require_root!(Ok(()));
    let n = kill_everywhere(HEAP)?;
    report("heap", n);
    Ok(())
}

#[test]
fn restore_killed_anywhere_before_the_release_of_a_tcp_pair_leaves_no_process_and_no_lock(
) -> Result<()> {
    require_root!(Ok(()));
    let n = kill_everywhere(TCP)?;
    report("tcp pair", n);
    Ok(())
}

#[test]
fn restore_killed_anywhere_before_the_release_in_a_new_pid_namespace_leaves_nothing() -> Result<()>
{
    require_root!(Ok(()));
    let n = kill_everywhere(TREE_NS)?;
    report("tree in a new PID namespace", n);
    Ok(())
}

/// A restore refused after its husks exist (a failure injected at
/// `restore:tree`, every process forked, and at `restore:threads`, every thread
/// cloned too) leaves none of the image's PIDs in use, not even as a zombie, the
/// moment the command returns: nothing is reaped here before the check. (This
/// test is the subreaper of what it starts, so a husk's zombie passed up to it
/// would stay until it reaped it; the zombies of the commands' rescue
/// watchdogs, which come to it too, are not the image's.) The tree of four processes has husks whose
/// parents are husks; the 61 threads have TIDs that must go with their process.
#[test]
fn a_refused_restore_leaves_no_husk_not_even_a_zombie() -> Result<()> {
    require_root!(Ok(()));
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    for case in [TREE, THREADS] {
        let d = Dumped::new(case)?;
        let lines = d.lines();
        for stage in ["restore:tree", "restore:threads"] {
            let what = format!("{}, refused at {stage}", case.name);
            let run = run_restore(agent(), &d.image, &[], &[("CKPT_FAULT", stage)])?;
            ensure!(
                !run.success() && run.stderr.contains("induced failure"),
                "{what}: not refused by the test hook:\n{}",
                run.describe()
            );
            let held: Vec<i32> = d
                .pids
                .iter()
                .copied()
                .filter(|&p| proc_state(p).is_some())
                .collect();
            ensure!(
                held.is_empty(),
                "{what}: processes left when the restore returned: {}",
                describe(&held)
            );
            ensure!(d.lines() == lines, "{what}: the log grew: a husk ran");
        }
        retry(&d, &format!("{}, after the refused restores", case.name))?;
    }
    Ok(())
}
