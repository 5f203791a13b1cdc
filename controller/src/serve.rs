//! `ckpt-controller serve`: the registry of agents and jobs, the checkpoint
//! catalog, and the driver that feeds the barrier state machines
//! ([`crate::barrier`]) from the agents' QUIC connections.
//!
//! Each agent holds one connection (mutual TLS; the name it registers must be one
//! its certificate is valid for). Each save or restore is a task of its own that
//! owns its barrier: the connection tasks route every message that names an
//! attempt to that task, and tell every task when an agent is lost. The catalog is
//! the set of job manifests in the store ([`ckpt_shared::catalog`]), read at start,
//! so a controller that restarts knows every committed checkpoint.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ckpt_shared::catalog::{self, CatalogError, JobManifest, JobRank, JOB_FORMAT_VERSION};
use ckpt_shared::gc::{self, GcError, Leases};
use ckpt_shared::objstore::{BlockingStore, ObjStoreError, StoreConfig};
use ckpt_shared::proto::{
    rank_image_name, AttachedRank, AttemptId, ExternalTcp, FrameError, FromAgent, Hello, NodeInfo,
    RankManifest, RankRef, RestoreRank, SaveSpec, ToAgent, PROTO_VERSION,
};
use ckpt_shared::tls::{self, Identity, TlsError};
use ckpt_shared::wire::{self, WireError};
use serde::Deserialize;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tracing::{info, warn};

use crate::api::{Done, Event, JobView, NodeView, Outcome, RankView, Request};
use crate::barrier::{self, Action, Barrier, RestoreBarrier, Timeouts};

/// The controller could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("reading the config file {}", path.display())]
    ConfigRead {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config file {}", path.display())]
    ConfigParse {
        path: PathBuf,
        #[source]
        source: Box<toml::de::Error>,
    },
    #[error(
        "no controller certificate in {}: create the cluster CA with \
         `ckpt-controller ca init --dir {}`",
        certs.display(),
        certs.display()
    )]
    Identity {
        certs: PathBuf,
        #[source]
        source: Box<TlsError>,
    },
    #[error("the TLS configuration of the QUIC port")]
    Tls {
        #[source]
        source: Box<TlsError>,
    },
    #[error("opening the store {url}")]
    StoreOpen {
        url: String,
        #[source]
        source: Box<ObjStoreError>,
    },
    #[error("the store {url} does not answer")]
    StoreCheck {
        url: String,
        #[source]
        source: Box<ObjStoreError>,
    },
    #[error("reading the catalog of the store {url}")]
    Catalog {
        url: String,
        #[source]
        source: Box<CatalogError>,
    },
    #[error("starting the controller's threads")]
    Runtime {
        #[source]
        source: std::io::Error,
    },
    #[error("creating {}", dir.display())]
    SocketDir {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "another controller listens on {}; stop it or use another --socket",
        socket.display()
    )]
    SocketInUse { socket: PathBuf },
    #[error("binding the QUIC port {addr}")]
    BindQuic {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("binding the API socket {}", socket.display())]
    BindSocket {
        socket: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("opening the API socket {} to every user (mode 0666)", socket.display())]
    SocketMode {
        socket: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("binding the TCP API {addr}")]
    BindTcpApi {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// An agent's connection that ended in an error (logged; the agent is dropped).
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("no stream opened")]
    NoStream,
    #[error(transparent)]
    Connection(#[from] quinn::ConnectionError),
    #[error(transparent)]
    Wire(#[from] WireError),
    #[error(transparent)]
    Frame(#[from] FrameError),
    #[error("no {expected}")]
    Closed { expected: &'static str },
    #[error("agent {name} speaks protocol {theirs}, this controller {PROTO_VERSION}")]
    Protocol { name: String, theirs: u32 },
    #[error("the agent began with {got:?} instead of Hello")]
    NotHello { got: Box<FromAgent> },
    #[error("an agent calls itself {name:?} but its certificate is for {names:?}")]
    NotItsName { name: String, names: Vec<String> },
    #[error("agent {name} sent {got:?} instead of Register")]
    NotRegister { name: String, got: Box<FromAgent> },
}

/// A request of the API that is refused or failed: the text goes back to the
/// client, who sees it as the command's error, so each says what to do. The
/// store's errors are part of the text (there is no chain on the wire).
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    #[error("bad request: {error}")]
    BadRequest { error: serde_json::Error },
    #[error("bad request in the credential: {error}")]
    BadCredentialRequest { error: serde_json::Error },
    #[error("{}", ckpt_shared::report::error_chain(error))]
    Credential { error: crate::munge::MungeError },
    #[error("cannot tell who is asking (SO_PEERCRED)")]
    NoPeerCred,
    #[error("job {job} has no committed checkpoint (see `ckpt-controller ckpt list`)")]
    NoLatest { job: String },
    #[error("no checkpoint {id} in the catalog (see `ckpt-controller ckpt list`)")]
    NoCheckpoint { id: String },
    #[error("checkpoint {ckpt} belongs to uid {owner}; uid {uid} may act only on its own jobs")]
    NotYourCheckpoint { ckpt: String, owner: u32, uid: u32 },
    #[error("job {job} belongs to uid {owner}; uid {uid} may act only on its own jobs")]
    NotYourJob { job: String, owner: u32, uid: u32 },
    #[error("job {job} belongs to uid {owner}; uid {uid} may save only its own jobs")]
    NotYourSave { job: String, owner: u32, uid: u32 },
    #[error("only root may gc the store: it deletes chunks of every user")]
    GcNotRoot,
    #[error("no running job {job}: no agent has ranks of it (see `ckpt-controller job list`)")]
    NoRunningJob { job: String },
    #[error("job {job} has a save or restore in progress; wait for it to end")]
    Busy { job: String },
    #[error("the controller is stopping: start the save or restore again once it runs")]
    Stopping,
    #[error(
        "checkpoint {ckpt} ran on {} nodes ({}); --nodes names {given}: give as many, or \
         use --map RANK=NODE",
        saved.len(),
        saved.join(",")
    )]
    NodeCount {
        ckpt: String,
        saved: Vec<String>,
        given: usize,
    },
    #[error("checkpoint {ckpt} has no rank {rank}")]
    NoRank { ckpt: String, rank: u32 },
    #[error(
        "job {job} is running ({ranks} ranks attached): end it, or save it with --kill, \
         before restoring it"
    )]
    JobRunning { job: String, ranks: usize },
    #[error(
        "no agent connected for node(s) {missing:?} (connected: {have:?}); choose others \
         with --nodes or --map"
    )]
    NoAgent {
        missing: Vec<String>,
        have: Vec<String>,
    },
    #[error(
        "rank {rank} was saved on kernel {saved} but node {node} runs {have}: restore it on \
         nodes with the same kernel build"
    )]
    Kernel {
        rank: u32,
        saved: String,
        node: String,
        have: String,
    },
    #[error(
        "the save of job {job} was aborted, nothing was committed and the job runs on: {reason}"
    )]
    SaveAborted { job: String, reason: String },
    #[error("the restore of {ckpt} failed and no rank was released: {reason}")]
    RestoreFailed { ckpt: String, reason: String },
    #[error("removing {ckpt}: {error}")]
    Remove { ckpt: String, error: CatalogError },
    #[error("pruning job {job}: {error}")]
    Prune { job: String, error: CatalogError },
    #[error("{0}")]
    Gc(GcError),
    #[error("{0}")]
    Task(tokio::task::JoinError),
}

