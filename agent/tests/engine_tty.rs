//! End-to-end tests of the descriptor kinds of `fd/timerfd.rs`, `fd/signalfd.rs`
//! and `fd/pty.rs`: real programs from `tests/workloads/`, dumped, killed (or left
//! running), restored, with continuity proven by their logs (`ckpt_tests::ticks`)
//! and by checks the programs make of themselves (a `FAIL` line fails the test).
//!
//! Every test owns a temporary directory and guards that SIGKILL, by PID, every
//! process it started or restored, even when it panics.

use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use ckpt_shared::image::{FileKind, Image};
use ckpt_tests::{is_alive, require_root, run_dump, send_signal, wait_for, wait_for_tick, Tick};

mod common;
use common::{agent, WAIT};
#[path = "common/tree.rs"]
mod tree;
use tree::Tree;

fn num(t: &Tick, key: &str) -> Result<u64> {
    t.num(key)
        .with_context(|| format!("tick {} has no {key}: {:?}", t.n, t.fields))
}

// ---------------------------------------------------------------------------
// eventfd, timerfd and signalfd under one epoll.
// ---------------------------------------------------------------------------

#[test]
fn eventfd_timerfd_and_signalfd_under_epoll_keep_counting_after_a_restore() -> Result<()> {
    require_root!(Ok(()));
    const INTERVAL_MS: u64 = 10;
    let mut t = Tree::start("tty", "anon_fds", &["10"])?;
    t.ready(5, 1)?;
    let away = Instant::now();
    t.dump_and_kill()?;
    let before = t.last_tick();
    let img = t.manifest()?;
    let files = &img.files;
    let timer_ticks = files
        .iter()
        .find_map(|f| match &f.kind {
            FileKind::TimerFd {
                clock,
                interval_ns,
                value_ns,
                ticks,
                ..
            } => Some((*clock, *interval_ns, *value_ns, *ticks)),
            _ => None,
        })
        .context("the image holds no timerfd")?;
    let (clock, interval_ns, value_ns, unread) = timer_ticks;
    ensure!(clock == libc::CLOCK_MONOTONIC, "timerfd clock {clock}");
    ensure!(
        interval_ns == INTERVAL_MS * 1_000_000,
        "interval {interval_ns} ns"
    );
    ensure!(
        value_ns > 0 && value_ns <= interval_ns,
        "a periodic timer must be armed within one interval: {value_ns} ns left"
    );
    let count = files
        .iter()
        .find_map(|f| match &f.kind {
            FileKind::EventFd { count, .. } => Some(*count),
            _ => None,
        })
        .context("the image holds no eventfd")?;
    ensure!(
        (1..=3).contains(&count),
        "eventfd counter {count} at the dump"
    );
    let mask = files
        .iter()
        .find_map(|f| match &f.kind {
            FileKind::SignalFd { mask } => Some(*mask),
            _ => None,
        })
        .context("the image holds no signalfd")?;
    ensure!(mask == 1 << (libc::SIGUSR1 - 1), "signalfd mask {mask:#x}");
    ensure!(
        files
            .iter()
            .any(|f| matches!(&f.kind, FileKind::Epoll { targets } if targets.len() == 3)),
        "no epoll instance with its three targets in the image"
    );

    std::thread::sleep(Duration::from_millis(500));
    t.restore()?;
    let away = away.elapsed();
    wait_for_tick(&t.log, before + 3, WAIT)?;
    send_signal(t.pid, libc::SIGUSR1)?;
    wait_for_tick(&t.log, t.last_tick() + 15, WAIT)?;
    let ticks = t.finish()?;

    let last_before = &ticks[before as usize - 1];
    // The first line whose timer read came after the restore: the count must have
    // grown by at least the expirations the image held unread.
    let exp_before = num(last_before, "exp")?;
    let first_read_after = ticks[before as usize..]
        .iter()
        .find(|k| num(k, "exp").is_ok_and(|e| e > exp_before))
        .context("the timer's expirations never grew after the restore")?;
    let grown = num(first_read_after, "exp")? - exp_before;
    ensure!(
        grown >= unread,
        "{unread} expirations were unread at the dump, the first read after the restore \
         added only {grown} (tick {} -> {})",
        last_before.n,
        first_read_after.n
    );
    // Timer time lost, on the last line that read the timer (every 10th loop):
    // the time the tree was away, no more (none lost besides); the program
    // checked itself that none were invented.
    let lost_ms = |k: &Tick| -> Result<i64> {
        Ok(num(k, "elapsed_ms")? as i64 - (num(k, "exp")? * INTERVAL_MS) as i64)
    };
    let read_line = ticks
        .iter()
        .rev()
        .find(|k| k.n > before && k.num("loops").is_some_and(|l| l % 10 == 0))
        .context("no line read the timer after the restore")?;
    let lost = lost_ms(read_line)?;
    ensure!(
        lost >= 0 && lost <= away.as_millis() as i64 + 3 * INTERVAL_MS as i64,
        "timer time lost {lost} ms at tick {}; the tree was away at most {} ms",
        read_line.n,
        away.as_millis()
    );
    let last = ticks.last().context("no ticks")?;
    ensure!(
        num(last, "sigs")? == 1,
        "SIGUSR1 not read once through the signalfd: {last:?}"
    );
    ensure!(
        num(last, "from")? == std::process::id() as u64,
        "the signal's sender is {:?}, we are {}",
        last.num("from"),
        std::process::id()
    );
    ensure!(
        num(last, "loops")? >= num(last_before, "loops")? + 15,
        "the loop did not go on"
    );
    Ok(())
}

