//! End-to-end tests of the dump/restore engine: real workloads, the real kernel,
//! the real `ckpt-agent` binary.
//!
//! Each scenario starts a workload from `tests/workloads/` in a session of its own
//! with its output in a log file, lets it tick, dumps it, and (for the kill-mode
//! scenarios) restores it with its original PIDs and lets it tick on. Continuity is
//! then proved from the log with the tick protocol of `ckpt_tests::ticks`: tick
//! numbers 1, 2, 3, ... with no gap or repeat across the dump and the restore, each
//! chain value recomputed, and no `FAIL` line from the workload's own checks. On
//! top of that each scenario checks what the workload is about (TIDs, the tree's
//! shape, the file's records, the signal counters...).
//!
//! The failure scenarios check the "side-effect free" promise of ../shared/DESIGN.md: a dump
//! that fails at any stage (the `CKPT_FAULT` hook), or that meets an unsupported
//! descriptor, leaves the tree running untouched, untraced, and commits no image; a
//! restore that meets a taken PID, a corrupted chunk or a truncated manifest refuses
//! with a clear message and starts nothing.
//!
//! Every test is self-contained: it owns a temporary directory and guards that
//! SIGKILL, by PID, every process it started or restored, even when it panics.
//! Scenarios use distinct processes, so they may run concurrently.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use ckpt_tests::process::{start_time, wait_gone};
use ckpt_tests::ticks::{check_log, check_records_file, last_tick};
use ckpt_tests::{
    digits_tokens, ensure_untraced, expect_killed_by_dump, guard_restored, inspect_json, is_alive,
    is_stopped, last_line_pid, mkfifo, path_str, proc_ppid, proc_state, read_log_lines,
    require_root, run_dump, run_restore, send_signal, spawn_workload, thread_ids, tracer_pids,
    tree_pids, wait_for, wait_for_tick, write_fifo, AgentRun, PidsGuard, ProcGuard, Tick,
};
use tempfile::TempDir;

mod common;
use common::{agent, WAIT};

/// How many ticks a workload must make after a dump or a restore.
const MORE: u64 = 20;

/// The fault stages of the `CKPT_FAULT` test hook.
const FAULT_STAGES: [&str; 5] = [
    "after-seize",
    "after-regs",
    "after-memory",
    "after-files",
    "before-commit",
];

/// What a workload needs besides its static arguments.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Extra {
    /// Nothing.
    None,
    /// A FIFO at `DIR/fifo`, passed as the argument; the test feeds it (`blocked_read`).
    Fifo,
    /// A data file at `DIR/data`, passed as the argument (`file_writer`).
    DataFile,
}

/// A workload of `tests/workloads/` and how to run it.
#[derive(Debug, Clone, Copy)]
struct Spec {
    name: &'static str,
    args: &'static [&'static str],
    /// Processes in its tree once it ticks.
    procs: usize,
    /// Threads of its root once it ticks.
    threads: usize,
    extra: Extra,
}

const COUNTER: Spec = Spec {
    name: "counter",
    args: &[],
    procs: 1,
    threads: 1,
    extra: Extra::None,
};
const HEAP_64MIB: Spec = Spec {
    name: "heap_checksum",
    args: &["64"],
    procs: 1,
    threads: 1,
    extra: Extra::None,
};
const HEAP_8MIB: Spec = Spec {
    name: "heap_checksum",
    args: &["8"],
    procs: 1,
    threads: 1,
    extra: Extra::None,
};
const THREADS: Spec = Spec {
    name: "threads",
    args: &["4"],
    procs: 1,
    threads: 5,
    extra: Extra::None,
};
const FORK_PIPES: Spec = Spec {
    name: "fork_pipes",
    args: &[],
    procs: 4,
    threads: 1,
    extra: Extra::None,
};
const SIGNALS: Spec = Spec {
    name: "signals",
    args: &[],
    procs: 1,
    threads: 1,
    extra: Extra::None,
};
const FILE_WRITER: Spec = Spec {
    name: "file_writer",
    args: &[],
    procs: 1,
    threads: 1,
    extra: Extra::DataFile,
};
const BLOCKED_READ: Spec = Spec {
    name: "blocked_read",
    args: &[],
    procs: 1,
    threads: 1,
    extra: Extra::Fifo,
};
const NETLINK: Spec = Spec {
    name: "netlink",
    args: &[],
    procs: 1,
    threads: 1,
    extra: Extra::None,
};
const PYTHON: Spec = Spec {
    name: "stateful.py",
    args: &[],
    procs: 1,
    threads: 1,
    extra: Extra::None,
};

