//! A consistent TCP cut on the test cluster (issue 5): jobs whose ranks stream to
//! each other over TCP (`tests/workloads/tcp_mesh.c`: every rank to every other
//! rank, checksummed and sequence-numbered records, full queues) are saved while
//! they run, killed, and restored on other nodes with other addresses, loopback
//! connections split onto two nodes and merged back onto one; every stream must go
//! on byte for byte (the workload checks every record and prints FAIL otherwise).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use ckpt_tests::jobs::{reap_killed, wait_for_text, wait_job_gone, wait_ticks, JobCluster};
use ckpt_tests::ticks::{check_log, last_tick};

#[path = "common/bin.rs"]
mod bin;
use bin::{bin, root};

const PORT: &str = "7200";
const WAIT: Duration = Duration::from_secs(30);

/// Starts a tcp_mesh job: rank `r` on node `on[r]`, reaching the others at
/// `hosts`. Returns the PIDs and logs once every rank has ticked a few times.
fn start_mesh(
    jc: &JobCluster,
    job: &str,
    on: &[usize],
    hosts: &[String],
) -> (Vec<i32>, Vec<PathBuf>) {
    let mut pids = Vec::new();
    let mut logs = Vec::new();
    for (r, &node) in on.iter().enumerate() {
        let mut args = vec![r.to_string(), PORT.to_string()];
        args.extend(hosts.iter().cloned());
        let args: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
        let (pid, log) = jc
            .spawn_rank(node, job, r as u32, "tcp_mesh", &args)
            .unwrap();
        pids.push(pid);
        logs.push(log);
    }
    for log in &logs {
        wait_ticks(log, 5, WAIT);
    }
    (pids, logs)
}

/// Every rank ticks `more` times beyond where it is, and its log is whole.
fn all_advance(logs: &[PathBuf], more: u64) {
    for log in logs {
        let n = last_tick(log).unwrap_or(0);
        wait_ticks(log, n + more, WAIT);
        check_log(log).unwrap_or_else(|e| panic!("{}: {e:#}", log.display()));
    }
}

/// `save --kill`, reaps the ranks, and returns each one's last tick.
fn kill_save(jc: &JobCluster, job: &str, pids: &[i32], logs: &[PathBuf]) -> Vec<u64> {
    let out = jc
        .ctl_ok(&["job", "save", job, "--kill", "--wait"])
        .unwrap();
    assert!(out.contains("saved"), "{out}");
    for &pid in pids {
        reap_killed(pid);
    }
    wait_job_gone(jc, job);
    logs.iter().map(|l| last_tick(l).unwrap()).collect()
}

