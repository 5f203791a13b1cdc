//! A whole ckpt deployment on the test cluster: a controller in the hub namespace,
//! one `ckpt-agent serve` per node, a cluster CA of their own, a store in a
//! temporary directory, and jobs whose ranks are workloads started inside the nodes
//! and attached to their agents.
//!
//! Everything is torn down by the [`Cluster`]'s `Drop` (every process it started,
//! and whatever still runs in its namespaces: ranks restored by an agent included).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::cluster::Cluster;

/// The controller's QUIC port inside the hub namespace.
pub const PORT: u16 = 7100;

pub struct JobCluster {
    pub dir: tempfile::TempDir,
    pub controller_bin: PathBuf,
    pub agent_bin: PathBuf,
    pub lease_secs: f64,
    /// The controller's store arguments: `--store file://<dir>/store`, or what
    /// [`JobCluster::new_with`]'s set-up gave (a `--config` file, say).
    store_args: Vec<String>,
    controller: Option<Child>,
    agents: Vec<Option<Child>>,
    // Last: dropped after the children above are handled.
    pub cluster: Cluster,
}

impl JobCluster {
    /// `n` nodes, each with an agent; the controller started with `controller_env`
    /// and the agents with `agent_env` (test hooks).
    pub fn new(
        n: usize,
        controller_bin: &Path,
        lease_secs: f64,
        controller_env: &[(&str, &str)],
        agent_env: &[(&str, &str)],
    ) -> Result<JobCluster> {
        JobCluster::new_with(
            n,
            controller_bin,
            lease_secs,
            controller_env,
            agent_env,
            |_, _| Ok(None),
        )
    }