/// A workload tree under test. Field order is drop order: the descendants die
/// first, then the root, then the directory goes.
struct Tree {
    /// Every process of the tree but the root (filled by [`Tree::snapshot`]).
    descendants: PidsGuard,
    root: ProcGuard,
    dir: TempDir,
    spec: Spec,
    log: PathBuf,
    image: PathBuf,
    pid: i32,
    /// The tree at the last snapshot: PID -> (parent PID, thread IDs).
    shape: BTreeMap<i32, (i32, Vec<i32>)>,
    /// Rounds of `blocked_read` fed so far.
    fed: u32,
}

impl Tree {
    fn start(spec: Spec) -> Result<Tree> {
        let dir = tempfile::Builder::new()
            .prefix(&format!("ckpt-engine-{}-", spec.name))
            .tempdir()?;
        let log = dir.path().join("log");
        let mut args: Vec<String> = spec.args.iter().map(|s| s.to_string()).collect();
        match spec.extra {
            Extra::None => {}
            Extra::Fifo => {
                let fifo = dir.path().join("fifo");
                mkfifo(&fifo)?;
                args.push(path_str(&fifo)?.to_owned());
            }
            Extra::DataFile => args.push(path_str(&dir.path().join("data"))?.to_owned()),
        }
        let root = spawn_workload(spec.name, &args, &log)?;
        let pid = root.id();
        Ok(Tree {
            descendants: PidsGuard::default(),
            root,
            image: dir.path().join("img"),
            dir,
            spec,
            log,
            pid,
            shape: BTreeMap::new(),
            fed: 0,
        })
    }

    fn lines(&self) -> Vec<String> {
        read_log_lines(&self.log).unwrap_or_default()
    }

    fn has_line(&self, line: &str) -> bool {
        self.lines().iter().any(|l| l == line)
    }

    fn last_tick(&self) -> u64 {
        last_tick(&self.log).unwrap_or(0)
    }

    fn fifo(&self) -> PathBuf {
        self.dir.path().join("fifo")
    }

    /// Waits until the workload is in the state the scenario dumps: a few ticks made
    /// (and the whole tree there), or for `blocked_read`, blocked in its first read.
    fn ready(&mut self) -> Result<()> {
        if self.spec.extra == Extra::Fifo {
            ensure!(
                wait_for(|| self.has_line("waiting 1"), WAIT),
                "blocked_read never waited:\n{}",
                self.lines().join("\n")
            );
            ensure!(
                wait_for(|| proc_state(self.pid) == Some('S'), WAIT),
                "blocked_read is not asleep in read() (state {:?})",
                proc_state(self.pid)
            );
        } else {
            wait_for_tick(&self.log, 5, WAIT)?;
        }
        self.snapshot()
    }

    /// Records the tree (PIDs, parents, TIDs) and guards its descendants.
    fn snapshot(&mut self) -> Result<()> {
        let pids = tree_pids(self.pid);
        // Re-snapshotting must not kill the processes guarded so far.
        self.descendants.forget();
        self.descendants = PidsGuard::new(pids.iter().copied().skip(1));
        self.shape = pids
            .iter()
            .map(|&p| (p, (proc_ppid(p).unwrap_or(0), thread_ids(p))))
            .collect();
        ensure!(
            pids.len() == self.spec.procs,
            "{} should be a tree of {} processes, found {pids:?}",
            self.spec.name,
            self.spec.procs
        );
        let threads = self.shape[&self.pid].1.len();
        ensure!(
            threads == self.spec.threads,
            "{} should have {} threads, found {threads}",
            self.spec.name,
            self.spec.threads
        );
        Ok(())
    }

    fn pids(&self) -> Vec<i32> {
        self.shape.keys().copied().collect()
    }

