//! `ckpt-controller demo`: the whole path on one machine, as root.
//!
//! A controller (in this process) and one agent (`ckpt-agent serve`, a child
//! process) with a local directory store and a CA of their own; a job of 4 ranks
//! (`ckpt-controller __demo-rank`, each computing a chain over a 16 MiB array it
//! keeps rewriting); a save while it runs, a save that kills it, and a restore; then
//! every rank's log is checked against an independent recomputation: every step
//! present once, in order, with the right value, before and after the restore.

use std::io::BufRead;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::api::{Done, Event, Outcome, Request};
use crate::client::{self, ClientError};
use crate::serve::{ServeError, ServeOptions};
use ckpt_shared::outln;
use ckpt_shared::stdout::StdoutError;
use ckpt_shared::tls::TlsError;

/// The demo could not run, or the job did not continue correctly.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error(transparent)]
    Stdout(#[from] StdoutError),
    #[error("the demo freezes and restores processes with ptrace: run it as root")]
    NotRoot,
    #[error("finding the path of this program")]
    CurrentExe {
        #[source]
        source: std::io::Error,
    },
    #[error("{} not found: build both binaries (cargo build --release)", path.display())]
    NoAgentBinary { path: PathBuf },
    #[error("{op} {}", path.display())]
    File {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Ca(#[from] TlsError),
    #[error(transparent)]
    Serve(#[from] ServeError),
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error("starting {what}")]
    Spawn {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("the agent did not register; its log:\n{log}")]
    NotRegistered { log: String },
    #[error("attach: {stderr}")]
    Attach { stderr: String },
    #[error("waiting for a rank killed by the save")]
    WaitRank {
        #[source]
        source: std::io::Error,
    },
    #[error("{which} do not compute")]
    NotComputing { which: &'static str },
    #[error("no outcome in the controller's answer")]
    NoOutcome,
    #[error("rank {rank}, line {line}: unexpected {text:?}")]
    LogLine {
        rank: u32,
        line: usize,
        text: String,
    },
    #[error(
        "rank {rank}, line {line}: step {step} value {value:016x}, expected step {want_step} \
         value {want:016x}"
    )]
    LogValue {
        rank: u32,
        line: usize,
        step: u64,
        value: u64,
        want_step: u64,
        want: u64,
    },
    #[error("the job did not continue correctly")]
    Broken,
}

const RANKS: u32 = 4;
const JOB: &str = "demo";

/// The rank program: `steps` of a computation whose every value depends on all
/// earlier ones and on the whole array.
pub struct RankSim {
    a: Vec<u64>,
    x: u64,
    pub chain: u64,
    pub step: u64,
}

impl RankSim {
    pub fn new(rank: u32, mib: usize) -> RankSim {
        let n = (mib << 20) / 8;
        RankSim {
            a: (0..n as u64)
                .map(|i| i.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ rank as u64)
                .collect(),
            x: 0x2545_f491_4f6c_dd1d ^ ((rank as u64 + 1) << 32),
            chain: rank as u64,
            step: 0,
        }
    }

    /// One step: rewrites 4096 entries chosen by a xorshift stream, folds them in.
    pub fn step_once(&mut self) -> u64 {
        self.step += 1;
        let n = self.a.len() as u64;
        let mut acc = 0u64;
        for _ in 0..4096 {
            self.x ^= self.x << 13;
            self.x ^= self.x >> 7;
            self.x ^= self.x << 17;
            let i = (self.x % n) as usize;
            self.a[i] = self.a[i]
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(self.step);
            acc = acc.rotate_left(5) ^ self.a[i];
        }
        self.chain = (self.chain ^ acc)
            .wrapping_mul(0x0100_0000_01b3)
            .rotate_left(17);
        self.chain
    }
}

/// `__demo-rank`: prints `step N CHAIN` every `interval_ms`, forever.
pub fn rank_main(rank: u32, mib: usize, interval_ms: u64) -> ! {
    use std::io::Write;
    let mut sim = RankSim::new(rank, mib);
    let mut out = std::io::stdout().lock();
    loop {
        let c = sim.step_once();
        // One write per line, so the log shows every step at once.
        let line = format!("step {} {c:016x}\n", sim.step);
        let _ = out.write_all(line.as_bytes());
        let _ = out.flush();
        std::thread::sleep(Duration::from_millis(interval_ms));
    }
}

/// Checks a rank's log: steps 1..=N in order, each value recomputed. Returns N.
fn verify(rank: u32, mib: usize, log: &Path) -> Result<u64, DemoError> {
    let mut sim = RankSim::new(rank, mib);
    let read = |source| DemoError::File {
        op: "reading",
        path: log.to_path_buf(),
        source,
    };
    let f = std::fs::File::open(log).map_err(read)?;
    for (i, l) in std::io::BufReader::new(f).lines().enumerate() {
        let l = l.map_err(read)?;
        let mut it = l.split_whitespace();
        let parsed = match (it.next(), it.next(), it.next()) {
            (Some("step"), Some(n), Some(c)) => {
                n.parse::<u64>().ok().zip(u64::from_str_radix(c, 16).ok())
            }
            _ => None,
        };
        let Some((n, c)) = parsed else {
            return Err(DemoError::LogLine {
                rank,
                line: i + 1,
                text: l,
            });
        };
        let want = sim.step_once();
        if n != sim.step || c != want {
            return Err(DemoError::LogValue {
                rank,
                line: i + 1,
                step: n,
                value: c,
                want_step: sim.step,
                want,
            });
        }
    }
    Ok(sim.step)
}

fn last_step(log: &Path) -> u64 {
    std::fs::read_to_string(log)
        .ok()
        .and_then(|s| {
            s.lines()
                .last()
                .and_then(|l| l.split_whitespace().nth(1).and_then(|n| n.parse().ok()))
        })
        .unwrap_or(0)
}

/// Everything the demo started, ended by PID on drop.
struct Cleanup {
    dir: PathBuf,
    agent: Option<Child>,
    ranks: Vec<Child>,
    restored: Vec<i32>,
    keep: bool,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        for &p in &self.restored {
            // SAFETY: kill(2) on PIDs we restored.
            unsafe { libc::kill(p, libc::SIGKILL) };
        }
        for c in &mut self.ranks {
            let _ = c.kill();
            let _ = c.wait();
        }
        if let Some(mut a) = self.agent.take() {
            // The agent reaps the restored ranks (its children) before it goes.
            std::thread::sleep(Duration::from_millis(400));
            let _ = a.kill();
            let _ = a.wait();
        }
        if !self.keep {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

fn call(socket: &Path, req: Request) -> Result<Outcome, DemoError> {
    let mut bar = client::Bar::default();
    let r = client::call(socket, &req, |e| bar.show(e));
    bar.finish();
    match r? {
        Event::Done(Done {
            outcome: Some(o), ..
        }) => Ok(o),
        _ => Err(DemoError::NoOutcome),
    }
}

/// Runs the demo; its controller takes `opts` (what the CLI read from the
/// environment).
pub fn run(mib: usize, keep: bool, opts: ServeOptions) -> Result<(), DemoError> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err(DemoError::NotRoot);
    }
    let exe = std::env::current_exe().map_err(|source| DemoError::CurrentExe { source })?;
    let agent_bin = exe.with_file_name("ckpt-agent");
    if !agent_bin.is_file() {
        return Err(DemoError::NoAgentBinary { path: agent_bin });
    }
    let dir = tempfile::Builder::new()
        .prefix("ckpt-demo.")
        .tempdir_in("/var/tmp")
        .map_err(|source| DemoError::File {
            op: "creating a directory in",
            path: "/var/tmp".into(),
            source,
        })?
        .keep();
    let mut demo = Demo {
        logs: (0..RANKS)
            .map(|r| dir.join(format!("rank{r}.log")))
            .collect(),
        socket: dir.join("controller.sock"),
        agent_socket: dir.join("agent.sock"),
        exe,
        agent_bin,
        mib,
        clean: Cleanup {
            dir: dir.clone(),
            agent: None,
            ranks: Vec::new(),
            restored: Vec::new(),
            keep,
        },
        dir,
    };
    let ctl = demo.start_controller(opts)?;
    demo.start_agent(ctl.addr)?;
    demo.start_ranks()?;
    let (s1, s2, at_kill) = demo.save_twice()?;
    let r = demo.restore(&at_kill)?;
    let all_ok = demo.verify_logs(&at_kill)?;
    print_table(&s1, &s2, &r)?;
    if keep {
        outln!("files kept in {}", demo.dir.display());
    }
    drop(demo);
    drop(ctl);
    if !all_ok {
        return Err(DemoError::Broken);
    }
    outln!("the job continued correctly after save, kill and restore");
    Ok(())
}

/// One run of the demo: its directory, its programs, the ranks' logs, and what it
/// started (ended when it is dropped).
struct Demo {
    dir: PathBuf,
    exe: PathBuf,
    agent_bin: PathBuf,
    socket: PathBuf,
    agent_socket: PathBuf,
    logs: Vec<PathBuf>,
    mib: usize,
    clean: Cleanup,
}

/// The error of creating `path`.
fn create(path: &Path) -> impl FnOnce(std::io::Error) -> DemoError {
    let path = path.to_path_buf();
    move |source| DemoError::File {
        op: "creating",
        path,
        source,
    }
}

impl Demo {
    /// The cluster CA, the store and the controller (in this process).
    fn start_controller(&self, opts: ServeOptions) -> Result<crate::serve::Running, DemoError> {
        let certs = self.dir.join("certs");
        crate::tls::ca_init(&certs, &["127.0.0.1".into()], &["local".into()])?;
        let store = self.dir.join("store");
        std::fs::create_dir_all(&store).map_err(create(&store))?;
        let cfg = crate::serve::Config {
            listen: std::net::SocketAddr::from(([127, 0, 0, 1], 0)),
            store: format!("file://{}", store.display()),
            certs,
            socket: self.socket.clone(),
            lease_secs: 5.0,
            ..crate::serve::Config::default()
        };
        let ctl = crate::serve::start(cfg.clone(), opts)?;
        outln!(
            "== controller on {} (QUIC, mutual TLS), store {}",
            ctl.addr,
            cfg.store
        );
        Ok(ctl)
    }

    /// `ckpt-agent serve` as node `local`, once it has registered.
    fn start_agent(&mut self, controller: std::net::SocketAddr) -> Result<(), DemoError> {
        let log_path = self.dir.join("agent.log");
        let log = std::fs::File::create(&log_path).map_err(create(&log_path))?;
        let log_2 = log.try_clone().map_err(create(&log_path))?;
        self.clean.agent = Some(
            Command::new(&self.agent_bin)
                .args(["serve", "--name", "local", "--controller"])
                .arg(controller.to_string())
                .arg("--certs")
                .arg(self.dir.join("certs"))
                .arg("--socket")
                .arg(&self.agent_socket)
                .stdin(Stdio::null())
                .stdout(log_2)
                .stderr(log)
                .spawn()
                .map_err(|source| DemoError::Spawn {
                    what: "ckpt-agent serve",
                    source,
                })?,
        );
        let t = Instant::now();
        loop {
            let n = client::call(&self.socket, &Request::Nodes, |_| {})
                .ok()
                .map(|e| match e {
                    Event::Done(d) => d.nodes.len(),
                    _ => 0,
                })
                .unwrap_or(0);
            if n == 1 {
                break;
            }
            if t.elapsed() > Duration::from_secs(15) {
                return Err(DemoError::NotRegistered {
                    log: std::fs::read_to_string(&log_path).unwrap_or_default(),
                });
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        outln!(
            "== agent 'local' registered (ckpt-agent serve, PID {})",
            self.clean.agent.as_ref().map(|c| c.id()).unwrap_or(0)
        );
        Ok(())
    }

    /// The job: each rank started, attached to the agent, and computing.
    fn start_ranks(&mut self) -> Result<(), DemoError> {
        for r in 0..RANKS {
            let pid = self.spawn_rank(r)?;
            self.attach(r, pid)?;
        }
        let t = Instant::now();
        while self.logs.iter().any(|l| last_step(l) < 20) {
            if t.elapsed() > Duration::from_secs(30) {
                return Err(DemoError::NotComputing { which: "the ranks" });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        // Let the agent report the ranks.
        std::thread::sleep(Duration::from_millis(400));
        outln!(
            "== job '{JOB}': {RANKS} ranks, each rewriting a {} MiB array every 10 ms (PIDs {})",
            self.mib,
            self.clean
                .ranks
                .iter()
                .map(|c| c.id().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        );
        Ok(())
    }

    /// `__demo-rank` `r` in a session of its own, its output into its log.
    fn spawn_rank(&mut self, r: u32) -> Result<i32, DemoError> {
        let path = &self.logs[r as usize];
        let log = std::fs::File::create(path).map_err(create(path))?;
        let log_2 = log.try_clone().map_err(create(path))?;
        let mut cmd = Command::new(&self.exe);
        cmd.args([
            "__demo-rank",
            "--rank",
            &r.to_string(),
            "--mib",
            &self.mib.to_string(),
        ])
        .current_dir(&self.dir)
        .stdin(Stdio::null())
        .stdout(log_2)
        .stderr(log);
        // SAFETY: async-signal-safe calls only, between fork and exec: a session of
        // its own, and no descriptor of ours beyond stdio (a pipe of this process
        // would lead out of the rank's tree).
        unsafe {
            cmd.pre_exec(|| {
                libc::setsid();
                libc::syscall(
                    libc::SYS_close_range,
                    3 as libc::c_uint,
                    libc::c_uint::MAX,
                    libc::CLOSE_RANGE_CLOEXEC,
                );
                Ok(())
            });
        }
        let child = cmd.spawn().map_err(|source| DemoError::Spawn {
            what: "a rank",
            source,
        })?;
        let pid = child.id() as i32;
        self.clean.ranks.push(child);
        Ok(pid)
    }

    /// `ckpt-agent attach` of rank `r`, PID `pid`.
    fn attach(&self, r: u32, pid: i32) -> Result<(), DemoError> {
        let reply = Command::new(&self.agent_bin)
            .args([
                "attach",
                "--job",
                JOB,
                "--rank",
                &r.to_string(),
                "--pid",
                &pid.to_string(),
            ])
            .arg("--socket")
            .arg(&self.agent_socket)
            .output()
            .map_err(|source| DemoError::Spawn {
                what: "ckpt-agent attach",
                source,
            })?;
        if !reply.status.success() {
            return Err(DemoError::Attach {
                stderr: String::from_utf8_lossy(&reply.stderr).into_owned(),
            });
        }
        Ok(())
    }

    /// A save while the job runs on, then a save that kills it. Returns both
    /// outcomes and the last step of each rank's log at the kill.
    fn save_twice(&mut self) -> Result<(Outcome, Outcome, Vec<u64>), DemoError> {
        outln!("== ckpt-controller job save {JOB} --wait        (the job runs on)");
        let s1 = self.save(false)?;
        client::print_outcome("saved", &s1)?;
        let steps_before = self.logs.iter().map(|l| last_step(l)).min().unwrap_or(0);
        std::thread::sleep(Duration::from_millis(300));
        let steps_after = self.logs.iter().map(|l| last_step(l)).min().unwrap_or(0);
        outln!("   still computing: step {steps_before} -> {steps_after} in 0.3 s");

        outln!("== ckpt-controller job save {JOB} --kill --wait");
        let s2 = self.save(true)?;
        client::print_outcome("saved", &s2)?;
        for c in &mut self.clean.ranks {
            c.wait().map_err(|source| DemoError::WaitRank { source })?;
        }
        self.clean.ranks.clear();
        let at_kill: Vec<u64> = self.logs.iter().map(|l| last_step(l)).collect();
        outln!("   the ranks are gone (killed after the commit) at steps {at_kill:?}");
        std::thread::sleep(Duration::from_millis(700)); // the agent notices
        Ok((s1, s2, at_kill))
    }

    fn save(&self, kill: bool) -> Result<Outcome, DemoError> {
        call(
            &self.socket,
            Request::Save {
                job: JOB.into(),
                kill,
                wait: true,
                external_tcp: None,
            },
        )
    }

    /// The latest checkpoint restored, once every rank has gone on 50 steps past
    /// its kill.
    fn restore(&mut self, at_kill: &[u64]) -> Result<Outcome, DemoError> {
        outln!("== ckpt-controller job restore {JOB}:latest");
        let r = call(
            &self.socket,
            Request::Restore {
                ckpt: format!("{JOB}:latest"),
                nodes: Vec::new(),
                map: Vec::new(),
            },
        )?;
        self.clean.restored = r.pids.iter().map(|p| p.pid).collect();
        client::print_outcome("restored", &r)?;
        let t = Instant::now();
        while self
            .logs
            .iter()
            .zip(at_kill)
            .any(|(l, k)| last_step(l) < k + 50)
        {
            if t.elapsed() > Duration::from_secs(30) {
                return Err(DemoError::NotComputing {
                    which: "the restored ranks",
                });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(r)
    }

    /// Every rank's log against a recomputation, a line each: whether all passed.
    fn verify_logs(&self, at_kill: &[u64]) -> Result<bool, DemoError> {
        outln!("== checking every rank's log against an independent recomputation");
        let mut all_ok = true;
        for (i, l) in self.logs.iter().enumerate() {
            match verify(i as u32, self.mib, l) {
                Ok(n) => outln!(
                    "   rank {i}: steps 1..{n} all present once, in order, every value right (killed at {}, restored, went on)",
                    at_kill[i]
                ),
                Err(e) => {
                    all_ok = false;
                    outln!("   rank {i}: BROKEN: {}", ckpt_shared::report::error_chain(&e));
                }
            }
        }
        Ok(all_ok)
    }
}

/// The figures of the two saves and the restore, a line each.
fn print_table(s1: &Outcome, s2: &Outcome, r: &Outcome) -> Result<(), DemoError> {
    outln!();
    outln!(
        "{:<24} {:>6} {:>12} {:>11} {:>11} {:>12} {:>10}",
        "operation",
        "ranks",
        "stood still",
        "image",
        "stored",
        "throughput",
        "time"
    );
    for (what, o) in [
        ("save (job runs on)", s1),
        ("save --kill", s2),
        ("restore", r),
    ] {
        let restore = what == "restore";
        outln!(
            "{:<24} {:>6} {:>12} {:>11} {:>11} {:>12} {:>10}",
            what,
            o.ranks,
            if restore {
                "-".to_string()
            } else {
                format!("{:.1} ms", o.freeze_ms)
            },
            client::human(o.memory_bytes),
            if restore {
                "-".to_string()
            } else {
                client::human(o.stored_bytes)
            },
            format!(
                "{}/s",
                client::human((o.memory_bytes as f64 / (o.total_ms.max(0.001) / 1e3)) as u64)
            ),
            format!("{:.1} ms", o.total_ms)
        );
    }
    outln!();
    Ok(())
}
