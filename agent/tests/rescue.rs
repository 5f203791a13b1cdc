//! An agent killed at any instant of a dump leaves the tree as it was.
//!
//! `ckpt-agent dump` is SIGKILLed, many times, at moments spread over the whole
//! dump: by time after the freeze, right after the seize, and inside the window
//! where a thread runs injected system calls (watched for: its mask in
//! `/proc/PID/task/TID/status` is "everything blocked", which only the agent sets).
//! The rank (`sigwatch`) is sent SIGUSR1 just before each kill. After each kill
//! it must run on: untraced, not stopped, its own checks quiet (each thread's mask
//! as it set it, its pending signal still pending, every thread making progress),
//! and the SIGUSR1 delivered. Then a normal dump must succeed. Run on a rank of 200
//! threads and on a single-threaded one, with `--leave-running` and in kill mode
//! (where a kill that comes after the commit finds the rank killed by the dump
//! itself: the image must then be complete).
//!
//! See agent/src/rescue.rs for the mechanism.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use ckpt_tests::sigwatch::{self, injecting, phase_of, traced};
use ckpt_tests::{
    is_alive, require_root, run_dump, send_signal, spawn_workload, thread_ids, wait_for,
    wait_for_tick, ProcGuard,
};
use tempfile::TempDir;

mod common;
use common::{agent, WAIT};

/// The file whose presence makes a directory image committed.
const MANIFEST: &str = "manifest.ckpt";

struct Rank {
    guard: ProcGuard,
    log: PathBuf,
    threads: u32,
}

impl Rank {
    fn start(dir: &Path, threads: u32, n: usize) -> Result<Rank> {
        let log = dir.join(format!("sigwatch-{n}.log"));
        let guard = spawn_workload("sigwatch", [threads.to_string()], &log)?;
        wait_for_tick(&log, 3, WAIT)?;
        let pid = guard.id();
        ensure!(
            wait_for(|| thread_ids(pid).len() == threads as usize, WAIT),
            "sigwatch did not start its {threads} threads"
        );
        Ok(Rank {
            guard,
            log,
            threads,
        })
    }

    fn pid(&self) -> i32 {
        self.guard.id()
    }

    fn last(&self) -> (u64, u64) {
        sigwatch::last(&self.log)
    }

    fn check_runs_on(&self, usr1_before: Option<u64>, what: &str) -> Result<()> {
        sigwatch::check_runs_on(
            self.pid(),
            &self.log,
            self.threads as usize,
            usr1_before,
            what,
        )
    }
}

/// When to kill the dump.
#[derive(Debug, Clone, Copy)]
enum When {
    /// This long after the tree is first seen traced.
    AfterFreeze(Duration),
    /// As soon as a thread is seen inside an injection.
    Injecting,
}

/// Whether the dump `d` has exited (reaped if so).
fn ended(d: &mut ProcGuard) -> bool {
    matches!(d.wait_exit(Duration::ZERO), Ok(Some(_)))
}

/// Starts a dump of `pid`, kills it as `when` says; returns the phase seen at the
/// kill, or `None` if the dump ended first.
fn kill_dump(
    pid: i32,
    image: &Path,
    leave_running: bool,
    rescue_dir: &Path,
    when: When,
) -> Result<Option<&'static str>> {
    let mut cmd = Command::new(agent());
    cmd.args(["dump", "--pid", &pid.to_string(), "--image"])
        .arg(image)
        .env("CKPT_RESCUE_DIR", rescue_dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(image.with_extension("stderr"))?);
    if leave_running {
        cmd.arg("--leave-running");
    }
    let mut dump = ProcGuard::new(cmd.spawn().context("starting ckpt-agent dump")?);
    let deadline = Instant::now() + WAIT;
    // Watch closely: a busy loop, no sleep, so that short windows are hit.
    let hit = loop {
        if Instant::now() > deadline {
            let dpid = dump.id();
            let wchan = |p: i32| {
                thread_ids(p)
                    .iter()
                    .map(|t| {
                        std::fs::read_to_string(format!("/proc/{p}/task/{t}/wchan"))
                            .unwrap_or_default()
                    })
                    .collect::<Vec<_>>()
                    .join(",")
            };
            // Seen once in a full run (kill mode, 200 threads), not reproduced
            // since: say where it was, then kill it there like any other; the rank
            // must still run on.
            println!(
                "!! the dump never reached the moment to kill it ({when:?}) in {WAIT:?}: \
                 dump {dpid} waits in [{}]; rank state {:?}, tracers {:?}; dump's \
                 stderr: {}",
                wchan(dpid),
                ckpt_tests::proc_state(pid),
                ckpt_tests::tracer_pids(pid)
                    .iter()
                    .take(3)
                    .collect::<Vec<_>>(),
                std::fs::read_to_string(image.with_extension("stderr")).unwrap_or_default()
            );
            break true;
        }
        let reached = match when {
            When::AfterFreeze(_) => traced(pid),
            When::Injecting => injecting(pid),
        };
        if reached {
            break true;
        }
        if ended(&mut dump) {
            break false;
        }
    };
    if !hit {
        return Ok(None);
    }
    if let When::AfterFreeze(d) = when {
        std::thread::sleep(d);
    }
    let phase = phase_of(pid);
    send_signal(pid, libc::SIGUSR1)?;
    dump.kill();
    Ok(Some(phase))
}

