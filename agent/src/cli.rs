//! Command-line arguments of `ckpt-agent`. The doc comments are the `--help` text.

use anyhow::{Context, Result};
use ckpt_shared::location::Location;
use clap::{Parser, Subcommand};

/// Standard output was closed by its reader (`ckpt-agent inspect --json | head`):
/// not a failure of the command, which stops writing and exits 0 (see `main.rs`).
#[derive(Debug, thiserror::Error)]
#[error("standard output was closed")]
pub struct StdoutClosed;

/// A failed write to standard output: [`StdoutClosed`] when the reader went away.
fn stdout_error(e: std::io::Error) -> anyhow::Error {
    if e.kind() == std::io::ErrorKind::BrokenPipe {
        StdoutClosed.into()
    } else {
        anyhow::Error::new(e).context("writing to standard output")
    }
}

/// `print!` that returns the failure instead of panicking on it.
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        write!(std::io::stdout().lock(), $($arg)*).map_err(stdout_error)?
    }};
}

/// `println!` that returns the failure instead of panicking on it.
macro_rules! outln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        writeln!(std::io::stdout().lock(), $($arg)*).map_err(stdout_error)?
    }};
}

/// ckpt-agent: checkpoint and restore Linux process trees from outside, with ptrace.
///
/// The agent freezes every thread of a process tree, reads its memory, registers,
/// descriptors and signal state without running any code inside it, and writes an
/// image: a manifest plus content-addressed memory chunks. `restore` rebuilds the
/// tree with its original PIDs, and it carries on where it stopped.
///
/// Where images go (--image):
///   /scratch/ckpt/job1              a directory holding one image
///   file:///scratch/store/job1      image job1 in a shared local store: its chunks
///                                   are shared with every other image there, so
///                                   pages already stored cost nothing again
///   s3://bucket/prefix/job1         image job1 in an S3-compatible store (MinIO,
///                                   Ceph, Garage, AWS), chunks shared the same way
/// S3 is configured the way the AWS CLI is: AWS_ENDPOINT_URL_S3 or AWS_ENDPOINT_URL
/// (plain http allowed for a local endpoint), AWS_REGION, AWS_ACCESS_KEY_ID,
/// AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, AWS_PROFILE (~/.aws/credentials and
/// ~/.aws/config), AWS_CA_BUNDLE, web identity and container credentials.
///
/// Needs root (CAP_SYS_PTRACE and CAP_CHECKPOINT_RESTORE) on Linux ≥ 5.14, x86_64.
///
/// Example:
///   ckpt-agent dump --pid 4121 --image /scratch/ckpt/job1
///   ckpt-agent inspect --image /scratch/ckpt/job1
///   ckpt-agent restore --image /scratch/ckpt/job1
///   ckpt-agent dump --pid 4121 --leave-running --image s3://ckpt/cluster1/job1-0001
#[derive(Debug, Parser)]
#[command(name = "ckpt-agent", version, verbatim_doc_comment)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Dump the process tree rooted at PID into an image.
    ///
    /// Every process and thread under PID is frozen (the tree cannot tell), its state
    /// is written to DIR, and then the tree is killed — unless --leave-running is
    /// given, in which case it runs on unaffected. If anything fails (a store that is
    /// down included) the tree is left running exactly as before and no image is
    /// committed: an image exists only once its manifest does, and the manifest is
    /// written last.
    ///
    /// Supported: memory of all kinds (memfds, deleted files, POSIX and System V
    /// shared memory included: their content is saved), threads with full
    /// register/FPU/AVX state, signal state, timers, regular files, directories,
    /// /dev/{null,zero,random,urandom}, pipes and FIFOs with their buffered data,
    /// TCP connections and listeners (IPv4, IPv6, with their socket options; held
    /// still by an nftables lock while they are read), UDP sockets, UNIX sockets
    /// whose peers are in the tree (with their queued data), pseudo-terminal pairs
    /// inside the tree, epoll instances, eventfds, timerfds and signalfds.
    /// Other descriptors (inotify, a UNIX socket or pty whose other end is outside
    /// the tree beyond fds 0-2, SCM_RIGHTS in flight...) abort the dump with a
    /// message naming the fd and the PID, and the tree runs on.
    #[command(verbatim_doc_comment)]
    Dump {
        /// Root of the process tree to dump.
        #[arg(long)]
        pid: i32,
        /// Where to write the image: a directory, file:///store/NAME or
        /// s3://bucket/prefix/NAME (see above). It must not hold an image already.
        #[arg(long, value_name = "LOCATION", value_parser = parse_location)]
        image: Location,
        /// Let the tree run on after the dump instead of killing it.
        #[arg(long)]
        leave_running: bool,
        /// With --leave-running, the most memory the agent may use to copy the tree
        /// while it is frozen (then the tree runs on while the copy is stored, and
        /// the freeze lasts only the copy). A larger tree is stored while frozen,
        /// chunk by chunk, in bounded memory. Bytes, or with a K, M, G or T suffix.
        /// Default: half of MemAvailable.
        #[arg(long, value_name = "SIZE", value_parser = parse_size)]
        max_snapshot: Option<u64>,
        /// Make this dump incremental against PARENT, an earlier image of the same tree
        /// in the same shared store: pages the tree has not written since PARENT was
        /// taken are not read or stored again, but taken from PARENT's chunks (which
        /// stay referenced, so gc keeps them). Needs the write tracking that a
        /// --leave-running dump into a shared store arms (Linux 6.7 or later); a
        /// process whose tracking does not hold (it restarted, the tracking was lost,
        /// a later dump armed it) is dumped in full, and the summary says so.
        #[arg(long, value_name = "NAME")]
        parent: Option<String>,
        /// Do not arm write tracking after a --leave-running dump into a shared
        /// store. Tracking costs the tree one page fault per page at its first write
        /// after the dump; without it, the next dump cannot be incremental.
        #[arg(long)]
        no_track: bool,
        /// Largest memory chunk (a multiple of 4K, from 64K to 64M). Default: 1M for a
        /// directory or file:// store, 4M for s3:// (fewer requests; S3 servers are
        /// slow on small objects). Smaller chunks dedupe finer across images.
        #[arg(long, value_name = "SIZE", value_parser = parse_chunk_size)]
        chunk_size: Option<u64>,
        /// zstd level for memory chunks (0 stores them raw; raw is the default because
        /// HPC memory is mostly incompressible floating point).
        #[arg(long, default_value_t = 0, value_name = "LEVEL")]
        compress: i32,
        /// Worker threads that read, hash and store memory, each with at most two
        /// chunks (2 MiB) in hand: this bounds the dump's memory. Default: the CPUs,
        /// or 16 for an s3:// store, where the threads mostly wait on uploads.
        #[arg(long)]
        workers: Option<usize>,
        /// Print the summary as JSON.
        #[arg(long)]
        json: bool,
        /// Where write tracking keeps its registry of tracked processes.
        #[arg(long, env = "CKPT_TRACK_DIR", default_value = crate::track::DEFAULT_DIR)]
        track_dir: std::path::PathBuf,
        /// Where the journals live that let a watchdog put the tree back if this
        /// process dies mid-operation (see `ckpt-agent rescue --help`).
        #[arg(long, env = "CKPT_RESCUE_DIR", default_value = crate::rescue::DEFAULT_DIR)]
        rescue_dir: std::path::PathBuf,
        /// Measuring only (the engine bench): hold the tree with PTRACE_INTERRUPT
        /// alone, without group-stop, journal or watchdog. A tree whose agent dies
        /// then runs on from wherever the agent left it, and may crash.
        #[arg(long, hide = true)]
        unsafe_interrupt_only: bool,
    },
    /// Restore a process tree from an image; prints the root PID as the last line.
    ///
    /// The tree comes back with its original PIDs and TIDs and keeps running after
    /// this command returns (it is reparented to init). The image is checked against
    /// this host first (format, CPU features, vDSO, PIDs, and every file it refers to);
    /// a mismatch is refused before anything is created.
    Restore {
        /// The image, as given to `dump`.
        #[arg(long, value_name = "LOCATION", value_parser = parse_location)]
        image: Location,
        /// Restore into a fresh PID namespace, where the original PIDs are free.
        #[arg(long)]
        new_pid_ns: bool,
        /// Worker threads that fetch, verify and write memory (default: the CPUs); for
        /// an s3:// store, the requests kept in flight instead, each with a buffer of
        /// one chunk (default 16: 64 MiB with the 4 MiB chunks of s3:// dumps).
        #[arg(long)]
        workers: Option<usize>,
        /// Output the tree wrote (a file it held open for writing) that grew after a
        /// --leave-running dump: `truncate` brings it back to its size at the
        /// checkpoint, as an uninterrupted run would have it; `keep` leaves it as it
        /// is. Files the tree only read or maps executable must be unchanged.
        #[arg(long, value_name = "truncate|keep", default_value = "truncate")]
        changed_files: crate::filecheck::ChangedFiles,
        /// Where the journals live that let a watchdog kill a half-restored tree
        /// if this process dies before the release (see `ckpt-agent rescue --help`).
        #[arg(long, env = "CKPT_RESCUE_DIR", default_value = crate::rescue::DEFAULT_DIR)]
        rescue_dir: std::path::PathBuf,
    },
    /// Show what an image holds: processes, threads, mappings, descriptors, sizes.
    Inspect {
        /// The image, as given to `dump`.
        #[arg(long, value_name = "LOCATION", value_parser = parse_location)]
        image: Location,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// List, remove, prune and garbage-collect the images of a shared store.
    ///
    /// A shared store (file:///path or s3://bucket/prefix) keeps one pool of chunks
    /// for all its images. Removing an image deletes its manifest, which is the only
    /// proof that it exists; `gc` then deletes the chunks that no image references.
    /// gc never deletes a chunk of a committed image, and never runs beside a
    /// checkpoint in progress: it stops, deleting nothing, and says so; a checkpoint
    /// that starts during a gc waits for it (up to CKPT_GC_WAIT_SECS, default 600)
    /// before it freezes anything.
    ///
    /// Example:
    ///   ckpt-agent images list --store s3://ckpt/cluster1
    ///   ckpt-agent images prune --store s3://ckpt/cluster1 --job job42 --keep 2
    ///   ckpt-agent images gc --store s3://ckpt/cluster1
    #[command(verbatim_doc_comment)]
    Images {
        #[command(subcommand)]
        op: ImagesOp,
    },
    /// Run the node's daemon: connect to the controller, register, and carry out its
    /// checkpoints and restores of the ranks attached here.
    ///
    /// The connection is QUIC with mutual TLS: the agent presents
    /// CERTS/agents/NAME.pem (from `ckpt-controller ca init --agent NAME` or
    /// `ca issue --agent NAME`) and accepts only a controller certified by
    /// CERTS/ca.pem. If the controller is silent for longer than --lease while ranks
    /// are frozen, the agent thaws them itself: a dead controller never leaves a job
    /// frozen. Ranks are attached through the local socket (`ckpt-agent attach`).
    ///
    /// Example:
    ///   ckpt-agent serve --name node1 --controller 10.0.0.1:7100 --certs /etc/ckpt/certs
    #[command(verbatim_doc_comment)]
    Serve {
        /// This node's name, as in its certificate.
        #[arg(long)]
        name: String,
        /// The controller's QUIC address (host:port).
        #[arg(long, value_name = "ADDR")]
        controller: std::net::SocketAddr,
        /// Directory of the cluster's certificates (ca.pem, agents/NAME.pem, .key).
        #[arg(long, default_value = "/etc/ckpt/certs")]
        certs: std::path::PathBuf,
        /// The local API socket, where ranks are attached.
        #[arg(long, default_value = DEFAULT_SOCKET)]
        socket: std::path::PathBuf,
        /// Seconds without a word from the controller after which an operation in
        /// progress is given up (frozen ranks thawed).
        #[arg(long, default_value_t = 5.0, value_name = "SECS")]
        lease: f64,
        /// Worker threads per rank that read, hash and store memory.
        #[arg(long, default_value_t = 2)]
        workers: usize,
        /// Where write tracking keeps its registry of tracked processes.
        #[arg(long, env = "CKPT_TRACK_DIR", default_value = crate::track::DEFAULT_DIR)]
        track_dir: std::path::PathBuf,
        /// Where the journals live that let a watchdog put the tree back if this
        /// process dies mid-operation (see `ckpt-agent rescue --help`).
        #[arg(long, env = "CKPT_RESCUE_DIR", default_value = crate::rescue::DEFAULT_DIR)]
        rescue_dir: std::path::PathBuf,
    },
    /// Attach a running process tree to a job as one of its ranks, so that the
    /// job's checkpoints include it. Root may attach any process; a user only their
    /// own. The Slurm plugin does this for every task it starts.
    ///
    /// --external-tcp sets the job's policy for TCP connections to peers outside
    /// the job, which cannot be moved: `fail` makes a save fail and name them (the
    /// job runs on), `close` saves anyway and restores them reset. A save may
    /// override it (`ckpt-controller job save --external-tcp`).
    ///
    /// Example:
    ///   ckpt-agent attach --job job42 --rank 0 --pid 4121
    ///   ckpt-agent attach --job job42 --rank 1 --pid 4122 --external-tcp close
    #[command(verbatim_doc_comment)]
    Attach {
        #[arg(long)]
        job: String,
        #[arg(long)]
        rank: u32,
        #[arg(long)]
        pid: i32,
        #[arg(long, value_name = "fail|close")]
        external_tcp: Option<ckpt_shared::proto::ExternalTcp>,
        /// The agent's API socket.
        #[arg(long, default_value = DEFAULT_SOCKET)]
        socket: std::path::PathBuf,
    },
    /// Detach a rank from its job (the process is not touched).
    Detach {
        #[arg(long)]
        job: String,
        #[arg(long)]
        rank: u32,
        #[arg(long, default_value = DEFAULT_SOCKET)]
        socket: std::path::PathBuf,
    },
    /// List the ranks attached to this node's agent.
    Ranks {
        #[arg(long, default_value = DEFAULT_SOCKET)]
        socket: std::path::PathBuf,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Put back the process trees of operations whose agent died.
    ///
    /// Every dump and restore journals, before each change it makes to a tree, what
    /// the tree was (registers, signal masks, stack bytes, sockets in repair mode,
    /// lock tables), and holds the tree in group-stop meanwhile, so that a tree whose
    /// agent is killed stays stopped instead of running on in a broken state. A
    /// watchdog started with each agent puts such trees back at once; this command
    /// does it for journals whose agent and watchdog are both gone (`serve` does it
    /// at its start too). Unreleased restores are killed instead. It is safe to run
    /// at any time: live operations are left alone.
    Rescue {
        /// The journals' directory (as `--rescue-dir` of dump, restore and serve).
        #[arg(long, env = "CKPT_RESCUE_DIR", default_value = crate::rescue::DEFAULT_DIR)]
        dir: std::path::PathBuf,
        /// Internal: watch the agent PID.START_TIME and rescue its journals when it
        /// exits (started by the agent itself).
        #[arg(long, hide = true, value_name = "PID.START")]
        watch: Option<String>,
    },
    /// Internal: holds the write-tracking descriptors (3, 4, ...) of the given PIDs
    /// between dumps, until they have all exited. Started by `dump`.
    #[command(name = "__hold-uffd", hide = true)]
    HoldUffd { pids: Vec<i32> },
}

#[derive(Debug, Subcommand)]
pub enum ImagesOp {
    /// List the committed images: name, when the dump started, memory, bytes stored.
    List {
        /// The store: file:///path or s3://bucket/prefix.
        #[arg(long, value_name = "URL")]
        store: String,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Remove images (their manifests at once; their chunks at the next gc).
    Rm {
        /// The store: file:///path or s3://bucket/prefix.
        #[arg(long, value_name = "URL")]
        store: String,
        /// Names of the images.
        #[arg(required = true)]
        names: Vec<String>,
    },
    /// Keep the newest N checkpoints of a job, remove the rest.
    ///
    /// A job's checkpoints are the ones the controller writes, `JOB-<attempt>`, whose
    /// rank images `JOB-<attempt>.r<N>` are kept or removed together with the job
    /// manifest, and images dumped by hand as `JOB-<n>` or `JOB.<anything>`, each one a
    /// checkpoint of its own. Removing a job checkpoint here is what
    /// `ckpt-controller ckpt rm` does; a running controller lists it until it starts
    /// again.
    #[command(verbatim_doc_comment)]
    Prune {
        /// The store: file:///path or s3://bucket/prefix.
        #[arg(long, value_name = "URL")]
        store: String,
        /// The job (its name, as in `ckpt-controller job list`).
        #[arg(long)]
        job: String,
        /// How many of its newest checkpoints to keep.
        #[arg(long, value_name = "N")]
        keep: usize,
    },
    /// Delete every chunk that no image references.
    Gc {
        /// The store: file:///path or s3://bucket/prefix.
        #[arg(long, value_name = "URL")]
        store: String,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
}

/// `4096`, `512K`, `64M`, `2G`, `1T` (powers of 1024).
fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let (num, mult) = match t.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let m = match c.to_ascii_uppercase() {
                'K' => 1u64 << 10,
                'M' => 1 << 20,
                'G' => 1 << 30,
                'T' => 1 << 40,
                _ => return Err(format!("{s:?}: use bytes or a K, M, G or T suffix")),
            };
            (&t[..i], m)
        }
        _ => (t, 1),
    };
    num.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .ok_or_else(|| format!("{s:?}: use bytes or a K, M, G or T suffix"))
}