    /// Start times of the tree's processes: the same processes keep the same ones.
    fn start_times(&self) -> Vec<Option<u64>> {
        self.pids().into_iter().map(start_time).collect()
    }

    /// `ckpt-agent dump --pid PID --image IMAGE extra...` with `env`.
    fn dump(&self, image: &Path, extra: &[&str], env: &[(&str, &str)]) -> Result<AgentRun> {
        run_dump(agent(), self.pid, image, extra, env)
    }

    /// Dumps without --leave-running and checks that the whole tree is gone (and
    /// reaped, so that its PIDs are free for the restore) and the image committed.
    fn dump_and_kill(&mut self) -> Result<()> {
        let run = self.dump(&self.image, &[], &[])?.ok()?;
        expect_killed_by_dump(&run, &mut self.root, &self.descendants, &self.image, WAIT)
    }

    /// Restores the image and checks that the tree is back as it was dumped: the
    /// printed root PID is the original one, every process is back with its parent
    /// and its thread IDs, it runs (not traced by the agent any more). Re-arms the
    /// guards on the restored processes first thing.
    fn restore(&mut self) -> Result<()> {
        self.restore_env(&[]).map(|_| ())
    }

    /// [`restore`](Self::restore) with extra environment for the agent; returns
    /// the agent's run.
    fn restore_env(&mut self, env: &[(&str, &str)]) -> Result<AgentRun> {
        let run = run_restore(agent(), &self.image, &[], env)?;
        if run.success() {
            // Guard whatever came back before checking anything.
            guard_restored(&run, &mut self.root);
            self.descendants.rearm();
        }
        let run = run.ok()?;
        let pid = last_line_pid(&run)?;
        ensure!(
            pid == self.pid,
            "restore printed PID {pid}, the original root PID was {}",
            self.pid
        );
        for (&p, (ppid, tids)) in &self.shape {
            ensure!(is_alive(p), "process {p} is not running after the restore");
            if p != self.pid {
                ensure!(
                    proc_ppid(p) == Some(*ppid),
                    "process {p} came back with parent {:?}, was {ppid}",
                    proc_ppid(p)
                );
            }
            ensure!(
                thread_ids(p) == *tids,
                "process {p} came back with threads {:?}, was {tids:?}",
                thread_ids(p)
            );
            // The fill's userfaultfd must not be left behind in the process.
            let uffds: Vec<_> = fs::read_dir(format!("/proc/{p}/fd"))?
                .filter_map(|e| fs::read_link(e.ok()?.path()).ok())
                .filter(|l| l.to_string_lossy().contains("userfaultfd"))
                .collect();
            ensure!(
                uffds.is_empty(),
                "process {p} holds {uffds:?} after the restore"
            );
            let traced: Vec<_> = tracer_pids(p)
                .into_iter()
                .filter(|&(_, t)| t != 0)
                .collect();
            ensure!(
                traced.is_empty(),
                "threads still traced after the restore: {traced:?}"
            );
        }
        let now: Vec<i32> = tree_pids(self.pid);
        let mut sorted = now.clone();
        sorted.sort_unstable();
        ensure!(
            sorted == self.pids(),
            "the restored tree is {now:?}, the dumped one was {:?}",
            self.pids()
        );
        Ok(run)
    }

    /// Checks that the tree runs on undisturbed: the same processes (start times),
    /// none stopped or traced.
    fn check_untouched(&self, starts: &[Option<u64>]) -> Result<()> {
        ensure!(
            self.start_times() == starts,
            "the tree's processes changed: start times {:?}, were {starts:?}",
            self.start_times()
        );
        for p in self.pids() {
            let state = proc_state(p);
            ensure!(
                is_alive(p) && !matches!(state, Some('T') | Some('t')),
                "process {p} is not running freely (state {state:?})"
            );
            ensure_untraced(p, Duration::from_secs(5))?;
        }
        Ok(())
    }