/// What `serve` takes from its environment rather than from its config file. The
/// CLI layer reads it (`ckpt-controller serve` and `demo`); the library never
/// reads the environment, so a test or an embedding sets each field itself.
#[derive(Debug, Clone, Default)]
pub struct ServeOptions {
    /// The store's settings under the config file's `[s3]` table (whose values
    /// win): in the CLI, the AWS_* variables and `CKPT_STORE_RETRY_SECS`.
    pub store: StoreConfig,
    /// How long the markers of checkpoints and gcs count as alive, for `ckpt gc`
    /// (in the CLI, `CKPT_GC_WAIT_SECS`).
    pub leases: Leases,
    /// Test hook (`CKPT_TEST_PAUSE=frozen` in the CLI): a save stops for good once
    /// every rank is frozen, so that a test can kill the controller and watch the
    /// agents' leases. Only in builds with the `test-hooks` feature.
    #[cfg(feature = "test-hooks")]
    pub test_pause: Option<String>,
}

/// Where the controller's local API listens by default.
pub const DEFAULT_SOCKET: &str = "/run/ckpt/controller.sock";

/// The controller's settings: a TOML file (`--config`), each overridden by a flag.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// QUIC address the agents connect to.
    pub listen: SocketAddr,
    /// Store of the checkpoints: `file:///path` or `s3://bucket/prefix`.
    pub store: String,
    /// Directory of `ckpt-controller ca init`.
    pub certs: PathBuf,
    /// The local API socket.
    pub socket: PathBuf,
    /// A TCP address for the API from other hosts (login nodes): each request
    /// carries a MUNGE credential that proves its user. Off unless set.
    pub api_listen: Option<SocketAddr>,
    /// munged's socket (default: munge's own default).
    pub munge_socket: Option<PathBuf>,
    /// Seconds: an agent's lease (the controller pings four times per lease).
    pub lease_secs: f64,
    /// Seconds each phase may take, for all agents together.
    pub freeze_timeout_secs: f64,
    pub capture_timeout_secs: f64,
    pub store_timeout_secs: f64,
    pub restore_timeout_secs: f64,
    /// zstd level of the chunks (0: raw).
    pub compress: i32,
    /// What a save does with connections to peers outside the job, unless the job
    /// or the save says otherwise: `fail` (the default) or `close`.
    pub external_tcp: ExternalTcp,
    /// S3 settings (the AWS_* environment variables are used where these are empty).
    pub s3: S3Settings,
}

/// S3 settings in the config file.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct S3Settings {
    pub endpoint: Option<String>,
    pub region: Option<String>,
    pub access_key_id: Option<String>,
    pub secret_access_key: Option<String>,
    pub allow_http: Option<bool>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: "0.0.0.0:7100".parse().expect("address"),
            store: "file:///var/lib/ckpt/store".into(),
            certs: "/etc/ckpt/certs".into(),
            socket: DEFAULT_SOCKET.into(),
            api_listen: None,
            munge_socket: None,
            lease_secs: 5.0,
            freeze_timeout_secs: 30.0,
            capture_timeout_secs: 60.0,
            store_timeout_secs: 3600.0,
            restore_timeout_secs: 600.0,
            compress: 0,
            external_tcp: ExternalTcp::Fail,
            s3: S3Settings::default(),
        }
    }
}

impl Config {
    /// Reads a TOML config file.
    pub fn load(path: &std::path::Path) -> Result<Config, ServeError> {
        let text = std::fs::read_to_string(path).map_err(|source| ServeError::ConfigRead {
            path: path.to_path_buf(),
            source,
        })?;
        toml::from_str(&text).map_err(|source| ServeError::ConfigParse {
            path: path.to_path_buf(),
            source: Box::new(source),
        })
    }

    fn lease(&self) -> Duration {
        Duration::from_secs_f64(self.lease_secs)
    }

    /// `base` (the environment's settings) with the file's `[s3]` over it.
    fn store_config(&self, base: &StoreConfig) -> StoreConfig {
        let mut c = base.clone();
        let s = &self.s3;
        // The file's settings win over the environment's.
        if s.endpoint.is_some() {
            c.s3.endpoint = s.endpoint.clone();
        }
        if s.region.is_some() {
            c.s3.region = s.region.clone();
        }
        if s.access_key_id.is_some() || s.secret_access_key.is_some() {
            // The file's keys replace the environment's whole credentials.
            c.s3.access_key_id = s.access_key_id.clone();
            c.s3.secret_access_key = s.secret_access_key.clone();
            c.s3.session_token = None;
            c.s3.credentials_source = Some(ckpt_shared::objstore::CredentialsSource::Configuration);
        }
        if s.allow_http.is_some() {
            c.s3.allow_http = s.allow_http;
        }
        c
    }
}

/// What an operation task hears.
enum OpEvent {
    Msg(String, FromAgent),
    Lost(String),
    /// The controller stops (SIGINT, SIGTERM): give the attempt up.
    Stop(String),
}

struct AgentConn {
    tx: mpsc::UnboundedSender<ToAgent>,
    info: NodeInfo,
    ranks: Vec<AttachedRank>,
    conn: u64,
}

#[derive(Default)]
struct Registry {
    agents: BTreeMap<String, AgentConn>,
    ops: HashMap<AttemptId, mpsc::UnboundedSender<OpEvent>>,
    /// Jobs with a save or restore in progress.
    busy: HashSet<String>,
    catalog: BTreeMap<String, JobManifest>,
}

struct Ctl {
    cfg: Config,
    opts: ServeOptions,
    /// How the store is reached: the config file's `[s3]` over the environment.
    /// It goes to the agents with each save and restore.
    store_config: StoreConfig,
    /// The store's URL, parsed from the config once.
    store_url: ckpt_shared::objstore::StoreUrl,
    store: Arc<BlockingStore>,
    reg: Mutex<Registry>,
    /// Set when the controller stops: no new save or restore begins.
    stopping: std::sync::atomic::AtomicBool,
    next_attempt: std::sync::atomic::AtomicU64,
    next_conn: std::sync::atomic::AtomicU64,
}

/// A controller running on threads of its own (the `serve` command, and `demo`).
pub struct Running {
    pub addr: SocketAddr,
    /// The TCP API's address, when `api_listen` is set.
    pub api_addr: Option<SocketAddr>,
    rt: Option<tokio::runtime::Runtime>,
    store: Option<Arc<BlockingStore>>,
    ctl: Arc<Ctl>,
}

impl Running {
    /// Runs until SIGINT or SIGTERM, then [`stop`](Self::stop)s; returns the
    /// signal's number.
    pub fn wait_for_signal(self) -> Result<i32, ServeError> {
        use tokio::signal::unix::{signal, SignalKind};
        let rt = self.rt.as_ref().expect("running");
        let sig = rt.block_on(async {
            let mut term = signal(SignalKind::terminate())?;
            let mut int = signal(SignalKind::interrupt())?;
            tokio::select! {
                _ = term.recv() => Ok::<i32, std::io::Error>(libc::SIGTERM),
                _ = int.recv() => Ok(libc::SIGINT),
            }
        });
        let sig = sig.map_err(|source| ServeError::Runtime { source })?;
        let name = if sig == libc::SIGTERM {
            "SIGTERM"
        } else {
            "SIGINT"
        };
        self.stop(&format!("the controller was stopped by {name}"));
        Ok(sig)
    }