/// The store configuration the environment gives (AWS_*, CKPT_STORE_RETRY_SECS):
/// read here, and only here, then passed down.
fn store_config() -> ckpt_shared::objstore::StoreConfig {
    ckpt_shared::objstore::StoreConfig::from_vars(|k| std::env::var(k).ok())
}

/// The gc leases the environment gives (CKPT_GC_WAIT_SECS).
fn leases() -> ckpt_shared::gc::Leases {
    ckpt_shared::gc::Leases::from_vars(|k| std::env::var(k).ok())
}

/// A token that SIGINT and SIGTERM set from now on, instead of ending the
/// process (see [`crate::cancel`]).
fn cancel_on_signals() -> Result<crate::cancel::Cancel> {
    let cancel = crate::cancel::Cancel::new();
    crate::sys::signal::cancel_on(&[libc::SIGINT, libc::SIGTERM], cancel.flag())
        .context("installing the SIGINT/SIGTERM handler")?;
    Ok(cancel)
}

/// The test hooks (`CKPT_FAULT`, `CKPT_TEST_PAUSE`), in a build that has them.
fn hooks() -> crate::hooks::Hooks {
    #[cfg(feature = "test-hooks")]
    {
        crate::hooks::Hooks {
            fault: std::env::var("CKPT_FAULT").ok(),
            pause: std::env::var("CKPT_TEST_PAUSE").ok(),
        }
    }
    #[cfg(not(feature = "test-hooks"))]
    crate::hooks::Hooks::default()
}