#[derive(Default)]
struct Tally {
    by_phase: BTreeMap<&'static str, u32>,
    completed: u32,
}

/// `kills` kills of dumps of a rank of `threads` threads.
fn kill_loop(threads: u32, leave_running: bool, kills: u32) -> Result<Tally> {
    let dir = TempDir::new()?;
    let rescue_dir = dir.path().join("rescue");
    let mut starts = 0;
    let mut rank = Rank::start(dir.path(), threads, starts)?;
    // One dump to learn how long it takes, so the kills spread over all of it.
    let t0 = Instant::now();
    run_dump(
        agent(),
        rank.pid(),
        &dir.path().join("timing"),
        &["--leave-running"],
        &[],
    )?
    .ok()?;
    let full = t0.elapsed();
    rank.check_runs_on(None, "after a normal dump")?;
    let mut tally = Tally::default();
    let mode = if leave_running {
        "--leave-running"
    } else {
        "kill mode"
    };
    for k in 0..kills {
        let when = match k % 3 {
            0 => When::Injecting,
            1 => When::AfterFreeze(Duration::from_micros(
                (full.as_micros() as u64 * k as u64 / kills as u64).min(5_000_000),
            )),
            _ => When::AfterFreeze(Duration::from_micros(50 * (k as u64 % 40))),
        };
        let (_, usr1) = rank.last();
        let image = dir.path().join(format!("img-{k}"));
        let what = format!("{threads} threads, {mode}, kill {k} ({when:?})");
        let Some(phase) = kill_dump(rank.pid(), &image, leave_running, &rescue_dir, when)
            .with_context(|| what.clone())?
        else {
            // The dump ended before the moment came.
            tally.completed += 1;
            if !leave_running {
                ensure!(
                    image.join(MANIFEST).exists(),
                    "{what}: the dump ended without a manifest"
                );
                starts += 1;
                rank = Rank::start(dir.path(), threads, starts)?;
            }
            continue;
        };
        if !leave_running && !is_alive(rank.pid()) {
            // Killed after its commit: the dump killed the rank, as asked, and
            // only once its image was complete.
            ensure!(
                image.join(MANIFEST).exists(),
                "{what}: the rank is dead and the image has no manifest"
            );
            tally.completed += 1;
            starts += 1;
            rank = Rank::start(dir.path(), threads, starts)?;
            continue;
        }
        rank.check_runs_on(Some(usr1), &format!("{what}, killed {phase}"))?;
        *tally.by_phase.entry(phase).or_default() += 1;
    }
    // A later save succeeds, and the rank still runs on.
    let (_, usr1) = rank.last();
    send_signal(rank.pid(), libc::SIGUSR1)?;
    run_dump(
        agent(),
        rank.pid(),
        &dir.path().join("after"),
        &["--leave-running"],
        &[],
    )?
    .ok()
    .context("a dump after the killed ones")?;
    rank.check_runs_on(Some(usr1), "after the last, normal dump")?;
    // Every journal was rescued and removed.
    let left: Vec<_> = walk(&rescue_dir);
    ensure!(
        wait_for(|| walk(&rescue_dir).is_empty(), Duration::from_secs(20)),
        "journals left behind: {left:?}"
    );
    Ok(tally)
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(d) = std::fs::read_dir(dir) {
        for e in d.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(walk(&p));
            } else {
                out.push(p);
            }
        }
    }
    out
}