    /// Gives up every save and restore in progress (the agents are told to thaw,
    /// or to kill what they rebuilt), waits (up to 10 s) until they have ended and
    /// their ABORTs are sent, and refuses new ones.
    pub fn stop(&self, why: &str) {
        let ctl = &self.ctl;
        ctl.stopping
            .store(true, std::sync::atomic::Ordering::SeqCst);
        let _ = std::fs::remove_file(&ctl.cfg.socket);
        for op in ctl.reg.lock().unwrap().ops.values() {
            let _ = op.send(OpEvent::Stop(why.to_string()));
        }
        let t = Instant::now();
        while !ctl.reg.lock().unwrap().ops.is_empty() && t.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(20));
        }
        // The ABORT frames are queued to the agents' writers: let them leave.
        std::thread::sleep(Duration::from_millis(300));
    }

    /// Runs until the process ends.
    pub fn wait(self) -> ! {
        loop {
            std::thread::park();
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_timeout(Duration::from_secs(1));
        }
        drop(self.store.take());
    }
}

/// Starts the controller: opens the store and reads its catalog, binds the QUIC
/// port and the API socket.
pub fn start(cfg: Config, opts: ServeOptions) -> Result<Running, ServeError> {
    let id = Identity::controller(&cfg.certs).map_err(|source| ServeError::Identity {
        certs: cfg.certs.clone(),
        source: Box::new(source),
    })?;
    let mut server = tls::server_config(&id).map_err(|source| ServeError::Tls {
        source: Box::new(source),
    })?;
    server.transport_config(tls::transport(cfg.lease()));
    let store_config = cfg.store_config(&opts.store);
    // Parsed once: the saves carry it typed to the agents.
    let store_url = ckpt_shared::objstore::StoreUrl::parse(&cfg.store).map_err(|source| {
        ServeError::StoreOpen {
            url: cfg.store.clone(),
            source: Box::new(source),
        }
    })?;
    let store = Arc::new(
        BlockingStore::open(&cfg.store, &store_config).map_err(|source| ServeError::StoreOpen {
            url: cfg.store.clone(),
            source: Box::new(source),
        })?,
    );
    store.check().map_err(|source| ServeError::StoreCheck {
        url: cfg.store.clone(),
        source: Box::new(source),
    })?;
    let mut catalog = BTreeMap::new();
    let listed = catalog::list(&store).map_err(|source| ServeError::Catalog {
        url: cfg.store.clone(),
        source: Box::new(source),
    })?;
    for m in listed {
        match m {
            Ok(m) => {
                catalog.insert(m.id.clone(), m);
            }
            Err(e) => warn!("skipping a checkpoint of the catalog: {e}"),
        }
    }
    info!(
        checkpoints = catalog.len(),
        store = cfg.store,
        "catalog read"
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("ckpt-controller")
        .enable_all()
        .build()
        .map_err(|source| ServeError::Runtime { source })?;
    if let Some(dir) = cfg.socket.parent() {
        std::fs::create_dir_all(dir).map_err(|source| ServeError::SocketDir {
            dir: dir.to_path_buf(),
            source,
        })?;
    }
    if cfg.socket.exists() {
        // A live controller answers on it; a stale socket is removed.
        if std::os::unix::net::UnixStream::connect(&cfg.socket).is_ok() {
            return Err(ServeError::SocketInUse {
                socket: cfg.socket.clone(),
            });
        }
        let _ = std::fs::remove_file(&cfg.socket);
    }
    let ctl = Arc::new(Ctl {
        cfg: cfg.clone(),
        opts,
        store_config,
        store_url,
        store: store.clone(),
        reg: Mutex::new(Registry {
            catalog,
            ..Registry::default()
        }),
        stopping: Default::default(),
        next_attempt: std::sync::atomic::AtomicU64::new(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(1),
        ),
        next_conn: std::sync::atomic::AtomicU64::new(1),
    });
    let (addr, api_addr) = {
        let _g = rt.enter();
        let quic = |source| ServeError::BindQuic {
            addr: cfg.listen,
            source,
        };
        let ep = wire::endpoint(cfg.listen, Some(server)).map_err(quic)?;
        let addr = ep.local_addr().map_err(quic)?;
        let api = tokio::net::UnixListener::bind(&cfg.socket).map_err(|source| {
            ServeError::BindSocket {
                socket: cfg.socket.clone(),
                source,
            }
        })?;
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&cfg.socket, std::fs::Permissions::from_mode(0o666)).map_err(
            |source| ServeError::SocketMode {
                socket: cfg.socket.clone(),
                source,
            },
        )?;
        rt.spawn(accept_loop(ep, ctl.clone()));
        rt.spawn(api_loop(api, ctl.clone()));
        rt.spawn(ping_loop(ctl.clone()));
        let api_addr = match cfg.api_listen {
            Some(a) => {
                let tcp = |source| ServeError::BindTcpApi { addr: a, source };
                let std = std::net::TcpListener::bind(a).map_err(tcp)?;
                std.set_nonblocking(true).map_err(tcp)?;
                let l = tokio::net::TcpListener::from_std(std).map_err(tcp)?;
                let bound = l.local_addr().map_err(tcp)?;
                rt.spawn(tcp_api_loop(l, ctl.clone()));
                Some(bound)
            }
            None => None,
        };
        (addr, api_addr)
    };
    Ok(Running {
        addr,
        api_addr,
        rt: Some(rt),
        store: Some(store),
        ctl,
    })
}

async fn ping_loop(ctl: Arc<Ctl>) {
    let every = ctl.cfg.lease() / 4;
    loop {
        tokio::time::sleep(every).await;
        for a in ctl.reg.lock().unwrap().agents.values() {
            let _ = a.tx.send(ToAgent::Ping);
        }
    }
}

async fn accept_loop(ep: quinn::Endpoint, ctl: Arc<Ctl>) {
    while let Some(incoming) = ep.accept().await {
        let ctl = ctl.clone();
        tokio::spawn(async move {
            let remote = incoming.remote_address();
            match incoming.await {
                Ok(conn) => {
                    if let Err(e) = agent_conn(conn, ctl).await {
                        warn!(%remote, "agent connection: {}", ckpt_shared::report::error_chain(&e));
                    }
                }
                Err(e) => warn!(%remote, "refused a connection: {e}"),
            }
        });
    }
}

fn attempt_of(m: &FromAgent) -> Option<AttemptId> {
    match m {
        FromAgent::Frozen { attempt }
        | FromAgent::Captured { attempt }
        | FromAgent::Stored { attempt, .. }
        | FromAgent::Failed { attempt, .. }
        | FromAgent::Rebuilt { attempt, .. }
        | FromAgent::Released { attempt } => Some(*attempt),
        _ => None,
    }
}

