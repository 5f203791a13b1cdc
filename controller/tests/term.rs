//! Issue 13, points 3 and 4 on the test cluster: a rank is its process, not its
//! number (a PID taken over by another process is never touched), and SIGINT or
//! SIGTERM to `ckpt-agent dump`, `ckpt-agent serve` and `ckpt-controller serve`
//! end them cleanly: ranks running on, untraced, no `ckpt_` lock table, no
//! temporary file or manifest in the store, exit status 128 + the signal. And
//! `serve` at its start removes only the lock tables whose owner is gone.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use ckpt_tests::jobs::{wait_ticks, JobCluster};
use ckpt_tests::process::{is_alive, proc_state, spawn_at_pid, start_time, tracer_pids, tree_pids};
use ckpt_tests::wait_for;

#[path = "common/bin.rs"]
mod bin;
use bin::{bin, root};

/// Neither stopped nor traced.
fn running_free(pid: i32) -> bool {
    is_alive(pid)
        && proc_state(pid).is_some_and(|s| s != 't' && s != 'T')
        && tracer_pids(pid).iter().all(|&(_, t)| t == 0)
}

/// Every process of the tree under `root` runs on, untraced (after a moment for
/// a dying tracer to let go).
fn tree_runs_free(root: i32, within: Duration) {
    let ok = wait_for(|| tree_pids(root).iter().all(|&p| running_free(p)), within);
    let states: Vec<_> = tree_pids(root)
        .iter()
        .map(|&p| (p, proc_state(p), tracer_pids(p)))
        .collect();
    assert!(ok, "the tree of {root} does not run free: {states:?}");
}

/// The `ckpt_` tables of node `node`'s network namespace.
fn lock_tables(jc: &JobCluster, node: usize) -> Vec<String> {
    let ns = jc.cluster.nodes()[node].netns.clone();
    let out = jc
        .cluster
        .run_in(&ns, Command::new("nft").args(["list", "tables", "inet"]))
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.strip_prefix("table inet "))
        .filter(|t| t.starts_with("ckpt_"))
        .map(String::from)
        .collect()
}

/// Files under `dir` (recursively) whose name says they are temporaries.
fn temporaries(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                todo.push(p);
            } else if p
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.contains(".tmp") || n.contains('#'))
            {
                out.push(p);
            }
        }
    }
    out
}

/// The manifests under `store`: rank images (`images/NAME/manifest.ckpt`; an
/// image removed from a `file://` store may leave its empty directory) and job
/// checkpoints (`jobs/ID`).
fn manifests(store: &Path) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = std::fs::read_dir(store.join("jobs"))
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .collect();
    for e in std::fs::read_dir(store.join("images"))
        .into_iter()
        .flatten()
        .flatten()
    {
        let m = e.path().join("manifest.ckpt");
        if m.exists() {
            out.push(m);
        }
    }
    out
}

fn chunk_count(store: &Path) -> usize {
    std::fs::read_dir(store.join("chunks"))
        .into_iter()
        .flatten()
        .flatten()
        .map(|d| std::fs::read_dir(d.path()).into_iter().flatten().count())
        .sum()
}

