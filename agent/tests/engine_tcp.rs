//! TCP through the engine: a process and its child joined by a loopback TCP
//! connection that always has data in flight both ways, plus the listening socket
//! it came from (`tests/workloads/tcp_pair.c`), inside a network namespace of the
//! test cluster. A dump that leaves it running, then a dump that kills it and a
//! restore: every record arrives once, in order, intact, across both. And UDP
//! sockets (a bound server, a connected client) with their options.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use ckpt_tests::cluster::Cluster;
use ckpt_tests::process::{children, PidsGuard};
use ckpt_tests::{check_log, require_root, wait_for_tick, workload};

mod common;
use common::WAIT;

fn agent_in(c: &Cluster, ns: &str, args: &[&str]) -> Result<std::process::Output> {
    c.run_in(ns, Command::new(common::agent()).args(args))
}

fn ok(out: &std::process::Output, what: &str) -> Result<String> {
    ensure!(
        out.status.success(),
        "{what} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[test]
fn a_tcp_connection_with_data_in_flight_survives_dump_and_restore() -> Result<()> {
    require_root!(Ok(()));
    let c = Cluster::new(1)?;
    let ns = c.nodes()[0].netns.clone();
    let dir = tempfile::tempdir()?;
    let log = dir.path().join("log");
    let mut cmd = workload::workload_command("tcp_pair", Vec::<&str>::new(), &log)?;
    let child = c.spawn_in(&ns, &mut cmd)?;
    let pid = child.id() as i32;
    let mut guard = PidsGuard::new([pid]);
    let n = wait_for_tick(&log, 20, WAIT)?;
    let kids = children(pid);
    ensure!(kids.len() == 1, "tcp_pair has children {kids:?}");
    guard.push(kids[0]);

    // Leave running: the pair carries on.
    let img1 = dir.path().join("img1");
    let out = agent_in(
        &c,
        &ns,
        &[
            "dump",
            "--pid",
            &pid.to_string(),
            "--image",
            img1.to_str().unwrap(),
            "--leave-running",
        ],
    )?;
    ok(&out, "dump --leave-running")?;
    wait_for_tick(&log, n + 50, WAIT)?;
    let shown = ok(
        &agent_in(&c, &ns, &["inspect", "--image", img1.to_str().unwrap()])?,
        "inspect",
    )?;
    ensure!(shown.contains("tcp listening on 127.0.0.1:"), "{shown}");
    ensure!(shown.matches("tcp 127.0.0.1:").count() == 2, "{shown}");
    // tcp_pair's sockets are not close-on-exec (the bit is read after the thaw).
    ensure!(
        shown
            .lines()
            .filter(|l| l.contains("tcp "))
            .all(|l| !l.contains("cloexec")),
        "{shown}"
    );

    // Kill, restore: the connection comes back with its queues.
    let img2 = dir.path().join("img2");
    let out = agent_in(
        &c,
        &ns,
        &[
            "dump",
            "--pid",
            &pid.to_string(),
            "--image",
            img2.to_str().unwrap(),
        ],
    )?;
    ok(&out, "dump")?;
    let at_kill = ckpt_tests::ticks::last_tick(&log).context("no tick")?;
    // Reap both (ours: the test launched the root, and the child is orphaned to us),
    // or their PIDs stay taken.
    ensure!(
        guard.wait_gone(Duration::from_secs(10)).is_empty(),
        "the pair survived the dump"
    );
    drop(child);
    let shown = ok(
        &agent_in(&c, &ns, &["inspect", "--image", img2.to_str().unwrap()])?,
        "inspect",
    )?;
    let queued: Vec<&str> = shown
        .lines()
        .filter(|l| l.contains("tcp 127.0.0.1:"))
        .collect();
    eprintln!("connections in the image:\n{}", queued.join("\n"));
    let out = agent_in(&c, &ns, &["restore", "--image", img2.to_str().unwrap()])?;
    let text = ok(&out, "restore")?;
    let root: i32 = text.lines().last().unwrap_or("").trim().parse()?;
    ensure!(root == pid, "restored as {root}, not {pid}");
    guard.rearm();
    wait_for_tick(&log, at_kill + 100, WAIT)?;
    check_log(&log)?;
    Ok(())
}

#[test]
fn a_listener_with_connections_not_yet_accepted_is_refused_and_left_running() -> Result<()> {
    require_root!(Ok(()));
    let c = Cluster::new(1)?;
    let ns = c.nodes()[0].netns.clone();
    let dir = tempfile::tempdir()?;
    let log = dir.path().join("log");
    let script = "import socket, sys, time\n\
                  l = socket.socket(); l.bind(('127.0.0.1', 0)); l.listen(4)\n\
                  c = socket.create_connection(l.getsockname())\n\
                  print('ready', flush=True)\n\
                  time.sleep(600)\n";
    let out = std::fs::File::create(&log)?;
    let mut cmd = Command::new("python3");
    cmd.args(["-c", script])
        .stdin(std::process::Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out);
    let child = c.spawn_in(&ns, &mut cmd)?;
    let pid = child.id() as i32;
    let _guard = PidsGuard::new([pid]);
    let t = std::time::Instant::now();
    while !std::fs::read_to_string(&log)?.contains("ready") {
        ensure!(t.elapsed() < WAIT, "the script did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    let img = dir.path().join("img");
    let out = agent_in(
        &c,
        &ns,
        &[
            "dump",
            "--pid",
            &pid.to_string(),
            "--image",
            img.to_str().unwrap(),
        ],
    )?;
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(!out.status.success(), "the dump succeeded");
    ensure!(err.contains("1 connection(s) not yet accepted"), "{err}");
    ensure!(
        ckpt_tests::process::is_alive(pid),
        "the process did not survive the refusal"
    );
    ensure!(
        !ckpt_tests::process::is_stopped(pid),
        "the process was left stopped"
    );
    let tables = c.run_in(&ns, Command::new("nft").args(["list", "tables"]))?;
    let tables = String::from_utf8_lossy(&tables.stdout);
    ensure!(
        !tables.contains("ckpt_"),
        "the network lock was left: {tables}"
    );
    Ok(())
}

/// The last "self N" the UDP workload printed.
fn last_self(log: &Path) -> u64 {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .rev()
        .find_map(|l| l.strip_prefix("self ")?.trim().parse().ok())
        .unwrap_or(0)
}

fn udp_ask(c: &Cluster, ns: &str, what: &str) -> Result<String> {
    let script = format!(
        "import socket\n\
         s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
         s.settimeout(2)\n\
         s.sendto(b'{what}', ('127.0.0.1', 7500))\n\
         print(s.recvfrom(2048)[0].decode())\n"
    );
    let out = c.run_in(ns, Command::new("python3").args(["-c", &script]))?;
    Ok(ok(&out, "the UDP client")?.trim().to_string())
}

#[test]
fn udp_sockets_come_back_bound_connected_and_with_their_options() -> Result<()> {
    require_root!(Ok(()));
    let c = Cluster::new(1)?;
    let ns = c.nodes()[0].netns.clone();
    let dir = tempfile::tempdir()?;
    let log = dir.path().join("log");
    let mut cmd = workload::workload_command("udp_echo.py", ["7500"], &log)?;
    let child = c.spawn_in(&ns, &mut cmd)?;
    let pid = child.id() as i32;
    let mut guard = PidsGuard::new([pid]);
    let t = std::time::Instant::now();
    while last_self(&log) < 3 {
        ensure!(t.elapsed() < WAIT, "udp_echo does not run");
        std::thread::sleep(Duration::from_millis(20));
    }
    let before = udp_ask(&c, &ns, "opts")?;
    ensure!(before.contains("reuseaddr=1"), "{before}");
    let img = dir.path().join("img");
    ok(
        &agent_in(
            &c,
            &ns,
            &[
                "dump",
                "--pid",
                &pid.to_string(),
                "--image",
                img.to_str().unwrap(),
            ],
        )?,
        "dump",
    )?;
    ensure!(
        guard.wait_gone(Duration::from_secs(10)).is_empty(),
        "udp_echo survived the dump"
    );
    drop(child);
    let shown = ok(
        &agent_in(&c, &ns, &["inspect", "--image", img.to_str().unwrap()])?,
        "inspect",
    )?;
    ensure!(shown.contains("udp 0.0.0.0:7500 reuseaddr"), "{shown}");
    // Python makes its sockets close-on-exec.
    ensure!(
        shown
            .lines()
            .filter(|l| l.contains("udp "))
            .all(|l| l.contains("cloexec")),
        "{shown}"
    );
    ensure!(shown.contains("connected to 127.0.0.1:7500"), "{shown}");
    let at_dump = last_self(&log);
    let out = agent_in(&c, &ns, &["restore", "--image", img.to_str().unwrap()])?;
    ok(&out, "restore")?;
    guard.rearm();
    // The connected socket still reaches the server, which still counts.
    let t = std::time::Instant::now();
    while last_self(&log) < at_dump + 5 {
        ensure!(t.elapsed() < WAIT, "no datagram after the restore");
        std::thread::sleep(Duration::from_millis(20));
    }
    ensure!(udp_ask(&c, &ns, "ping")? == "gnip");
    let after = udp_ask(&c, &ns, "opts")?;
    ensure!(
        after == before,
        "options before {before:?}, after {after:?}"
    );
    check_no_fail(&log)
}

fn check_no_fail(log: &Path) -> Result<()> {
    let text = std::fs::read_to_string(log)?;
    ensure!(!text.contains("FAIL"), "{text}");
    Ok(())
}

/// The options field of the last tick `sockopts` printed: what getsockopt read.
fn last_opts(log: &Path) -> Result<String> {
    let text = std::fs::read_to_string(log)?;
    let line = text
        .lines()
        .rev()
        .find(|l| l.starts_with("tick "))
        .context("no tick")?;
    Ok(line.splitn(4, ' ').nth(3).unwrap_or("").to_string())
}

#[test]
fn socket_options_and_a_v6only_listener_on_the_same_port_come_back() -> Result<()> {
    require_root!(Ok(()));
    let c = Cluster::new(1)?;
    let ns = c.nodes()[0].netns.clone();
    let dir = tempfile::tempdir()?;
    let log = dir.path().join("log");
    let mut cmd = workload::workload_command("sockopts", Vec::<&str>::new(), &log)?;
    let child = c.spawn_in(&ns, &mut cmd)?;
    let pid = child.id() as i32;
    let mut guard = PidsGuard::new([pid]);
    wait_for_tick(&log, 10, WAIT)?;
    let before = last_opts(&log)?;
    for want in [
        "l4:reuseaddr=1,keepalive=1,keepidle=77,rcvbuf=200000",
        "l6:v6only=1,reuseaddr=1,nodelay=1",
        "c:nodelay=1,keepalive=1,keepidle=33,keepintvl=7,keepcnt=4,linger=1/5",
        "a:keepalive=1",
        "u6:v6only=1",
    ] {
        ensure!(before.contains(want), "{want} not in {before}");
    }
    let img = dir.path().join("img");
    let img_s = img.to_str().unwrap();
    let pid_s = pid.to_string();
    // A dump that leaves it running changes nothing it reads.
    let img0 = dir.path().join("img0");
    let dump0 = ["dump", "--pid", &pid_s, "--image", img0.to_str().unwrap()];
    ok(
        &agent_in(&c, &ns, &[&dump0[..], &["--leave-running"]].concat())?,
        "dump",
    )?;
    let n = ckpt_tests::ticks::last_tick(&log).context("no tick")?;
    wait_for_tick(&log, n + 5, WAIT)?;
    ok(
        &agent_in(&c, &ns, &["dump", "--pid", &pid_s, "--image", img_s])?,
        "dump",
    )?;
    let at_kill = ckpt_tests::ticks::last_tick(&log).context("no tick")?;
    ensure!(
        guard.wait_gone(Duration::from_secs(10)).is_empty(),
        "sockopts survived the dump"
    );
    drop(child);
    let shown = ok(
        &agent_in(&c, &ns, &["inspect", "--image", img_s])?,
        "inspect",
    )?;
    eprintln!("{shown}");
    for want in [
        "(backlog 8) [v6only, reuseaddr, nodelay]",
        "(backlog 8) [reuseaddr, keepalive, keepidle 77, rcvbuf 200000]",
        "[keepalive, nodelay, linger 5, keepidle 33, keepintvl 7, keepcnt 4]",
        " v6only (buffers",
    ] {
        ensure!(shown.contains(want), "{want} not in {shown}");
    }
    ok(
        &agent_in(&c, &ns, &["restore", "--image", img_s])?,
        "restore",
    )?;
    guard.rearm();
    wait_for_tick(&log, at_kill + 10, WAIT)?;
    let after = last_opts(&log)?;
    ensure!(
        after == before,
        "options before {before:?}, after {after:?}"
    );
    check_log(&log)?;
    check_no_fail(&log)
}