async fn agent_conn(conn: quinn::Connection, ctl: Arc<Ctl>) -> Result<(), SessionError> {
    let names: Vec<String> = conn
        .peer_identity()
        .and_then(|i| {
            i.downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>()
                .ok()
        })
        .and_then(|c| c.first().map(tls::cert_names))
        .unwrap_or_default();
    let (mut send, mut recv) = tokio::time::timeout(Duration::from_secs(10), conn.accept_bi())
        .await
        .map_err(|_| SessionError::NoStream)??;
    let hello = wire::read_frame(&mut recv)
        .await?
        .ok_or(SessionError::Closed { expected: "Hello" })?;
    let name = match FromAgent::from_frame(&hello)? {
        FromAgent::Hello(h) if h.proto_version != PROTO_VERSION => {
            return Err(SessionError::Protocol {
                name: h.name,
                theirs: h.proto_version,
            })
        }
        FromAgent::Hello(h) => h.name,
        other => {
            return Err(SessionError::NotHello {
                got: Box::new(other),
            })
        }
    };
    if !names.contains(&name) {
        conn.close(1u32.into(), b"name not in certificate");
        return Err(SessionError::NotItsName { name, names });
    }
    let register = wire::read_frame(&mut recv)
        .await?
        .ok_or(SessionError::Closed {
            expected: "Register",
        })?;
    let info = match FromAgent::from_frame(&register)? {
        FromAgent::Register(i) if i.name == name => i,
        other => {
            return Err(SessionError::NotRegister {
                name,
                got: Box::new(other),
            })
        }
    };
    let reply = ToAgent::Hello(Hello {
        proto_version: PROTO_VERSION,
        name: "controller".into(),
    });
    wire::write_frame(&mut send, &reply.to_frame()?).await?;
    let (tx, mut rx) = mpsc::unbounded_channel::<ToAgent>();
    let me = ctl
        .next_conn
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    {
        let mut reg = ctl.reg.lock().unwrap();
        if reg.agents.contains_key(&name) {
            warn!(
                agent = name,
                "agent reconnected: the older connection is dropped"
            );
        }
        reg.agents.insert(
            name.clone(),
            AgentConn {
                tx,
                info,
                ranks: Vec::new(),
                conn: me,
            },
        );
    }
    info!(agent = name, "agent registered");
    let writer = tokio::spawn(async move {
        while let Some(m) = rx.recv().await {
            let Ok(f) = m.to_frame() else { continue };
            if wire::write_frame(&mut send, &f).await.is_err() {
                break;
            }
        }
    });
    let result: Result<(), SessionError> = async {
        loop {
            let Some(f) = wire::read_frame(&mut recv).await? else {
                return Ok(());
            };
            let msg = FromAgent::from_frame(&f)?;
            let mut reg = ctl.reg.lock().unwrap();
            match msg {
                FromAgent::Pong | FromAgent::Hello(_) => {}
                FromAgent::Register(i) => {
                    if let Some(a) = reg.agents.get_mut(&name) {
                        a.info = i;
                    }
                }
                FromAgent::Ranks(r) => {
                    if let Some(a) = reg.agents.get_mut(&name) {
                        a.ranks = r;
                    }
                }
                m => {
                    if let Some(op) = attempt_of(&m).and_then(|a| reg.ops.get(&a)) {
                        let _ = op.send(OpEvent::Msg(name.clone(), m));
                    }
                }
            }
        }
    }
    .await;
    writer.abort();
    let mut reg = ctl.reg.lock().unwrap();
    if reg.agents.get(&name).map(|a| a.conn) == Some(me) {
        reg.agents.remove(&name);
        for op in reg.ops.values() {
            let _ = op.send(OpEvent::Lost(name.clone()));
        }
        info!(agent = name, "agent gone");
    }
    result
}

async fn api_loop(listener: tokio::net::UnixListener, ctl: Arc<Ctl>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let ctl = ctl.clone();
        tokio::spawn(async move {
            let uid = stream.peer_cred().map(|c| c.uid()).ok();
            let (rd, mut wr) = stream.into_split();
            let mut rd = tokio::io::BufReader::new(rd);
            let mut line = String::new();
            if rd.read_line(&mut line).await.is_err() {
                return;
            }
            let (tx, mut rx) = mpsc::unbounded_channel::<Event>();
            match (serde_json::from_str::<Request>(&line), uid) {
                (Err(error), _) => {
                    let _ = tx.send(Event::error(RequestError::BadRequest { error }));
                }
                (_, None) => {
                    let _ = tx.send(Event::error(RequestError::NoPeerCred));
                }
                (Ok(req), Some(uid)) => request(&ctl, req, uid, tx),
            }
            while let Some(ev) = rx.recv().await {
                let mut out = serde_json::to_string(&ev).unwrap_or_default();
                out.push('\n');
                if wr.write_all(out.as_bytes()).await.is_err() {
                    break; // the client went away; the operation goes on
                }
            }
        });
    }
}

/// The TCP API: one line `{"munge": CRED}` per connection, the request being the
/// credential's payload; answered like the local socket.
async fn tcp_api_loop(listener: tokio::net::TcpListener, ctl: Arc<Ctl>) {
    #[derive(Deserialize)]
    struct Envelope {
        munge: String,
    }
    loop {
        let Ok((stream, peer)) = listener.accept().await else {
            continue;
        };
        let ctl = ctl.clone();
        tokio::spawn(async move {
            let (rd, mut wr) = stream.into_split();
            let mut rd = tokio::io::BufReader::new(rd).take(64 << 10);
            let mut line = String::new();
            if rd.read_line(&mut line).await.is_err() {
                return;
            }
            let (tx, mut rx) = mpsc::unbounded_channel::<Event>();
            let socket = ctl.cfg.munge_socket.clone();
            let decoded = match serde_json::from_str::<Envelope>(&line) {
                Err(error) => Err(RequestError::BadRequest { error }),
                Ok(env) => tokio::task::spawn_blocking(move || {
                    crate::munge::decode(socket.as_deref(), &env.munge)
                })
                .await
                .map_err(RequestError::Task)
                .and_then(|r| r.map_err(|error| RequestError::Credential { error })),
            };
            match decoded.and_then(|(uid, payload)| {
                serde_json::from_slice::<Request>(&payload)
                    .map(|r| (uid, r))
                    .map_err(|error| RequestError::BadCredentialRequest { error })
            }) {
                Ok((uid, req)) => {
                    info!(%peer, uid, "request over TCP");
                    request(&ctl, req, uid, tx)
                }
                Err(e) => {
                    warn!(%peer, "refused a TCP request: {e}");
                    let _ = tx.send(Event::error(e));
                }
            }
            while let Some(ev) = rx.recv().await {
                let mut out = serde_json::to_string(&ev).unwrap_or_default();
                out.push('\n');
                if wr.write_all(out.as_bytes()).await.is_err() {
                    break;
                }
            }
        });
    }
}

fn is_link_local(ip: &std::net::IpAddr) -> bool {
    match ip {
        std::net::IpAddr::V4(v4) => v4.is_link_local(),
        std::net::IpAddr::V6(v6) => (v6.segments()[0] & 0xffc0) == 0xfe80,
    }
}

fn may_act(uid: u32, owner: u32) -> bool {
    uid == 0 || uid == owner
}

fn jobs(reg: &Registry) -> Vec<JobView> {
    let mut jobs: BTreeMap<String, JobView> = BTreeMap::new();
    for (node, a) in &reg.agents {
        for r in &a.ranks {
            let j = jobs.entry(r.job.clone()).or_insert_with(|| JobView {
                job: r.job.clone(),
                uid: r.uid,
                ranks: Vec::new(),
                latest: None,
                external_tcp: r.external_tcp,
            });
            if j.external_tcp != r.external_tcp {
                // Ranks that disagree: the safe one.
                j.external_tcp = Some(ExternalTcp::Fail);
            }
            j.ranks.push(RankView {
                rank: r.rank,
                node: node.clone(),
                pid: r.pid,
            });
        }
    }
    for j in jobs.values_mut() {
        j.ranks.sort_by_key(|r| r.rank);
        j.latest = latest(reg, &j.job).map(|m| m.id.clone());
    }
    jobs.into_values().collect()
}

