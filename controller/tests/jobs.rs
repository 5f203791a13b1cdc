//! Job checkpoints end to end on the test cluster (network namespaces joined by a
//! bridge; a controller in the hub, an agent per node; see `ckpt_tests::jobs`):
//! save while running, save with --kill, restore on other nodes; agents killed in
//! each phase; a controller killed while the job is frozen; a user acting on
//! another's job.

use std::time::{Duration, Instant};

use ckpt_tests::cluster::in_netns;
use ckpt_tests::jobs::{reap_killed, wait_for_text, wait_job_gone, wait_ticks, JobCluster};
use ckpt_tests::process::{is_alive, proc_state, tracer_pids};
use ckpt_tests::ticks::{check_log, last_tick};

/// Neither stopped nor traced.
fn running_free(pid: i32) -> bool {
    is_alive(pid)
        && proc_state(pid).is_some_and(|s| s != 't' && s != 'T')
        && tracer_pids(pid).iter().all(|&(_, t)| t == 0)
}

#[test]
fn four_ranks_on_two_nodes_saved_running_then_killed_and_restored_on_two_other_nodes() {
    if !root() {
        return;
    }
    let jc = JobCluster::new(4, &bin(), 5.0, &[], &[]).unwrap();
    let job = "sim";
    let mut ranks = Vec::new();
    for r in 0..4u32 {
        let node = (r / 2) as usize; // ranks 0,1 on n0; 2,3 on n1
        ranks.push(jc.spawn_rank(node, job, r, "counter", &["5"]).unwrap());
    }
    for (_, log) in &ranks {
        wait_ticks(log, 5, Duration::from_secs(10));
    }
    // Saves that leave the job running, while it computes.
    for _ in 0..2 {
        let before: Vec<u64> = ranks.iter().map(|(_, l)| last_tick(l).unwrap()).collect();
        let out = jc.ctl_ok(&["job", "save", job, "--wait"]).unwrap();
        assert!(out.contains("saved"), "{out}");
        for ((_, log), b) in ranks.iter().zip(before) {
            wait_ticks(log, b + 5, Duration::from_secs(10));
        }
    }
    for (pid, _) in &ranks {
        assert!(
            running_free(*pid),
            "rank {pid} not running free after a save"
        );
    }
    // A save that kills: committed, then the ranks are gone.
    let out = jc
        .ctl_ok(&["job", "save", job, "--kill", "--wait", "--json"])
        .unwrap();
    let o: serde_json::Value = serde_json::from_str(&out).unwrap();
    let ckpt = o["ckpt"].as_str().unwrap().to_string();
    assert_eq!(o["ranks"], 4);
    for (pid, _) in &ranks {
        // The ranks are this test's children (it launched them, as a batch
        // system would): reap them, or their PIDs stay taken.
        let status = reap_killed(*pid);
        assert!(
            libc::WIFSIGNALED(status),
            "rank {pid} was not killed: {status:#x}"
        );
    }
    let ckpts = jc.ckpts(job).unwrap();
    assert_eq!(ckpts.len(), 3, "{ckpts:?}");
    assert_eq!(ckpts.last().unwrap(), &ckpt);
    let last: Vec<u64> = ranks.iter().map(|(_, l)| last_tick(l).unwrap()).collect();
    // Wait for the agents to report the ranks gone, then restore on n2, n3.
    wait_job_gone(&jc, job);
    let now = jc.restore_latest(job, &["--nodes", "n2,n3"]);
    assert_eq!(now.len(), 4, "{now:?}");
    for (r, node, pid) in &now {
        let want = if *r < 2 { "n2" } else { "n3" };
        assert_eq!(node, want, "rank {r}");
        assert_eq!(*pid, ranks[*r as usize].0, "rank {r} keeps its PID");
        let ns = &jc.cluster.nodes()[if *r < 2 { 2 } else { 3 }].netns;
        assert!(
            in_netns(*pid, ns).unwrap(),
            "rank {r} is not inside node {want}"
        );
    }
    for ((_, log), l) in ranks.iter().zip(last) {
        wait_ticks(log, l + 10, Duration::from_secs(10));
        check_log(log).unwrap_or_else(|e| panic!("{}: {e:#}", log.display()));
    }
    // The catalog is rebuilt from the store: a new controller lists the same.
    let mut jc = jc;
    jc.kill_controller();
    jc.start_controller(&[]).unwrap();
    assert_eq!(jc.ckpts(job).unwrap(), ckpts);
    // A checkpoint can be shown and removed.
    let show = jc.ctl_ok(&["ckpt", "show", &ckpts[0]]).unwrap();
    assert!(show.contains("rank    3"), "{show}");
    jc.ctl_ok(&["ckpt", "rm", &ckpts[0]]).unwrap();
    assert_eq!(jc.ckpts(job).unwrap(), ckpts[1..].to_vec());
    // Retention, then gc of the chunks nothing references any more.
    let out = jc
        .ctl_ok(&["ckpt", "prune", "--job", job, "--keep", "1"])
        .unwrap();
    assert!(out.contains(&format!("removed {}", ckpts[1])), "{out}");
    assert_eq!(jc.ckpts(job).unwrap(), ckpts[2..].to_vec());
    let out = jc.ctl_ok(&["ckpt", "gc"]).unwrap();
    assert!(out.contains("4 image(s) reference"), "{out}");
}