// ---------------------------------------------------------------------------
// A pseudo-terminal pair inside the tree.
// ---------------------------------------------------------------------------

/// What the image keeps of the tree's pty pair; the bytes queued both ways.
fn check_pty_image(img: &Image, child: i32) -> Result<(usize, usize)> {
    let pair = img
        .files
        .iter()
        .find_map(|f| match &f.kind {
            FileKind::PtyMaster { pty } => Some(pty),
            _ => None,
        })
        .context("the image holds no pty master")?;
    ensure!(
        img.files
            .iter()
            .any(|f| matches!(f.kind, FileKind::PtySlave { index } if index == pair.index)),
        "the image holds no slave of /dev/pts/{}",
        pair.index
    );
    ensure!(
        (pair.winsize.cols, pair.winsize.rows) == (101, 33),
        "window {:?}",
        pair.winsize
    );
    ensure!(pair.termios.lflag & libc::ICANON != 0 && pair.termios.lflag & libc::ECHO == 0);
    ensure!(
        pair.session == Some(child),
        "the pair is the controlling terminal of {:?}, the child is {child}",
        pair.session
    );
    ensure!(
        pair.foreground == Some(child),
        "foreground {:?}",
        pair.foreground
    );
    ensure!(!pair.locked && !pair.slave_closed && !pair.packet);
    let input = pair
        .input
        .lines
        .iter()
        .map(|l| l.bytes.len())
        .sum::<usize>()
        + pair.input.rest.len();
    Ok((input, pair.output.len()))
}