    /// As [`JobCluster::new`], with `store` run once the cluster and its directory
    /// exist and before the controller starts: it may start what the store needs
    /// (an S3 server in the hub) and return the controller's store arguments
    /// instead of the default local store.
    pub fn new_with(
        n: usize,
        controller_bin: &Path,
        lease_secs: f64,
        controller_env: &[(&str, &str)],
        agent_env: &[(&str, &str)],
        store: impl FnOnce(&Cluster, &Path) -> Result<Option<Vec<String>>>,
    ) -> Result<JobCluster> {
        let agent_bin = controller_bin.with_file_name("ckpt-agent");
        if !agent_bin.is_file() {
            bail!(
                "{} is not built: run `cargo build --workspace` first",
                agent_bin.display()
            );
        }
        let cluster = Cluster::new(n)?;
        let dir = tempfile::Builder::new().prefix("ckpt-jobs").tempdir()?;
        // Other users reach the sockets in it (the tests of refusals run as nobody).
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))?;
        let mut ca = Command::new(controller_bin);
        ca.args(["ca", "init", "--dir"])
            .arg(dir.path().join("certs"))
            .args(["--controller-name", &cluster.hub_addr().to_string()]);
        for node in cluster.nodes() {
            ca.args(["--agent", &node.name]);
        }
        let out = ca.output()?;
        if !out.status.success() {
            bail!("ca init: {}", String::from_utf8_lossy(&out.stderr));
        }
        std::fs::create_dir_all(dir.path().join("store"))?;
        let default_store = vec![
            "--store".to_string(),
            format!("file://{}", dir.path().join("store").display()),
        ];
        let store_args = store(&cluster, dir.path())?.unwrap_or(default_store);
        let mut jc = JobCluster {
            controller_bin: controller_bin.to_path_buf(),
            agent_bin,
            lease_secs,
            store_args,
            controller: None,
            agents: Vec::new(),
            cluster,
            dir,
        };
        jc.start_controller(controller_env)?;
        for i in 0..n {
            let a = jc.spawn_agent(i, agent_env)?;
            jc.agents.push(Some(a));
        }
        jc.wait_nodes(n)?;
        Ok(jc)
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("controller.sock")
    }

    pub fn agent_socket(&self, node: usize) -> PathBuf {
        self.dir.path().join(format!("agent-{node}.sock"))
    }

    pub fn store_url(&self) -> String {
        format!("file://{}", self.dir.path().join("store").display())
    }

    /// Starts (or starts again) the controller in the hub.
    pub fn start_controller(&mut self, env: &[(&str, &str)]) -> Result<()> {
        let _ = std::fs::remove_file(self.socket());
        let log = std::fs::File::options()
            .create(true)
            .append(true)
            .open(self.dir.path().join("controller.log"))?;
        let mut c = Command::new(&self.controller_bin);
        c.arg("serve")
            .args(["--listen", &format!("{}:{PORT}", self.cluster.hub_addr())])
            .args(&self.store_args)
            .arg("--certs")
            .arg(self.dir.path().join("certs"))
            .arg("--socket")
            .arg(self.socket())
            .args(["--lease", &self.lease_secs.to_string()])
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        for (k, v) in env {
            c.env(k, v);
        }
        let hub = self.cluster.hub_netns().to_string();
        self.controller = Some(self.cluster.spawn_in(&hub, &mut c)?);
        let t = Instant::now();
        while !self.socket().exists() {
            if t.elapsed() > Duration::from_secs(10) {
                bail!("the controller did not start: {}", self.log("controller"));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    fn spawn_agent(&self, i: usize, env: &[(&str, &str)]) -> Result<Child> {
        let node = &self.cluster.nodes()[i];
        let log = std::fs::File::options()
            .create(true)
            .append(true)
            .open(self.dir.path().join(format!("agent-{i}.log")))?;
        let mut c = Command::new(&self.agent_bin);
        c.arg("serve")
            .args(["--name", &node.name])
            .args([
                "--controller",
                &format!("{}:{PORT}", self.cluster.hub_addr()),
            ])
            .arg("--certs")
            .arg(self.dir.path().join("certs"))
            .arg("--socket")
            .arg(self.agent_socket(i))
            .args(["--lease", &self.lease_secs.to_string()])
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        for (k, v) in env {
            c.env(k, v);
        }
        let ns = node.netns.clone();
        self.cluster.spawn_in(&ns, &mut c)
    }

    /// Waits until `n` agents are connected.
    pub fn wait_nodes(&self, n: usize) -> Result<()> {
        let t = Instant::now();
        loop {
            let out = self.ctl(&["nodes", "--json"])?;
            if out.status.success() {
                let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
                if v.as_array().map(|a| a.len()) == Some(n) {
                    return Ok(());
                }
            }
            if t.elapsed() > Duration::from_secs(20) {
                bail!(
                    "{n} agents did not register: {}\n{}",
                    String::from_utf8_lossy(&out.stdout),
                    self.logs()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The controller's PID.
    pub fn controller_pid(&self) -> Option<i32> {
        self.controller.as_ref().map(|c| c.id() as i32)
    }

    /// The PID of node `i`'s agent.
    pub fn agent_pid(&self, i: usize) -> Option<i32> {
        self.agents[i].as_ref().map(|c| c.id() as i32)
    }

    /// Starts node `i`'s agent again (killing the running one) with `env`, and
    /// waits until every agent is connected.
    pub fn restart_agent(&mut self, i: usize, env: &[(&str, &str)]) -> Result<()> {
        self.kill_agent(i);
        let log = format!("agent-{i}");
        let mark = "registered with the controller";
        let before = self.log(&log).matches(mark).count();
        let a = self.spawn_agent(i, env)?;
        self.agents[i] = Some(a);
        let t = Instant::now();
        while self.log(&log).matches(mark).count() == before {
            if t.elapsed() > Duration::from_secs(20) {
                bail!("agent {i} did not register again:\n{}", self.logs());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.wait_nodes(self.agents.len())
    }

    /// Attaches the running `pid` again (after its agent was restarted).
    pub fn attach(&self, node: usize, job: &str, rank: u32, pid: i32) -> Result<()> {
        self.attach_with(node, job, rank, pid, &[])
    }

    /// `ckpt-agent attach` with more arguments (`--external-tcp close`).
    pub fn attach_with(
        &self,
        node: usize,
        job: &str,
        rank: u32,
        pid: i32,
        more: &[&str],
    ) -> Result<()> {
        let out = Command::new(&self.agent_bin)
            .args(["attach", "--job", job, "--rank", &rank.to_string()])
            .args(["--pid", &pid.to_string()])
            .args(more)
            .arg("--socket")
            .arg(self.agent_socket(node))
            .output()?;
        if !out.status.success() {
            bail!("attach: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(())
    }

    /// Waits until `what` appears in the log of `log` (e.g. "agent-1").
    pub fn wait_log(&self, log: &str, what: &str, timeout: Duration) -> Result<()> {
        let t = Instant::now();
        while !self.log(log).contains(what) {
            if t.elapsed() > timeout {
                bail!("{what:?} never appeared in {log}.log:\n{}", self.logs());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    /// SIGKILLs node `i`'s agent.
    pub fn kill_agent(&mut self, i: usize) {
        if let Some(mut c) = self.agents[i].take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGKILLs the controller.
    pub fn kill_controller(&mut self) {
        if let Some(mut c) = self.controller.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts workload `name` with `args` inside node `node` as rank `rank` of
    /// `job`, and attaches it; returns its PID and log.
    pub fn spawn_rank(
        &self,
        node: usize,
        job: &str,
        rank: u32,
        name: &str,
        args: &[&str],
    ) -> Result<(i32, PathBuf)> {
        let log = self.dir.path().join(format!("{job}.rank{rank}.log"));
        let cmd = crate::workload::workload_command(name, args, &log)?;
        self.spawn_rank_cmd(node, job, rank, cmd, log)
    }

    /// Starts `cmd` (see `workload::program_command`; its output goes to `log`)
    /// inside node `node` as rank `rank` of `job`, and attaches it.
    pub fn spawn_rank_cmd(
        &self,
        node: usize,
        job: &str,
        rank: u32,
        mut cmd: Command,
        log: PathBuf,
    ) -> Result<(i32, PathBuf)> {
        let ns = self.cluster.nodes()[node].netns.clone();
        let child = self.cluster.spawn_in(&ns, &mut cmd)?;
        let pid = child.id() as i32;
        // The Cluster reaps it by PID; the handle is not needed.
        drop(child);
        self.attach(node, job, rank, pid)?;
        Ok((pid, log))
    }

    /// Starts `ckpt-controller ARGS --socket ...` without waiting.
    pub fn ctl_spawn(&self, args: &[&str]) -> Result<Child> {
        Command::new(&self.controller_bin)
            .args(args)
            .arg("--socket")
            .arg(self.socket())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .context("running ckpt-controller")
    }

    /// Runs `ckpt-controller ARGS --socket ...`.
    pub fn ctl(&self, args: &[&str]) -> Result<Output> {
        self.ctl_as(args, None)
    }

    /// Runs `ckpt-controller ARGS --socket ...` as `uid` (when given).
    pub fn ctl_as(&self, args: &[&str], uid: Option<u32>) -> Result<Output> {
        let mut c = Command::new(&self.controller_bin);
        c.args(args).arg("--socket").arg(self.socket());
        if let Some(u) = uid {
            use std::os::unix::process::CommandExt;
            c.uid(u).gid(u);
        }
        c.output().context("running ckpt-controller")
    }

    /// Runs `ckpt-controller ARGS` and fails with its output unless it succeeds.
    pub fn ctl_ok(&self, args: &[&str]) -> Result<String> {
        let out = self.ctl(args)?;
        if !out.status.success() {
            bail!(
                "ckpt-controller {args:?} failed: {}{}\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr),
                self.logs()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `job restore JOB:latest` with the further arguments `how` (`--nodes ...`),
    /// which must succeed and say "restored": the job's ranks after it.
    pub fn restore_latest(&self, job: &str, how: &[&str]) -> Vec<(u32, String, i32)> {
        let latest = format!("{job}:latest");
        let mut args = vec!["job", "restore", latest.as_str()];
        args.extend_from_slice(how);
        let out = self.ctl_ok(&args).unwrap();
        assert!(out.contains("restored"), "{out}");
        self.job_ranks(job).unwrap()
    }

    /// The ranks of `job` now: (rank, node, pid).
    pub fn job_ranks(&self, job: &str) -> Result<Vec<(u32, String, i32)>> {
        let out = self.ctl_ok(&["job", "list", "--json"])?;
        let v: serde_json::Value = serde_json::from_str(&out)?;
        let mut r = Vec::new();
        for j in v.as_array().into_iter().flatten() {
            if j["job"] == job {
                for x in j["ranks"].as_array().into_iter().flatten() {
                    r.push((
                        x["rank"].as_u64().unwrap_or(0) as u32,
                        x["node"].as_str().unwrap_or("").to_string(),
                        x["pid"].as_i64().unwrap_or(0) as i32,
                    ));
                }
            }
        }
        r.sort();
        Ok(r)
    }

    /// The ids of the committed checkpoints of `job`.
    pub fn ckpts(&self, job: &str) -> Result<Vec<String>> {
        let out = self.ctl_ok(&["ckpt", "list", "--job", job, "--json"])?;
        let v: serde_json::Value = serde_json::from_str(&out)?;
        Ok(v.as_array()
            .into_iter()
            .flatten()
            .filter_map(|m| m["id"].as_str().map(String::from))
            .collect())
    }

    pub fn log(&self, what: &str) -> String {
        std::fs::read_to_string(self.dir.path().join(format!("{what}.log"))).unwrap_or_default()
    }

    /// Every daemon's log, for failure messages.
    pub fn logs(&self) -> String {
        let mut s = format!("--- controller\n{}", self.log("controller"));
        for i in 0..self.agents.len() {
            s += &format!("--- agent {i}\n{}", self.log(&format!("agent-{i}")));
        }
        s
    }
}

impl Drop for JobCluster {
    fn drop(&mut self) {
        // The children are killed and reaped by the Cluster (by PID); drop the
        // handles without waiting.
        self.controller.take();
        self.agents.clear();
    }
}

/// Waits until the log's last tick passes `beyond`.
pub fn wait_ticks(log: &Path, beyond: u64, timeout: Duration) -> u64 {
    let t = Instant::now();
    loop {
        let n = crate::ticks::last_tick(log).unwrap_or(0);
        if n > beyond {
            return n;
        }
        assert!(t.elapsed() < timeout, "{} stuck at tick {n}", log.display());
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Reaps `pid` (a rank this test launched, killed by a save with --kill) and
/// returns its wait status; fails if it is still alive after 5 s.
pub fn reap_killed(pid: i32) -> i32 {
    let t = Instant::now();
    let mut status = 0;
    // SAFETY: waitpid on one PID of our own children.
    while unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) } != pid {
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "rank {pid} survived --kill"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    status
}

/// Waits until the agents no longer report any rank of `job`.
pub fn wait_job_gone(jc: &JobCluster, job: &str) {
    let t = Instant::now();
    while !jc.job_ranks(job).unwrap().is_empty() {
        assert!(t.elapsed() < Duration::from_secs(5));
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Waits until the file at `log` contains `text` (a server saying it listens).
pub fn wait_for_text(log: &Path, text: &str, timeout: Duration) {
    let t = Instant::now();
    while !std::fs::read_to_string(log)
        .unwrap_or_default()
        .contains(text)
    {
        assert!(
            t.elapsed() < timeout,
            "{text:?} never appeared in {}",
            log.display()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}