/// How a restore fills memory: `CKPT_FILL=populate` (a test hook) forces the
/// fallback.
fn fill() -> crate::restore::Fill {
    #[cfg(feature = "test-hooks")]
    if std::env::var("CKPT_FILL").as_deref() == Ok("populate") {
        return crate::restore::Fill::Populate;
    }
    crate::restore::Fill::Uffd
}

fn open_shared(url: &str) -> Result<ckpt_shared::objstore::BlockingStore> {
    use ckpt_shared::objstore::{BlockingStore, StoreUrl};
    if matches!(StoreUrl::parse(url)?, StoreUrl::Memory) {
        anyhow::bail!("memory:// lives inside one process; use file:///path or s3://bucket/prefix");
    }
    let store = BlockingStore::open(url, &store_config())?;
    store.check()?;
    Ok(store)
}

fn images(op: ImagesOp) -> Result<()> {
    use ckpt_shared::gc;
    match op {
        ImagesOp::List { store, json } => {
            let s = open_shared(&store)?;
            let mut rows = Vec::new();
            for name in s.list_manifests()? {
                let img = s
                    .get_manifest(&name)
                    .map_err(anyhow::Error::from)
                    .and_then(|b| Ok(ckpt_shared::codec::decode_image(&b)?));
                rows.push(match img {
                    Ok(img) => serde_json::json!({
                        "name": name,
                        "created_unix": img.created_unix,
                        "root_pid": img.root_pid,
                        "memory_bytes": img.stats.memory_bytes,
                        "stored_bytes": img.stats.stored_bytes,
                    }),
                    Err(e) => serde_json::json!({ "name": name, "error": format!("{e:#}") }),
                });
            }
            if json {
                outln!("{}", serde_json::to_string_pretty(&rows)?);
            } else {
                outln!(
                    "{:<40} {:>12} {:>8} {:>10} {:>10}",
                    "NAME",
                    "CREATED",
                    "PID",
                    "MEMORY",
                    "STORED"
                );
                for r in &rows {
                    if let Some(e) = r.get("error") {
                        outln!("{:<40} unreadable: {}", r["name"].as_str().unwrap_or(""), e);
                        continue;
                    }
                    outln!(
                        "{:<40} {:>12} {:>8} {:>10} {:>10}",
                        r["name"].as_str().unwrap_or(""),
                        r["created_unix"],
                        r["root_pid"],
                        crate::inspect::human(r["memory_bytes"].as_u64().unwrap_or(0)),
                        crate::inspect::human(r["stored_bytes"].as_u64().unwrap_or(0)),
                    );
                }
            }
        }
        ImagesOp::Rm { store, names } => {
            let s = open_shared(&store)?;
            let known = s.list_manifests()?;
            for n in &names {
                if !known.contains(n) {
                    anyhow::bail!("no image {n:?} in {store} (nothing was removed); `ckpt-agent images list --store {store}` shows what there is");
                }
            }
            for n in &names {
                s.block_on(s.backend().delete_manifest(n))?;
                outln!("removed {n} (its chunks go at the next gc)");
            }
        }
        ImagesOp::Prune { store, job, keep } => {
            let s = open_shared(&store)?;
            let removed = s.block_on(gc::prune(s.backend(), &job, keep))?;
            for n in &removed {
                outln!("removed {n}");
            }
            outln!(
                "kept the newest {keep} checkpoint(s) of job {job}; removed {} image(s)",
                removed.len()
            );
        }
        ImagesOp::Gc { store, json } => {
            let s = open_shared(&store)?;
            let r = s.block_on(gc::gc(s.backend(), &leases()))?;
            if json {
                outln!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                outln!(
                    "{} image(s) reference {} of {} chunk(s); deleted {}",
                    r.images,
                    r.referenced,
                    r.chunks,
                    r.deleted
                );
                for m in &r.abandoned_markers {
                    outln!("removed the marker of an abandoned checkpoint: {m}");
                }
            }
        }
    }
    Ok(())
}