fn latest<'a>(reg: &'a Registry, job: &str) -> Option<&'a JobManifest> {
    reg.catalog
        .values()
        .filter(|m| m.job == job)
        .max_by_key(|m| (m.created_unix, m.id.clone()))
}

fn request(ctl: &Arc<Ctl>, req: Request, uid: u32, tx: mpsc::UnboundedSender<Event>) {
    let reply = match req {
        Request::Jobs => list_jobs(&ctl.reg.lock().unwrap(), uid),
        Request::Nodes => list_nodes(&ctl.reg.lock().unwrap()),
        Request::Ckpts { job } => list_ckpts(&ctl.reg.lock().unwrap(), job.as_deref(), uid),
        Request::Show { ckpt } => match find(&ctl.reg.lock().unwrap(), &ckpt, uid) {
            Ok(m) => Event::Done(Done {
                ckpts: vec![m.clone()],
                ..Done::ok()
            }),
            Err(e) => Event::error(e),
        },
        Request::Remove { ckpt } => {
            let found = find(&ctl.reg.lock().unwrap(), &ckpt, uid).cloned();
            match found {
                Ok(m) => return remove_ckpt(ctl, m, tx),
                Err(e) => Event::error(e),
            }
        }
        Request::Prune { job, keep } => {
            let plan = prune_plan(&ctl.reg.lock().unwrap(), &job, keep, uid);
            match plan {
                Ok(gone) => return prune(ctl, job, gone, tx),
                Err(e) => Event::error(e),
            }
        }
        Request::Gc if uid != 0 => Event::error(RequestError::GcNotRoot),
        Request::Gc => return collect_garbage(ctl, tx),
        Request::Save {
            job,
            kill,
            wait,
            external_tcp,
        } => match start_save(ctl, &job, kill, external_tcp, uid, tx.clone(), wait) {
            Ok(()) => return,
            Err(e) => Event::error(e),
        },
        Request::Restore { ckpt, nodes, map } => {
            let m = find(&ctl.reg.lock().unwrap(), &ckpt, uid).cloned();
            match m.and_then(|m| start_restore(ctl, m, &nodes, &map, tx.clone())) {
                Ok(()) => return,
                Err(e) => Event::error(e),
            }
        }
    };
    let _ = tx.send(reply);
}

/// `job list`: the jobs the caller may act on.
fn list_jobs(reg: &Registry, uid: u32) -> Event {
    Event::Done(Done {
        jobs: jobs(reg)
            .into_iter()
            .filter(|j| may_act(uid, j.uid))
            .collect(),
        ..Done::ok()
    })
}

/// `nodes`: every connected agent.
fn list_nodes(reg: &Registry) -> Event {
    Event::Done(Done {
        nodes: reg
            .agents
            .iter()
            .map(|(n, a)| NodeView {
                name: n.clone(),
                addrs: a.info.addrs.clone(),
                kernel: a.info.kernel.clone(),
                ranks: a.ranks.len(),
            })
            .collect(),
        ..Done::ok()
    })
}

/// `ckpt list`: the committed checkpoints (of `job`) the caller may see.
fn list_ckpts(reg: &Registry, job: Option<&str>, uid: u32) -> Event {
    Event::Done(Done {
        ckpts: reg
            .catalog
            .values()
            .filter(|m| job.is_none_or(|j| j == m.job) && may_act(uid, m.uid))
            .cloned()
            .collect(),
        ..Done::ok()
    })
}

/// `ckpt rm`: the job manifest removed from the store, then from the catalog;
/// answered on `tx` when done.
fn remove_ckpt(ctl: &Arc<Ctl>, m: JobManifest, tx: mpsc::UnboundedSender<Event>) {
    let ctl = ctl.clone();
    tokio::spawn(async move {
        let store = ctl.store.clone();
        let mm = m.clone();
        let r = tokio::task::spawn_blocking(move || catalog::remove(&store, &mm)).await;
        let ev = match r {
            Ok(Ok(())) => {
                ctl.reg.lock().unwrap().catalog.remove(&m.id);
                Event::ok()
            }
            Ok(Err(error)) => Event::error(RequestError::Remove {
                ckpt: m.id.clone(),
                error,
            }),
            Err(e) => Event::error(RequestError::Task(e)),
        };
        let _ = tx.send(ev);
    });
}

/// What `ckpt prune --job JOB --keep N` removes: all but the newest `keep`, if
/// the caller owns every checkpoint of the job.
fn prune_plan(
    reg: &Registry,
    job: &str,
    keep: usize,
    uid: u32,
) -> Result<Vec<JobManifest>, RequestError> {
    let mut of_job: Vec<JobManifest> = reg
        .catalog
        .values()
        .filter(|m| m.job == job)
        .cloned()
        .collect();
    if let Some(m) = of_job.iter().find(|m| !may_act(uid, m.uid)) {
        return Err(RequestError::NotYourJob {
            job: job.to_string(),
            owner: m.uid,
            uid,
        });
    }
    of_job.sort_by_key(|m| (m.created_unix, m.id.clone()));
    let drop_n = of_job.len().saturating_sub(keep);
    Ok(of_job.into_iter().take(drop_n).collect())
}

/// `ckpt prune`: each of `gone` removed from the store, then from the catalog;
/// answered on `tx` with what was removed.
fn prune(ctl: &Arc<Ctl>, job: String, gone: Vec<JobManifest>, tx: mpsc::UnboundedSender<Event>) {
    let ctl = ctl.clone();
    tokio::spawn(async move {
        let store = ctl.store.clone();
        let g = gone.clone();
        let r = tokio::task::spawn_blocking(move || {
            for m in &g {
                catalog::remove(&store, m)?;
            }
            Ok::<(), catalog::CatalogError>(())
        })
        .await;
        let ev = match r {
            Ok(Ok(())) => {
                let mut reg = ctl.reg.lock().unwrap();
                for m in &gone {
                    reg.catalog.remove(&m.id);
                }
                Event::Done(Done {
                    ckpts: gone,
                    ..Done::ok()
                })
            }
            Ok(Err(error)) => Event::error(RequestError::Prune { job, error }),
            Err(e) => Event::error(RequestError::Task(e)),
        };
        let _ = tx.send(ev);
    });
}

/// `ckpt gc` (root only): the store's unreferenced chunks deleted; answered on
/// `tx` with the counts.
fn collect_garbage(ctl: &Arc<Ctl>, tx: mpsc::UnboundedSender<Event>) {
    let ctl = ctl.clone();
    tokio::spawn(async move {
        let store = ctl.store.clone();
        let r = tokio::task::spawn_blocking(move || {
            store.block_on(gc::gc(store.backend(), &ctl.opts.leases))
        })
        .await;
        let ev = match r {
            Ok(Ok(r)) => Event::Done(Done {
                message: Some(format!(
                    "{} image(s) reference {} of {} chunk(s); deleted {}",
                    r.images, r.referenced, r.chunks, r.deleted
                )),
                ..Done::ok()
            }),
            Ok(Err(e)) => Event::error(RequestError::Gc(e)),
            Err(e) => Event::error(RequestError::Task(e)),
        };
        let _ = tx.send(ev);
    });
}

