//! `ckpt-agent serve`: the daemon of one node.
//!
//! It keeps one QUIC connection (mutual TLS, see `ckpt_shared::tls`) to the
//! controller, registers the node and the ranks attached to it, and carries out the
//! controller's barrier: FREEZE, CAPTURE, RESUME or STORE, KILL, ABORT for a save;
//! RESTORE, RELEASE, ABORT for a restore. Each rank is dumped or restored by the
//! engine on a thread of its own ([`crate::dump::dump_gated`],
//! [`crate::restore::restore_gated`]); the `JobGate` (over [`crate::jobgate::GateMachine`]) holds those threads at the
//! barrier's points until the controller's word arrives.
//!
//! The lease: the controller pings every agent; an agent that hears nothing from it
//! for the lease (default 5 s), or loses the connection, gives up every attempt in
//! progress — its frozen ranks are thawed, its half-restored ranks killed — and
//! reconnects. A job is never left frozen by a dead controller.
//!
//! Ranks are attached through a UNIX socket (`ckpt-agent attach`, and later the
//! Slurm plugin): one JSON request per connection, answered by one JSON line. The
//! caller is identified by `SO_PEERCRED`: root may attach any process, a user only
//! their own.
//!
//! A rank is its process, not its number: each is held with its start time
//! (`/proc/PID/stat` field 22) from the moment it is attached or restored. A rank
//! whose process exited is dropped, even when another process took its PID; a
//! save checks every rank's start time before it touches anything, and the freeze
//! checks it again right after it seizes the root ([`crate::freeze::freeze`]),
//! so a process that took over a rank's PID is never frozen, dumped or killed.
//!
//! SIGINT and SIGTERM stop the daemon cleanly: it stops accepting requests, gives
//! up every operation in progress (frozen ranks thawed, half-restored ones killed,
//! the controller told), waits for them to end, removes what is left of its
//! network locks and exits with 128 + the signal.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use ckpt_shared::location::Location;
use ckpt_shared::objstore::StoreConfig;
use ckpt_shared::proto::{
    AttachedRank, AttemptId, FromAgent, Hello, NodeInfo, RankManifest, RankRef, RestoreRank,
    SaveSpec, ToAgent, PROTO_VERSION,
};
use ckpt_shared::tls::{self, Identity};
use ckpt_shared::wire;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tracing::{info, warn};

use crate::jobgate::{Action, Event, GateMachine, Step, Verdict};

/// How the daemon runs.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// This node's name: the name of its certificate.
    pub name: String,
    pub controller: SocketAddr,
    /// The directory of `ckpt-controller ca init`.
    pub certs: PathBuf,
    /// The local API socket.
    pub socket: PathBuf,
    pub lease: Duration,
    /// Worker threads per rank for memory.
    pub workers: usize,
    /// How this node reaches the store (its own S3 endpoint, credentials, retries).
    pub store: ckpt_shared::objstore::StoreConfig,
    /// The gc protocol's leases.
    pub leases: ckpt_shared::gc::Leases,
    pub registry: crate::track::Registry,
    pub hooks: crate::hooks::Hooks,
    /// The watchdog of this daemon's operations (see [`crate::rescue`]).
    pub rescue: Option<std::sync::Arc<crate::rescue::Watch>>,
    /// Set by SIGINT or SIGTERM: the daemon stops (see the module doc).
    pub cancel: crate::cancel::Cancel,
}

/// A request on the local API socket.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum ApiRequest {
    Attach {
        job: String,
        rank: u32,
        pid: i32,
        #[serde(default)]
        external_tcp: Option<ckpt_shared::proto::ExternalTcp>,
    },
    Detach {
        job: String,
        rank: u32,
    },
    List,
}

/// The answer to an [`ApiRequest`].
#[derive(Debug, Serialize, Deserialize)]
pub struct ApiReply {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ranks: Vec<AttachedRank>,
}

impl ApiReply {
    fn err(e: impl std::fmt::Display) -> ApiReply {
        ApiReply {
            ok: false,
            error: Some(e.to_string()),
            ranks: Vec::new(),
        }
    }
}