    /// Waits for `more` ticks beyond the last one, feeding `blocked_read`'s FIFO
    /// whenever it waits for a message.
    fn advance(&mut self, more: u64) -> Result<u64> {
        let target = self.last_tick() + more;
        if self.spec.extra != Extra::Fifo {
            return wait_for_tick(&self.log, target, WAIT);
        }
        let fifo = self.fifo();
        let mut error = None;
        let reached = wait_for(
            || {
                let lines = self.lines();
                if lines.iter().any(|l| l.contains("FAIL")) {
                    return true;
                }
                let waiting = lines
                    .iter()
                    .filter_map(|l| l.strip_prefix("waiting ")?.parse::<u32>().ok())
                    .max()
                    .unwrap_or(0);
                if waiting > self.fed {
                    if let Err(e) = write_fifo(&fifo, format!("msg-{waiting}\n").as_bytes()) {
                        error = Some(e);
                        return true;
                    }
                    self.fed = waiting;
                }
                ckpt_tests::ticks::last_tick_of(&lines).unwrap_or(0) >= target
            },
            WAIT,
        );
        if let Some(e) = error {
            return Err(e);
        }
        // Reports FAIL lines and timeouts with the log's tail.
        let last = wait_for_tick(&self.log, target, Duration::ZERO)?;
        ensure!(reached, "no tick {target} in time");
        Ok(last)
    }

    /// Kills the whole tree now (leaves first) and reaps it.
    fn stop(&mut self) {
        self.descendants.kill_all();
        self.root.kill();
    }

    /// Kills the tree and checks the log's continuity; returns the ticks.
    fn finish(&mut self) -> Result<Vec<Tick>> {
        self.stop();
        let ticks = check_log(&self.log)?;
        if self.spec.extra == Extra::Fifo {
            // The last message fed may not have been read before the kill.
            for round in 1..self.fed {
                let got = format!("got {round} msg-{round}");
                ensure!(self.has_line(&got), "blocked_read never printed {got:?}");
            }
        }
        Ok(ticks)
    }
}

/// The default scenario: tick, dump (killing the tree), restore with the original
/// PIDs, tick on, and prove continuity. Returns the ticks and the tick number at
/// the dump.
fn dump_kill_restore(spec: Spec) -> Result<(Vec<Tick>, u64)> {
    let mut t = Tree::start(spec)?;
    t.ready()?;
    t.dump_and_kill()?;
    let at_dump = t.last_tick();
    t.restore()?;
    t.advance(MORE)?;
    let ticks = t.finish()?;
    ensure!(
        ticks.len() as u64 >= at_dump + MORE,
        "only {} ticks, {at_dump} at the dump",
        ticks.len()
    );
    Ok((ticks, at_dump))
}

// ---------------------------------------------------------------------------
// Dump, kill, restore: one scenario per workload.
// ---------------------------------------------------------------------------

#[test]
fn counter_continues_after_dump_and_restore_with_its_original_pid() -> Result<()> {
    require_root!(Ok(()));
    dump_kill_restore(COUNTER)?;
    Ok(())
}

/// The 64 MiB heap workload, dumped (killed) and restored with `env`: the agent's
/// stderr must contain `fill` (how the memory was filled), and every tick after the
/// restore carries the heap's checksum (the workload re-checks it, a mismatch is a
/// `FAIL` line that `finish` reports).
fn heap_comes_back(env: &[(&str, &str)], fill: &str, why: &str) -> Result<()> {
    let mut t = Tree::start(HEAP_64MIB)?;
    t.ready()?;
    t.dump_and_kill()?;
    let at_dump = t.last_tick();
    let run = t.restore_env(env)?;
    ensure!(run.stderr.contains(fill), "{why}: {}", run.describe());
    t.advance(MORE)?;
    let ticks = t.finish()?;
    ensure!(ticks.len() as u64 >= at_dump + MORE);
    ensure!(ticks
        .iter()
        .skip(at_dump as usize)
        .all(|t| t.hex("csum").is_some()));
    Ok(())
}

#[test]
fn heap_checksum_64mib_heap_is_intact_after_dump_and_restore() -> Result<()> {
    require_root!(Ok(()));
    heap_comes_back(
        &[],
        "1 of 1 processes filled by userfaultfd",
        "the heap was not filled by userfaultfd",
    )
}