/// Checkpoint `id` or `JOB:latest`, if the caller may see it.
fn find<'a>(reg: &'a Registry, id: &str, uid: u32) -> Result<&'a JobManifest, RequestError> {
    let m = match id.strip_suffix(":latest") {
        Some(job) => latest(reg, job).ok_or_else(|| RequestError::NoLatest {
            job: job.to_string(),
        })?,
        None => reg
            .catalog
            .get(id)
            .ok_or_else(|| RequestError::NoCheckpoint { id: id.to_string() })?,
    };
    if !may_act(uid, m.uid) {
        return Err(RequestError::NotYourCheckpoint {
            ckpt: m.id.clone(),
            owner: m.uid,
            uid,
        });
    }
    Ok(m)
}

/// Registers an operation's channel under `attempt`; the guard removes it and
/// frees the job.
struct OpGuard {
    ctl: Arc<Ctl>,
    attempt: AttemptId,
    job: String,
}

impl Drop for OpGuard {
    fn drop(&mut self) {
        let mut reg = self.ctl.reg.lock().unwrap();
        reg.ops.remove(&self.attempt);
        reg.busy.remove(&self.job);
    }
}

fn begin_op(
    ctl: &Arc<Ctl>,
    reg: &mut Registry,
    job: &str,
) -> Result<(OpGuard, mpsc::UnboundedReceiver<OpEvent>), RequestError> {
    if ctl.stopping.load(std::sync::atomic::Ordering::SeqCst) {
        return Err(RequestError::Stopping);
    }
    if !reg.busy.insert(job.to_string()) {
        return Err(RequestError::Busy {
            job: job.to_string(),
        });
    }
    let attempt = ctl
        .next_attempt
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let (tx, rx) = mpsc::unbounded_channel();
    reg.ops.insert(attempt, tx);
    Ok((
        OpGuard {
            ctl: ctl.clone(),
            attempt,
            job: job.to_string(),
        },
        rx,
    ))
}

fn start_save(
    ctl: &Arc<Ctl>,
    job: &str,
    kill: bool,
    external_tcp: Option<ExternalTcp>,
    uid: u32,
    tx: mpsc::UnboundedSender<Event>,
    wait: bool,
) -> Result<(), RequestError> {
    let mut reg = ctl.reg.lock().unwrap();
    let view = jobs(&reg)
        .into_iter()
        .find(|j| j.job == job)
        .ok_or_else(|| RequestError::NoRunningJob {
            job: job.to_string(),
        })?;
    if !may_act(uid, view.uid) {
        return Err(RequestError::NotYourSave {
            job: job.to_string(),
            owner: view.uid,
            uid,
        });
    }
    let (guard, rx) = begin_op(ctl, &mut reg, job)?;
    drop(reg);
    let spec = SaveSpec {
        job: job.to_string(),
        ckpt: format!("{job}-{}", guard.attempt),
        store: ctl.store_url.clone(),
        kill,
        zstd_level: (ctl.cfg.compress > 0).then_some(ctl.cfg.compress),
        store_config: Box::new(ctl.store_config.clone()),
    };
    if !wait {
        let _ = tx.send(Event::Done(Done {
            outcome: Some(Outcome {
                ckpt: spec.ckpt.clone(),
                job: job.to_string(),
                ranks: view.ranks.len(),
                nodes: Vec::new(),
                freeze_ms: 0.0,
                total_ms: 0.0,
                memory_bytes: 0,
                stored_bytes: 0,
                pids: Vec::new(),
            }),
            ..Done::ok()
        }));
    }
    let ctl = ctl.clone();
    tokio::spawn(async move {
        let policy = external_tcp
            .or(view.external_tcp)
            .unwrap_or(ctl.cfg.external_tcp);
        let ev = drive_save(&ctl, guard, rx, spec, view, policy, &tx).await;
        match &ev {
            Event::Done(Done { ok: true, .. }) => info!(job = ctl_job(&ev), "save committed"),
            Event::Done(Done { error: Some(e), .. }) => warn!("save failed: {e}"),
            _ => {}
        }
        let _ = tx.send(ev);
    });
    Ok(())
}

fn ctl_job(ev: &Event) -> String {
    match ev {
        Event::Done(Done {
            outcome: Some(o), ..
        }) => o.ckpt.clone(),
        _ => String::new(),
    }
}

/// The progress events of one save or restore: at most one every 100 ms, plus the
/// start and the end of each phase (with a thousand agents, a line per answer would
/// cost the barrier more than its messages).
struct Progress<'a> {
    tx: &'a mpsc::UnboundedSender<Event>,
    of: usize,
    ranks: usize,
    shown: Option<Instant>,
}

impl<'a> Progress<'a> {
    fn new(tx: &'a mpsc::UnboundedSender<Event>, of: usize, ranks: usize) -> Self {
        Progress {
            tx,
            of,
            ranks,
            shown: None,
        }
    }

    fn show(&mut self, phase: &str, done: usize, bytes: u64) {
        let recent = self
            .shown
            .is_some_and(|t| t.elapsed() < Duration::from_millis(100));
        if done != 0 && done != self.of && recent {
            return;
        }
        self.shown = Some(Instant::now());
        let _ = self.tx.send(Event::Progress {
            phase: phase.to_string(),
            done,
            of: self.of,
            ranks: self.ranks,
            bytes,
        });
    }
}

fn timeouts(cfg: &Config) -> Timeouts {
    Timeouts {
        freeze: Duration::from_secs_f64(cfg.freeze_timeout_secs),
        capture: Duration::from_secs_f64(cfg.capture_timeout_secs),
        store: Duration::from_secs_f64(cfg.store_timeout_secs),
        commit: Duration::from_secs(60),
    }
}

fn send_to(ctl: &Ctl, to: &str, msg: ToAgent) -> bool {
    ctl.reg
        .lock()
        .unwrap()
        .agents
        .get(to)
        .is_some_and(|a| a.tx.send(msg).is_ok())
}

