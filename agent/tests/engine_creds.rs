//! Credentials and process groups come back: a workload running as an unprivileged
//! user with supplementary groups, in a process group of its own inside its own
//! session, is dumped and restored by root, and afterwards runs with exactly the same
//! identity (real, effective, saved and filesystem IDs, and groups).

use std::fs::OpenOptions;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};

use anyhow::{ensure, Context, Result};
use ckpt_tests::{
    check_log, last_line_pid, process, require_root, run_agent, wait_for_tick, workload, ProcGuard,
};

mod common;
use common::WAIT;

fn status_line(pid: i32, key: &str) -> Option<String> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines().find_map(|l| {
        l.strip_prefix(&format!("{key}:"))
            .map(|v| v.split_whitespace().collect::<Vec<_>>().join(" "))
    })
}

fn stat_field(pid: i32, n: usize) -> Option<i64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &s[s.rfind(')')? + 2..];
    rest.split_whitespace().nth(n - 3)?.parse().ok()
}

#[test]
fn unprivileged_credentials_groups_and_session_survive_dump_and_restore() -> Result<()> {
    require_root!(Ok(()));
    let agent = common::agent();
    let dir = tempfile::tempdir()?;
    let log = dir.path().join("log");
    let image = dir.path().join("img");
    let out = OpenOptions::new().create(true).append(true).open(&log)?;
    let mut cmd = Command::new(workload("counter")?);
    cmd.arg("5")
        .current_dir("/")
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out);
    // SAFETY: only async-signal-safe system calls on plain integers run in the child.
    unsafe {
        cmd.pre_exec(|| {
            let groups: [libc::gid_t; 2] = [100, 65534];
            if libc::setsid() < 0
                || libc::setgroups(2, groups.as_ptr()) < 0
                || libc::setresgid(65534, 65534, 65534) < 0
                || libc::setresuid(65534, 65534, 65534) < 0
            {
                return Err(std::io::Error::last_os_error());
            }
            libc::syscall(
                libc::SYS_close_range,
                3u32,
                u32::MAX,
                4u32, /* CLOSE_RANGE_CLOEXEC */
            );
            Ok(())
        });
    }
    process::become_subreaper();
    let mut guard = ProcGuard::new(cmd.spawn().context("starting counter as nobody")?);
    let pid = guard.id();
    wait_for_tick(&log, 5, WAIT)?;
    let before = ["Uid", "Gid", "Groups"].map(|k| status_line(pid, k));
    ensure!(
        before[0].as_deref() == Some("65534 65534 65534 65534"),
        "setup: uid is {:?}",
        before[0]
    );
    let (pgid, sid) = (stat_field(pid, 5), stat_field(pid, 6));
    ensure!(
        sid == Some(pid as i64) && pgid == Some(pid as i64),
        "setup: not a session leader"
    );

    run_agent(
        agent,
        &[
            "dump",
            "--pid",
            &pid.to_string(),
            "--image",
            image.to_str().context("utf-8")?,
        ],
    )?
    .ok()?;
    guard.wait_exit(WAIT)?;
    let at_dump = ckpt_tests::last_tick(&log).unwrap_or(0);

    let run = run_agent(
        agent,
        &["restore", "--image", image.to_str().context("utf-8")?],
    )?
    .ok()?;
    let restored = last_line_pid(&run)?;
    guard.set_pid(restored);
    ensure!(restored == pid, "restored as PID {restored}, not {pid}");
    let after = ["Uid", "Gid", "Groups"].map(|k| status_line(restored, k));
    ensure!(
        before == after,
        "credentials changed across the restore: {before:?} -> {after:?}"
    );
    ensure!(
        stat_field(restored, 5) == pgid && stat_field(restored, 6) == sid,
        "process group or session changed: pgid {:?} sid {:?}",
        stat_field(restored, 5),
        stat_field(restored, 6)
    );
    wait_for_tick(&log, at_dump + 20, WAIT)?;
    guard.kill();
    check_log(&log)?;
    Ok(())
}
