//! Command-line arguments of `ckpt-controller`. The doc comments are the `--help` text.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::api::{self, Done, Event, Request};
use crate::client::{self, ClientError};
use crate::demo::DemoError;
use crate::serve::ServeError;
use ckpt_shared::outln;
use ckpt_shared::proto::ExternalTcp;
use ckpt_shared::stdout::StdoutError;
use ckpt_shared::tls::TlsError;

/// A command of `ckpt-controller` that failed. The binary prints it with its
/// causes ("a: b: c").
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    #[error(transparent)]
    Serve(#[from] ServeError),
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error(transparent)]
    Demo(#[from] DemoError),
    #[error(transparent)]
    Ca(#[from] TlsError),
    #[error("the lease must be between 0.2 and 3600 seconds")]
    Lease { secs: f64 },
    #[error("the controller's answer has no outcome")]
    NoOutcome,
    #[error("no checkpoint in the answer")]
    NoCheckpoint,
    #[error(transparent)]
    Stdout(#[from] StdoutError),
    #[error(
        "ckpt-controller serve stopped by {}: every save and restore in progress was given up",
        if *signal == libc::SIGTERM { "SIGTERM" } else { "SIGINT" }
    )]
    Interrupted { signal: i32 },
    #[error("printing the answer as JSON")]
    Json {
        #[source]
        source: serde_json::Error,
    },
}

impl CommandError {
    /// The reader of standard output went away (`job list | head -n1`): the
    /// command stopped writing, which is no failure (the binary exits 0).
    pub fn is_stdout_closed(&self) -> bool {
        matches!(
            self,
            CommandError::Stdout(StdoutError::Closed)
                | CommandError::Demo(DemoError::Stdout(StdoutError::Closed))
        )
    }
}

