//! The controller's store settings reach the agents: a controller configured for
//! S3 by its config file alone (`[s3]` endpoint, keys) and agents with no AWS_*
//! environment at all save a job into that S3 store and restore it from there.
//! Before, the agents opened the store with their own (empty) environment, and the
//! save went nowhere the controller said.

use std::time::Duration;

use ckpt_tests::jobs::{reap_killed, wait_job_gone, wait_ticks, JobCluster};
use ckpt_tests::s3::{S3Server, ACCESS_KEY, BUCKET, SECRET_KEY};
use ckpt_tests::ticks::{check_log, last_tick};

#[path = "common/bin.rs"]
mod bin;
use bin::bin;

#[test]
fn a_controller_configured_for_s3_by_its_file_saves_and_restores_through_agents_without_aws_env() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: job checkpoints need root (ptrace, namespaces)");
        return;
    }
    let mut server = None;
    // Neither the controller nor the agents get an AWS_* variable: the endpoint
    // and the keys are in the controller's config file only.
    let jc = JobCluster::new_with(2, &bin(), 5.0, &[], &[], |cluster, dir| {
        // The S3 server in the hub, on the bridge's address: the nodes reach it.
        let hub = cluster.hub_netns().to_string();
        let s = S3Server::start_in(cluster, &hub, &cluster.hub_addr().to_string());
        let config = dir.join("controller.toml");
        std::fs::write(
            &config,
            format!(
                "store = \"s3://{BUCKET}/site\"\n\
                 [s3]\n\
                 endpoint = \"{}\"\n\
                 region = \"us-east-1\"\n\
                 access_key_id = \"{ACCESS_KEY}\"\n\
                 secret_access_key = \"{SECRET_KEY}\"\n\
                 allow_http = true\n",
                s.endpoint()
            ),
        )?;
        server = Some(s);
        Ok(Some(vec![
            "--config".to_string(),
            config.display().to_string(),
        ]))
    })
    .unwrap();
    let server = server.expect("started by the set-up");
    let job = "s3job";
    let mut ranks = Vec::new();
    for r in 0..2u32 {
        ranks.push(
            jc.spawn_rank(r as usize, job, r, "counter", &["5"])
                .unwrap(),
        );
    }
    for (_, log) in &ranks {
        wait_ticks(log, 5, Duration::from_secs(10));
    }
    let out = jc
        .ctl_ok(&["job", "save", job, "--kill", "--wait", "--json"])
        .unwrap_or_else(|e| panic!("{e:#}\n{}", jc.logs()));
    let o: serde_json::Value = serde_json::from_str(&out).unwrap();
    let ckpt = o["ckpt"].as_str().unwrap().to_string();
    for (pid, _) in &ranks {
        assert!(libc::WIFSIGNALED(reap_killed(*pid)));
    }
    // The rank images and the job manifest are in the bucket the file named.
    let site = server.bucket_dir().join("site");
    for r in 0..2 {
        let m = site.join(format!("images/{ckpt}.r{r}/manifest.ckpt"));
        assert!(m.is_file(), "{} is missing\n{}", m.display(), jc.logs());
    }
    assert!(site.join("jobs").join(&ckpt).is_file());
    // And the job comes back from there, on the other nodes (once the agents
    // have told the controller that its ranks are gone).
    wait_job_gone(&jc, job);
    let before: Vec<u64> = ranks.iter().map(|(_, l)| last_tick(l).unwrap()).collect();
    let out = jc
        .ctl_ok(&["job", "restore", &ckpt, "--nodes", "n1,n0"])
        .unwrap_or_else(|e| panic!("{e:#}\n{}", jc.logs()));
    assert!(out.contains("restored"), "{out}");
    for ((_, log), b) in ranks.iter().zip(before) {
        wait_ticks(log, b + 5, Duration::from_secs(20));
        check_log(log).unwrap();
    }
}