#[test]
fn heap_checksum_heap_is_intact_when_restored_by_populating_instead_of_userfaultfd() -> Result<()> {
    require_root!(Ok(()));
    // The fallback for kernels that refuse userfaultfd: populate in bulk, then copy.
    heap_comes_back(
        &[("CKPT_FILL", "populate")],
        "0 of 1 processes filled by userfaultfd",
        "the fallback was not taken",
    )
}

#[test]
fn threads_come_back_with_their_tids_tls_and_token_passing() -> Result<()> {
    require_root!(Ok(()));
    let mut t = Tree::start(THREADS)?;
    t.ready()?;
    let tids = t.shape[&t.pid].1.clone();
    t.dump_and_kill()?;

    let json = inspect_json(agent(), &t.image)?;
    ensure!(
        json["root_pid"].as_i64() == Some(t.pid as i64),
        "inspect root_pid: {}",
        json["root_pid"]
    );
    let procs = json["processes"].as_array().context("inspect: processes")?;
    ensure!(procs.len() == 1, "inspect: {} processes", procs.len());
    let mut image_tids: Vec<i64> = procs[0]["threads"]
        .as_array()
        .context("inspect: threads")?
        .iter()
        .filter_map(|th| th["tid"].as_i64())
        .collect();
    image_tids.sort_unstable();
    let want: Vec<i64> = tids.iter().map(|&t| t as i64).collect();
    ensure!(
        image_tids == want,
        "inspect: threads {image_tids:?}, process had {want:?}"
    );
    ensure!(procs[0]["mappings"]
        .as_array()
        .is_some_and(|m| !m.is_empty()));
    ensure!(procs[0]["fds"].as_array().is_some_and(|f| !f.is_empty()));

    let at_dump = t.last_tick();
    let tokens_at_dump = t
        .lines()
        .iter()
        .rev()
        .find_map(|l| ckpt_tests::ticks::parse_tick(l, 0).and_then(|tk| tk.num("tokens")));
    t.restore()?;
    t.advance(MORE)?;
    let ticks = t.finish()?;
    let tokens_after = ticks.last().and_then(|tk| tk.num("tokens"));
    ensure!(
        tokens_after > tokens_at_dump,
        "the token stopped moving after the restore: {tokens_at_dump:?} at the dump (tick {at_dump}), {tokens_after:?} at the end"
    );
    Ok(())
}

#[test]
fn fork_pipes_tree_comes_back_with_the_data_in_its_pipes() -> Result<()> {
    require_root!(Ok(()));
    let mut t = Tree::start(FORK_PIPES)?;
    t.ready()?;
    // Let the pipes fill up before the dump.
    wait_for_tick(&t.log, 30, WAIT)?;
    t.snapshot()?;
    t.dump_and_kill()?;

    let json = inspect_json(agent(), &t.image)?;
    let mut pids: Vec<i64> = json["processes"]
        .as_array()
        .context("inspect: processes")?
        .iter()
        .filter_map(|p| p["pid"].as_i64())
        .collect();
    pids.sort_unstable();
    let want: Vec<i64> = t.pids().iter().map(|&p| p as i64).collect();
    ensure!(
        pids == want,
        "inspect: processes {pids:?}, tree was {want:?}"
    );

    let at_dump = t.last_tick();
    t.restore()?;
    t.advance(MORE)?;
    let ticks = t.finish()?;
    for tk in &ticks {
        ensure!(
            tk.num("seq") == Some(16 * tk.n - 1),
            "tick {}: last record {:?}, expected {}",
            tk.n,
            tk.num("seq"),
            16 * tk.n - 1
        );
    }
    let inq = ticks[..at_dump as usize]
        .iter()
        .filter_map(|tk| tk.num("inq"))
        .max()
        .unwrap_or(0);
    ensure!(
        inq > 0,
        "the pipes never held data before the dump: the test proves nothing"
    );
    Ok(())
}

#[test]
fn signals_handlers_pending_signals_itimer_and_altstack_survive_dump_and_restore() -> Result<()> {
    require_root!(Ok(()));
    let (ticks, at_dump) = dump_kill_restore(SIGNALS)?;
    for tk in &ticks {
        ensure!(
            tk.num("usr1") == Some(tk.n),
            "tick {}: usr1 {:?}",
            tk.n,
            tk.num("usr1")
        );
        ensure!(
            tk.num("rt") == Some(tk.n),
            "tick {}: rt {:?}",
            tk.n,
            tk.num("rt")
        );
    }
    let alarms = |i: usize| ticks[i].num("alarms").unwrap_or(0);
    ensure!(
        alarms(ticks.len() - 1) > alarms(at_dump as usize - 1),
        "the interval timer did not fire after the restore"
    );
    Ok(())
}

