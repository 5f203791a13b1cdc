//! UNIX sockets through the engine: an epoll echo server and its client over a
//! named stream socket with data queued both ways (`tests/workloads/unix_echo.c`),
//! dumped leaving it running, then dumped, killed and restored, the echo checked
//! byte for byte by the programs themselves across both; datagram and seqpacket
//! socketpairs with messages queued both ways (`unix_msgs.c`), their boundaries
//! and `SO_PASSCRED` kept; and descriptors in flight (`SCM_RIGHTS`) refused with
//! the tree left running.
//!
//! Each workload checks every byte or message it reads and prints FAIL on the first
//! wrong one; the test checks the ticks (no gap, no repeat, chain values right)
//! and that no FAIL was printed. Every process started or restored is killed by PID
//! when the test ends, even when it fails.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use ckpt_tests::process::is_stopped;
use ckpt_tests::ticks::{check_log, last_tick};
use ckpt_tests::workload::program_command;
use ckpt_tests::{
    expect_killed_by_dump, guard_restored, is_alive, last_line_pid, require_root, run_agent,
    run_dump, run_restore, spawn_workload, tree_pids, wait_for, wait_for_tick, PidsGuard,
    ProcGuard,
};
use tempfile::TempDir;

mod common;
use common::{agent, WAIT};

/// A workload tree. Field order is drop order: descendants, root, directory.
struct Tree {
    descendants: PidsGuard,
    root: ProcGuard,
    dir: TempDir,
    log: PathBuf,
    pid: i32,
}

impl Tree {
    fn start(name: &str, args: &[&str], procs: usize) -> Result<Tree> {
        let dir = tempfile::Builder::new()
            .prefix(&format!("ckpt-unix-{name}-"))
            .tempdir()?;
        let log = dir.path().join("log");
        let args: Vec<String> = args
            .iter()
            .map(|a| a.replace("{dir}", dir.path().to_str().unwrap()))
            .collect();
        let root = spawn_workload(name, &args, &log)?;
        let pid = root.id();
        let mut t = Tree {
            descendants: PidsGuard::default(),
            root,
            dir,
            log,
            pid,
        };
        wait_for_tick(&t.log, 5, WAIT)?;
        ensure!(
            wait_for(|| tree_pids(pid).len() == procs, WAIT),
            "{name} should have {procs} processes: {:?}",
            tree_pids(pid)
        );
        t.descendants = PidsGuard::new(tree_pids(pid).into_iter().skip(1));
        Ok(t)
    }