/// ckpt-controller: checkpoints of whole jobs across nodes.
///
/// One controller runs per cluster (`serve`); one `ckpt-agent serve` per node. A
/// job is the set of ranks attached to the agents under its name (`ckpt-agent
/// attach`). `job save` freezes every rank of the job on every node, captures them
/// all, lets them run on (or kills them with --kill) and commits the checkpoint
/// only once every rank is stored; `job restore` rebuilds every rank, on the same
/// nodes or others, and releases them together.
///
/// Quick start on one machine (as root): `ckpt-controller demo`.
///
/// A cluster:
///   ckpt-controller ca init --dir /etc/ckpt/certs --controller-name 10.0.0.1 \
///       --agent node1 --agent node2
///   ckpt-controller serve --listen 0.0.0.0:7100 --store file:///scratch/ckpt
///   ckpt-agent serve --name node1 --controller 10.0.0.1:7100      (on each node)
///   ckpt-agent attach --job job42 --rank 0 --pid 4121             (each rank)
///   ckpt-controller job save job42 --wait
///   ckpt-controller ckpt list --job job42
///   ckpt-controller job restore job42:latest --nodes node3,node4
#[derive(Debug, Parser)]
#[command(name = "ckpt-controller", version, verbatim_doc_comment)]
pub struct Cli {
    /// Reach the controller's TCP API at HOST:PORT (its `api_listen`) instead of
    /// its local socket, proving who you are with a MUNGE credential, as Slurm
    /// does: for the job and ckpt commands from login nodes.
    #[arg(long, global = true, env = "CKPT_CONTROLLER", value_name = "HOST:PORT")]
    pub controller: Option<String>,
    /// munged's socket, for --controller (default: munge's).
    #[arg(long, global = true, env = "CKPT_MUNGE_SOCKET", value_name = "PATH")]
    pub munge_socket: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// The cluster's certificate authority: every agent and the controller prove
    /// who they are with a certificate it signed (mutual TLS over QUIC), and a peer
    /// without one is refused at the handshake.
    #[command(subcommand)]
    Ca(CaCommand),
    /// Run the controller: accept agents (QUIC, mutual TLS), keep the registry of
    /// jobs and the catalog of checkpoints (read from the store at start), and
    /// serve the `job` and `ckpt` commands on a local socket.
    ///
    /// `--help` adds the settings file and what the agents take from it
    /// (`SERVE_LONG_ABOUT`).
    #[command(verbatim_doc_comment, long_about = SERVE_LONG_ABOUT)]
    Serve(ServeArgs),
    /// Running jobs: list them, save them, restore them.
    #[command(subcommand)]
    Job(JobCommand),
    /// Committed checkpoints: list, show, remove.
    #[command(subcommand)]
    Ckpt(CkptCommand),
    /// The whole path on this one machine, as root: a controller and an agent with a
    /// local store, a job of 4 ranks, a save while it runs, a save that kills it, a
    /// restore, and a check of every rank's output against a recomputation.
    Demo {
        /// MiB of memory each rank keeps rewriting.
        #[arg(long, default_value_t = 16)]
        mib: usize,
        /// Keep the demo's directory (logs, store, certificates) afterwards.
        #[arg(long)]
        keep: bool,
    },
    /// Internal: one rank of the demo's job.
    #[command(name = "__demo-rank", hide = true)]
    DemoRank {
        #[arg(long)]
        rank: u32,
        #[arg(long)]
        mib: usize,
        #[arg(long, default_value_t = 10)]
        interval_ms: u64,
    },
    /// The connected agents.
    Nodes {
        #[arg(long, default_value = crate::serve::DEFAULT_SOCKET)]
        socket: PathBuf,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// TOML settings (see above).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// QUIC address for the agents.
    #[arg(long)]
    pub listen: Option<std::net::SocketAddr>,
    /// Checkpoint store URL.
    #[arg(long)]
    pub store: Option<String>,
    /// Directory of `ca init`.
    #[arg(long)]
    pub certs: Option<PathBuf>,
    /// The local API socket.
    #[arg(long)]
    pub socket: Option<PathBuf>,
    /// Seconds of an agent's lease.
    #[arg(long, value_name = "SECS")]
    pub lease: Option<f64>,
    /// Also serve the job and ckpt commands on this TCP address, to users of other
    /// hosts who prove themselves with MUNGE (`--controller` on their side).
    #[arg(long, value_name = "ADDR")]
    pub api_listen: Option<std::net::SocketAddr>,
}

#[derive(Debug, Subcommand)]
pub enum JobCommand {
    /// The running jobs: ranks, nodes, PIDs, and the latest checkpoint.
    List {
        #[arg(long, default_value = crate::serve::DEFAULT_SOCKET)]
        socket: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Checkpoint a job: every rank on every node, one consistent cut.
    ///
    /// Without --kill the job runs on: it stands still only while its state is
    /// captured, and is stored afterwards. With --kill it stays frozen until the
    /// checkpoint is committed, and is killed only then: if anything fails, it
    /// runs on. Without --wait the command returns once the save has started and
    /// prints the checkpoint's id; with --wait it shows progress and its exit code
    /// says whether the checkpoint was committed (0) or not (1).
    ///
    /// TCP connections between ranks are saved and come back intact, on any
    /// nodes. A connection to a peer outside the job (a database, a license
    /// server) cannot be moved: by default the save then fails, naming each one,
    /// and the job runs on. --external-tcp=close saves anyway, and a restore gives
    /// the application those connections as reset by the peer. The default is the
    /// job's own (`ckpt-agent attach --external-tcp`), else the controller's
    /// `external_tcp` setting, else fail.
    ///
    /// Example:
    ///   ckpt-controller job save job42 --kill --wait
    ///   ckpt-controller job save job42 --wait --external-tcp=close
    #[command(verbatim_doc_comment)]
    Save {
        job: String,
        #[arg(long)]
        kill: bool,
        #[arg(long)]
        wait: bool,
        /// Connections to peers outside the job: fail (the save) or close (restore
        /// them reset).
        #[arg(long, value_name = "fail|close")]
        external_tcp: Option<ExternalTcp>,
        #[arg(long, default_value = crate::serve::DEFAULT_SOCKET)]
        socket: PathBuf,
        /// Print the outcome as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Restore a job from a checkpoint, on the nodes it ran on or on others.
    ///
    /// CKPT is a checkpoint id (`ckpt list`) or JOB:latest. Every rank is rebuilt
    /// and held; only when all are rebuilt are they released, together. If any
    /// rank cannot be rebuilt, none runs. The job must not be running.
    ///
    /// Example:
    ///   ckpt-controller job restore job42:latest                   (same nodes)
    ///   ckpt-controller job restore job42-1764201 --nodes n3,n4    (n1→n3, n2→n4)
    ///   ckpt-controller job restore job42:latest --map 0=n5,3=n6
    #[command(verbatim_doc_comment)]
    Restore {
        ckpt: String,
        /// New nodes, one per node the checkpoint ran on, in the order of their names.
        #[arg(long, value_delimiter = ',')]
        nodes: Vec<String>,
        /// Single ranks onto nodes: RANK=NODE, comma-separated.
        #[arg(long, value_delimiter = ',', value_parser = parse_map)]
        map: Vec<(u32, String)>,
        #[arg(long, default_value = crate::serve::DEFAULT_SOCKET)]
        socket: PathBuf,
        #[arg(long)]
        json: bool,
    },
}

fn parse_map(s: &str) -> Result<(u32, String), String> {
    let (r, n) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?}: expected RANK=NODE"))?;
    let r = r
        .parse()
        .map_err(|_| format!("{r:?} is not a rank number"))?;
    if n.is_empty() {
        return Err(format!("{s:?}: no node"));
    }
    Ok((r, n.to_string()))
}

#[derive(Debug, Subcommand)]
pub enum CkptCommand {
    /// The committed checkpoints (yours; root sees all).
    List {
        #[arg(long)]
        job: Option<String>,
        #[arg(long, default_value = crate::serve::DEFAULT_SOCKET)]
        socket: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// One checkpoint: its ranks, nodes, images and sizes.
    Show {
        ckpt: String,
        #[arg(long, default_value = crate::serve::DEFAULT_SOCKET)]
        socket: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Remove a checkpoint (its job manifest, then its rank images; the chunks
    /// nothing else references go at the next `ckpt gc`).
    Rm {
        ckpt: String,
        #[arg(long, default_value = crate::serve::DEFAULT_SOCKET)]
        socket: PathBuf,
    },
    /// Retention: keep the newest N checkpoints of a job, remove the older ones.
    Prune {
        #[arg(long)]
        job: String,
        #[arg(long)]
        keep: usize,
        #[arg(long, default_value = crate::serve::DEFAULT_SOCKET)]
        socket: PathBuf,
    },
    /// Delete the chunks of the store that no image references (root only). It
    /// never deletes a chunk of a committed checkpoint, nor runs beside a save in
    /// progress (it stops, deleting nothing, and says so).
    Gc {
        #[arg(long, default_value = crate::serve::DEFAULT_SOCKET)]
        socket: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
pub enum CaCommand {
    /// Create the cluster CA, the controller's certificate and the named agents'.
    ///
    /// Example:
    ///   ckpt-controller ca init --dir /etc/ckpt/pki --controller-name ctl.cluster \
    ///       --agent node001 --agent node002
    /// Then copy agents/NODE.pem, agents/NODE.key and ca.pem to each node. ca.key
    /// stays on the controller's host.
    #[command(verbatim_doc_comment)]
    Init {
        /// Directory for the files (created; must not hold a CA already).
        #[arg(long)]
        dir: PathBuf,
        /// Names and addresses agents use to reach the controller (repeatable).
        #[arg(long = "controller-name", value_name = "NAME")]
        controller_names: Vec<String>,
        /// An agent node to issue a certificate for (repeatable).
        #[arg(long = "agent", value_name = "NAME")]
        agents: Vec<String>,
    },
    /// Issue a certificate for one more agent node.
    Issue {
        /// The directory of `ca init`.
        #[arg(long)]
        dir: PathBuf,
        /// The node's name.
        #[arg(long, value_name = "NAME")]
        agent: String,
    },
}

/// The long `--help` of `serve`. It is a string rather than the doc comment of
/// [`Command::Serve`] because its settings file has an `[s3]` table, which rustdoc
/// would read as a broken link.
const SERVE_LONG_ABOUT: &str = r#"Run the controller: accept agents (QUIC, mutual TLS), keep the registry of
jobs and the catalog of checkpoints (read from the store at start), and
serve the `job` and `ckpt` commands on a local socket.

Settings come from --config (TOML) and are overridden by the flags:
  listen = "0.0.0.0:7100"
  store = "s3://ckpt/cluster1"            # or "file:///scratch/ckpt"
  certs = "/etc/ckpt/certs"
  socket = "/run/ckpt/controller.sock"
  lease_secs = 5.0
  freeze_timeout_secs = 30.0
  capture_timeout_secs = 60.0
  store_timeout_secs = 3600.0
  restore_timeout_secs = 600.0
  compress = 0                            # zstd level, 0 = raw
  api_listen = "0.0.0.0:7101"             # job/ckpt commands from other hosts (MUNGE)
  munge_socket = "/run/munge/munge.socket.2"
  [s3]                                    # else the AWS_* variables
  endpoint = "http://10.0.0.5:9000"
  region = "us-east-1"
  access_key_id = "..."
  secret_access_key = "..."
  allow_http = true
The controller sends these store settings (or its own AWS_* environment) to
the agents with each save and restore; an agent takes what they leave unset
(keys, region) from its own environment."#;

fn print_json(v: &impl serde::Serialize) -> Result<(), CommandError> {
    let text = serde_json::to_string_pretty(v).map_err(|source| CommandError::Json { source })?;
    outln!("{text}");
    Ok(())
}

fn done_parts(
    ev: Event,
) -> (
    Option<api::Outcome>,
    Vec<api::JobView>,
    Vec<api::NodeView>,
    Vec<ckpt_shared::catalog::JobManifest>,
) {
    match ev {
        Event::Done(Done {
            outcome,
            jobs,
            nodes,
            ckpts,
            ..
        }) => (outcome, jobs, nodes, ckpts),
        Event::Progress { .. } => (None, Vec::new(), Vec::new(), Vec::new()),
    }
}

fn when(unix: u64) -> String {
    let ago = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
        .saturating_sub(unix);
    match ago {
        0..=119 => format!("{ago}s ago"),
        120..=7199 => format!("{}m ago", ago / 60),
        7200..=172_799 => format!("{}h ago", ago / 3600),
        _ => format!("{}d ago", ago / 86400),
    }
}

/// What the controller takes from the environment: read here, in the CLI layer,
/// and nowhere below it.
fn serve_options() -> crate::serve::ServeOptions {
    crate::serve::ServeOptions {
        store: ckpt_shared::objstore::StoreConfig::from_vars(|k| std::env::var(k).ok()),
        leases: ckpt_shared::gc::Leases::from_vars(|k| std::env::var(k).ok()),
        #[cfg(feature = "test-hooks")]
        test_pause: std::env::var("CKPT_TEST_PAUSE").ok(),
    }
}

pub fn run(cli: Cli) -> Result<(), CommandError> {
    let api = Api {
        remote: cli.controller,
        munge_socket: cli.munge_socket,
    };
    match cli.command {
        Command::Serve(a) => serve(a, api.munge_socket),
        Command::Demo { mib, keep } => Ok(crate::demo::run(mib.max(1), keep, serve_options())?),
        Command::DemoRank {
            rank,
            mib,
            interval_ms,
        } => crate::demo::rank_main(rank, mib.max(1), interval_ms),
        Command::Nodes { socket, json } => nodes(&api.target(&socket), json),
        Command::Job(c) => job(&api, c),
        Command::Ckpt(c) => ckpt(&api, c),
        Command::Ca(c) => ca(c),
    }
}

/// Where the `job`, `ckpt` and `nodes` commands send their request: the local
/// socket, or with `--controller` the TCP API of a controller on another host.
struct Api {
    remote: Option<String>,
    munge_socket: Option<PathBuf>,
}

impl Api {
    fn target(&self, socket: &std::path::Path) -> client::Target {
        match &self.remote {
            Some(addr) => client::Target::Munge {
                addr: addr.clone(),
                socket: self.munge_socket.clone(),
            },
            None => client::Target::Local(socket.to_path_buf()),
        }
    }

    /// One request, answered at once (no progress to show).
    fn ask(&self, socket: &std::path::Path, req: &Request) -> Result<Event, CommandError> {
        Ok(client::call_at(&self.target(socket), req, |_| {})?)
    }
}

/// `serve`: the config file, overridden by the flags; then run until killed.
fn serve(a: ServeArgs, munge_socket: Option<PathBuf>) -> Result<(), CommandError> {
    let cfg = serve_config(a, munge_socket)?;
    let r = crate::serve::start(cfg.clone(), serve_options())?;
    eprintln!(
        "ckpt-controller: serving agents on {} (QUIC), commands on {}, store {}",
        r.addr,
        cfg.socket.display(),
        cfg.store
    );
    let signal = r.wait_for_signal()?;
    Err(CommandError::Interrupted { signal })
}

/// The controller's settings: `--config` (or the defaults), each flag given over
/// its key.
fn serve_config(
    a: ServeArgs,
    munge_socket: Option<PathBuf>,
) -> Result<crate::serve::Config, CommandError> {
    let mut cfg = match &a.config {
        Some(p) => crate::serve::Config::load(p)?,
        None => crate::serve::Config::default(),
    };
    if let Some(v) = a.listen {
        cfg.listen = v;
    }
    if let Some(v) = a.store {
        cfg.store = v;
    }
    if let Some(v) = a.certs {
        cfg.certs = v;
    }
    if let Some(v) = a.socket {
        cfg.socket = v;
    }
    if let Some(v) = a.lease {
        cfg.lease_secs = v;
    }
    if let Some(v) = a.api_listen {
        cfg.api_listen = Some(v);
    }
    if let Some(v) = munge_socket {
        cfg.munge_socket = Some(v);
    }
    if !(0.2..=3600.0).contains(&cfg.lease_secs) {
        return Err(CommandError::Lease {
            secs: cfg.lease_secs,
        });
    }
    Ok(cfg)
}

/// `nodes`: the connected agents.
fn nodes(target: &client::Target, json: bool) -> Result<(), CommandError> {
    let (_, _, nodes, _) = done_parts(client::call_at(target, &Request::Nodes, |_| {})?);
    if json {
        return print_json(&nodes);
    }
    outln!("{:<16} {:>5}  {:<24} KERNEL", "NODE", "RANKS", "ADDRESSES");
    for n in nodes {
        outln!(
            "{:<16} {:>5}  {:<24} {}",
            n.name,
            n.ranks,
            n.addrs.join(","),
            n.kernel
        );
    }
    Ok(())
}

fn job(api: &Api, c: JobCommand) -> Result<(), CommandError> {
    match c {
        JobCommand::List { socket, json } => job_list(api, &socket, json),
        JobCommand::Save {
            job,
            kill,
            wait,
            external_tcp,
            socket,
            json,
        } => {
            let req = Request::Save {
                job,
                kill,
                wait,
                external_tcp,
            };
            let o = with_progress(&api.target(&socket), &req, json)?;
            if json {
                print_json(&o)?;
            } else if wait {
                client::print_outcome("saved", &o)?;
            } else {
                outln!("{}", o.ckpt);
                eprintln!("save of job {} started; `ckpt-controller ckpt list --job {}` shows it once committed", o.job, o.job);
            }
            Ok(())
        }
        JobCommand::Restore {
            ckpt,
            nodes,
            map,
            socket,
            json,
        } => {
            let req = Request::Restore { ckpt, nodes, map };
            let o = with_progress(&api.target(&socket), &req, json)?;
            if json {
                print_json(&o)
            } else {
                Ok(client::print_outcome("restored", &o)?)
            }
        }
    }
}

/// A save or restore, with its progress bar on stderr (none for `--json`): its
/// outcome.
fn with_progress(
    target: &client::Target,
    req: &Request,
    json: bool,
) -> Result<api::Outcome, CommandError> {
    let mut bar = client::Bar::default();
    let r = client::call_at(target, req, |e| {
        if !json {
            bar.show(e)
        }
    });
    bar.finish();
    let (o, ..) = done_parts(r?);
    o.ok_or(CommandError::NoOutcome)
}

/// `job list`.
fn job_list(api: &Api, socket: &std::path::Path, json: bool) -> Result<(), CommandError> {
    let (_, jobs, _, _) = done_parts(api.ask(socket, &Request::Jobs)?);
    if json {
        return print_json(&jobs);
    }
    outln!(
        "{:<20} {:>6} {:>5}  {:<20} LATEST",
        "JOB",
        "UID",
        "RANKS",
        "NODES"
    );
    for j in jobs {
        let mut nodes: Vec<&str> = j.ranks.iter().map(|r| r.node.as_str()).collect();
        nodes.sort();
        nodes.dedup();
        outln!(
            "{:<20} {:>6} {:>5}  {:<20} {}",
            j.job,
            j.uid,
            j.ranks.len(),
            nodes.join(","),
            j.latest.as_deref().unwrap_or("-")
        );
    }
    Ok(())
}

fn ckpt(api: &Api, c: CkptCommand) -> Result<(), CommandError> {
    match c {
        CkptCommand::List { job, socket, json } => {
            let (.., ckpts) = done_parts(api.ask(&socket, &Request::Ckpts { job })?);
            ckpt_list(&ckpts, json)
        }
        CkptCommand::Show { ckpt, socket, json } => {
            let (.., ckpts) = done_parts(api.ask(&socket, &Request::Show { ckpt })?);
            let m = ckpts.into_iter().next().ok_or(CommandError::NoCheckpoint)?;
            if json {
                print_json(&m)
            } else {
                ckpt_show(&m)
            }
        }
        CkptCommand::Prune { job, keep, socket } => {
            let req = Request::Prune {
                job: job.clone(),
                keep,
            };
            let (.., gone) = done_parts(api.ask(&socket, &req)?);
            for m in &gone {
                outln!("removed {}", m.id);
            }
            outln!(
                "job {job}: {} checkpoint(s) removed, the newest {keep} kept",
                gone.len()
            );
            Ok(())
        }
        CkptCommand::Gc { socket } => {
            match api.ask(&socket, &Request::Gc)? {
                Event::Done(Done {
                    message: Some(m), ..
                }) => outln!("{m}"),
                _ => outln!("gc done"),
            }
            Ok(())
        }
        CkptCommand::Rm { ckpt, socket } => {
            api.ask(&socket, &Request::Remove { ckpt: ckpt.clone() })?;
            outln!("checkpoint {ckpt} removed");
            Ok(())
        }
    }
}

/// `ckpt list`: a line per checkpoint.
fn ckpt_list(ckpts: &[ckpt_shared::catalog::JobManifest], json: bool) -> Result<(), CommandError> {
    if json {
        return print_json(&ckpts);
    }
    outln!(
        "{:<28} {:<16} {:>5} {:>10} {:>10} {:>10}  WHEN",
        "CHECKPOINT",
        "JOB",
        "RANKS",
        "MEMORY",
        "STORED",
        "STILL"
    );
    for m in ckpts {
        outln!(
            "{:<28} {:<16} {:>5} {:>10} {:>10} {:>8.1}ms  {}",
            m.id,
            m.job,
            m.ranks.len(),
            client::human(m.memory_bytes()),
            client::human(m.stored_bytes()),
            m.freeze_us as f64 / 1e3,
            when(m.created_unix)
        );
    }
    Ok(())
}

/// `ckpt show`: one checkpoint, rank by rank, with its sockets.
fn ckpt_show(m: &ckpt_shared::catalog::JobManifest) -> Result<(), CommandError> {
    outln!("checkpoint {} of job {} (uid {})", m.id, m.job, m.uid);
    outln!(
        "  taken {} ({}), store {}",
        when(m.created_unix),
        if m.killed {
            "job killed"
        } else {
            "job left running"
        },
        m.store
    );
    outln!(
        "  stood still {:.1} ms, total {:.1} ms, memory {}, stored {}",
        m.freeze_us as f64 / 1e3,
        m.total_us as f64 / 1e3,
        client::human(m.memory_bytes()),
        client::human(m.stored_bytes())
    );
    for r in &m.ranks {
        outln!(
            "  rank {:>4}  node {:<12} PID {:<8} {:>10}  {}",
            r.rank,
            r.node,
            r.pid,
            client::human(r.memory_bytes),
            r.image
        );
        for a in &r.listen {
            outln!("             tcp listening on {a}");
        }
        for a in &r.udp {
            outln!("             udp bound to {a}");
        }
        for c in &r.tcp {
            outln!(
                "             tcp {} -> {}: {} queued to send, {} received unread{}",
                c.local,
                c.remote,
                client::human(c.send_queued),
                client::human(c.recv_queued),
                if c.external {
                    " (peer outside the job: restored reset)"
                } else {
                    ""
                }
            );
        }
    }
    Ok(())
}

fn ca(c: CaCommand) -> Result<(), CommandError> {
    match c {
        CaCommand::Init {
            dir,
            controller_names,
            agents,
        } => {
            crate::tls::ca_init(&dir, &controller_names, &agents)?;
            outln!("cluster CA created in {}", dir.display());
            outln!("  controller: {}/controller.pem", dir.display());
            for a in &agents {
                outln!("  agent {a}: {}/agents/{a}.pem", dir.display());
            }
            outln!("keep {}/ca.key on this host only", dir.display());
        }
        CaCommand::Issue { dir, agent } => {
            let (cert, key) = crate::tls::ca_issue(&dir, &agent)?;
            outln!("agent {agent}: {} and {}", cert.display(), key.display());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::munge::MungeError;

    fn enoent() -> std::io::Error {
        std::io::Error::from_raw_os_error(libc::ENOENT)
    }

    /// Prints `e` as the binary does, and checks that every error of its chain
    /// shows up exactly once: a Display that also prints its `#[source]` would
    /// show the cause twice.
    fn printed_once(e: CommandError) -> String {
        let mut levels = Vec::new();
        let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(&e);
        while let Some(c) = cur {
            levels.push(c.to_string());
            cur = c.source();
        }
        let text = format!("{:#}", anyhow::Error::from(e));
        for l in &levels {
            assert_eq!(text.matches(l.as_str()).count(), 1, "{l:?} in {text:?}");
        }
        text
    }

    #[test]
    fn the_binary_prints_each_cause_of_an_error_once() {
        let os = enoent().to_string();
        let t = printed_once(
            ServeError::ConfigRead {
                path: "/etc/ckpt/controller.toml".into(),
                source: enoent(),
            }
            .into(),
        );
        assert_eq!(
            t,
            format!("reading the config file /etc/ckpt/controller.toml: {os}")
        );
        let t = printed_once(
            ClientError::ConnectSocket {
                socket: "/run/ckpt/controller.sock".into(),
                source: enoent(),
            }
            .into(),
        );
        assert!(t.starts_with("cannot reach the controller at /run/ckpt/controller.sock"));
        assert!(t.ends_with(&format!("--controller HOST:PORT: {os}")), "{t}");
        // Three levels deep, through transparent wrappers.
        let t = printed_once(
            ClientError::from(MungeError::Spawn {
                program: "munge",
                hint: " (install the munge package, and run munged)",
                source: enoent(),
            })
            .into(),
        );
        assert_eq!(
            t,
            format!("running `munge` (install the munge package, and run munged): {os}")
        );
        let t = printed_once(
            DemoError::File {
                op: "creating",
                path: "/var/tmp/ckpt-demo.x/agent.log".into(),
                source: enoent(),
            }
            .into(),
        );
        assert_eq!(t, format!("creating /var/tmp/ckpt-demo.x/agent.log: {os}"));
        let bad = toml::from_str::<crate::serve::Config>("listen = 3").unwrap_err();
        let t = printed_once(
            ServeError::ConfigParse {
                path: "/c.toml".into(),
                source: Box::new(bad.clone()),
            }
            .into(),
        );
        assert_eq!(t, format!("config file /c.toml: {bad}"));
        // The controller's refusal is its own words, and nothing else.
        let t = printed_once(
            ClientError::Refused {
                reason: "job j belongs to uid 0; uid 65534 may save only its own jobs".into(),
            }
            .into(),
        );
        assert_eq!(
            t,
            "job j belongs to uid 0; uid 65534 may save only its own jobs"
        );
    }
}