/// Sends `req` to the agent at `socket` and returns its answer.
pub fn api_call(socket: &std::path::Path, req: &ApiRequest) -> Result<ApiReply> {
    use std::io::{BufRead, Write};
    let mut s = std::os::unix::net::UnixStream::connect(socket).with_context(|| {
        format!(
            "cannot reach the agent at {}: is `ckpt-agent serve` running on this node \
             (and is this its --socket)?",
            socket.display()
        )
    })?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut line = serde_json::to_string(req)?;
    line.push('\n');
    s.write_all(line.as_bytes())?;
    let mut answer = String::new();
    std::io::BufReader::new(&s).read_line(&mut answer)?;
    serde_json::from_str(&answer).with_context(|| format!("bad answer from the agent: {answer:?}"))
}

/// The ranks of this node, and the ones an operation holds (not to be reaped).
#[derive(Default)]
struct Ranks {
    list: Vec<AttachedRank>,
    busy: std::collections::HashSet<i32>,
    /// The start time of each rank's process, by PID: the PID alone may come to
    /// name another process once the rank exits.
    starts: HashMap<i32, u64>,
}

impl Ranks {
    /// Whether the rank at `pid` is still the process that was attached.
    fn same_process(&self, pid: i32) -> bool {
        let now = crate::sys::proc::stat(pid)
            .ok()
            .filter(|s| s.state != 'Z' && s.state != 'X')
            .map(|s| s.start_time);
        now.is_some() && now == self.starts.get(&pid).copied()
    }
}

/// The start time of the live process `pid`.
fn start_time_of(pid: i32) -> Option<u64> {
    crate::sys::proc::stat(pid)
        .ok()
        .filter(|s| s.state != 'Z' && s.state != 'X')
        .map(|s| s.start_time)
}

struct Node {
    opts: ServeOptions,
    ranks: Mutex<Ranks>,
    attempts: Mutex<HashMap<AttemptId, Arc<JobGate>>>,
    /// The sender to the current controller connection, if any.
    out: Mutex<Option<mpsc::UnboundedSender<FromAgent>>>,
    /// When the controller was last heard from.
    heard: Mutex<Instant>,
}

impl Node {
    fn send(&self, msg: FromAgent) {
        if let Some(tx) = self.out.lock().unwrap().as_ref() {
            let _ = tx.send(msg);
        }
    }

    fn send_ranks(&self) {
        let list = self.ranks.lock().unwrap().list.clone();
        self.send(FromAgent::Ranks(list));
    }

    /// Gives up every attempt in progress (lost or silent controller).
    fn abort_all(&self, reason: &str) {
        for g in self.attempts.lock().unwrap().values() {
            g.abort(reason.to_string());
        }
    }
}

