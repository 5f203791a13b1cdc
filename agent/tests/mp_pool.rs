//! A Python `multiprocessing` pool (`tests/workloads/mp_pool.py`, the fork
//! context): the parent, its pool workers and the pool's helper threads, talking
//! through pipes and a SimpleQueue, with a lock and a semaphore in /dev/shm and a
//! `Value` in shared memory. Dumped with `--leave-running`, then dumped and
//! killed, restored: every task's result and the shared total stay right and the
//! ticks go on without a gap.

use std::time::Duration;

use anyhow::{ensure, Context, Result};
use ckpt_tests::{
    check_log, expect_killed_by_dump, guard_restored, last_tick, require_root, run_dump,
    run_restore, spawn_workload, tree_pids, wait_for_tick, PidsGuard,
};

mod common;
use common::{agent, WAIT};

const WORKERS: usize = 3;

#[test]
fn a_python_multiprocessing_pool_is_dumped_killed_restored_and_computes_on() -> Result<()> {
    require_root!(Ok(()));
    let dir = tempfile::tempdir()?;
    let log = dir.path().join("log");
    let mut root = spawn_workload("mp_pool.py", [WORKERS.to_string()], &log)?;
    let pid = root.id();
    wait_for_tick(&log, 10, WAIT)?;
    let tree = tree_pids(pid);
    ensure!(tree.len() > WORKERS, "the pool is {tree:?}");
    // The root last in the guard, so that it is killed first: a pool whose
    // workers die while it lives forks new ones, which would outlive the test.
    let mut descendants = PidsGuard::new(tree[1..].iter().copied());
    descendants.push(pid);

    let img1 = dir.path().join("img1");
    run_dump(agent(), pid, &img1, &["--leave-running"], &[])?.ok()?;
    let n = last_tick(&log).context("no tick")?;
    wait_for_tick(&log, n + 20, WAIT)?;

    let img2 = dir.path().join("img2");
    let run = run_dump(agent(), pid, &img2, &[], &[])?.ok()?;
    expect_killed_by_dump(
        &run,
        &mut root,
        &descendants,
        &img2,
        Duration::from_secs(10),
    )?;
    let at_kill = last_tick(&log).context("no tick")?;
    let run = run_restore(agent(), &img2, &[], &[])?;
    guard_restored(&run, &mut root);
    let run = run.ok()?;
    let mut restored = PidsGuard::new(tree[1..].iter().copied());
    restored.push(pid);
    ensure!(
        tree_pids(pid).len() == tree.len(),
        "restored {:?}, dumped {tree:?}\n{}",
        tree_pids(pid),
        run.describe()
    );
    wait_for_tick(&log, at_kill + 30, WAIT)?;
    let ticks = check_log(&log)?;
    let last = ticks.last().context("no tick")?;
    ensure!(last.num("workers") == Some(WORKERS as u64), "{last:?}");
    restored.kill_all();
    Ok(())
}