async fn drive_save(
    ctl: &Arc<Ctl>,
    guard: OpGuard,
    mut rx: mpsc::UnboundedReceiver<OpEvent>,
    spec: SaveSpec,
    view: JobView,
    policy: ExternalTcp,
    tx: &mpsc::UnboundedSender<Event>,
) -> Event {
    let t0 = Instant::now();
    let by_agent = ranks_by_agent(&view);
    let nodes: Vec<String> = by_agent.keys().cloned().collect();
    let n_agents = nodes.len();
    let mut b = Barrier::start(t0, guard.attempt, &spec, by_agent, timeouts(&ctl.cfg));
    let mut answered: HashMap<&'static str, HashSet<String>> = HashMap::new();
    let mut bytes = 0u64;
    let mut freeze_us = 0u64;
    let mut progress = Progress::new(tx, n_agents, view.ranks.len());
    let mut progress = |phase: &str, done: usize, bytes: u64| progress.show(phase, done, bytes);
    progress("FREEZE", 0, 0);
    loop {
        while let Some(a) = b.poll() {
            match a {
                Action::Send { to, msg } => {
                    if !send_to(ctl, &to, msg) {
                        b.agent_lost(Instant::now(), &to);
                    }
                }
                Action::Commit { ranks } => {
                    let total_us = t0.elapsed().as_micros() as u64;
                    let freeze_us = if spec.kill { total_us } else { freeze_us };
                    let mut m = job_manifest(ctl, &spec, &view, &ranks, freeze_us, total_us);
                    // Connections that leave the job: the policy decides, before
                    // anything is committed.
                    if let Err(reason) = external_tcp_policy(&mut m, policy) {
                        b.refuse(reason);
                        continue;
                    }
                    progress("COMMIT", 0, bytes);
                    b.commit_done(Instant::now(), commit(ctl, m).await);
                }
                Action::Finished(barrier::Outcome::Committed) => {
                    return saved(ctl, &spec, &view, nodes);
                }
                Action::Finished(barrier::Outcome::Aborted { phase, reason }) => {
                    discard_attempt(ctl, &spec, &view, phase).await;
                    return Event::error(RequestError::SaveAborted {
                        job: spec.job.clone(),
                        reason,
                    });
                }
            }
        }
        let deadline = b.poll_timeout().unwrap_or_else(Instant::now);
        tokio::select! {
            ev = rx.recv() => {
                let now = Instant::now();
                match ev {
                    Some(OpEvent::Msg(from, msg)) => {
                        let key = match &msg {
                            FromAgent::Frozen { .. } => Some("FREEZE"),
                            FromAgent::Captured { .. } => Some("CAPTURE"),
                            FromAgent::Stored { ranks, .. } => {
                                bytes += ranks.iter().map(|r| r.stored_bytes).sum::<u64>();
                                Some("STORE")
                            }
                            _ => None,
                        };
                        let before = b.phase();
                        b.handle(now, &from, msg);
                        if let Some(k) = key {
                            let set = answered.entry(k).or_default();
                            set.insert(from);
                            progress(k, set.len(), bytes);
                        }
                        if before == barrier::Phase::Capturing && b.phase() == barrier::Phase::Storing {
                            freeze_us = t0.elapsed().as_micros() as u64;
                        }
                        #[cfg(feature = "test-hooks")]
                        if before == barrier::Phase::Freezing
                            && b.phase() == barrier::Phase::Capturing
                            && ctl.opts.test_pause.as_deref() == Some("frozen")
                        {
                            // Test hook: every rank is frozen; hold here so that a
                            // test can kill the controller and watch the leases.
                            eprintln!("ckpt-controller: test pause at frozen (CKPT_TEST_PAUSE)");
                            std::future::pending::<()>().await;
                        }
                    }
                    Some(OpEvent::Lost(a)) => b.agent_lost(now, &a),
                    Some(OpEvent::Stop(why)) => b.stop(why),
                    None => b.handle_timeout(now + Duration::from_secs(1 << 30)),
                }
            }
            _ = tokio::time::sleep_until(deadline.into()) => b.handle_timeout(Instant::now()),
        }
    }
}

/// The ranks of a job, by the agent (node) that holds them.
fn ranks_by_agent(view: &JobView) -> BTreeMap<String, Vec<RankRef>> {
    let mut by_agent: BTreeMap<String, Vec<RankRef>> = BTreeMap::new();
    for r in &view.ranks {
        by_agent.entry(r.node.clone()).or_default().push(RankRef {
            rank: r.rank,
            pid: r.pid,
        });
    }
    by_agent
}

/// The job manifest of a save whose every rank is stored: the commit to write.
fn job_manifest(
    ctl: &Ctl,
    spec: &SaveSpec,
    view: &JobView,
    ranks: &[RankManifest],
    freeze_us: u64,
    total_us: u64,
) -> JobManifest {
    JobManifest {
        format_version: JOB_FORMAT_VERSION,
        id: spec.ckpt.clone(),
        job: spec.job.clone(),
        uid: view.uid,
        created_unix: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        store: spec.store.clone(),
        killed: spec.kill,
        ranks: ranks
            .iter()
            .map(|r| {
                let v = view.ranks.iter().find(|v| v.rank == r.rank);
                let kernel = v
                    .and_then(|v| {
                        ctl.reg
                            .lock()
                            .unwrap()
                            .agents
                            .get(&v.node)
                            .map(|a| a.info.kernel.clone())
                    })
                    .unwrap_or_default();
                JobRank {
                    kernel,
                    tcp: r.tcp.clone(),
                    listen: r.listen.clone(),
                    udp: r.udp.clone(),
                    rank: r.rank,
                    image: r.image.clone(),
                    node: v.map(|v| v.node.clone()).unwrap_or_default(),
                    pid: v.map(|v| v.pid).unwrap_or(0),
                    memory_bytes: r.memory_bytes,
                    stored_bytes: r.stored_bytes,
                }
            })
            .collect(),
        freeze_us,
        total_us,
        external_tcp: view.external_tcp,
    }
}

/// The connections of `m` that lead outside the job, under `policy`: refused (the
/// reason, naming each), or marked external (restored reset).
fn external_tcp_policy(m: &mut JobManifest, policy: ExternalTcp) -> Result<(), String> {
    let outside = crate::readdress::outside(m);
    if !outside.is_empty() && policy == ExternalTcp::Fail {
        let list: Vec<String> = outside
            .iter()
            .map(|(rank, node, c)| format!("rank {rank} on {node}: {} -> {}", c.local, c.remote))
            .collect();
        return Err(format!(
            "{} TCP connection(s) lead outside the job and cannot be moved: {}. \
             Save with --external-tcp=close to restore them as reset \
             (the application sees a connection error), or close them first",
            outside.len(),
            list.join("; ")
        ));
    }
    for (rank, _, c) in &outside {
        if let Some(r) = m.ranks.iter_mut().find(|r| r.rank == *rank) {
            for s in r.tcp.iter_mut() {
                if s.local == c.local && s.remote == c.remote {
                    s.external = true;
                }
            }
        }
    }
    Ok(())
}

/// The commit: `m` written to the store, then into the catalog.
async fn commit(ctl: &Ctl, m: JobManifest) -> Result<(), barrier::CommitError> {
    let store = ctl.store.clone();
    let mm = m.clone();
    match tokio::task::spawn_blocking(move || catalog::put(&store, &mm)).await {
        Ok(written) => written?,
        Err(e) => return Err(barrier::CommitError::Writer(e)),
    }
    ctl.reg.lock().unwrap().catalog.insert(m.id.clone(), m);
    Ok(())
}

/// The answer to a committed save: its figures, from the catalog.
fn saved(ctl: &Ctl, spec: &SaveSpec, view: &JobView, nodes: Vec<String>) -> Event {
    let m = ctl.reg.lock().unwrap().catalog.get(&spec.ckpt).cloned();
    let (memory, stored, freeze, total) = m
        .as_ref()
        .map(|m| (m.memory_bytes(), m.stored_bytes(), m.freeze_us, m.total_us))
        .unwrap_or_default();
    Event::Done(Done {
        outcome: Some(Outcome {
            ckpt: spec.ckpt.clone(),
            job: spec.job.clone(),
            ranks: view.ranks.len(),
            nodes,
            freeze_ms: freeze as f64 / 1e3,
            total_ms: total as f64 / 1e3,
            memory_bytes: memory,
            stored_bytes: stored,
            pids: Vec::new(),
        }),
        ..Done::ok()
    })
}

/// An aborted save: nothing was committed, and the images some ranks may have
/// written are not a checkpoint. Remove them (the chunks go at a gc).
async fn discard_attempt(ctl: &Ctl, spec: &SaveSpec, view: &JobView, phase: barrier::Phase) {
    let store = ctl.store.clone();
    let names: Vec<String> = view
        .ranks
        .iter()
        .map(|r| rank_image_name(&spec.ckpt, r.rank))
        .collect();
    let ckpt = spec.ckpt.clone();
    let _ = tokio::task::spawn_blocking(move || {
        // A commit that failed may still have landed (a timeout after the
        // write): the job manifest must go first, or the rank images stay.
        if phase == barrier::Phase::Committing
            && store.delete_object(catalog::JOBS_DIR, &ckpt).is_err()
        {
            return;
        }
        for n in names {
            let _ = store.delete_manifest(&n);
        }
    })
    .await;
}