/// `save --kill` of ranks that a restore made (the agents' children, which they
/// reap), and each one's last tick.
fn kill_save_restored(jc: &JobCluster, job: &str, pids: &[i32], logs: &[PathBuf]) -> Vec<u64> {
    let out = jc
        .ctl_ok(&["job", "save", job, "--kill", "--wait"])
        .unwrap();
    assert!(out.contains("saved"), "{out}");
    let t = Instant::now();
    while pids.iter().any(|&p| ckpt_tests::process::is_alive(p)) {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "ranks survived --kill"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    wait_job_gone(jc, job);
    logs.iter().map(|l| last_tick(l).unwrap()).collect()
}

/// After a restore: every rank ticks well past where it was killed (`at_kill`),
/// and then on, with its log whole.
fn goes_on(logs: &[PathBuf], at_kill: &[u64]) {
    for (log, k) in logs.iter().zip(at_kill) {
        wait_ticks(log, k + 20, WAIT);
    }
    all_advance(logs, 10);
}

/// The bytes queued in the job's latest checkpoint, summed over its connections,
/// as `ckpt show --json` reports them.
fn queued_bytes(jc: &JobCluster, job: &str) -> u64 {
    let id = jc.ckpts(job).unwrap().last().cloned().unwrap();
    let out = jc.ctl_ok(&["ckpt", "show", &id, "--json"]).unwrap();
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let mut sum = 0;
    for r in v["ranks"].as_array().unwrap() {
        for c in r["tcp"].as_array().unwrap() {
            sum += c["send_queued"].as_u64().unwrap() + c["recv_queued"].as_u64().unwrap();
        }
    }
    sum
}

#[test]
fn four_ranks_streaming_to_each_other_survive_saves_and_a_restore_on_other_nodes() {
    if !root() {
        return;
    }
    let jc = JobCluster::new(4, &bin(), 5.0, &[], &[]).unwrap();
    let job = "mesh";
    let addr = |i: usize| jc.cluster.nodes()[i].addr.to_string();
    // Ranks 0, 1 on n0 and 2, 3 on n1: connections within a node and across.
    let on = [0, 0, 1, 1];
    let hosts: Vec<String> = on.iter().map(|&n| addr(n)).collect();
    let (pids, logs) = start_mesh(&jc, job, &on, &hosts);
    // Saves at moments the test does not choose, the job running on after each.
    let mut rng = 0x2545f4914f6cdd1du64 ^ std::process::id() as u64;
    for _ in 0..3 {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        std::thread::sleep(Duration::from_millis(20 + rng % 300));
        let out = jc.ctl_ok(&["job", "save", job, "--wait"]).unwrap();
        assert!(out.contains("saved"), "{out}");
        all_advance(&logs, 10);
    }
    let at_kill = kill_save(&jc, job, &pids, &logs);
    let queued = queued_bytes(&jc, job);
    eprintln!("bytes queued in the killed job's connections: {queued}");
    assert!(
        queued > 64 * 1024,
        "the queues held only {queued} bytes: the test does not test in-flight data"
    );
    let now = jc.restore_latest(job, &["--nodes", "n2,n3"]);
    let nodes: Vec<&str> = now.iter().map(|(_, n, _)| n.as_str()).collect();
    assert_eq!(nodes, ["n2", "n2", "n3", "n3"]);
    goes_on(&logs, &at_kill);
    // And once more from there: saved on n2, n3 and restored on n0, n1.
    let pids: Vec<i32> = now.iter().map(|(_, _, p)| *p).collect();
    let out = jc.ctl_ok(&["job", "save", job, "--wait"]).unwrap();
    assert!(out.contains("saved"), "{out}");
    all_advance(&logs, 10);
    let at_kill = kill_save_restored(&jc, job, &pids, &logs);
    jc.restore_latest(job, &["--nodes", "n0,n1"]);
    goes_on(&logs, &at_kill);
}

#[test]
fn loopback_ranks_split_onto_two_nodes_and_merge_back_onto_one() {
    if !root() {
        return;
    }
    let jc = JobCluster::new(3, &bin(), 5.0, &[], &[]).unwrap();
    let job = "lo";
    let lo = "127.0.0.1".to_string();
    let (pids, logs) = start_mesh(&jc, job, &[0, 0], &[lo.clone(), lo]);
    let at_kill = kill_save(&jc, job, &pids, &logs);
    // Apart: the loopback connection becomes one between n1's and n2's addresses.
    let now = jc.restore_latest(job, &["--map", "0=n1,1=n2"]);
    let nodes: Vec<&str> = now.iter().map(|(_, n, _)| n.as_str()).collect();
    assert_eq!(nodes, ["n1", "n2"]);
    goes_on(&logs, &at_kill);
    let pids: Vec<i32> = now.iter().map(|(_, _, p)| *p).collect();
    let at_kill = kill_save_restored(&jc, job, &pids, &logs);
    // Together again, on a third node: both ends on n0's address.
    let now = jc.restore_latest(job, &["--map", "0=n0,1=n0"]);
    let nodes: Vec<&str> = now.iter().map(|(_, n, _)| n.as_str()).collect();
    assert_eq!(nodes, ["n0", "n0"]);
    goes_on(&logs, &at_kill);
}

#[test]
fn a_connection_to_a_server_outside_the_job_fails_the_save_or_comes_back_reset() {
    if !root() {
        return;
    }
    let jc = JobCluster::new(3, &bin(), 5.0, &[], &[]).unwrap();
    let job = "ext";
    // The server on n0 belongs to no job.
    let dir = tempfile::tempdir().unwrap();
    let server_log = dir.path().join("server.log");
    let mut cmd =
        ckpt_tests::workload::workload_command("tcp_pair", ["serve", "7300"], &server_log).unwrap();
    let ns0 = jc.cluster.nodes()[0].netns.clone();
    drop(jc.cluster.spawn_in(&ns0, &mut cmd).unwrap());
    wait_for_text(&server_log, "port 7300", WAIT);
    let n0 = jc.cluster.nodes()[0].addr.to_string();
    let (pid, log) = jc
        .spawn_rank(1, job, 0, "tcp_pair", &["connect", &n0, "7300"])
        .unwrap();
    wait_ticks(&log, 5, WAIT);
    let logs = [log.clone(), server_log.clone()];

    // The default policy: the save fails and names the connection; nothing is
    // committed and the job runs on (with --kill too).
    for args in [vec!["--wait"], vec!["--kill", "--wait"]] {
        let mut all = vec!["job", "save", job];
        all.extend(args);
        let out = jc.ctl(&all).unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{all:?} succeeded");
        assert!(err.contains("outside the job"), "{err}");
        assert!(err.contains(&format!("-> {n0}:7300")), "{err}");
        assert!(err.contains("--external-tcp=close"), "{err}");
        assert!(jc.ckpts(job).unwrap().is_empty());
        all_advance(&logs, 10);
    }
    // The save's own policy overrides the job's.
    let out = jc
        .ctl_ok(&["job", "save", job, "--wait", "--external-tcp=close"])
        .unwrap();
    assert!(out.contains("saved"), "{out}");
    all_advance(&logs, 10);

    // The job's policy, given when its rank is attached.
    let agent = &jc.agent_bin;
    let st = std::process::Command::new(agent)
        .args(["detach", "--job", job, "--rank", "0", "--socket"])
        .arg(jc.agent_socket(1))
        .status()
        .unwrap();
    assert!(st.success());
    jc.attach_with(1, job, 0, pid, &["--external-tcp", "close"])
        .unwrap();
    let t = Instant::now();
    while jc.job_ranks(job).unwrap().is_empty() {
        assert!(t.elapsed() < WAIT);
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = jc
        .ctl_ok(&["job", "save", job, "--kill", "--wait"])
        .unwrap();
    assert!(out.contains("saved"), "{out}");
    reap_killed(pid);
    wait_job_gone(&jc, job);
    let id = jc.ckpts(job).unwrap().last().cloned().unwrap();
    let shown = jc.ctl_ok(&["ckpt", "show", &id]).unwrap();
    assert!(shown.contains("restored reset"), "{shown}");
    // Restored on n2, the rank finds its connection reset, as when a server goes
    // away, and says so.
    let now = jc.restore_latest(job, &["--nodes", "n2"]);
    assert_eq!(now[0].1, "n2");
    let t = Instant::now();
    loop {
        let text = std::fs::read_to_string(&log).unwrap();
        if text.contains("connection error: Connection reset by peer") {
            break;
        }
        assert!(t.elapsed() < WAIT, "no connection error:\n{text}");
        std::thread::sleep(Duration::from_millis(20));
    }
    check_log(&log).unwrap();
}

#[test]
fn a_server_rank_and_its_callers_keep_their_sessions_across_a_restore() {
    if !root() {
        return;
    }
    let jc = JobCluster::new(4, &bin(), 5.0, &[], &[]).unwrap();
    let job = "rpc";
    let n0 = jc.cluster.nodes()[0].addr.to_string();
    // Rank 0 serves three callers: rank 1 beside it on n0, ranks 2 and 3 on n1.
    let (p0, log0) = jc
        .spawn_rank(0, job, 0, "tcp_rpc", &["serve", "7400", "3"])
        .unwrap();
    let mut pids = vec![p0];
    let mut logs = vec![log0];
    for (rank, node) in [(1u32, 0usize), (2, 1), (3, 1)] {
        let id = rank.to_string();
        let (p, l) = jc
            .spawn_rank(node, job, rank, "tcp_rpc", &["call", &n0, "7400", &id])
            .unwrap();
        pids.push(p);
        logs.push(l);
    }
    for log in &logs {
        wait_ticks(log, 5, WAIT);
    }
    for pause in [70, 230] {
        std::thread::sleep(Duration::from_millis(pause));
        let out = jc.ctl_ok(&["job", "save", job, "--wait"]).unwrap();
        assert!(out.contains("saved"), "{out}");
        all_advance(&logs, 5);
    }
    let at_kill = kill_save(&jc, job, &pids, &logs);
    let now = jc.restore_latest(job, &["--nodes", "n2,n3"]);
    let nodes: Vec<&str> = now.iter().map(|(_, n, _)| n.as_str()).collect();
    assert_eq!(nodes, ["n2", "n2", "n3", "n3"]);
    for (log, k) in logs.iter().zip(&at_kill) {
        wait_ticks(log, k + 10, WAIT);
    }
    all_advance(&logs, 5);
}

#[test]
fn memcached_and_a_client_holding_its_connection_are_restored_on_other_nodes() {
    if !root() {
        return;
    }
    let jc = JobCluster::new(4, &bin(), 5.0, &[], &[]).unwrap();
    let job = "mc";
    // Debian's memcached, unmodified, as rank 0 on n0; the client as rank 1 on n1.
    let log0 = jc.cluster.nodes()[0].name.clone() + "-memcached.log";
    let log0 = std::env::temp_dir().join(format!("{}-{log0}", jc.cluster.tag()));
    let cmd = ckpt_tests::workload::program_command(
        "memcached",
        [
            "-u", "root", "-l", "0.0.0.0", "-p", "11211", "-U", "0", "-t", "2", "-m", "64",
        ],
        &log0,
    )
    .unwrap();
    let (p0, _) = jc.spawn_rank_cmd(0, job, 0, cmd, log0.clone()).unwrap();
    let n0 = jc.cluster.nodes()[0].addr.to_string();
    let (p1, log1) = jc
        .spawn_rank(1, job, 1, "mc_client.py", &[&n0, "11211"])
        .unwrap();
    wait_ticks(&log1, 10, WAIT);
    let out = jc.ctl_ok(&["job", "save", job, "--wait"]).unwrap();
    assert!(out.contains("saved"), "{out}");
    all_advance(std::slice::from_ref(&log1), 10);
    let at_kill = kill_save(&jc, job, &[p0, p1], std::slice::from_ref(&log1));
    let id = jc.ckpts(job).unwrap().last().cloned().unwrap();
    let shown = jc.ctl_ok(&["ckpt", "show", &id]).unwrap();
    assert!(shown.contains(":11211"), "{shown}");
    let now = jc.restore_latest(job, &["--nodes", "n2,n3"]);
    let nodes: Vec<&str> = now.iter().map(|(_, n, _)| n.as_str()).collect();
    assert_eq!(nodes, ["n2", "n3"]);
    // The same session carries on: the client reads back what it stored before
    // the checkpoint, over the connection it opened then.
    wait_ticks(&log1, at_kill[0] + 20, WAIT);
    all_advance(std::slice::from_ref(&log1), 10);
    let _ = std::fs::remove_file(&log0);
}

/// The lock tables in node `i`'s network namespace.
fn lock_tables(jc: &JobCluster, i: usize) -> Vec<String> {
    let ns = jc.cluster.nodes()[i].netns.clone();
    let out = jc
        .cluster
        .run_in(
            &ns,
            std::process::Command::new("nft").args(["list", "tables", "inet"]),
        )
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.strip_prefix("table inet ckpt_"))
        .map(|t| t.trim().to_string())
        .collect()
}

#[test]
fn a_restore_holds_the_connections_until_every_rank_is_rebuilt_and_lets_go_on_abort() {
    if !root() {
        return;
    }
    let mut jc = JobCluster::new(3, &bin(), 5.0, &[], &[]).unwrap();
    let job = "lk";
    let n0 = jc.cluster.nodes()[0].addr.to_string();
    let (p0, log0) = jc
        .spawn_rank(0, job, 0, "tcp_pair", &["serve", "7600"])
        .unwrap();
    wait_for_text(&log0, "port 7600", WAIT);
    let (p1, log1) = jc
        .spawn_rank(1, job, 1, "tcp_pair", &["connect", &n0, "7600"])
        .unwrap();
    let logs = [log0, log1];
    for l in &logs {
        wait_ticks(l, 5, WAIT);
    }
    let at_kill = kill_save(&jc, job, &[p0, p1], &logs);
    // n2's agent stops for good once its rank is rebuilt, before it says so.
    jc.restart_agent(2, &[("CKPT_TEST_PAUSE", "rebuilt")])
        .unwrap();
    let restoring = jc
        .ctl_spawn(&[
            "job",
            "restore",
            &format!("{job}:latest"),
            "--map",
            "0=n1,1=n2",
        ])
        .unwrap();
    // n1 has rebuilt rank 0 and waits for the others: its connection is held by a
    // lock table of the attempt on n1, and so is n2's.
    let t = Instant::now();
    while lock_tables(&jc, 1).is_empty() || lock_tables(&jc, 2).is_empty() {
        assert!(
            t.elapsed() < WAIT,
            "no lock table on n1 and n2 during the restore"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let held = lock_tables(&jc, 1);
    assert_eq!(
        held,
        lock_tables(&jc, 2),
        "one table per attempt, same name"
    );
    // n2's agent dies: the restore is aborted, n1 lets the connection go. Its
    // husk (rank 1, with rank 1's PID) dies with it and, orphaned, is ours to reap.
    jc.kill_agent(2);
    reap_killed(p1);
    let out = restoring.wait_with_output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no rank was released"), "{err}");
    let t = Instant::now();
    while !lock_tables(&jc, 1).is_empty() {
        assert!(t.elapsed() < WAIT, "n1 kept its lock after the abort");
        std::thread::sleep(Duration::from_millis(20));
    }
    // The killed agent's table is removed by its watchdog (agent/src/rescue.rs),
    // from the journal's record of it; a new agent would remove a leftover too.
    let t = Instant::now();
    while !lock_tables(&jc, 2).is_empty() {
        assert!(
            t.elapsed() < WAIT,
            "the killed agent's table {held:?} stayed"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    jc.restart_agent(2, &[]).unwrap();
    assert!(lock_tables(&jc, 2).is_empty());
    // And the checkpoint still restores, with the connection intact.
    let now = jc.restore_latest(job, &["--map", "0=n1,1=n2"]);
    assert_eq!(now.len(), 2);
    assert!(lock_tables(&jc, 1).is_empty() && lock_tables(&jc, 2).is_empty());
    goes_on(&logs, &at_kill);
}