fn parse_chunk_size(s: &str) -> Result<u64, String> {
    let n = parse_size(s)?;
    if !(64 << 10..=64 << 20).contains(&n) || !n.is_multiple_of(4096) {
        return Err(format!(
            "{s:?}: a chunk is a multiple of 4K from 64K to 64M"
        ));
    }
    Ok(n)
}

fn parse_location(s: &str) -> Result<Location, String> {
    Location::parse(s).map_err(|e| e.to_string())
}

/// Default worker threads: the CPUs for a local store (the work is CPU and disk), 16
/// for a remote one (the threads mostly wait on the network); `remote` overrides the
/// latter.
fn default_workers(image: &Location, remote: usize) -> usize {
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2);
    match image {
        Location::Named {
            store: ckpt_shared::objstore::StoreUrl::S3 { .. },
            ..
        } => cpus.max(remote),
        _ => cpus,
    }
}

/// Where `ckpt-agent serve` listens for `attach` by default.
pub const DEFAULT_SOCKET: &str = "/run/ckpt/agent.sock";

fn api(socket: &std::path::Path, req: crate::serve::ApiRequest) -> Result<crate::serve::ApiReply> {
    let r = crate::serve::api_call(socket, &req)?;
    if !r.ok {
        anyhow::bail!("{}", r.error.unwrap_or_else(|| "refused".into()));
    }
    Ok(r)
}

pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Serve {
            name,
            controller,
            certs,
            socket,
            lease,
            workers,
            track_dir,
            rescue_dir,
        } => {
            if !(0.2..=3600.0).contains(&lease) {
                anyhow::bail!("--lease must be between 0.2 and 3600 seconds");
            }
            let rescued = crate::rescue::sweep(&rescue_dir);
            if rescued > 0 {
                tracing::warn!(rescued, "put back trees of operations whose agent had died");
            }
            let rescue = std::sync::Arc::new(crate::rescue::Watch::start(&rescue_dir)?);
            crate::serve::serve(crate::serve::ServeOptions {
                name,
                controller,
                certs,
                socket,
                lease: std::time::Duration::from_secs_f64(lease),
                workers: workers.max(1),
                store: store_config(),
                leases: leases(),
                registry: crate::track::Registry::new(track_dir),
                hooks: hooks(),
                rescue: Some(rescue),
                cancel: cancel_on_signals()?,
            })?;
        }
        Command::Attach {
            job,
            rank,
            pid,
            external_tcp,
            socket,
        } => {
            api(
                &socket,
                crate::serve::ApiRequest::Attach {
                    job: job.clone(),
                    rank,
                    pid,
                    external_tcp,
                },
            )?;
            outln!("PID {pid} is rank {rank} of job {job}");
        }
        Command::Detach { job, rank, socket } => {
            api(
                &socket,
                crate::serve::ApiRequest::Detach {
                    job: job.clone(),
                    rank,
                },
            )?;
            outln!("rank {rank} of job {job} detached");
        }
        Command::Ranks { socket, json } => {
            let r = api(&socket, crate::serve::ApiRequest::List)?;
            if json {
                outln!("{}", serde_json::to_string_pretty(&r.ranks)?);
            } else {
                outln!("{:<20} {:>5} {:>8} {:>6}", "JOB", "RANK", "PID", "UID");
                for a in &r.ranks {
                    outln!("{:<20} {:>5} {:>8} {:>6}", a.job, a.rank, a.pid, a.uid);
                }
            }
        }
        Command::Dump {
            pid,
            image,
            leave_running,
            max_snapshot,
            parent,
            no_track,
            chunk_size,
            compress,
            workers,
            json,
            track_dir,
            rescue_dir,
            unsafe_interrupt_only,
        } => {
            let (rescue, hold) = if unsafe_interrupt_only {
                (None, crate::freeze::Hold::InterruptOnly)
            } else {
                let w = crate::rescue::Watch::start(&rescue_dir)?;
                (Some(std::sync::Arc::new(w)), crate::freeze::Hold::GroupStop)
            };
            let opts = crate::dump::DumpOptions {
                pid,
                image: image.clone(),
                leave_running,
                zstd_level: (compress > 0).then_some(compress),
                workers: workers.unwrap_or_else(|| default_workers(&image, 16)),
                snapshot_limit: max_snapshot.unwrap_or_else(crate::dump::default_snapshot_limit),
                parent,
                track: !no_track,
                chunk_size: chunk_size.unwrap_or_else(|| crate::dump::default_chunk_size(&image)),
                store: store_config(),
                leases: leases(),
                registry: crate::track::Registry::new(track_dir),
                hooks: hooks(),
                rescue,
                hold,
                start_time: None,
                cancel: cancel_on_signals()?,
            };
            let img = crate::dump::dump(&opts).map_err(|e| match e.cancelled_by() {
                Some(signal) => anyhow::Error::new(crate::cancel::Interrupted {
                    signal,
                    what: format!("dump of PID {pid}"),
                    outcome: "nothing was committed, and the tree runs on as before".into(),
                }),
                None => anyhow::Error::new(e).context(format!(
                    "dump of PID {pid} failed; the process tree was left running"
                )),
            })?;
            let s = &img.stats;
            if json {
                outln!(
                    "{}",
                    serde_json::to_string_pretty(&crate::inspect::stats_json(&img))?
                );
            } else {
                let threads: usize = img.processes.iter().map(|p| p.threads.len()).sum();
                outln!(
                    "dumped PID {pid} ({} processes, {threads} threads) to {image}",
                    img.processes.len(),
                );
                outln!(
                    "frozen {:.1} ms, total {:.1} ms, memory {}, stored {} in {} chunks, {}/s",
                    s.freeze_us as f64 / 1e3,
                    s.total_us as f64 / 1e3,
                    crate::inspect::human(s.memory_bytes),
                    crate::inspect::human(s.stored_bytes),
                    s.chunks,
                    crate::inspect::human(
                        (s.memory_bytes as f64 / (s.total_us.max(1) as f64 / 1e6)) as u64
                    ),
                );
                match (&s.parent, &opts.parent) {
                    (Some(p), _) => outln!(
                        "incremental against {p}: {} taken from it, not read again",
                        crate::inspect::human(s.reused_bytes)
                    ),
                    (None, Some(p)) => outln!(
                        "full dump: write tracking since {p} did not hold for this tree \
                         (see `ckpt-agent dump --help`, --parent)"
                    ),
                    (None, None) => {}
                }
                outln!(
                    "{}",
                    if leave_running {
                        "the tree runs on"
                    } else {
                        "the tree was killed"
                    }
                );
            }
        }
        Command::Restore {
            image,
            new_pid_ns,
            workers,
            changed_files,
            rescue_dir,
        } => {
            // The husks of a failed restore are reaped before we return (see
            // `restore::Husks`).
            crate::sys::spawn::become_subreaper().context("PR_SET_CHILD_SUBREAPER")?;
            let rescue = std::sync::Arc::new(crate::rescue::Watch::start(&rescue_dir)?);
            let opts = crate::restore::RestoreOptions {
                image: image.clone(),
                new_pid_ns,
                workers: workers.unwrap_or_else(|| default_workers(&image, 16)),
                moves: Default::default(),
                store: store_config(),
                fill: fill(),
                hooks: hooks(),
                rescue: Some(rescue),
                changed_files,
            };
            let rep = crate::restore::restore(&opts)
                .with_context(|| format!("restore from {image} failed; no process was started"))?;
            eprintln!(
                "restored {} of memory in {:.1} ms (fill {:.1} ms; {} of {} processes \
                 filled by userfaultfd)",
                crate::inspect::human(rep.memory_bytes),
                rep.total_us as f64 / 1e3,
                rep.fill_us as f64 / 1e3,
                rep.uffd_processes,
                rep.processes
            );
            for c in &rep.changed_files {
                eprintln!("{c}");
            }
            outln!("{}", rep.root_pid);
        }
        Command::Images { op } => images(op)?,
        Command::HoldUffd { pids } => crate::track::hold(&pids),
        Command::Rescue { dir, watch } => match watch {
            Some(owner) => crate::rescue::watch(&dir, &owner)?,
            None => {
                let n = crate::rescue::sweep(&dir);
                outln!("{n} journal(s) of dead agents rescued");
            }
        },
        Command::Inspect { image, json } => {
            let (_, img) = crate::restore::load(&image, &store_config())?;
            if json {
                outln!(
                    "{}",
                    serde_json::to_string_pretty(&crate::inspect::to_json(&img))?
                );
            } else {
                out!("{}", crate::inspect::to_text(&img));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn sizes_parse_with_binary_suffixes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("64M"), Ok(64 << 20));
        assert_eq!(parse_size("2g"), Ok(2 << 30));
        assert!(parse_size("2X").is_err());
        assert!(parse_size("M").is_err());
        assert!(parse_size("99999999999T").is_err());
    }
}