    fn image(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn advance(&self, more: u64) -> Result<u64> {
        wait_for_tick(&self.log, last_tick(&self.log).unwrap_or(0) + more, WAIT)
    }

    fn inspect(&self, image: &Path) -> Result<String> {
        Ok(
            run_agent(agent(), &["inspect", "--image", image.to_str().unwrap()])?
                .ok()?
                .stdout,
        )
    }

    /// Dump --leave-running (it ticks on), then dump, kill, restore (it ticks on
    /// from where it was): `inspect` of the second image is returned.
    fn leave_running_then_kill_and_restore(&mut self) -> Result<String> {
        let img1 = self.image("img1");
        run_dump(agent(), self.pid, &img1, &["--leave-running"], &[])?.ok()?;
        self.advance(20)?;
        let img2 = self.image("img2");
        let run = run_dump(agent(), self.pid, &img2, &[], &[])?.ok()?;
        expect_killed_by_dump(&run, &mut self.root, &self.descendants, &img2, WAIT)?;
        let shown = self.inspect(&img2)?;
        eprintln!("{shown}");
        let at_kill = last_tick(&self.log).context("no tick")?;
        let run = run_restore(agent(), &img2, &[], &[])?;
        guard_restored(&run, &mut self.root);
        self.descendants.rearm();
        let run = run.ok()?;
        ensure!(last_line_pid(&run)? == self.pid, "restored at another PID");
        wait_for_tick(&self.log, at_kill + 40, WAIT)?;
        Ok(shown)
    }

    /// Checks the log, then kills the tree (a side whose peer is killed first
    /// would print FAIL for the broken connection).
    fn finish(mut self) -> Result<()> {
        let checked = check_log(&self.log).map(|_| ());
        let text = std::fs::read_to_string(&self.log)?;
        self.descendants.kill_all();
        self.root.kill();
        checked?;
        ensure!(!text.contains("FAIL"), "{text}");
        Ok(())
    }
}

#[test]
fn an_epoll_echo_over_a_named_unix_socket_with_data_queued_both_ways_carries_on() -> Result<()> {
    require_root!(Ok(()));
    let mut t = Tree::start("unix_echo", &["{dir}/echo.sock"], 2)?;
    let shown = t.leave_running_then_kill_and_restore()?;
    ensure!(shown.contains("listening (backlog 4)"), "{shown}");
    ensure!(shown.contains("/echo.sock"), "{shown}");
    ensure!(
        shown.matches("unix stream").count() == 3,
        "a listener and two connected ends: {shown}"
    );
    // Data was queued both ways at the cut (the sides pause their reading).
    let q = queued(&t.image("img2"), "queued_bytes")?;
    ensure!(q.len() == 2, "two connected ends: {q:?}");
    ensure!(q.iter().all(|&n| n > 0), "bytes queued both ways: {q:?}");
    t.finish()
}

/// `field` of each connected UNIX socket of the image, by descriptor.
fn queued(image: &Path, field: &str) -> Result<Vec<u64>> {
    let v = ckpt_tests::inspect_json(agent(), image)?;
    let mut out = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for p in v["processes"].as_array().context("processes")? {
        for f in p["fds"].as_array().context("fds")? {
            if f["kind"] == "unix" && !f["peer"].is_null() && seen.insert(f["file"].clone()) {
                out.push(f[field].as_u64().context("a count")?);
            }
        }
    }
    Ok(out)
}

fn messages(kind: &str) -> Result<()> {
    let mut t = Tree::start("unix_msgs", &[kind], 2)?;
    let shown = t.leave_running_then_kill_and_restore()?;
    ensure!(
        shown.matches(&format!("unix {kind}")).count() == 2,
        "{shown}"
    );
    ensure!(shown.contains("passcred"), "{shown}");
    let q = queued(&t.image("img2"), "queued_messages")?;
    ensure!(
        q.len() == 2 && q.iter().all(|&n| n > 0),
        "messages queued both ways: {q:?} in {shown}"
    );
    t.finish()
}

#[test]
fn a_dgram_socketpair_keeps_its_queued_messages_and_their_boundaries() -> Result<()> {
    require_root!(Ok(()));
    messages("dgram")
}

#[test]
fn a_seqpacket_socketpair_keeps_its_queued_messages_and_their_boundaries() -> Result<()> {
    require_root!(Ok(()));
    messages("seqpacket")
}

#[test]
fn descriptors_in_flight_are_refused_naming_the_process_and_the_tree_runs_on() -> Result<()> {
    require_root!(Ok(()));
    let dir = tempfile::tempdir()?;
    let log = dir.path().join("log");
    let script = "import socket, time\n\
                  a, b = socket.socketpair()\n\
                  f = open('/dev/null')\n\
                  socket.send_fds(a, [b'x'], [f.fileno()])\n\
                  print('ready', flush=True)\n\
                  n = 0\n\
                  while True:\n    n += 1\n    print('alive', n, flush=True)\n    time.sleep(0.05)\n";
    let child = program_command("python3", ["-c", script], &log)?.spawn()?;
    let pid = child.id() as i32;
    let _guard = ProcGuard::new(child);
    ensure!(
        wait_for(
            || std::fs::read_to_string(&log).is_ok_and(|t| t.contains("ready")),
            WAIT
        ),
        "the script did not start"
    );
    let img = dir.path().join("img");
    let run = run_dump(agent(), pid, &img, &[], &[])?;
    ensure!(!run.success(), "the dump succeeded: {}", run.stdout);
    ensure!(
        run.stderr.contains("SCM_RIGHTS") && run.stderr.contains(&format!("of PID {pid}")),
        "{}",
        run.stderr
    );
    ensure!(is_alive(pid), "the process did not survive the refusal");
    ensure!(!is_stopped(pid), "the process was left stopped");
    let alive = |t: &str| t.matches("alive").count();
    let before = alive(&std::fs::read_to_string(&log)?);
    ensure!(
        wait_for(
            || alive(&std::fs::read_to_string(&log).unwrap_or_default()) > before + 3,
            Duration::from_secs(10)
        ),
        "the process does not run on"
    );
    Ok(())
}

#[test]
fn named_and_abstract_datagram_sockets_are_bound_again_and_keep_their_queue() -> Result<()> {
    require_root!(Ok(()));
    let dir = tempfile::tempdir()?;
    let d = dir.path().to_str().unwrap().to_string();
    let log = dir.path().join("log");
    let script = format!(
        "import os, socket, time\n\
         srv = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM); srv.bind('{d}/srv.sock')\n\
         cli = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)\n\
         cli.bind('\\0ckpt-test-{{}}'.format(os.getpid())); cli.connect('{d}/srv.sock')\n\
         for m in (b'm1', b'm22', b'm333'): srv.sendto(m, cli.getsockname())\n\
         print('ready', flush=True)\n\
         while not os.path.exists('{d}/go'): time.sleep(0.02)\n\
         print('got', *[cli.recv(100).decode() for _ in range(3)], flush=True)\n\
         cli.send(b'ping'); m, a = srv.recvfrom(100)\n\
         srv.sendto(b'pong', a); print('reply', cli.recv(100).decode(), flush=True)\n\
         time.sleep(600)\n"
    );
    let child = program_command("python3", ["-c", &script], &log)?.spawn()?;
    let pid = child.id() as i32;
    let mut root = ProcGuard::new(child);
    let text = || std::fs::read_to_string(&log).unwrap_or_default();
    ensure!(wait_for(|| text().contains("ready"), WAIT), "{}", text());
    let img = dir.path().join("img");
    let run = run_dump(agent(), pid, &img, &[], &[])?.ok()?;
    expect_killed_by_dump(&run, &mut root, &PidsGuard::default(), &img, WAIT)?;
    let shown = run_agent(agent(), &["inspect", "--image", img.to_str().unwrap()])?
        .ok()?
        .stdout;
    ensure!(shown.contains(&format!("at {d}/srv.sock")), "{shown}");
    ensure!(shown.contains("at @ckpt-test-"), "{shown}");
    ensure!(shown.contains("3 message(s) (9 bytes) queued"), "{shown}");
    // The killed process left its socket file: the restore replaces it.
    ensure!(Path::new(&format!("{d}/srv.sock")).exists());
    let run = run_restore(agent(), &img, &[], &[])?;
    guard_restored(&run, &mut root);
    run.ok()?;
    std::fs::write(format!("{d}/go"), b"")?;
    ensure!(
        wait_for(|| text().contains("reply pong"), WAIT),
        "{}",
        text()
    );
    ensure!(text().contains("got m1 m22 m333"), "{}", text());
    Ok(())
}

#[test]
fn a_unix_socket_connected_outside_the_tree_is_refused_and_the_tree_runs_on() -> Result<()> {
    require_root!(Ok(()));
    let dir = tempfile::tempdir()?;
    let at = dir.path().join("outside.sock");
    // The other end is held by this test, outside the dumped tree.
    let listener = std::os::unix::net::UnixListener::bind(&at)?;
    let log = dir.path().join("log");
    let script = format!(
        "import socket, time\n\
         s = socket.socket(socket.AF_UNIX); s.connect('{}')\n\
         print('ready', flush=True)\n\
         time.sleep(600)\n",
        at.display()
    );
    let child = program_command("python3", ["-c", &script], &log)?.spawn()?;
    let pid = child.id() as i32;
    let _guard = ProcGuard::new(child);
    let (_outside_end, _) = listener.accept()?;
    let text = || std::fs::read_to_string(&log).unwrap_or_default();
    ensure!(wait_for(|| text().contains("ready"), WAIT), "{}", text());
    let run = run_dump(agent(), pid, &dir.path().join("img"), &[], &[])?;
    ensure!(!run.success(), "the dump succeeded: {}", run.stdout);
    ensure!(
        run.stderr.contains(&format!("of PID {pid}"))
            && run.stderr.contains("which no process of the tree holds"),
        "{}",
        run.stderr
    );
    ensure!(
        is_alive(pid) && !is_stopped(pid),
        "the process does not run on"
    );
    Ok(())
}

#[test]
fn a_unix_socket_shut_down_is_refused_and_the_tree_runs_on() -> Result<()> {
    require_root!(Ok(()));
    let dir = tempfile::tempdir()?;
    let log = dir.path().join("log");
    let script = "import socket, time\n\
                  a, b = socket.socketpair(); a.shutdown(socket.SHUT_WR)\n\
                  print('ready', flush=True)\n\
                  time.sleep(600)\n";
    let child = program_command("python3", ["-c", script], &log)?.spawn()?;
    let pid = child.id() as i32;
    let _guard = ProcGuard::new(child);
    let text = || std::fs::read_to_string(&log).unwrap_or_default();
    ensure!(wait_for(|| text().contains("ready"), WAIT), "{}", text());
    let run = run_dump(agent(), pid, &dir.path().join("img"), &[], &[])?;
    ensure!(!run.success(), "the dump succeeded: {}", run.stdout);
    ensure!(
        run.stderr.contains("a shutdown is not saved"),
        "{}",
        run.stderr
    );
    ensure!(
        is_alive(pid) && !is_stopped(pid),
        "the process does not run on"
    );
    Ok(())
}
