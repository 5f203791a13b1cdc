//! Issue 13 on one node, with the real `ckpt-agent`: SIGTERM to a dump in its
//! store phase, a dump that fills its disk, and a dump of a PID that changed hands.
//! After each: the tree runs on untraced, no manifest, no temporary, no chunk of
//! the failed dump left in the store.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use ckpt_tests::process::{proc_state, spawn_at_pid, start_time, tracer_pids, tree_pids};
use ckpt_tests::workload::spawn_workload;
use ckpt_tests::{wait_for, wait_for_tick};

mod common;
use common::{agent, WAIT};

fn root() -> bool {
    // SAFETY: geteuid has no preconditions.
    let r = unsafe { libc::geteuid() } == 0;
    if !r {
        eprintln!("skipped: needs root (ptrace, mount)");
    }
    r
}

fn runs_free(pid: i32) -> bool {
    proc_state(pid).is_some_and(|s| !matches!(s, 't' | 'T' | 'Z' | 'X'))
        && tracer_pids(pid).iter().all(|&(_, t)| t == 0)
}

fn tree_runs_free(root: i32) {
    let ok = wait_for(
        || tree_pids(root).iter().all(|&p| runs_free(p)),
        Duration::from_secs(5),
    );
    assert!(ok, "the tree of {root} does not run free");
}

/// Every file under `dir`, recursively.
fn files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                todo.push(p);
            } else {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

/// What a failed dump may leave in a `file://` store: nothing but empty
/// directories (`chunks/`, `pending/`, `gc/`).
fn assert_store_empty(store: &Path, what: &str) {
    let left = files(store);
    assert!(left.is_empty(), "{what} left files in the store: {left:?}");
}

/// Kills what it mounted's file system off again, even when the test fails.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(dir).unwrap();
        let st = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "ckpt-test"])
            .arg(dir)
            .status()
            .unwrap();
        assert!(st.success(), "mount tmpfs on {}", dir.display());
        Tmpfs(dir.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

#[test]
fn sigterm_to_a_dump_in_its_store_phase_stops_it_at_once_and_leaves_nothing() {
    if !root() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("mem.log");
    let guard = spawn_workload("bench_mem", ["768"], &log).unwrap();
    let pid = guard.id();
    wait_for_tick(&log, 1, WAIT).unwrap();
    let store = dir.path().join("store");
    let dlog = dir.path().join("dump.log");
    let out = std::fs::File::create(&dlog).unwrap();
    // Kill mode: stored while frozen, the longest standstill a signal can cut.
    let mut dump = Command::new(agent())
        .args(["dump", "--pid", &pid.to_string(), "--image"])
        .arg(format!("file://{}/img", store.display()))
        .stdin(Stdio::null())
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .spawn()
        .unwrap();
    let chunks = store.join("chunks");
    let storing = wait_for(|| files(&chunks).len() >= 16, WAIT);
    assert!(storing, "the store phase never began");
    let t = Instant::now();
    // SAFETY: kill on our own child.
    assert_eq!(unsafe { libc::kill(dump.id() as i32, libc::SIGTERM) }, 0);
    let status = dump.wait().unwrap();
    let took = t.elapsed();
    eprintln!(
        "the dump ended {:.0} ms after SIGTERM",
        took.as_secs_f64() * 1e3
    );
    let text = std::fs::read_to_string(&dlog).unwrap();
    assert_eq!(status.code(), Some(128 + libc::SIGTERM), "{text}");
    assert_eq!(text.lines().count(), 1, "one line: {text}");
    assert!(
        text.contains("stopped by SIGTERM") && text.contains("runs on"),
        "{text}"
    );
    assert!(took < Duration::from_secs(2), "took {took:?} to stop");
    tree_runs_free(pid);
    wait_for_tick(&log, ckpt_tests::ticks::last_tick(&log).unwrap() + 3, WAIT).unwrap();
    assert!(!std::fs::read_to_string(&log).unwrap().contains("FAIL"));
    assert_store_empty(&store, "a dump stopped by SIGTERM");
    drop(guard);
}

#[test]
fn a_dump_that_fills_its_disk_says_so_and_leaves_the_tree_and_the_disk_as_they_were() {
    if !root() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("mem.log");
    let guard = spawn_workload("bench_mem", ["32"], &log).unwrap();
    let pid = guard.id();
    wait_for_tick(&log, 1, WAIT).unwrap();
    let store = dir.path().join("small");
    let _fs = Tmpfs::mount(&store, "8m");
    for leave_running in [false, true] {
        let mut args = vec![
            "dump".to_string(),
            "--pid".into(),
            pid.to_string(),
            "--image".into(),
            format!("file://{}/img", store.display()),
        ];
        if leave_running {
            args.push("--leave-running".into());
        }
        let out = Command::new(agent()).args(&args).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "a 32 MiB tree fit in 8 MiB?");
        assert!(
            err.contains("file system is full") && err.contains("images gc"),
            "the error says neither that the disk is full nor what to do: {err}"
        );
        tree_runs_free(pid);
        assert_store_empty(&store, "a dump that filled its disk");
    }
    wait_for_tick(&log, ckpt_tests::ticks::last_tick(&log).unwrap() + 3, WAIT).unwrap();
    assert!(!std::fs::read_to_string(&log).unwrap().contains("FAIL"));
    drop(guard);
}

#[test]
fn a_dump_of_a_pid_that_changed_hands_refuses_and_touches_nothing() {
    if !root() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("c.log");
    let mut first = spawn_workload("counter", ["10"], &log).unwrap();
    let pid = first.id();
    let start = start_time(pid).unwrap();
    wait_for_tick(&log, 2, WAIT).unwrap();
    first.kill();
    std::thread::sleep(Duration::from_millis(50));
    let slog = dir.path().join("s.log");
    let counter = ckpt_tests::workload::workload("counter").unwrap();
    let stranger = spawn_at_pid(pid, &counter, &["10"], &slog).unwrap();
    wait_for_tick(&slog, 2, WAIT).unwrap();
    let store = dir.path().join("store");
    let opts = ckpt_agent::dump::DumpOptions {
        pid,
        image: ckpt_shared::location::Location::parse(&format!("file://{}/x", store.display()))
            .unwrap(),
        leave_running: false,
        zstd_level: None,
        workers: 1,
        snapshot_limit: 0,
        parent: None,
        track: false,
        chunk_size: ckpt_agent::mem::CHUNK_MAX,
        store: Default::default(),
        leases: Default::default(),
        registry: Default::default(),
        hooks: Default::default(),
        rescue: None,
        hold: Default::default(),
        start_time: Some(start),
        cancel: Default::default(),
    };
    let err = ckpt_agent::dump::dump(&opts).unwrap_err();
    assert!(
        matches!(
            err,
            ckpt_agent::dump::DumpError::Freeze(
                ckpt_agent::freeze::FreezeError::NotTheProcess { .. }
            )
        ),
        "{err}"
    );
    let msg = err.to_string();
    assert!(
        msg.contains(&format!("PID {pid}")) && msg.contains("another process"),
        "{msg}"
    );
    assert!(runs_free(pid), "the stranger was touched");
    wait_for_tick(
        &slog,
        ckpt_tests::ticks::last_tick(&slog).unwrap() + 3,
        WAIT,
    )
    .unwrap();
    assert_store_empty(&store, "a refused dump");
    drop(stranger);
}