#[test]
fn file_writer_offsets_survive_dump_and_restore_without_lost_or_repeated_records() -> Result<()> {
    require_root!(Ok(()));
    let mut t = Tree::start(FILE_WRITER)?;
    t.ready()?;
    t.dump_and_kill()?;
    let data = t.dir.path().join("data");
    let at_dump = check_records_file(&data)?;
    t.restore()?;
    t.advance(MORE)?;
    let ticks = t.finish()?;
    let records = check_records_file(&data)?;
    let last = ticks.last().and_then(|tk| tk.num("records")).unwrap_or(0);
    ensure!(
        records >= last && records > at_dump,
        "{records} records in the file, {last} reported at the last tick, {at_dump} at the dump"
    );
    Ok(())
}

#[test]
fn blocked_read_is_restarted_transparently_after_dump_and_restore() -> Result<()> {
    require_root!(Ok(()));
    let mut t = Tree::start(BLOCKED_READ)?;
    t.ready()?;
    t.dump_and_kill()?;
    t.restore()?;
    // Back in read(), not returned from it: no data, no EINTR, no end of file.
    ensure!(
        wait_for(|| proc_state(t.pid) == Some('S'), Duration::from_secs(5)),
        "the restored process is not blocked (state {:?})",
        proc_state(t.pid)
    );
    std::thread::sleep(Duration::from_millis(300));
    let lines = t.lines();
    ensure!(
        lines.last().map(String::as_str) == Some("waiting 1"),
        "the restored read returned by itself:\n{}",
        lines.join("\n")
    );
    write_fifo(&t.fifo(), b"msg-1\n").context("the restored process does not read its FIFO")?;
    t.fed = 1;
    ensure!(
        wait_for(|| t.has_line("got 1 msg-1"), WAIT),
        "the restored read did not get the message:\n{}",
        t.lines().join("\n")
    );
    t.advance(MORE)?;
    t.finish()?;
    Ok(())
}

#[test]
fn python_interpreter_continues_after_dump_and_restore() -> Result<()> {
    require_root!(Ok(()));
    dump_kill_restore(PYTHON)?;
    Ok(())
}

#[test]
fn stopped_process_stays_stopped_across_dump_and_restore_until_sigcont() -> Result<()> {
    require_root!(Ok(()));
    let mut t = Tree::start(COUNTER)?;
    t.ready()?;
    send_signal(t.pid, libc::SIGSTOP)?;
    ensure!(
        wait_for(|| is_stopped(t.pid), WAIT),
        "SIGSTOP did not stop it"
    );
    std::thread::sleep(Duration::from_millis(50));
    let at_stop = t.last_tick();
    t.dump_and_kill()?;
    t.restore()?;
    ensure!(
        wait_for(|| is_stopped(t.pid), Duration::from_secs(5)),
        "the restored process is not stopped (state {:?})",
        proc_state(t.pid)
    );
    std::thread::sleep(Duration::from_millis(300));
    ensure!(
        t.last_tick() == at_stop,
        "the stopped process ticked after the restore"
    );
    send_signal(t.pid, libc::SIGCONT)?;
    t.advance(MORE)?;
    let ticks = t.finish()?;
    ensure!(ticks.len() as u64 >= at_stop + MORE);
    Ok(())
}

// ---------------------------------------------------------------------------
// Dump with --leave-running.
// ---------------------------------------------------------------------------