fn start_restore(
    ctl: &Arc<Ctl>,
    m: JobManifest,
    nodes: &[String],
    map: &[(u32, String)],
    tx: mpsc::UnboundedSender<Event>,
) -> Result<(), RequestError> {
    // Placement: the same nodes; or the saved nodes, in order, onto --nodes; then
    // --map for single ranks.
    let saved = m.nodes();
    if !nodes.is_empty() && nodes.len() != saved.len() {
        return Err(RequestError::NodeCount {
            ckpt: m.id.clone(),
            saved: saved.clone(),
            given: nodes.len(),
        });
    }
    let mut place: BTreeMap<u32, String> = m
        .ranks
        .iter()
        .map(|r| {
            let node = if nodes.is_empty() {
                r.node.clone()
            } else {
                let i = saved.iter().position(|n| *n == r.node).unwrap_or(0);
                nodes[i].clone()
            };
            (r.rank, node)
        })
        .collect();
    for (rank, node) in map {
        if !place.contains_key(rank) {
            return Err(RequestError::NoRank {
                ckpt: m.id.clone(),
                rank: *rank,
            });
        }
        place.insert(*rank, node.clone());
    }
    let mut reg = ctl.reg.lock().unwrap();
    if let Some(j) = jobs(&reg).into_iter().find(|j| j.job == m.job) {
        return Err(RequestError::JobRunning {
            job: m.job.clone(),
            ranks: j.ranks.len(),
        });
    }
    let mut missing: Vec<&String> = place
        .values()
        .filter(|n| !reg.agents.contains_key(*n))
        .collect();
    missing.sort();
    missing.dedup();
    if !missing.is_empty() {
        return Err(RequestError::NoAgent {
            missing: missing.into_iter().cloned().collect(),
            have: reg.agents.keys().cloned().collect(),
        });
    }
    // The image's vDSO comes back at its old address: the node must run the same
    // kernel. Said here, before anything is rebuilt, rather than by each agent.
    for r in &m.ranks {
        let node = &place[&r.rank];
        let have = &reg.agents[node].info.kernel;
        if !r.kernel.is_empty() && *have != r.kernel {
            return Err(RequestError::Kernel {
                rank: r.rank,
                saved: r.kernel.clone(),
                node: node.clone(),
                have: have.clone(),
            });
        }
    }
    let (guard, rx) = begin_op(ctl, &mut reg, &m.job)?;
    drop(reg);
    let ctl = ctl.clone();
    tokio::spawn(async move {
        let ev = drive_restore(&ctl, guard, rx, m, place, &tx).await;
        let _ = tx.send(ev);
    });
    Ok(())
}

async fn drive_restore(
    ctl: &Arc<Ctl>,
    guard: OpGuard,
    mut rx: mpsc::UnboundedReceiver<OpEvent>,
    m: JobManifest,
    place: BTreeMap<u32, String>,
    tx: &mpsc::UnboundedSender<Event>,
) -> Event {
    let t0 = Instant::now();
    let mut moves = {
        let reg = ctl.reg.lock().unwrap();
        let ip_of = |node: &str, v6: bool| -> Option<std::net::IpAddr> {
            reg.agents.get(node).and_then(|a| {
                a.info
                    .addrs
                    .iter()
                    .filter_map(|s| s.parse::<std::net::IpAddr>().ok())
                    .find(|ip| ip.is_ipv6() == v6 && !ip.is_loopback() && !is_link_local(ip))
            })
        };
        crate::readdress::plan(&m, &place, &ip_of)
    };
    let mut by_agent: BTreeMap<String, Vec<RestoreRank>> = BTreeMap::new();
    for r in &m.ranks {
        by_agent
            .entry(place[&r.rank].clone())
            .or_default()
            .push(RestoreRank {
                rank: r.rank,
                image: r.image.clone(),
                readdress: moves.conns.remove(&r.rank).unwrap_or_default(),
                relisten: moves.listen.remove(&r.rank).unwrap_or_default(),
                peer_recv: moves.peer_recv.remove(&r.rank).unwrap_or_default(),
                reset: r
                    .tcp
                    .iter()
                    .filter(|c| c.external)
                    .map(|c| ckpt_shared::proto::ConnRef {
                        local: c.local,
                        remote: c.remote,
                    })
                    .collect(),
                external_tcp: m.external_tcp,
            });
    }
    let nodes: Vec<String> = by_agent.keys().cloned().collect();
    let n = nodes.len();
    let timeout = Duration::from_secs_f64(ctl.cfg.restore_timeout_secs);
    let mut b = RestoreBarrier::start(
        t0,
        guard.attempt,
        &m.job,
        by_agent,
        &ctl.store_config,
        timeout,
        timeout,
    );
    let mut done: HashMap<&'static str, usize> = HashMap::new();
    let mut progress = Progress::new(tx, n, m.ranks.len());
    let mut progress = |phase: &str, done: usize| progress.show(phase, done, m.memory_bytes());
    progress("REBUILD", 0);
    loop {
        while let Some(a) = b.poll() {
            match a {
                Action::Send { to, msg } => {
                    if !send_to(ctl, &to, msg) {
                        b.agent_lost(Instant::now(), &to);
                    }
                }
                Action::Commit { .. } => {}
                Action::Finished(barrier::Outcome::Committed) => {
                    let mut pids: Vec<RankView> = b
                        .rebuilt()
                        .map(|(a, r)| RankView {
                            rank: r.rank,
                            node: a.clone(),
                            pid: r.pid,
                        })
                        .collect();
                    pids.sort_by_key(|r| r.rank);
                    let total = t0.elapsed().as_secs_f64() * 1e3;
                    return Event::Done(Done {
                        outcome: Some(Outcome {
                            ckpt: m.id.clone(),
                            job: m.job.clone(),
                            ranks: m.ranks.len(),
                            nodes,
                            freeze_ms: total,
                            total_ms: total,
                            memory_bytes: m.memory_bytes(),
                            stored_bytes: m.stored_bytes(),
                            pids,
                        }),
                        ..Done::ok()
                    });
                }
                Action::Finished(barrier::Outcome::Aborted { reason, .. }) => {
                    return Event::error(RequestError::RestoreFailed {
                        ckpt: m.id.clone(),
                        reason,
                    });
                }
            }
        }
        let deadline = b.poll_timeout().unwrap_or_else(Instant::now);
        tokio::select! {
            ev = rx.recv() => {
                let now = Instant::now();
                match ev {
                    Some(OpEvent::Msg(from, msg)) => {
                        let key = match &msg {
                            FromAgent::Rebuilt { .. } => Some("REBUILD"),
                            FromAgent::Released { .. } => Some("RELEASE"),
                            _ => None,
                        };
                        b.handle(now, &from, msg);
                        if let Some(k) = key {
                            let c = done.entry(k).or_default();
                            *c += 1;
                            progress(k, *c);
                        }
                    }
                    Some(OpEvent::Lost(a)) => b.agent_lost(now, &a),
                    Some(OpEvent::Stop(why)) => b.stop(why),
                    None => b.handle_timeout(now + Duration::from_secs(1 << 30)),
                }
            }
            _ = tokio::time::sleep_until(deadline.into()) => b.handle_timeout(Instant::now()),
        }
    }
}