#[test]
fn an_agent_killed_in_freeze_capture_or_upload_commits_nothing_and_the_job_runs_on() {
    if !root() {
        return;
    }
    let mut jc = JobCluster::new(2, &bin(), 3.0, &[], &[]).unwrap();
    let job = "faulty";
    // Enough memory that the upload is under way when the agent dies.
    let r0 = jc.spawn_rank(0, job, 0, "counter", &["5"]).unwrap();
    let r1 = jc.spawn_rank(1, job, 1, "counter", &["5"]).unwrap();
    for point in ["frozen", "captured", "storing"] {
        jc.restart_agent(1, &[("CKPT_TEST_PAUSE", point)]).unwrap();
        jc.attach(1, job, 1, r1.0).unwrap();
        let t = Instant::now();
        while jc.job_ranks(job).unwrap().len() != 2 {
            assert!(t.elapsed() < Duration::from_secs(5));
            std::thread::sleep(Duration::from_millis(20));
        }
        let save = jc.ctl_spawn(&["job", "save", job, "--wait"]).unwrap();
        jc.wait_log(
            "agent-1",
            &format!("test pause at {point}"),
            Duration::from_secs(20),
        )
        .unwrap();
        jc.kill_agent(1);
        let out = save.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{point}: save succeeded: {err}");
        assert!(err.contains("nothing was committed"), "{point}: {err}");
        assert!(
            jc.ckpts(job).unwrap().is_empty(),
            "{point}: a checkpoint was listed"
        );
        for (pid, log) in [&r0, &r1] {
            let t = Instant::now();
            while !running_free(*pid) {
                assert!(
                    t.elapsed() < Duration::from_secs(5),
                    "{point}: rank {pid} still frozen: state {:?}, tracers {:?}, r0 {}, r1 {}\n{}",
                    proc_state(*pid),
                    tracer_pids(*pid),
                    r0.0,
                    r1.0,
                    jc.logs()
                );
                std::thread::sleep(Duration::from_millis(10));
            }
            let n = last_tick(log).unwrap();
            wait_ticks(log, n + 5, Duration::from_secs(5));
        }
    }
    for (_, log) in [&r0, &r1] {
        check_log(log).unwrap_or_else(|e| panic!("{}: {e:#}", log.display()));
    }
    // No rank image of the aborted attempts is left as a committed image.
    let left: Vec<String> = std::fs::read_dir(jc.dir.path().join("store/images"))
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.path().join("manifest.ckpt").exists())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        left.is_empty(),
        "images of aborted saves were left: {left:?}"
    );
}

