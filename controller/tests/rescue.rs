//! A node's agent SIGKILLed at any instant of a job save leaves every rank of the
//! job running as it was (agent/src/rescue.rs): killed inside the injection
//! window (watched for from outside), and at moments spread over the save. The
//! rank is sent SIGUSR1 just before each kill; afterwards both ranks run on,
//! untraced and not stopped, with their own checks quiet and the signal
//! delivered, and a later save succeeds.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use ckpt_tests::jobs::JobCluster;
use ckpt_tests::process::send_signal;
use ckpt_tests::sigwatch::{self, check_runs_on, injecting, phase_of, traced};

#[path = "common/bin.rs"]
mod bin;
use bin::{bin, root};

const THREADS: usize = 100;
const KILLS: u32 = 12;

#[test]
fn an_agent_killed_at_any_instant_of_a_job_save_leaves_every_rank_running() {
    if !root() {
        return;
    }
    let mut jc = JobCluster::new(2, &bin(), 3.0, &[], &[]).unwrap();
    let job = "rescued";
    let threads = THREADS.to_string();
    let r0 = jc.spawn_rank(0, job, 0, "sigwatch", &["1"]).unwrap();
    let r1 = jc.spawn_rank(1, job, 1, "sigwatch", &[&threads]).unwrap();
    let wait_ranks = |jc: &JobCluster| {
        let t = Instant::now();
        while jc.job_ranks(job).unwrap().len() != 2 {
            assert!(t.elapsed() < Duration::from_secs(20), "{}", jc.logs());
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    wait_ranks(&jc);
    // One save to learn how long it takes.
    let t0 = Instant::now();
    jc.ctl_ok(&["job", "save", job, "--wait"]).unwrap();
    let full = t0.elapsed();
    let mut by_phase: BTreeMap<&str, u32> = BTreeMap::new();
    for k in 0..KILLS {
        jc.restart_agent(1, &[]).unwrap();
        jc.attach(1, job, 1, r1.0).unwrap();
        wait_ranks(&jc);
        let (_, usr1) = sigwatch::last(&r1.1);
        let mut save = jc.ctl_spawn(&["job", "save", job, "--wait"]).unwrap();
        let inside = k % 2 == 0;
        let t = Instant::now();
        // Watch closely (no sleep) for the moment.
        let hit = loop {
            let reached = if inside {
                injecting(r1.0)
            } else {
                traced(r1.0)
            };
            if reached {
                break true;
            }
            if save.try_wait().unwrap().is_some() || t.elapsed() > Duration::from_secs(60) {
                break false;
            }
        };
        assert!(
            hit,
            "kill {k}: the save never reached the moment\n{}",
            jc.logs()
        );
        if !inside {
            std::thread::sleep(full * k / KILLS / 2);
        }
        let phase = phase_of(r1.0);
        send_signal(r1.0, libc::SIGUSR1).unwrap();
        jc.kill_agent(1);
        let out = save.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success() || err.contains("nothing was committed"),
            "kill {k}: {err}"
        );
        let what = format!("kill {k} of the agent ({phase})");
        check_runs_on(r1.0, &r1.1, THREADS, Some(usr1), &what)
            .unwrap_or_else(|e| panic!("{e:#}\n{}", jc.logs()));
        check_runs_on(r0.0, &r0.1, 1, None, &format!("{what}, the other rank"))
            .unwrap_or_else(|e| panic!("{e:#}\n{}", jc.logs()));
        *by_phase.entry(phase).or_default() += 1;
    }
    jc.restart_agent(1, &[]).unwrap();
    jc.attach(1, job, 1, r1.0).unwrap();
    wait_ranks(&jc);
    jc.ctl_ok(&["job", "save", job, "--wait"]).unwrap();
    let (_, usr1) = sigwatch::last(&r1.1);
    send_signal(r1.0, libc::SIGUSR1).unwrap();
    check_runs_on(
        r1.0,
        &r1.1,
        THREADS,
        Some(usr1),
        "after a last, normal save",
    )
    .unwrap();
    println!(
        "{} kills of a node's agent during job saves survived: {}",
        by_phase.values().sum::<u32>(),
        by_phase
            .iter()
            .map(|(p, n)| format!("{n} {p}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
}