#[test]
fn leave_running_dump_commits_an_image_and_the_tree_ticks_on_without_a_gap() -> Result<()> {
    require_root!(Ok(()));
    for spec in [COUNTER, THREADS, SIGNALS, FORK_PIPES, BLOCKED_READ, PYTHON] {
        let mut t = Tree::start(spec)?;
        t.ready()?;
        let starts = t.start_times();
        let run = t.dump(&t.image, &["--leave-running"], &[])?;
        let run = run.ok().with_context(|| format!("dump of {}", spec.name))?;
        t.check_untouched(&starts)
            .with_context(|| format!("{} after the dump\n{}", spec.name, run.describe()))?;
        ensure!(
            t.image.join("manifest.ckpt").is_file(),
            "no manifest for {}",
            spec.name
        );
        let json = inspect_json(agent(), &t.image)?;
        ensure!(
            json["root_pid"].as_i64() == Some(t.pid as i64),
            "{}: {json}",
            spec.name
        );
        t.advance(MORE)
            .with_context(|| format!("{} after the dump", spec.name))?;
        t.finish()
            .with_context(|| format!("{} after the dump", spec.name))?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Failed dumps leave the tree as it was.
// ---------------------------------------------------------------------------

/// For each workload of the table: a dump that fails at `stage` exits non-zero,
/// commits nothing, and the tree runs on as if nothing happened (the same processes,
/// not stopped, not traced, ticking with no gap; `blocked_read` sees no EINTR).
fn fault_leaves_tree_running(stage: &str) -> Result<()> {
    for spec in [
        COUNTER,
        THREADS,
        SIGNALS,
        FORK_PIPES,
        BLOCKED_READ,
        HEAP_8MIB,
    ] {
        let mut t = Tree::start(spec)?;
        t.ready()?;
        let starts = t.start_times();
        let image = t.dir.path().join(format!("img-{stage}"));
        let run = t.dump(&image, &[], &[("CKPT_FAULT", stage)])?;
        let what = format!("{} with CKPT_FAULT={stage}", spec.name);
        ensure!(
            !run.success(),
            "{what}: the dump succeeded\n{}",
            run.describe()
        );
        ensure!(
            run.stderr.contains(stage),
            "{what}: the dump failed, but not at the induced fault (stderr should name the stage)\n{}",
            run.describe()
        );
        ensure!(
            !image.join("manifest.ckpt").exists(),
            "{what}: a failed dump committed a manifest"
        );
        t.check_untouched(&starts)
            .with_context(|| format!("{what}\n{}", run.describe()))?;
        t.advance(MORE).with_context(|| what.clone())?;
        t.finish().with_context(|| what.clone())?;
    }
    Ok(())
}

#[test]
fn fault_after_seize_leaves_the_tree_running_untouched() -> Result<()> {
    require_root!(Ok(()));
    fault_leaves_tree_running(FAULT_STAGES[0])
}

#[test]
fn fault_after_regs_leaves_the_tree_running_untouched() -> Result<()> {
    require_root!(Ok(()));
    fault_leaves_tree_running(FAULT_STAGES[1])
}

#[test]
fn fault_after_memory_leaves_the_tree_running_untouched() -> Result<()> {
    require_root!(Ok(()));
    fault_leaves_tree_running(FAULT_STAGES[2])
}

#[test]
fn fault_after_files_leaves_the_tree_running_untouched() -> Result<()> {
    require_root!(Ok(()));
    fault_leaves_tree_running(FAULT_STAGES[3])
}

#[test]
fn fault_before_commit_leaves_the_tree_running_untouched() -> Result<()> {
    require_root!(Ok(()));
    fault_leaves_tree_running(FAULT_STAGES[4])
}

#[test]
fn dump_refuses_a_netlink_socket_naming_the_fd_and_leaves_the_process_running() -> Result<()> {
    require_root!(Ok(()));
    let mut t = Tree::start(NETLINK)?;
    t.ready()?;
    let fd: u32 = t
        .lines()
        .first()
        .and_then(|l| l.strip_prefix("netlink fd "))
        .and_then(|r| r.split_whitespace().next()?.parse().ok())
        .context("netlink did not print its fd")?;
    let starts = t.start_times();
    let run = t.dump(&t.image, &[], &[])?;
    ensure!(
        !run.success(),
        "the dump of a netlink socket succeeded\n{}",
        run.describe()
    );
    ensure!(
        run.stderr.contains("unsupported"),
        "the error does not say \"unsupported\"\n{}",
        run.describe()
    );
    ensure!(
        digits_tokens(&run.stderr).contains(&fd.to_string().as_str()),
        "the error does not name fd {fd}\n{}",
        run.describe()
    );
    ensure!(
        !t.image.join("manifest.ckpt").exists(),
        "a refused dump committed a manifest"
    );
    t.check_untouched(&starts)?;
    t.advance(MORE)?;
    t.finish()?;
    Ok(())
}

// ---------------------------------------------------------------------------
// Restores that must be refused.
// ---------------------------------------------------------------------------

#[test]
fn restore_onto_a_taken_pid_fails_naming_the_pid_and_leaves_the_owner_alone() -> Result<()> {
    require_root!(Ok(()));
    let mut t = Tree::start(COUNTER)?;
    t.ready()?;
    let starts = t.start_times();
    t.dump(&t.image, &["--leave-running"], &[])?.ok()?;
    let run = run_restore(agent(), &t.image, &[], &[])?;
    ensure!(
        !run.success(),
        "restore onto a taken PID succeeded\n{}",
        run.describe()
    );
    ensure!(
        run.stderr.contains("taken"),
        "the error does not say the PID is taken\n{}",
        run.describe()
    );
    ensure!(
        digits_tokens(&run.stderr).contains(&t.pid.to_string().as_str()),
        "the error does not name PID {}\n{}",
        t.pid,
        run.describe()
    );
    t.check_untouched(&starts)?;
    t.advance(MORE)?;
    t.finish()?;
    Ok(())
}

/// Dumps a small workload (killing it) and returns the tree, gone, and its image.
fn dumped_counter() -> Result<Tree> {
    let mut t = Tree::start(COUNTER)?;
    t.ready()?;
    t.dump_and_kill()?;
    Ok(t)
}

/// Restores `t`'s damaged image and checks the refusal: non-zero exit, a message
/// that says what is wrong, and no process at the root's PID.
fn expect_refused_restore(t: &Tree, damage: &str) -> Result<()> {
    let run = run_restore(agent(), &t.image, &[], &[])?;
    // Whatever happens, kill anything that came up at the original PIDs.
    let strays: Vec<i32> = t.pids().into_iter().filter(|&p| is_alive(p)).collect();
    let _guard = PidsGuard::new(strays.iter().copied());
    ensure!(
        !run.success(),
        "restore of an image with {damage} succeeded\n{}",
        run.describe()
    );
    let msg = run.stderr.to_lowercase();
    ensure!(
        ["corrupt", "truncated", "checksum"]
            .iter()
            .any(|w| msg.contains(w)),
        "the error about {damage} says neither corrupt, truncated nor checksum\n{}",
        run.describe()
    );
    ensure!(
        strays.is_empty(),
        "a refused restore left processes {strays:?} behind"
    );
    ensure!(
        wait_gone(t.pid, Duration::ZERO),
        "PID {} is in use after a refused restore",
        t.pid
    );
    Ok(())
}

fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.is_file() {
                out.push(p);
            }
        }
    }
    out
}

