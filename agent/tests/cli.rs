//! The command line as a user meets it: output into a pipe whose reader went
//! away, and error messages that say each thing once.

use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{ensure, Result};
use ckpt_tests::{require_root, run_agent, spawn_workload, wait_for_tick};

mod common;
use common::agent;

/// `ckpt-agent inspect --json | head -n 1`: the reader closes the pipe first. The
/// agent stops writing and exits 0 without a panic (it exited 101 on the broken
/// pipe before).
#[test]
fn output_into_a_closed_pipe_ends_quietly() -> Result<()> {
    require_root!(Ok(()));
    let dir = tempfile::tempdir()?;
    let log = dir.path().join("log");
    let w = spawn_workload("counter", &[] as &[&str], &log)?;
    wait_for_tick(&log, 2, Duration::from_secs(30))?;
    let image = dir.path().join("img");
    let pid = w.id().to_string();
    run_agent(
        agent(),
        &[
            "dump",
            "--pid",
            &pid,
            "--image",
            image.to_str().unwrap(),
            "--leave-running",
        ],
    )?
    .ok()?;
    for args in [
        vec!["inspect", "--json", "--image", image.to_str().unwrap()],
        vec!["inspect", "--image", image.to_str().unwrap()],
    ] {
        // A pipe whose read end is already closed: every write fails with EPIPE.
        let (read_end, write_end) = nix::unistd::pipe()?;
        drop(read_end);
        let out = Command::new(agent())
            .args(&args)
            .stdout(Stdio::from(write_end))
            .stderr(Stdio::piped())
            .output()?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        ensure!(
            out.status.success() && !stderr.contains("panicked"),
            "{args:?} into a closed pipe: {} {stderr}",
            out.status
        );
    }
    Ok(())
}

/// Errors print each cause once: a dump into a directory that cannot be created
/// names the reason one time, not once per layer of the chain.
#[test]
fn an_error_names_each_cause_once() -> Result<()> {
    require_root!(Ok(()));
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("plain-file");
    std::fs::write(&file, b"x")?;
    // An image "inside" a regular file.
    let image = file.join("img");
    let r = run_agent(
        agent(),
        &[
            "dump",
            "--pid",
            &std::process::id().to_string(),
            "--image",
            image.to_str().unwrap(),
            "--leave-running",
        ],
    )?;
    ensure!(!r.success(), "{}", r.describe());
    let line = r.error_line();
    ensure!(!line.is_empty(), "{}", r.describe());
    let reason = std::io::Error::from_raw_os_error(libc::ENOTDIR).to_string();
    ensure!(
        line.matches(reason.as_str()).count() == 1,
        "the cause is not printed exactly once: {line}"
    );
    Ok(())
}

/// Restoring from a place with no image says so once.
#[test]
fn a_missing_image_is_named_once() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let image = dir.path().join("nothing-here");
    let r = run_agent(agent(), &["restore", "--image", image.to_str().unwrap()])?;
    ensure!(!r.success(), "{}", r.describe());
    let line = r.error_line();
    ensure!(
        line.matches("does not exist").count() == 1,
        "{}",
        r.describe()
    );
    Ok(())
}