fn report(name: &str, t: &Tally) -> u32 {
    let survived: u32 = t.by_phase.values().sum();
    println!(
        "{name}: {survived} kills survived ({}), {} dumps ended before their kill",
        t.by_phase
            .iter()
            .map(|(p, n)| format!("{n} {p}"))
            .collect::<Vec<_>>()
            .join(", "),
        t.completed
    );
    survived
}

#[test]
fn dump_killed_at_any_instant_leaves_the_rank_running_as_it_was() -> Result<()> {
    require_root!(Ok(()));
    let mut total = 0;
    for (threads, leave_running, kills) in [
        (200, true, 42),
        (1, true, 24),
        (200, false, 33),
        (1, false, 27),
    ] {
        let name = format!(
            "{threads} thread(s), {}",
            if leave_running {
                "--leave-running"
            } else {
                "kill mode"
            }
        );
        let t = kill_loop(threads, leave_running, kills).with_context(|| name.clone())?;
        total += report(&name, &t);
    }
    println!("{total} kills of ckpt-agent dump survived in all");
    ensure!(total >= 100, "only {total} kills landed inside dumps");
    Ok(())
}

/// The watchdog's own file in a journal directory names it as `PID.START`.
fn watchdogs(rescue_dir: &Path) -> Vec<i32> {
    walk(rescue_dir)
        .into_iter()
        .filter(|p| p.file_name().is_some_and(|n| n == "watchdog"))
        .filter_map(|p| std::fs::read_to_string(p).ok())
        .filter_map(|s| s.split('.').next()?.trim().parse().ok())
        .collect()
}

#[test]
fn a_rank_whose_agent_and_watchdog_both_died_stays_stopped_until_ckpt_agent_rescue() -> Result<()> {
    require_root!(Ok(()));
    let dir = TempDir::new()?;
    let rescue_dir = dir.path().join("rescue");
    let rank = Rank::start(dir.path(), 20, 0)?;
    let pid = rank.pid();
    let (_, usr1) = rank.last();
    // The injection window of one dump can be shorter than any poll interval:
    // watch it without sleeping, and start another dump if one ended unseen.
    let mut seen = None;
    for attempt in 0..50 {
        let mut cmd = Command::new(agent());
        cmd.args([
            "dump",
            "--pid",
            &pid.to_string(),
            "--leave-running",
            "--image",
        ])
        .arg(dir.path().join(format!("img{attempt}")))
        .env("CKPT_RESCUE_DIR", &rescue_dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
        let mut dump = ProcGuard::new(cmd.spawn()?);
        let deadline = Instant::now() + WAIT;
        while Instant::now() < deadline && !injecting(pid) && !ended(&mut dump) {}
        if injecting(pid) {
            seen = Some(dump);
            break;
        }
        ensure!(
            ended(&mut dump),
            "a dump took over {WAIT:?} without injecting"
        );
    }
    let Some(mut dump) = seen else {
        anyhow::bail!("50 dumps ended without being seen inside an injection");
    };
    // The watchdog first, then the agent, inside the injection window.
    let dogs = watchdogs(&rescue_dir);
    ensure!(dogs.len() == 1, "one watchdog expected: {dogs:?}");
    send_signal(dogs[0], libc::SIGKILL)?;
    send_signal(pid, libc::SIGUSR1)?;
    dump.kill();
    ensure!(wait_for(|| !traced(pid), WAIT), "the rank is still traced");
    // Nobody left to put it back: it must stay stopped, not run on.
    std::thread::sleep(Duration::from_millis(500));
    ensure!(
        ckpt_tests::proc_state(pid) == Some('T'),
        "the rank did not stay stopped: state {:?}",
        ckpt_tests::proc_state(pid)
    );
    let out = Command::new(agent())
        .args(["rescue", "--dir"])
        .arg(&rescue_dir)
        .output()?;
    ensure!(
        out.status.success(),
        "ckpt-agent rescue: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let said = String::from_utf8_lossy(&out.stdout);
    ensure!(
        said.contains("1 journal(s)"),
        "ckpt-agent rescue said {said:?}"
    );
    rank.check_runs_on(Some(usr1), "after ckpt-agent rescue")?;
    ensure!(
        walk(&rescue_dir).is_empty(),
        "journals left: {:?}",
        walk(&rescue_dir)
    );
    Ok(())
}
