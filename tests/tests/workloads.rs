//! The workloads on their own, without the agent: each one runs for a second or two
//! and must tick, pass its own checks and keep the tick protocol. A workload that
//! fails here would make every engine test fail for the wrong reason.
//!
//! These need gcc and python3 but no privilege.

use std::path::Path;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use ckpt_tests::ticks::{check_log, check_records_file};
use ckpt_tests::{
    mkfifo, proc_ppid, read_log_lines, spawn_workload, thread_ids, tree_pids, wait_for,
    wait_for_tick, write_fifo, PidsGuard, Tick,
};

const WAIT: Duration = Duration::from_secs(30);

/// Runs `name args` until tick `ticks`, kills it, and checks the log. The ticks
/// and the log's lines come back for workload-specific checks.
fn run_until(name: &str, args: &[&str], ticks: u64) -> Result<(Vec<Tick>, Vec<String>)> {
    let dir = tempfile::tempdir()?;
    let log = dir.path().join("log");
    let mut root = spawn_workload(name, args, &log)?;
    wait_for_tick(&log, ticks, WAIT)?;
    root.kill();
    let ticks = check_log(&log)?;
    Ok((ticks, read_log_lines(&log)?))
}

#[test]
fn counter_ticks_with_a_correct_chain() -> Result<()> {
    let (ticks, lines) = run_until("counter", &[], 30)?;
    ensure!(ticks.len() >= 30);
    ensure!(lines[0].starts_with("counter pid "), "header: {}", lines[0]);
    Ok(())
}

#[test]
fn heap_checksum_verifies_its_heap_every_tick() -> Result<()> {
    let (ticks, _) = run_until("heap_checksum", &["16"], 20)?;
    ensure!(
        ticks.iter().all(|t| t.hex("csum").is_some()),
        "every tick carries csum"
    );
    Ok(())
}

#[test]
fn threads_pass_the_token_and_count_it_in_tls() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let log = dir.path().join("log");
    let root = spawn_workload("threads", ["4"], &log)?;
    wait_for_tick(&log, 5, WAIT)?;
    ensure!(
        thread_ids(root.id()).len() == 5,
        "threads: {:?}",
        thread_ids(root.id())
    );
    wait_for_tick(&log, 40, WAIT)?;
    drop(root);
    let ticks = check_log(&log)?;
    let tokens: Vec<u64> = ticks.iter().filter_map(|t| t.num("tokens")).collect();
    ensure!(tokens.len() == ticks.len());
    ensure!(
        tokens.windows(2).all(|w| w[0] <= w[1]),
        "token count never goes back"
    );
    ensure!(tokens.last() > tokens.first(), "tokens advance: {tokens:?}");
    Ok(())
}

#[test]
fn fork_pipes_forwards_records_through_a_tree_with_data_in_flight() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let log = dir.path().join("log");
    let root = spawn_workload("fork_pipes", std::iter::empty::<&str>(), &log)?;
    let pid = root.id();
    wait_for_tick(&log, 10, WAIT)?;
    let tree = tree_pids(pid);
    let guard = PidsGuard::new(tree.iter().copied().skip(1));
    ensure!(tree.len() == 4, "a tree of 4 processes: {tree:?}");
    let parents: Vec<i32> = tree.iter().filter_map(|&p| proc_ppid(p)).collect();
    ensure!(
        parents[1..].iter().filter(|&&pp| pp == pid).count() == 2,
        "two children of the root: {tree:?} with parents {parents:?}"
    );
    ensure!(
        parents[1..].iter().any(|pp| tree[1..].contains(pp)),
        "one grandchild: {tree:?} with parents {parents:?}"
    );
    wait_for_tick(&log, 60, WAIT)?;
    drop(guard);
    drop(root);
    let ticks = check_log(&log)?;
    for t in &ticks {
        ensure!(
            t.num("seq") == Some(16 * t.n - 1),
            "tick {} has seq {:?}",
            t.n,
            t.num("seq")
        );
    }
    let max_inq = ticks.iter().filter_map(|t| t.num("inq")).max().unwrap_or(0);
    ensure!(
        max_inq > 4096,
        "the last pipe should fill up (max inq {max_inq})"
    );
    Ok(())
}

#[test]
fn signals_keep_handlers_pending_signals_timer_and_altstack() -> Result<()> {
    let (ticks, _) = run_until("signals", &[], 40)?;
    for t in &ticks {
        ensure!(
            t.num("usr1") == Some(t.n),
            "tick {}: usr1 {:?}",
            t.n,
            t.num("usr1")
        );
        ensure!(
            t.num("rt") == Some(t.n),
            "tick {}: rt {:?}",
            t.n,
            t.num("rt")
        );
    }
    let alarms: Vec<u64> = ticks.iter().filter_map(|t| t.num("alarms")).collect();
    ensure!(
        alarms.windows(2).all(|w| w[0] < w[1]),
        "alarms grow: {alarms:?}"
    );
    Ok(())
}

#[test]
fn file_writer_writes_every_record_once_in_order() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let log = dir.path().join("log");
    let data = dir.path().join("data");
    let mut root = spawn_workload("file_writer", [&data], &log)?;
    wait_for_tick(&log, 30, WAIT)?;
    root.kill();
    let ticks = check_log(&log)?;
    let last = ticks
        .last()
        .and_then(|t| t.num("records"))
        .context("records field")?;
    let records = check_records_file(&data)?;
    ensure!(
        (last..=last + 4).contains(&records),
        "file holds {records} records, last tick reported {last}"
    );
    Ok(())
}

fn log_has(log: &Path, line: &str) -> bool {
    read_log_lines(log)
        .map(|l| l.iter().any(|x| x == line))
        .unwrap_or(false)
}

#[test]
fn blocked_read_waits_on_its_fifo_and_checks_each_message() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let log = dir.path().join("log");
    let fifo = dir.path().join("fifo");
    mkfifo(&fifo)?;
    let root = spawn_workload("blocked_read", [&fifo], &log)?;
    ensure!(
        wait_for(|| log_has(&log, "waiting 1"), WAIT),
        "never waited"
    );
    std::thread::sleep(Duration::from_millis(100));
    ensure!(!log_has(&log, "got 1 msg-1"), "read returned without data");
    write_fifo(&fifo, b"msg-1\n")?;
    ensure!(
        wait_for(|| log_has(&log, "got 1 msg-1"), WAIT),
        "message 1 not read"
    );
    ensure!(
        wait_for(|| log_has(&log, "waiting 2"), WAIT),
        "never waited again"
    );
    write_fifo(&fifo, b"msg-2\n")?;
    wait_for_tick(&log, 20, WAIT)?;
    drop(root);
    let ticks = check_log(&log)?;
    ensure!(ticks.len() >= 20);
    Ok(())
}

#[test]
fn netlink_names_its_socket_fd_and_ticks() -> Result<()> {
    let (ticks, lines) = run_until("netlink", &[], 20)?;
    ensure!(ticks.len() >= 20);
    ensure!(lines[0].starts_with("netlink fd "), "header: {}", lines[0]);
    Ok(())
}

#[test]
fn python_stateful_checks_its_objects() -> Result<()> {
    let (ticks, _) = run_until("stateful.py", &[], 60)?;
    ensure!(ticks.iter().all(|t| t.hex("x").is_some()));
    Ok(())
}