/// Waits for our child `pid` to exit; returns its exit code (or 128 + the signal
/// that killed it).
fn wait_exit(pid: i32, timeout: Duration) -> i32 {
    let t = Instant::now();
    let mut status = 0;
    loop {
        // SAFETY: waitpid on one PID of our own children, into a local.
        let r = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
        if r == pid {
            break;
        }
        assert!(
            t.elapsed() < timeout,
            "{pid} did not exit within {timeout:?}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    if libc::WIFEXITED(status) {
        libc::WEXITSTATUS(status)
    } else {
        128 + libc::WTERMSIG(status)
    }
}

fn sigterm(pid: i32) {
    // SAFETY: kill on a PID this test started.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
}

#[test]
fn a_rank_whose_pid_was_taken_by_another_process_is_never_touched() {
    if !root() {
        return;
    }
    // The agent's watch of its ranks is off (test hook), so that the save, not the
    // watch, meets the stranger: the check that matters is the one before the
    // freeze.
    let jc = JobCluster::new(1, &bin(), 5.0, &[], &[("CKPT_TEST_PAUSE", "monitor")]).unwrap();
    let job = "reuse";
    let (pid, log) = jc.spawn_rank(0, job, 0, "counter", &["10"]).unwrap();
    wait_ticks(&log, 3, Duration::from_secs(10));
    // The rank exits and is reaped; a stranger takes its PID (a few clock ticks
    // later, so that its start time differs).
    // SAFETY: kill and waitpid on our own child.
    unsafe {
        assert_eq!(libc::kill(pid, libc::SIGKILL), 0);
        assert_eq!(libc::waitpid(pid, std::ptr::null_mut(), 0), pid);
    }
    std::thread::sleep(Duration::from_millis(50));
    let slog = jc.dir.path().join("stranger.log");
    let counter = ckpt_tests::workload::workload("counter").unwrap();
    let stranger = spawn_at_pid(pid, &counter, &["10"], &slog).unwrap();
    assert_eq!(stranger.id(), pid);
    let start = start_time(pid);
    wait_ticks(&slog, 3, Duration::from_secs(10));
    assert_eq!(
        jc.job_ranks(job).unwrap().len(),
        1,
        "the agent still lists the rank (its watch is paused)"
    );
    for args in [
        vec!["job", "save", job, "--wait"],
        vec!["job", "save", job, "--kill", "--wait"],
    ] {
        let out = jc.ctl(&args).unwrap();
        let err = String::from_utf8_lossy(&out.stderr).to_string();
        assert!(
            !out.status.success(),
            "{args:?} succeeded on a stranger: {err}"
        );
        assert!(
            err.contains(&format!("job {job}")) && err.contains(&format!("PID {pid}")),
            "the error names neither the job nor the PID: {err}"
        );
        assert!(err.contains("another process"), "{err}");
        // The stranger: never stopped, traced or killed.
        assert!(
            running_free(pid),
            "the stranger was touched: {:?}",
            proc_state(pid)
        );
        assert_eq!(start_time(pid), start, "the stranger was replaced");
    }
    let before = ckpt_tests::ticks::last_tick(&slog).unwrap();
    wait_ticks(&slog, before + 3, Duration::from_secs(10));
    assert!(manifests(&jc.dir.path().join("store")).is_empty());
    drop(stranger);
}

#[test]
fn serve_removes_only_dead_owners_locks_and_sigterm_stops_a_paused_dump_cleanly() {
    if !root() {
        return;
    }
    let mut jc = JobCluster::new(1, &bin(), 5.0, &[], &[]).unwrap();
    let ns = jc.cluster.nodes()[0].netns.clone();
    let (pid, log) = jc.spawn_rank(0, "pair", 0, "tcp_pair", &[]).unwrap();
    wait_ticks(&log, 5, Duration::from_secs(10));
    // A command-line dump (kill mode) held frozen with its lock in place.
    let store = jc.dir.path().join("cli-store");
    let dlog = jc.dir.path().join("dump.log");
    let out = std::fs::File::create(&dlog).unwrap();
    let mut dump = Command::new(&jc.agent_bin);
    dump.args(["dump", "--pid", &pid.to_string(), "--image"])
        .arg(format!("file://{}/img", store.display()))
        .env("CKPT_TEST_PAUSE", "after-files")
        .stdin(Stdio::null())
        .stdout(out.try_clone().unwrap())
        .stderr(out);
    let dump = jc.cluster.spawn_in(&ns, &mut dump).unwrap();
    let dump_pid = dump.id() as i32;
    drop(dump);
    let paused = wait_for(
        || std::fs::read_to_string(&dlog).is_ok_and(|s| s.contains("test pause at after-files")),
        Duration::from_secs(20),
    );
    assert!(
        paused,
        "the dump did not pause: {}",
        std::fs::read_to_string(&dlog).unwrap_or_default()
    );
    let held = lock_tables(&jc, 0);
    assert_eq!(held.len(), 1, "the paused dump holds one lock: {held:?}");
    // A table whose owner is gone: this test's PID, with another start time.
    let me = std::process::id() as i32;
    let dead = format!(
        "{{ comment \"ckpt owner {me} {}\"; }}",
        start_time(me).unwrap() + 1
    );
    let made = jc
        .cluster
        .run_in(
            &ns,
            Command::new("nft").args(["add", "table", "inet", "ckpt_dead", &dead]),
        )
        .unwrap();
    assert!(
        made.status.success(),
        "{}",
        String::from_utf8_lossy(&made.stderr)
    );
    // The node's daemon starts again beside the dump.
    jc.restart_agent(0, &[]).unwrap();
    assert!(
        jc.log("agent-0")
            .contains("removed the stale network lock ckpt_dead"),
        "{}",
        jc.log("agent-0")
    );
    assert_eq!(
        lock_tables(&jc, 0),
        held,
        "serve removed a live dump's lock"
    );
    // SIGTERM: the dump gives up, thaws the tree, lifts its lock, writes nothing.
    sigterm(dump_pid);
    let code = wait_exit(dump_pid, Duration::from_secs(10));
    let text = std::fs::read_to_string(&dlog).unwrap();
    assert_eq!(code, 128 + libc::SIGTERM, "{text}");
    let last = text.lines().last().unwrap_or("");
    assert!(
        last.contains("stopped by SIGTERM") && last.contains("runs on"),
        "{text}"
    );
    assert!(lock_tables(&jc, 0).is_empty(), "{:?}", lock_tables(&jc, 0));
    tree_runs_free(pid, Duration::from_secs(5));
    let before = ckpt_tests::ticks::last_tick(&log).unwrap();
    wait_ticks(&log, before + 5, Duration::from_secs(10));
    assert!(!std::fs::read_to_string(&log).unwrap().contains("FAIL"));
    assert!(manifests(&store).is_empty(), "{:?}", manifests(&store));
    assert!(temporaries(&store).is_empty(), "{:?}", temporaries(&store));
}

/// A job of a TCP pair (which holds a lock table) and a large rank whose store
/// takes a while, saved with --kill (stored while frozen); `stop(jc)` is sent
/// once the store phase is under way. Then everything must be as before.
fn stopped_mid_store(what: &str, stop: impl FnOnce(&mut JobCluster) -> (i32, String)) {
    let mut jc = JobCluster::new(1, &bin(), 30.0, &[], &[("CKPT_LOG", "info")]).unwrap();
    let job = "big";
    let (p0, log0) = jc.spawn_rank(0, job, 0, "tcp_pair", &[]).unwrap();
    let (p1, log1) = jc.spawn_rank(0, job, 1, "bench_mem", &["768"]).unwrap();
    wait_ticks(&log0, 5, Duration::from_secs(10));
    wait_ticks(&log1, 1, Duration::from_secs(60));
    let store = jc.dir.path().join("store");
    let chunks_before = chunk_count(&store);
    let save = jc
        .ctl_spawn(&["job", "save", job, "--kill", "--wait"])
        .unwrap();
    let storing = wait_for(
        || chunk_count(&store) >= chunks_before + 16,
        Duration::from_secs(60),
    );
    assert!(storing, "the store phase never began:\n{}", jc.logs());
    assert!(
        !lock_tables(&jc, 0).is_empty(),
        "the pair's lock is not in place"
    );
    let t = Instant::now();
    let (code, log) = stop(&mut jc);
    eprintln!(
        "{what}: stopped {:.0} ms after SIGTERM",
        t.elapsed().as_secs_f64() * 1e3
    );
    assert_eq!(code, 128 + libc::SIGTERM, "{log}");
    assert!(log.contains("stopped by SIGTERM"), "{log}");
    let out = save.wait_with_output().unwrap();
    assert!(!out.status.success(), "the save succeeded");
    for (p, _) in [(p0, &log0), (p1, &log1)] {
        // A rank in the middle of its store finishes the chunk in hand first; an
        // agent told ABORT by its controller finishes its store, then thaws: well
        // inside the 30 s lease either way.
        tree_runs_free(p, Duration::from_secs(20));
    }
    for log in [&log0, &log1] {
        let before = ckpt_tests::ticks::last_tick(log).unwrap();
        wait_ticks(log, before + 2, Duration::from_secs(10));
        assert!(!std::fs::read_to_string(log).unwrap().contains("FAIL"));
    }
    assert!(lock_tables(&jc, 0).is_empty(), "{:?}", lock_tables(&jc, 0));
    assert!(temporaries(&store).is_empty(), "{:?}", temporaries(&store));
    assert!(
        manifests(&store).is_empty(),
        "{:?}\n{}",
        manifests(&store),
        jc.logs()
    );
}

#[test]
fn sigterm_to_the_agent_during_a_save_thaws_the_job_and_leaves_nothing() {
    if !root() {
        return;
    }
    stopped_mid_store("ckpt-agent serve", |jc| {
        let agent = jc.agent_pid(0).unwrap();
        sigterm(agent);
        let code = wait_exit(agent, Duration::from_secs(30));
        (code, jc.log("agent-0"))
    });
}

#[test]
fn sigterm_to_the_controller_during_a_save_thaws_the_job_and_leaves_nothing() {
    if !root() {
        return;
    }
    // The agents' lease is 30 s: ranks running again well before it prove the
    // controller's ABORT, not the lease.
    stopped_mid_store("ckpt-controller serve", |jc| {
        let ctl = jc.controller_pid().unwrap();
        let t = Instant::now();
        sigterm(ctl);
        let code = wait_exit(ctl, Duration::from_secs(30));
        assert!(t.elapsed() < Duration::from_secs(15));
        (code, jc.log("controller"))
    });
}
