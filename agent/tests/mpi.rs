//! Open MPI through the engine: Debian's `openmpi-bin` with its default settings
//! (no MCA parameter), 4 ranks of `tests/workloads/mpi_allreduce.c` on one node,
//! inside a network namespace of the test cluster. `mpirun` and its ranks are one
//! tree: dumped while running, dumped again and killed, restored, and the job
//! finishes with the right result (every round's sum checked by every rank, the
//! ranks' chains equal, the tick chain unbroken, the final chain the one an
//! uninterrupted run prints).
//!
//! What an Open MPI process holds here (see ../shared/TESTBED.md): a deleted
//! `/dev/shm/open_mpi.0000`, pty pairs (mpirun's output forwarding: each rank's
//! stdout is a `/dev/pts/N` whose master mpirun reads), eventfds, epolls, pipes,
//! TCP connections to mpirun (PMIx and ORTE's out-of-band channel), the TCP
//! BTL's IPv4 and `IPV6_V6ONLY` IPv6 listeners on one port, and the shared
//! `/dev/shm/vader_segment.*` mappings of the shared-memory transport.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use ckpt_tests::cluster::Cluster;
use ckpt_tests::process::{tree_pids, PidsGuard};
use ckpt_tests::ticks::{chain, last_tick, log_tail, read_log_lines};
use ckpt_tests::{check_log, require_root, wait_for, wait_for_tick, workload};

mod common;
use common::WAIT;

const RANKS: usize = 4;
/// Rounds of the job, and the milliseconds rank 0 sleeps after each.
const ROUNDS: u64 = 400;
const MS: u64 = 20;

fn agent_in(c: &Cluster, ns: &str, args: &[&str]) -> Result<String> {
    let out = c.run_in(ns, Command::new(common::agent()).args(args))?;
    ensure!(
        out.status.success(),
        "ckpt-agent {} failed: {}{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The `done ROUNDS CHAIN` line of rank 0, once the job has printed it.
fn done_line(log: &Path) -> Option<String> {
    read_log_lines(log)
        .ok()?
        .into_iter()
        .find(|l| l.starts_with("done "))
}

#[test]
fn an_open_mpi_job_of_4_ranks_is_dumped_killed_restored_and_finishes_right() -> Result<()> {
    require_root!(Ok(()));
    let c = Cluster::new(1)?;
    let ns = c.nodes()[0].netns.clone();
    let dir = tempfile::tempdir()?;
    let log = dir.path().join("log");
    let program = workload::workload("mpi_allreduce")?;
    let (rounds, ms) = (ROUNDS.to_string(), MS.to_string());
    let ranks = RANKS.to_string();
    let args = [
        "--allow-run-as-root",
        "--oversubscribe",
        "-n",
        &ranks,
        ckpt_tests::path_str(&program)?,
        &rounds,
        &ms,
    ];
    let mut cmd = workload::program_command("mpirun", args, &log)?;
    cmd.env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1");
    let child = c
        .spawn_in(&ns, &mut cmd)
        .context("starting mpirun (openmpi-bin installed?)")?;
    let pid = child.id() as i32;
    let mut guard = PidsGuard::new([pid]);
    wait_for_tick(&log, 20, WAIT)?;
    let tree = tree_pids(pid);
    ensure!(tree.len() > RANKS, "mpirun's tree is {tree:?}");
    for p in &tree[1..] {
        guard.push(*p);
    }

    // Leave running: the job goes on.
    let img1 = dir.path().join("img1");
    let pid_s = pid.to_string();
    agent_in(
        &c,
        &ns,
        &[
            "dump",
            "--pid",
            &pid_s,
            "--image",
            ckpt_tests::path_str(&img1)?,
            "--leave-running",
        ],
    )?;
    let n = last_tick(&log).context("no tick")?;
    wait_for_tick(&log, n + 20, WAIT).with_context(|| log_tail(&log, 10))?;

    // Kill, restore: the job finishes.
    let img2 = dir.path().join("img2");
    agent_in(
        &c,
        &ns,
        &[
            "dump",
            "--pid",
            &pid_s,
            "--image",
            ckpt_tests::path_str(&img2)?,
        ],
    )?;
    let at_kill = last_tick(&log).context("no tick")?;
    ensure!(
        at_kill < ROUNDS,
        "the job finished before the dump killed it"
    );
    ensure!(
        guard.wait_gone(Duration::from_secs(10)).is_empty(),
        "the job survived the dump"
    );
    drop(child);
    let shown = agent_in(
        &c,
        &ns,
        &["inspect", "--image", ckpt_tests::path_str(&img2)?],
    )?;
    eprintln!("{shown}");
    let text = agent_in(
        &c,
        &ns,
        &["restore", "--image", ckpt_tests::path_str(&img2)?],
    )?;
    let root: i32 = text.lines().last().unwrap_or("").trim().parse()?;
    ensure!(root == pid, "restored as {root}, not {pid}");
    guard.rearm();
    ensure!(
        wait_for(|| done_line(&log).is_some(), WAIT * 2),
        "the restored job did not finish:\n{}",
        log_tail(&log, 10)
    );
    let ticks = check_log(&log)?;
    ensure!(ticks.len() as u64 == ROUNDS, "{} ticks", ticks.len());
    let done = done_line(&log).unwrap_or_default();
    ensure!(
        done == format!("done {ROUNDS} {:016x}", chain(ROUNDS)),
        "the job ended with {done:?}"
    );
    ensure!(
        ticks.iter().all(|t| t.num("ranks") == Some(RANKS as u64)),
        "a tick from a job of another size"
    );
    ensure!(
        guard.wait_gone(WAIT).is_empty(),
        "the restored job did not exit after its last round"
    );
    Ok(())
}