#[test]
fn a_controller_killed_while_the_job_is_frozen_is_outlived_by_the_lease() {
    if !root() {
        return;
    }
    let lease = 2.0;
    let mut jc = JobCluster::new(2, &bin(), lease, &[("CKPT_TEST_PAUSE", "frozen")], &[]).unwrap();
    let job = "orphan";
    let r0 = jc.spawn_rank(0, job, 0, "counter", &["5"]).unwrap();
    let r1 = jc.spawn_rank(1, job, 1, "counter", &["5"]).unwrap();
    let t = Instant::now();
    while jc.job_ranks(job).unwrap().len() != 2 {
        assert!(t.elapsed() < Duration::from_secs(5));
        std::thread::sleep(Duration::from_millis(20));
    }
    let save = jc.ctl_spawn(&["job", "save", job, "--wait"]).unwrap();
    jc.wait_log(
        "controller",
        "test pause at frozen",
        Duration::from_secs(20),
    )
    .unwrap();
    for (pid, _) in [&r0, &r1] {
        assert!(!running_free(*pid), "rank {pid} is not frozen");
    }
    jc.kill_controller();
    let killed = Instant::now();
    for (pid, _) in [&r0, &r1] {
        while !running_free(*pid) {
            assert!(
                killed.elapsed() < Duration::from_secs_f64(lease + 3.0),
                "rank {pid} still frozen {:?} after the controller died (lease {lease} s)",
                killed.elapsed()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    let thawed = killed.elapsed();
    eprintln!("ranks thawed {thawed:?} after the controller was killed (lease {lease} s)");
    let _ = save.wait_with_output();
    for (_, log) in [&r0, &r1] {
        let n = last_tick(log).unwrap();
        wait_ticks(log, n + 5, Duration::from_secs(5));
        check_log(log).unwrap_or_else(|e| panic!("{}: {e:#}", log.display()));
    }
}

#[test]
fn a_user_cannot_save_restore_or_remove_another_users_job() {
    if !root() {
        return;
    }
    let jc = JobCluster::new(1, &bin(), 5.0, &[], &[]).unwrap();
    let job = "roots";
    let (pid, log) = jc.spawn_rank(0, job, 0, "counter", &["5"]).unwrap();
    wait_ticks(&log, 3, Duration::from_secs(10));
    let nobody = Some(65534);
    let out = jc.ctl_as(&["job", "save", job, "--wait"], nobody).unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("may save only its own jobs"), "{err}");
    // Others' jobs are not even listed.
    let out = jc.ctl_as(&["job", "list", "--json"], nobody).unwrap();
    assert!(out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "[]");
    let saved = jc
        .ctl_ok(&["job", "save", job, "--wait", "--json"])
        .unwrap();
    let id = serde_json::from_str::<serde_json::Value>(&saved).unwrap()["ckpt"]
        .as_str()
        .unwrap()
        .to_string();
    for args in [
        vec!["ckpt", "rm", id.as_str()],
        vec!["job", "restore", id.as_str()],
    ] {
        let out = jc.ctl_as(&args, nobody).unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?}");
        assert!(
            err.contains("may act only on its own jobs"),
            "{args:?}: {err}"
        );
    }
    assert_eq!(jc.ckpts(job).unwrap(), vec![id]);
    assert!(running_free(pid));
    let out = jc.ctl_as(&["ckpt", "gc"], nobody).unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("only root may gc"));
    // A user may not attach a process that is not theirs either.
    let out = std::process::Command::new(&jc.agent_bin)
        .args([
            "attach",
            "--job",
            "x",
            "--rank",
            "0",
            "--pid",
            &pid.to_string(),
        ])
        .arg("--socket")
        .arg(jc.agent_socket(0))
        .uid(65534)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("may attach only its own processes"), "{err}");
}

use std::os::unix::process::CommandExt;

#[path = "common/bin.rs"]
mod bin;
use bin::{bin, root};

#[test]
fn ranks_streaming_over_tcp_are_restored_on_other_nodes_with_their_connection_intact() {
    if !root() {
        return;
    }
    let jc = JobCluster::new(4, &bin(), 5.0, &[], &[]).unwrap();
    let job = "stream";
    let n0 = jc.cluster.nodes()[0].addr.to_string();
    // Rank 0 serves on n0:7000, rank 1 on n1 streams to it; records flow both
    // ways and both queues hold data whenever the job is frozen.
    let (p0, log0) = jc
        .spawn_rank(0, job, 0, "tcp_pair", &["serve", "7000"])
        .unwrap();
    wait_for_text(&log0, "port 7000", Duration::from_secs(10));
    let (p1, log1) = jc
        .spawn_rank(1, job, 1, "tcp_pair", &["connect", &n0, "7000"])
        .unwrap();
    for log in [&log0, &log1] {
        wait_ticks(log, 20, Duration::from_secs(10));
    }
    let out = jc.ctl_ok(&["job", "save", job, "--wait"]).unwrap();
    assert!(out.contains("saved"), "{out}");
    for log in [&log0, &log1] {
        let n = last_tick(log).unwrap();
        wait_ticks(log, n + 20, Duration::from_secs(10));
    }
    jc.ctl_ok(&["job", "save", job, "--kill", "--wait"])
        .unwrap();
    for pid in [p0, p1] {
        reap_killed(pid);
    }
    let at_kill: Vec<u64> = [&log0, &log1]
        .iter()
        .map(|l| last_tick(l).unwrap())
        .collect();
    wait_job_gone(&jc, job);
    let now = jc.restore_latest(job, &["--nodes", "n2,n3"]);
    assert_eq!(
        now.iter().map(|(_, n, _)| n.as_str()).collect::<Vec<_>>(),
        ["n2", "n3"]
    );
    for (log, k) in [&log0, &log1].iter().zip(at_kill) {
        wait_ticks(log, k + 100, Duration::from_secs(20));
        check_log(log).unwrap_or_else(|e| panic!("{}: {e:#}", log.display()));
    }
}
