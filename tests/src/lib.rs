//! The end-to-end test harness of ckpt.
//!
//! Today it holds what the engine tests of `ckpt-agent` need:
//!
//! - [`workload`](mod@workload): the workload programs in `tests/workloads/` (C, compiled on demand
//!   with gcc into a cache keyed by their source; and Python), and
//!   [`spawn_workload`], which starts one in a session of its own with its output
//!   going to a log file.
//! - [`process`]: [`ProcGuard`] and [`PidsGuard`], which SIGKILL (by PID, never by
//!   name) and reap the processes a test started even when the test panics, and
//!   small readers of `/proc` (state, parent, children, threads, tracer).
//! - [`ticks`]: the line protocol the workloads print (`tick <n> <chain> ...`) and
//!   the continuity checks on it: no gap, no repeat, every chain value right, no
//!   `FAIL` line.
//! - [`agent`]: running `ckpt-agent` with a timeout and reading its answers.
//! - [`s3`]: a real S3-compatible server process (s3s-fs) per test.
//! - [`stats`]: the median and min–max figures the benches print.
//!
//! Later it will also build the network-namespace test cluster and drive real
//! Slurm, as `../shared/DESIGN.md` ("Test environment") describes.
//!
//! # Why the test process becomes a child subreaper
//!
//! A dump that kills the tree leaves zombies: the children of the killed root are
//! reparented, and if nobody reaps them their PIDs stay taken and the restore that
//! follows fails with "PID taken". PID 1 of a container or a minimal VM does not
//! always reap (the one on the development machines does not). So before the first
//! workload or agent is spawned, the test process marks itself
//! `PR_SET_CHILD_SUBREAPER`: orphans of the trees we start, and the trees that
//! `ckpt-agent restore` leaves behind when it exits, become our children and the
//! guards reap them by PID. Nothing ever calls `waitpid(-1)`, so the
//! `std::process::Child` handles of other tests are not disturbed.
//!
//! # Privileges
//!
//! Checkpoint and restore need root (ptrace of any process, `clone3` with `set_tid`,
//! `PR_SET_MM`). Tests that need it start with [`require_root!`], which returns early
//! and says why when the capabilities are missing; on the development machines and
//! in CI the tests run as root, so they really run.

pub mod agent;
pub mod cluster;
pub mod data;
pub mod jobs;
pub mod munge;
pub mod process;
pub mod s3;
pub mod sigwatch;
pub mod stats;
pub mod ticks;
pub mod workload;

use std::time::{Duration, Instant};

pub use agent::{
    digits_tokens, expect_killed_by_dump, guard_restored, inspect_json, last_line_pid, run_agent,
    run_agent_env, run_dump, run_restore, AgentRun, AGENT_TIMEOUT,
};
pub use process::{
    children, ensure_untraced, is_alive, is_stopped, proc_ppid, proc_state, send_signal,
    thread_ids, tracer_pids, tree_pids, wait_gone, PidsGuard, ProcGuard,
};
pub use ticks::{check_continuity, check_log, last_tick, read_log_lines, Tick};
pub use workload::{mkfifo, spawn_workload, workload, write_fifo};

/// `p` as a `&str`, for a command line; fails naming the path when it is not
/// UTF-8.
pub fn path_str(p: &std::path::Path) -> anyhow::Result<&str> {
    use anyhow::Context;
    p.to_str()
        .with_context(|| format!("path {} is not UTF-8", p.display()))
}

/// Polls `cond` every 10 ms until it is true or `timeout` has passed; returns whether
/// it became true. The condition is evaluated one last time at the deadline.
pub fn wait_for(mut cond: impl FnMut() -> bool, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return cond();
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Waits until the workload writing `log` has printed tick number `n` or a later
/// one, and returns the last tick number seen. Fails early, with the log's tail, if
/// the log shows a `FAIL` line, and at `timeout`.
pub fn wait_for_tick(log: &std::path::Path, n: u64, timeout: Duration) -> anyhow::Result<u64> {
    let mut last = 0;
    let mut failed = false;
    let reached = wait_for(
        || {
            let lines = read_log_lines(log).unwrap_or_default();
            failed = lines.iter().any(|l| l.contains("FAIL"));
            last = ticks::last_tick_of(&lines).unwrap_or(0);
            failed || last >= n
        },
        timeout,
    );
    if reached && !failed {
        return Ok(last);
    }
    let why = if failed {
        "the workload reported a failure".to_string()
    } else {
        format!("no tick {n} within {timeout:?} (last tick {last})")
    };
    anyhow::bail!(
        "{why}; {} ends with:\n{}",
        log.display(),
        ticks::log_tail(log, 20)
    )
}

/// Why tests that checkpoint or restore must be skipped here, or `None` when this
/// process has what they need: effective root with `CAP_SYS_ADMIN` and
/// `CAP_SYS_PTRACE`, and a Yama ptrace scope below 3 (3 forbids ptrace outright).
pub fn root_skip_reason() -> Option<String> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    if euid != 0 {
        return Some(format!("needs root (effective UID is {euid})"));
    }
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let cap_eff = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .unwrap_or(0);
    for (bit, name) in [(21, "CAP_SYS_ADMIN"), (19, "CAP_SYS_PTRACE")] {
        if cap_eff & (1u64 << bit) == 0 {
            return Some(format!(
                "needs {name}, which this process lacks (CapEff {cap_eff:#x})"
            ));
        }
    }
    if let Ok(scope) = std::fs::read_to_string("/proc/sys/kernel/yama/ptrace_scope") {
        if scope.trim() == "3" {
            return Some("kernel.yama.ptrace_scope is 3: ptrace is disabled on this host".into());
        }
    }
    None
}

/// Returns early from a test, saying why on stderr, unless the process may checkpoint
/// and restore (see [`root_skip_reason`]). `require_root!()` returns `()`;
/// `require_root!(value)` returns `value` (for tests returning `Result`, pass
/// `Ok(())`).
#[macro_export]
macro_rules! require_root {
    () => {
        $crate::require_root!(())
    };
    ($ret:expr) => {
        if let Some(why) = $crate::root_skip_reason() {
            let test = ::std::thread::current()
                .name()
                .unwrap_or(module_path!())
                .to_string();
            eprintln!("SKIPPED {test}: {why}");
            return $ret;
        }
    };
}