#[test]
fn a_pty_pair_with_data_queued_both_ways_survives_a_running_dump_and_a_restore() -> Result<()> {
    require_root!(Ok(()));
    let mut t = Tree::start("tty", "pty_pair", &[])?;
    t.ready(3, 2)?;
    let child = t.pids[1];
    // Each side reads once a second, and a tick is printed right after the
    // parent's read: half a second later both queues hold half a second of data.
    let settle = Duration::from_millis(500);
    std::thread::sleep(settle);
    // 1. --leave-running: the queues are taken out and put back; the programs'
    // own checks (FAIL lines) see every byte once, in order.
    let image1 = t.image.clone();
    run_dump(agent(), t.pid, &image1, &["--leave-running"], &[])?.ok()?;
    let (in1, out1) = check_pty_image(&t.manifest()?, child)?;
    let at = t.last_tick();
    wait_for_tick(&t.log, at + 4, WAIT)?;
    std::thread::sleep(settle);
    // 2. Killed and restored: a new pair, settings, queues and controlling
    // terminal set again (the child checks them itself).
    t.image = image1.with_file_name("img-kill");
    t.dump_and_kill()?;
    let (in2, out2) = check_pty_image(&t.manifest()?, child)?;
    ensure!(
        in1 > 0 && in2 > 0 && out1 > 0 && out2 > 0,
        "data should be queued both ways at each dump (in {in1}/{in2}, out {out1}/{out2} bytes)"
    );
    let before = t.last_tick();
    t.restore()?;
    wait_for_tick(&t.log, before + 5, WAIT)?;
    let ticks = t.finish()?;
    let (b, last) = (
        &ticks[before as usize - 1],
        ticks.last().context("no ticks")?,
    );
    ensure!(
        num(last, "out")? > num(b, "out")? + 40 && num(last, "in")? > num(b, "in")? + 20,
        "the pair stopped carrying data after the restore: {b:?} then {last:?}"
    );
    Ok(())
}

#[test]
fn a_terminal_whose_master_is_outside_the_tree_is_refused_beyond_stdio() -> Result<()> {
    require_root!(Ok(()));
    use nix::fcntl::OFlag;
    // The master is ours (outside the tree); the program opens the slave at fd 3.
    let master = nix::pty::posix_openpt(OFlag::O_RDWR | OFlag::O_NOCTTY)?;
    nix::pty::grantpt(&master)?;
    nix::pty::unlockpt(&master)?;
    let slave = nix::pty::ptsname_r(&master)?;
    let dir = tempfile::Builder::new()
        .prefix("ckpt-tty-outside-")
        .tempdir()?;
    let log = dir.path().join("log");
    let code = format!(
        "import os, time\nfd = os.open({slave:?}, os.O_RDWR | os.O_NOCTTY)\n\
         print('opened', fd, flush=True)\ntime.sleep(120)\n"
    );
    let mut root = ckpt_tests::workload::spawn_program(
        std::path::Path::new("/usr/bin/python3"),
        ["-c", code.as_str()],
        &log,
    )?;
    let pid = root.id();
    ensure!(
        wait_for(
            || std::fs::read_to_string(&log).is_ok_and(|l| l.contains("opened 3")),
            WAIT
        ),
        "python did not open {slave}: {:?}",
        std::fs::read_to_string(&log)
    );
    let run = run_dump(agent(), pid, &dir.path().join("img"), &[], &[])?;
    ensure!(
        !run.success(),
        "the dump should be refused\n{}",
        run.describe()
    );
    let err = run.error_line();
    ensure!(
        err.contains("master is outside the tree")
            && err.contains(&format!("fd 3 of PID {pid}"))
            && err.contains(&slave),
        "the refusal should name fd 3, PID {pid} and {slave}: {err}"
    );
    ensure!(is_alive(pid), "the tree should run on after a refused dump");
    ensure!(
        !dir.path().join("img/manifest.ckpt").exists(),
        "a refused dump left a manifest"
    );
    root.kill();
    Ok(())
}

// ---------------------------------------------------------------------------
// Shared descriptions among many descriptors of one inode.
// ---------------------------------------------------------------------------

/// Every eventfd, epoll, timerfd and signalfd shares one anonymous inode, so the
/// dump finds a duplicate's description by a search among all of them (in the
/// kernel's kcmp order): 64 eventfds, every 3rd one duplicated, must come back
/// with each duplicate still the same description as its original.
#[test]
fn duplicates_among_many_eventfds_stay_one_description() -> Result<()> {
    require_root!(Ok(()));
    let mut t = Tree::start("tty", "eventfd_dups.py", &["64"])?;
    t.ready(5, 1)?;
    t.dump_and_kill()?;
    let before = t.last_tick();
    t.restore()?;
    t.advance(20)?;
    let ticks = t.finish()?;
    ensure!(ticks.len() as u64 >= before + 20, "{} ticks", ticks.len());
    Ok(())
}
