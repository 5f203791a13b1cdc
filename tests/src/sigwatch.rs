//! The `sigwatch` workload as the tests that kill an agent mid-operation see it
//! (tests/workloads/sigwatch.c), and what can be seen of a dump from outside.

use std::path::Path;
use std::time::Duration;

use crate::process::{is_alive, proc_state, thread_ids, tracer_pids};
use crate::ticks::{log_tail, read_log_lines};
use crate::{ensure_untraced, wait_for, wait_for_tick};

/// What `PTRACE_SETSIGMASK` of all ones leaves: every signal but SIGKILL and
/// SIGSTOP. No workload blocks exactly this; the agent does while it injects.
pub const ALL_BLOCKED: &str = "fffffffffffbfeff";

/// The last tick's number and SIGUSR1 count of a `sigwatch` log.
pub fn last(log: &Path) -> (u64, u64) {
    read_log_lines(log)
        .unwrap_or_default()
        .iter()
        .rev()
        .find_map(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            match w.as_slice() {
                ["tick", n, _, "usr1", c] => Some((n.parse().ok()?, c.parse().ok()?)),
                _ => None,
            }
        })
        .unwrap_or((0, 0))
}

/// Some thread of `pid` is traced.
pub fn traced(pid: i32) -> bool {
    tracer_pids(pid).iter().any(|&(_, t)| t != 0)
}

/// Some thread of `pid` has every signal blocked: it is inside an injection.
pub fn injecting(pid: i32) -> bool {
    thread_ids(pid).iter().any(|tid| {
        std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/status"))
            .map(|s| {
                s.lines()
                    .any(|l| l.starts_with("SigBlk:") && l.ends_with(ALL_BLOCKED))
            })
            .unwrap_or(false)
    })
}

/// Where a dump of `pid` is, as seen from outside.
pub fn phase_of(pid: i32) -> &'static str {
    if !traced(pid) {
        "not frozen (before the freeze or after the thaw)"
    } else if injecting(pid) {
        "inside an injection"
    } else {
        "frozen"
    }
}

/// The `sigwatch` rank `pid` (logging to `log`, with `threads` threads) runs on as
/// if nothing had happened: untraced, not stopped, ticking, its own checks quiet,
/// and, given `usr1_before` (the count before one was sent), a SIGUSR1 delivered.
pub fn check_runs_on(
    pid: i32,
    log: &Path,
    threads: usize,
    usr1_before: Option<u64>,
    what: &str,
) -> anyhow::Result<()> {
    let dead = |why: &str| -> anyhow::Error {
        anyhow::anyhow!(
            "{what}: {why} (state {:?}); log:\n{}",
            proc_state(pid),
            log_tail(log, 5)
        )
    };
    let long = Duration::from_secs(20);
    if !is_alive(pid) {
        return Err(dead("the rank died"));
    }
    ensure_untraced(pid, long).map_err(|e| dead(&e.to_string()))?;
    if !wait_for(|| proc_state(pid).is_some_and(|s| s != 'T'), long) {
        return Err(dead("the rank was left stopped"));
    }
    let (n, _) = last(log);
    wait_for_tick(log, n + 5, Duration::from_secs(60)).map_err(|e| dead(&e.to_string()))?;
    if !usr1_before.is_none_or(|u| wait_for(|| last(log).1 > u, long)) {
        return Err(dead("the SIGUSR1 sent meanwhile was never delivered"));
    }
    if let Some(f) = read_log_lines(log)
        .unwrap_or_default()
        .into_iter()
        .find(|l| l.starts_with("FAIL"))
    {
        return Err(dead(&f));
    }
    let now = thread_ids(pid).len();
    anyhow::ensure!(
        now == threads,
        "{what}: the rank has {now} threads, not {threads}"
    );
    Ok(())
}