#[test]
fn restore_refuses_an_image_with_a_corrupted_chunk_and_starts_nothing() -> Result<()> {
    require_root!(Ok(()));
    let t = dumped_counter()?;
    let chunks = files_under(&t.image.join("chunks"));
    let Some(victim) = chunks
        .iter()
        .max_by_key(|p| fs::metadata(p).map(|m| m.len()).unwrap_or(0))
    else {
        bail!("no chunk files under {}", t.image.join("chunks").display());
    };
    let mut bytes = fs::read(victim)?;
    ensure!(!bytes.is_empty(), "empty chunk {}", victim.display());
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x5a;
    fs::write(victim, &bytes)?;
    expect_refused_restore(&t, &format!("a flipped byte in {}", victim.display()))
}

#[test]
fn restore_refuses_a_truncated_manifest_and_starts_nothing() -> Result<()> {
    require_root!(Ok(()));
    let t = dumped_counter()?;
    let manifest = t.image.join("manifest.ckpt");
    let len = fs::metadata(&manifest)?.len();
    ensure!(len > 1, "manifest of {len} bytes");
    fs::OpenOptions::new()
        .write(true)
        .open(&manifest)?
        .set_len(len / 2)?;
    expect_refused_restore(&t, "a manifest cut to half its length")
}