/// Runs the daemon until it is killed.
pub fn serve(opts: ServeOptions) -> Result<()> {
    let id = Identity::agent(&opts.certs, &opts.name).with_context(|| {
        format!(
            "no certificate for agent {:?} in {}: create one with \
             `ckpt-controller ca issue --agent {}` and copy the directory here",
            opts.name,
            opts.certs.display(),
            opts.name
        )
    })?;
    let mut client = tls::client_config(&id, true)?;
    client.transport_config(tls::transport(opts.lease));
    if let Some(dir) = opts.socket.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let _ = std::fs::remove_file(&opts.socket);
    // Lock tables whose owner is gone (a crashed predecessor, a killed dump) would
    // hold connections of a running job forever; those of a live owner (a
    // command-line dump beside us) stay.
    for t in crate::netlock::remove_stale() {
        eprintln!("ckpt-agent: removed the stale network lock {t}");
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let node = Arc::new(Node {
        opts: opts.clone(),
        ranks: Mutex::new(Ranks::default()),
        attempts: Mutex::new(HashMap::new()),
        out: Mutex::new(None),
        heard: Mutex::new(Instant::now()),
    });
    let name = opts.name.clone();
    rt.block_on(async move {
        let listener = tokio::net::UnixListener::bind(&opts.socket)
            .with_context(|| format!("binding the API socket {}", opts.socket.display()))?;
        // Any user may ask; each request is judged by the caller's credentials.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&opts.socket, std::fs::Permissions::from_mode(0o666))?;
        let api_task = tokio::spawn(api_loop(listener, node.clone()));
        if node.opts.hooks.pauses_at("monitor") {
            // Test hook: ranks are not watched, so that a test can give a rank's
            // PID to another process before the save looks at it.
            eprintln!("ckpt-agent: test pause at monitor (CKPT_TEST_PAUSE)");
        } else {
            tokio::spawn(monitor_loop(node.clone()));
        }
        let mut ep = wire::endpoint(
            if opts.controller.is_ipv6() {
                "[::]:0".parse()?
            } else {
                "0.0.0.0:0".parse()?
            },
            None,
        )?;
        ep.set_default_client_config(client);
        eprintln!(
            "ckpt-agent: node {} serving; API at {}; controller {}",
            opts.name,
            opts.socket.display(),
            opts.controller
        );
        let conn_node = node.clone();
        let conn_ep = ep.clone();
        let conns = tokio::spawn(async move {
            let mut backoff = Duration::from_millis(200);
            loop {
                match connection(&conn_ep, conn_node.clone()).await {
                    Ok(()) => backoff = Duration::from_millis(200),
                    Err(e) => warn!("controller connection: {e:#}"),
                }
                *conn_node.out.lock().unwrap() = None;
                conn_node.abort_all("lost the connection to the controller");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        });
        let signal = loop {
            if let Some(sig) = node.opts.cancel.signal() {
                break sig;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        // Stop: no new request, every operation given up (its rank threads thaw
        // or kill what they hold and tell the controller, whose connection stays
        // up meanwhile), then the connection.
        api_task.abort();
        let _ = std::fs::remove_file(&node.opts.socket);
        let why = format!(
            "the agent of node {} was stopped by {}",
            node.opts.name,
            crate::cancel::signal_name(signal)
        );
        eprintln!("ckpt-agent: {why}: giving up the operations in progress");
        node.abort_all(&why);
        let t = Instant::now();
        while !node.attempts.lock().unwrap().is_empty() {
            if t.elapsed() > Duration::from_secs(30) {
                warn!("operations still running after 30 s; exiting anyway");
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // Let the last frames (FAILED) leave before the connection closes.
        tokio::time::sleep(Duration::from_millis(100)).await;
        conns.abort();
        ep.close(0u32.into(), b"agent stopping");
        let _ = tokio::time::timeout(Duration::from_secs(1), ep.wait_idle()).await;
        Ok::<i32, anyhow::Error>(signal)
    })
    .and_then(|signal| {
        for t in crate::netlock::remove_own() {
            eprintln!("ckpt-agent: removed the network lock {t}");
        }
        Err(crate::cancel::Interrupted {
            signal,
            what: format!("ckpt-agent serve (node {name})"),
            outcome: "every operation in progress was given up, its ranks left running".into(),
        }
        .into())
    })
}

/// One connection to the controller, until it ends.
async fn connection(ep: &quinn::Endpoint, node: Arc<Node>) -> Result<()> {
    let conn = ep
        .connect(node.opts.controller, "controller")?
        .await
        .with_context(|| format!("connecting to the controller at {}", node.opts.controller))?;
    let (mut send, mut recv) = conn.open_bi().await?;
    let hello = FromAgent::Hello(Hello {
        proto_version: PROTO_VERSION,
        name: node.opts.name.clone(),
    });
    wire::write_frame(&mut send, &hello.to_frame()?).await?;
    wire::write_frame(
        &mut send,
        &FromAgent::Register(node_info(&node.opts.name)).to_frame()?,
    )
    .await?;
    let first = wire::read_frame(&mut recv)
        .await?
        .context("the controller closed the stream")?;
    match ToAgent::from_frame(&first)? {
        ToAgent::Hello(h) if h.proto_version == PROTO_VERSION => {}
        ToAgent::Hello(h) => bail!(
            "the controller speaks protocol {} and this agent {PROTO_VERSION}: run the same ckpt version on both",
            h.proto_version
        ),
        other => bail!("the controller began with {other:?} instead of Hello"),
    }
    eprintln!(
        "ckpt-agent: node {} registered with the controller at {}",
        node.opts.name, node.opts.controller
    );
    *node.heard.lock().unwrap() = Instant::now();
    let (tx, mut rx) = mpsc::unbounded_channel::<FromAgent>();
    *node.out.lock().unwrap() = Some(tx);
    node.send_ranks();
    let writer = tokio::spawn(async move {
        while let Some(m) = rx.recv().await {
            let Ok(f) = m.to_frame() else { continue };
            if wire::write_frame(&mut send, &f).await.is_err() {
                break;
            }
        }
    });
    let result = async {
        loop {
            let Some(f) = wire::read_frame(&mut recv).await? else {
                return Ok(());
            };
            *node.heard.lock().unwrap() = Instant::now();
            let msg = ToAgent::from_frame(&f)?;
            handle(&node, msg);
        }
    }
    .await;
    writer.abort();
    result
}

fn node_info(name: &str) -> NodeInfo {
    let addrs = nix::ifaddrs::getifaddrs()
        .map(|it| {
            it.filter_map(|i| i.address)
                .filter_map(|a| {
                    if let Some(v4) = a.as_sockaddr_in() {
                        Some(std::net::IpAddr::V4(v4.ip()))
                    } else {
                        a.as_sockaddr_in6().map(|v6| std::net::IpAddr::V6(v6.ip()))
                    }
                })
                .filter(|ip| !ip.is_loopback())
                .map(|ip| ip.to_string())
                .collect()
        })
        .unwrap_or_default();
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        })
        .unwrap_or_default();
    NodeInfo {
        name: name.to_string(),
        addrs,
        kernel: crate::host::uname_release(),
        cpu: format!("{cpu}; xcr0 {:#x}", crate::sys::host_xcr0()),
        agent_version: env!("CARGO_PKG_VERSION").to_string(),
    }
}

fn handle(node: &Arc<Node>, msg: ToAgent) {
    let gate = |a: AttemptId| node.attempts.lock().unwrap().get(&a).cloned();
    match msg {
        ToAgent::Hello(_) => {}
        ToAgent::Ping => node.send(FromAgent::Pong),
        ToAgent::Freeze {
            attempt,
            spec,
            ranks,
        } => start_save(node, attempt, spec, ranks),
        ToAgent::Restore {
            attempt,
            job,
            ranks,
            store_config,
        } => start_restore(node, attempt, job, ranks, &store_config),
        ToAgent::Capture { attempt } => gate(attempt).map_or((), |g| g.open(Step::Frozen)),
        ToAgent::Resume { attempt } | ToAgent::Store { attempt } => {
            gate(attempt).map_or((), |g| g.open(Step::Captured))
        }
        ToAgent::Kill { attempt } => gate(attempt).map_or((), |g| g.open(Step::Stored)),
        ToAgent::Release { attempt } => gate(attempt).map_or((), |g| g.open(Step::Rebuilt)),
        ToAgent::Abort { attempt, reason } => {
            if let Some(g) = gate(attempt) {
                g.handle(Event::ControllerAbort(format!(
                    "the controller aborted: {reason}"
                )));
            }
        }
    }
}

/// The [`crate::gate::Gate`] of one attempt on this node, shared by its rank
/// threads: a [`GateMachine`] behind a lock, driven by the ranks (arrivals,
/// failures) and the controller connection (open, abort); a rank waits on the
/// condition variable until the machine's verdict changes or its lease deadline
/// comes (no polling).
struct JobGate {
    attempt: AttemptId,
    node: Arc<Node>,
    machine: Mutex<GateMachine>,
    cv: Condvar,
    /// Test hook: a pause point stops the agent there for good (so that a test can
    /// kill it, or its controller, at a known moment).
    pause: crate::hooks::Hooks,
}

impl JobGate {
    fn new(node: &Arc<Node>, attempt: AttemptId, ranks: usize) -> Arc<JobGate> {
        let heard = *node.heard.lock().unwrap();
        Arc::new(JobGate {
            attempt,
            node: node.clone(),
            machine: Mutex::new(GateMachine::new(attempt, ranks, node.opts.lease, heard)),
            cv: Condvar::new(),
            pause: node.opts.hooks.clone(),
        })
    }

    fn test_pause(&self, point: &str) {
        if self.pause.pauses_at(point) {
            eprintln!("ckpt-agent: test pause at {point} (CKPT_TEST_PAUSE)");
            loop {
                std::thread::sleep(Duration::from_secs(3600));
            }
        }
    }

    /// Feeds `ev` to the machine, then sends what it asks for (outside the lock).
    fn handle(&self, ev: Event) {
        let mut m = self.machine.lock().unwrap();
        m.handle(Instant::now(), ev);
        let actions: Vec<Action> = std::iter::from_fn(|| m.poll()).collect();
        drop(m);
        self.cv.notify_all();
        for Action::Send { step, msg } in actions {
            if let Some(step) = step {
                self.test_pause(step.name());
            }
            self.node.send(msg);
        }
    }

    fn open(&self, step: Step) {
        self.handle(Event::Open(step));
    }

    fn abort(&self, reason: String) {
        self.handle(Event::Abort(reason));
    }

    /// A rank thread failed: tell the controller (once) and stop the others.
    fn fail(&self, reason: String) {
        self.handle(Event::Failed(reason));
    }

    /// Arrive at `step` (the last rank reports it), then wait for the word.
    fn pass(&self, step: Step) -> Result<(), String> {
        self.handle(Event::Arrive(step));
        let mut m = self.machine.lock().unwrap();
        loop {
            let now = Instant::now();
            m.handle(now, Event::Heard(*self.node.heard.lock().unwrap()));
            m.handle_timeout(now);
            match m.verdict(step) {
                Verdict::Go => return Ok(()),
                Verdict::GiveUp(r) => return Err(r),
                Verdict::Wait => {}
            }
            let wait = m
                .next_timeout()
                .map_or(Duration::from_secs(1), |t| t.saturating_duration_since(now));
            m = self.cv.wait_timeout(m, wait).unwrap().0;
        }
    }
}

impl crate::gate::Gate for JobGate {
    fn frozen(&self) -> Result<(), String> {
        self.pass(Step::Frozen)
    }
    fn captured(&self) -> Result<(), String> {
        self.pass(Step::Captured)
    }
    fn storing(&self) -> Result<(), String> {
        self.test_pause("storing");
        match self.machine.lock().unwrap().abort_reason() {
            Some(r) => Err(r.to_string()),
            None => Ok(()),
        }
    }
    fn stored(&self, _img: &ckpt_shared::image::Image) -> Result<(), String> {
        // The manifest of this rank is recorded by its RankGate before the gate;
        // only the count matters here.
        self.pass(Step::Stored)
    }
    fn rebuilt(&self, _root: i32) -> Result<(), String> {
        self.pass(Step::Rebuilt)
    }
}

/// The gate of one rank: knows the rank, so that it can record what the rank made
/// before it arrives at the point that reports it.
struct RankGate {
    gate: Arc<JobGate>,
    rank: u32,
    image: Location,
}

impl crate::gate::Gate for RankGate {
    fn frozen(&self) -> Result<(), String> {
        self.gate.frozen()
    }
    fn captured(&self) -> Result<(), String> {
        self.gate.captured()
    }
    fn storing(&self) -> Result<(), String> {
        self.gate.storing()
    }
    fn stored(&self, img: &ckpt_shared::image::Image) -> Result<(), String> {
        self.gate
            .handle(Event::Manifest(manifest_of(self.rank, &self.image, img)));
        self.gate.stored(img)
    }
    fn rebuilt(&self, root: i32) -> Result<(), String> {
        self.gate.handle(Event::Rebuilt(RankRef {
            rank: self.rank,
            pid: root,
        }));
        self.gate.rebuilt(root)
    }
    fn lock_name(&self) -> Option<(String, String)> {
        Some((self.gate.attempt.to_string(), format!("r{}", self.rank)))
    }
}

fn manifest_of(rank: u32, image: &Location, img: &ckpt_shared::image::Image) -> RankManifest {
    RankManifest {
        rank,
        image: image.clone(),
        memory_bytes: img.stats.memory_bytes,
        stored_bytes: img.stats.stored_bytes,
        tcp: img
            .files
            .iter()
            .filter_map(|f| match &f.kind {
                ckpt_shared::image::FileKind::Tcp { conn } => Some(ckpt_shared::proto::SavedConn {
                    local: conn.local,
                    remote: conn.remote,
                    send_queued: conn.send_queue.len() as u64,
                    recv_queued: conn.recv_queue.len() as u64,
                    send_una: Some(conn.send_una()),
                    recv_nxt: Some(conn.recv_seq),
                    external: false,
                }),
                _ => None,
            })
            .collect(),
        listen: img
            .files
            .iter()
            .filter_map(|f| match &f.kind {
                ckpt_shared::image::FileKind::TcpListen { addr, .. } => Some(*addr),
                _ => None,
            })
            .collect(),
        udp: img
            .files
            .iter()
            .filter_map(|f| match &f.kind {
                ckpt_shared::image::FileKind::Udp { local, .. } if local.port() != 0 => {
                    Some(*local)
                }
                _ => None,
            })
            .collect(),
    }
}

fn start_save(node: &Arc<Node>, attempt: AttemptId, spec: SaveSpec, ranks: Vec<RankRef>) {
    // Every rank must be one of ours, still the process that was attached.
    let starts = {
        let mut r = node.ranks.lock().unwrap();
        for want in &ranks {
            let ok = r
                .list
                .iter()
                .any(|a| a.job == spec.job && a.rank == want.rank && a.pid == want.pid);
            if !ok {
                node.send(FromAgent::Failed {
                    attempt,
                    reason: format!(
                        "rank {} (PID {}) of job {} is not attached to node {}",
                        want.rank, want.pid, spec.job, node.opts.name
                    ),
                });
                return;
            }
            if !r.same_process(want.pid) {
                let now = start_time_of(want.pid).is_some();
                node.send(FromAgent::Failed {
                    attempt,
                    reason: format!(
                        "rank {} of job {} (PID {}) on node {} has exited{}; the save \
                         touched no process (detach the rank, or restore the job)",
                        want.rank,
                        spec.job,
                        want.pid,
                        node.opts.name,
                        if now {
                            format!(", and PID {} now belongs to another process", want.pid)
                        } else {
                            String::new()
                        }
                    ),
                });
                return;
            }
        }
        r.busy.extend(ranks.iter().map(|x| x.pid));
        r.starts.clone()
    };
    let gate = JobGate::new(node, attempt, ranks.len());
    node.attempts.lock().unwrap().insert(attempt, gate.clone());
    let node = node.clone();
    // The controller's store settings, completed by ours.
    let store = spec.store_config.or(&node.opts.store);
    std::thread::spawn(move || {
        let snapshot_limit = crate::dump::default_snapshot_limit() / ranks.len().max(1) as u64;
        let threads: Vec<_> = ranks
            .iter()
            .map(|r| {
                let image = spec.image_of(r.rank);
                let gate = RankGate {
                    gate: gate.clone(),
                    rank: r.rank,
                    image: image.clone(),
                };
                let (pid, rank) = (r.pid, r.rank);
                let start_time = starts.get(&pid).copied();
                let (kill, zstd) = (spec.kill, spec.zstd_level);
                let node = node.clone();
                let store = store.clone();
                std::thread::spawn(move || -> Result<Option<RankManifest>, String> {
                    let loc = image.clone();
                    let o = &node.opts;
                    let opts = crate::dump::DumpOptions {
                        pid,
                        chunk_size: crate::dump::default_chunk_size(&loc),
                        image: loc,
                        leave_running: !kill,
                        zstd_level: zstd,
                        workers: o.workers,
                        snapshot_limit,
                        parent: None,
                        track: false,
                        store,
                        leases: o.leases,
                        registry: o.registry.clone(),
                        hooks: o.hooks.clone(),
                        rescue: o.rescue.clone(),
                        hold: Default::default(),
                        start_time,
                        cancel: o.cancel.clone(),
                    };
                    match crate::dump::dump_gated(&opts, &gate) {
                        Ok(img) => Ok((!kill).then(|| manifest_of(rank, &image, &img))),
                        Err(crate::dump::DumpError::Aborted(r)) => Err(r),
                        Err(e) => {
                            let reason = format!("rank {rank} (PID {pid}): {e}");
                            gate.gate.fail(reason.clone());
                            Err(reason)
                        }
                    }
                })
            })
            .collect();
        let mut manifests = Vec::new();
        let mut ok = true;
        for t in threads {
            match t.join() {
                Ok(Ok(m)) => manifests.extend(m),
                Ok(Err(_)) => ok = false,
                Err(_) => {
                    ok = false;
                    gate.fail("a rank's dump thread panicked".into());
                }
            }
        }
        let (aborted, written) = {
            let st = gate.machine.lock().unwrap();
            let mut w: Vec<u32> = st.manifests().iter().map(|m| m.rank).collect();
            w.extend(manifests.iter().map(|m| m.rank));
            w.sort_unstable();
            w.dedup();
            (
                st.abort_reason()
                    .map(String::from)
                    .filter(|_| st.aborted_by_controller()),
                w,
            )
        };
        if let (Some(why), false) = (&aborted, written.is_empty()) {
            // Ranks that finished storing after the controller gave the attempt up:
            // their images belong to no checkpoint. The controller removes the rank
            // images when it aborts; these may have been written after that. Only on
            // the controller's own ABORT: a controller that was lost may have
            // committed first, and then the images are the checkpoint.
            info!(attempt, reason = %why, "removing the images of an aborted save");
            if let Ok(store) =
                ckpt_shared::objstore::BlockingStore::open(&spec.store.to_string(), &store)
            {
                for &rank in &written {
                    let name = ckpt_shared::proto::rank_image_name(&spec.ckpt, rank);
                    if let Err(e) = store.delete_manifest(&name) {
                        warn!(%e, name, "could not remove the image of an aborted save");
                    }
                }
            }
        } else if ok && !spec.kill {
            manifests.sort_by_key(|m| m.rank);
            node.send(FromAgent::Stored {
                attempt,
                ranks: manifests,
            });
        }
        {
            let mut r = node.ranks.lock().unwrap();
            for x in &ranks {
                r.busy.remove(&x.pid);
            }
            if ok && spec.kill {
                r.list
                    .retain(|a| !(a.job == spec.job && ranks.iter().any(|x| x.pid == a.pid)));
                for x in &ranks {
                    r.starts.remove(&x.pid);
                }
            }
        }
        if ok && spec.kill {
            node.send_ranks();
        }
        node.attempts.lock().unwrap().remove(&attempt);
    });
}

fn start_restore(
    node: &Arc<Node>,
    attempt: AttemptId,
    job: String,
    ranks: Vec<RestoreRank>,
    store_config: &StoreConfig,
) {
    // The controller's store settings, completed by ours.
    let store = store_config.or(&node.opts.store);
    let gate = JobGate::new(node, attempt, ranks.len());
    node.attempts.lock().unwrap().insert(attempt, gate.clone());
    let node = node.clone();
    let external_tcp = ranks.iter().find_map(|r| r.external_tcp);
    std::thread::spawn(move || {
        let threads: Vec<_> = ranks
            .iter()
            .map(|r| {
                let gate = RankGate {
                    gate: gate.clone(),
                    rank: r.rank,
                    image: r.image.clone(),
                };
                let (rank, image) = (r.rank, r.image.clone());
                let node = node.clone();
                let store = store.clone();
                let moves = crate::fd::Moves {
                    conns: r.readdress.clone(),
                    listen: r.relisten.clone(),
                    peer_recv: r.peer_recv.clone(),
                    reset: r.reset.clone(),
                };
                std::thread::spawn(move || -> Result<i32, String> {
                    let opts = crate::restore::RestoreOptions {
                        image: image.clone(),
                        new_pid_ns: false,
                        workers: node.opts.workers,
                        moves,
                        store,
                        fill: Default::default(),
                        hooks: node.opts.hooks.clone(),
                        rescue: node.opts.rescue.clone(),
                        // A job restore brings the output back to the
                        // checkpoint; `keep` is not passed down from the
                        // controller yet.
                        changed_files: Default::default(),
                    };
                    match crate::restore::restore_gated(&opts, &gate) {
                        Ok(rep) => Ok(rep.root_pid),
                        Err(crate::restore::RestoreError::Aborted(r)) => Err(r),
                        Err(e) => {
                            let reason = format!("rank {rank} from {image}: {e}");
                            gate.gate.fail(reason.clone());
                            Err(reason)
                        }
                    }
                })
            })
            .collect();
        let mut pids = Vec::new();
        let mut ok = true;
        for (t, r) in threads.into_iter().zip(&ranks) {
            match t.join() {
                Ok(Ok(pid)) => pids.push((r.rank, pid)),
                Ok(Err(_)) => ok = false,
                Err(_) => {
                    ok = false;
                    gate.fail("a rank's restore thread panicked".into());
                }
            }
        }
        if ok {
            {
                let mut rs = node.ranks.lock().unwrap();
                for (rank, pid) in pids {
                    let uid = crate::sys::proc::status(pid).map(|s| s.uid[0]).unwrap_or(0);
                    rs.list.retain(|a| !(a.job == job && a.rank == rank));
                    if let Some(start) = start_time_of(pid) {
                        rs.starts.insert(pid, start);
                    }
                    rs.list.push(AttachedRank {
                        job: job.clone(),
                        rank,
                        pid,
                        uid,
                        external_tcp,
                    });
                }
            }
            node.send(FromAgent::Released { attempt });
            node.send_ranks();
        }
        node.attempts.lock().unwrap().remove(&attempt);
    });
}

/// Drops ranks whose process is gone (reaping those that are our children: the
/// restored ones), and tells the controller.
async fn monitor_loop(node: Arc<Node>) {
    loop {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let changed = {
            let mut guard = node.ranks.lock().unwrap();
            let r = &mut *guard;
            let busy = r.busy.clone();
            let before = r.list.len();
            let starts = &r.starts;
            r.list.retain(|a| {
                if busy.contains(&a.pid) {
                    return true;
                }
                // Our child (a rank we restored): reap it if it exited. Not while an
                // operation traces it (`busy`): its wait would be taken from it.
                if crate::sys::spawn::reap_if_exited(a.pid) {
                    info!(job = a.job, rank = a.rank, pid = a.pid, "rank exited");
                    return false;
                }
                // Gone, or its PID taken by another process: the rank exited.
                let same = start_time_of(a.pid).is_some()
                    && start_time_of(a.pid) == starts.get(&a.pid).copied();
                if !same {
                    info!(job = a.job, rank = a.rank, pid = a.pid, "rank exited");
                }
                same
            });
            let live: std::collections::HashSet<i32> = r.list.iter().map(|a| a.pid).collect();
            r.starts.retain(|pid, _| live.contains(pid));
            r.list.len() != before
        };
        if changed {
            node.send_ranks();
        }
    }
}

async fn api_loop(listener: tokio::net::UnixListener, node: Arc<Node>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let node = node.clone();
        tokio::spawn(async move {
            let uid = stream.peer_cred().map(|c| c.uid()).ok();
            let (rd, mut wr) = stream.into_split();
            let mut line = String::new();
            let mut rd = tokio::io::BufReader::new(rd);
            if rd.read_line(&mut line).await.is_err() {
                return;
            }
            let reply = match (serde_json::from_str::<ApiRequest>(&line), uid) {
                (Err(e), _) => ApiReply::err(format!("bad request: {e}")),
                (_, None) => ApiReply::err("cannot tell who is asking (SO_PEERCRED)"),
                (Ok(req), Some(uid)) => api(&node, req, uid),
            };
            let mut out = serde_json::to_string(&reply).unwrap_or_default();
            out.push('\n');
            let _ = wr.write_all(out.as_bytes()).await;
        });
    }
}

fn api(node: &Arc<Node>, req: ApiRequest, caller: u32) -> ApiReply {
    match req {
        ApiRequest::List => ApiReply {
            ok: true,
            error: None,
            ranks: node.ranks.lock().unwrap().list.clone(),
        },
        ApiRequest::Attach {
            job,
            rank,
            pid,
            external_tcp,
        } => {
            if let Err(e) = ckpt_shared::objstore::check_image_name(&job) {
                return ApiReply::err(format!("job name {job:?}: {e}"));
            }
            let owner = match crate::sys::proc::status(pid) {
                Ok(s) => s.uid[0],
                Err(_) => return ApiReply::err(format!("no process {pid} on this node")),
            };
            let Some(start) = start_time_of(pid) else {
                return ApiReply::err(format!("no process {pid} on this node"));
            };
            if caller != 0 && caller != owner {
                return ApiReply::err(format!(
                    "process {pid} belongs to uid {owner}; uid {caller} may attach only its own processes"
                ));
            }
            {
                let mut r = node.ranks.lock().unwrap();
                if let Some(a) = r.list.iter().find(|a| a.pid == pid) {
                    return ApiReply::err(format!(
                        "process {pid} is already rank {} of job {}",
                        a.rank, a.job
                    ));
                }
                if r.list.iter().any(|a| a.job == job && a.rank == rank) {
                    return ApiReply::err(format!(
                        "job {job} already has a rank {rank} on this node"
                    ));
                }
                r.list.push(AttachedRank {
                    job,
                    rank,
                    pid,
                    uid: owner,
                    external_tcp,
                });
                r.starts.insert(pid, start);
            }
            node.send_ranks();
            ApiReply {
                ok: true,
                error: None,
                ranks: Vec::new(),
            }
        }
        ApiRequest::Detach { job, rank } => {
            let mut r = node.ranks.lock().unwrap();
            let Some(i) = r.list.iter().position(|a| a.job == job && a.rank == rank) else {
                return ApiReply::err(format!("job {job} has no rank {rank} on this node"));
            };
            if caller != 0 && caller != r.list[i].uid {
                return ApiReply::err("only the job's owner or root may detach its ranks");
            }
            let gone = r.list.remove(i);
            r.starts.remove(&gone.pid);
            drop(r);
            node.send_ranks();
            ApiReply {
                ok: true,
                error: None,
                ranks: Vec::new(),
            }
        }
    }
}
