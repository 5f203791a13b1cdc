//! The engine against stores named by URL: `s3://` on a real S3 server process
//! (s3s-fs, started per test by `ckpt_tests::s3`) and a shared `file://` store.
//!
//! - a tree dumped to `s3://`, killed, restored from it, continues;
//! - images in one store share their chunks: a second checkpoint of a process that
//!   barely changed uploads a small fraction of the first (asserted in bytes);
//! - a damaged or missing chunk in the bucket is refused at restore, naming the
//!   chunk, and so is a truncated manifest; nothing is left running;
//! - incremental dumps (`--parent`): a chain restores a tree that keeps writing,
//!   5% of pages rewritten cost 1.0x their bytes and come back, and a dump that
//!   fails after arming makes the next one full;
//! - gc beside a checkpoint in progress, a checkpoint facing a gc, rm/prune/gc;
//! - the server killed during the upload: the dump fails naming the store, the tree
//!   runs on untouched, and no manifest is committed.
//!
//! Every test guards, by PID, every process it started or restored, and the server.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use ckpt_tests::s3::{S3Server, BUCKET};
use ckpt_tests::ticks::{check_log, last_tick};
use ckpt_tests::{
    guard_restored, is_alive, last_line_pid, require_root, run_agent_env, spawn_workload, wait_for,
    wait_for_tick, AgentRun, ProcGuard, AGENT_TIMEOUT,
};
use tempfile::TempDir;

mod common;
use common::{agent, WAIT};

const MORE: u64 = 10;

/// Runs the agent with the server's environment (and `extra`).
fn run(server: &S3Server, args: &[&str], extra: &[(&str, &str)]) -> Result<AgentRun> {
    let env = server.env();
    let mut all: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    all.extend_from_slice(extra);
    run_agent_env(agent(), args, &all, AGENT_TIMEOUT)
}

/// A workload in a temporary directory, its root guarded.
struct Work {
    root: ProcGuard,
    dir: TempDir,
    pid: i32,
}

impl Work {
    fn start(name: &str, args: &[&str]) -> Result<Work> {
        let dir = tempfile::Builder::new()
            .prefix(&format!("ckpt-store-{name}-"))
            .tempdir()?;
        let root = spawn_workload(name, args, &dir.path().join("log"))?;
        let pid = root.id();
        let w = Work { root, dir, pid };
        wait_for_tick(&w.log(), 3, WAIT)?;
        Ok(w)
    }

    fn log(&self) -> PathBuf {
        self.dir.path().join("log")
    }

    fn last(&self) -> u64 {
        last_tick(&self.log()).unwrap_or(0)
    }

    /// Waits until the workload is gone after a kill-mode dump.
    fn wait_killed(&mut self) -> Result<()> {
        self.root
            .wait_exit(WAIT)?
            .context("the tree still runs after a kill-mode dump")?;
        Ok(())
    }
}

/// Starts `dump --pid PID --image IMAGE` (kill mode) in a thread, with the server's
/// environment and `extra`.
fn spawn_dump(
    server: &S3Server,
    pid: &str,
    image: &str,
    extra: &[(&str, &str)],
) -> std::thread::JoinHandle<Result<AgentRun>> {
    let env: Vec<(String, String)> = server
        .env()
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .chain(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())))
        .collect();
    let args: Vec<String> = ["dump", "--pid", pid, "--image", image]
        .iter()
        .map(|s| s.to_string())
        .collect();
    std::thread::spawn(move || {
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        run_agent_env(agent(), &args, &env, AGENT_TIMEOUT)
    })
}

/// `dump --json` figures.
fn stored_bytes(run: &AgentRun) -> Result<u64> {
    run.json("dump --json")?
        .get("stored_bytes")
        .and_then(serde_json::Value::as_u64)
        .context("no stored_bytes in dump --json")
}

/// The bucket's files under `prefix/chunks`.
fn chunk_files(server: &S3Server, prefix: &str) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let root = server.bucket_dir().join(prefix).join("chunks");
    for shard in std::fs::read_dir(&root).into_iter().flatten().flatten() {
        for f in std::fs::read_dir(shard.path())
            .into_iter()
            .flatten()
            .flatten()
        {
            let name = f.file_name().to_string_lossy().into_owned();
            if name.len() == 64 {
                out.push(f.path());
            }
        }
    }
    out.sort();
    out
}

#[test]
fn a_tree_dumped_to_s3_is_restored_from_it_and_continues() -> Result<()> {
    require_root!(Ok(()));
    let server = S3Server::start();
    let mut w = Work::start("heap_checksum", &["32"])?;
    let url = format!("s3://{BUCKET}/jobs/heap-1");
    let pid = w.pid.to_string();
    run(
        &server,
        &["dump", "--pid", &pid, "--image", &url, "--json"],
        &[],
    )?
    .ok()?;
    w.wait_killed()?;
    let at_dump = w.last();
    ensure!(server
        .bucket_dir()
        .join("jobs/images/heap-1/manifest.ckpt")
        .is_file());

    let restored = run(&server, &["restore", "--image", &url], &[])?;
    guard_restored(&restored, &mut w.root);
    let restored = restored.ok()?;
    ensure!(last_line_pid(&restored)? == w.pid);
    wait_for_tick(&w.log(), at_dump + MORE, WAIT)?;
    w.root.kill();
    let ticks = check_log(&w.log())?;
    ensure!(ticks.len() as u64 >= at_dump + MORE);
    ensure!(ticks.iter().all(|t| t.hex("csum").is_some()));

    // inspect reads the same URL.
    let shown = run(&server, &["inspect", "--image", &url, "--json"], &[])?.ok()?;
    ensure!(
        shown.stdout.contains("\"processes\""),
        "{}",
        shown.describe()
    );
    Ok(())
}

#[test]
fn checkpoints_in_one_store_share_chunks_so_an_unchanged_process_costs_little() -> Result<()> {
    require_root!(Ok(()));
    let server = S3Server::start();
    // 48 MiB of incompressible memory that the program only reads after its fill.
    let w = Work::start("bench_mem", &["48"])?;
    let pid = w.pid.to_string();
    let mut sizes = Vec::new();
    for name in ["ck-1", "ck-2"] {
        let url = format!("s3://{BUCKET}/inc/{name}");
        let r = run(
            &server,
            &[
                "dump",
                "--pid",
                &pid,
                "--image",
                &url,
                "--leave-running",
                "--json",
            ],
            &[],
        )?
        .ok()?;
        sizes.push(stored_bytes(&r)?);
    }
    ensure!(
        sizes[0] >= 48 << 20,
        "first checkpoint stored only {} bytes",
        sizes[0]
    );
    // What changed between the two: the stack, libc's data, the tick counter: a few
    // chunks at most, against 48 of the big mapping.
    ensure!(
        sizes[1] * 10 < sizes[0],
        "second checkpoint stored {} bytes, first {}: chunks are not shared",
        sizes[1],
        sizes[0]
    );
    wait_for_tick(&w.log(), w.last() + 3, WAIT)?;
    check_log(&w.log())?;
    Ok(())
}

/// A restore of `url` must fail naming chunk `name` and saying `what`, and leave
/// nothing running at `pid`.
fn expect_refused(server: &S3Server, url: &str, pid: i32, name: &str, what: &str) -> Result<()> {
    let r = run(server, &["restore", "--image", url], &[])?;
    ensure!(!r.success(), "restore succeeded with a chunk {what}");
    ensure!(
        r.stderr.contains(name) && r.stderr.contains(what),
        "the error does not name chunk {name} as {what}: {}",
        r.describe()
    );
    ensure!(!is_alive(pid), "PID {pid} runs after a refused restore");
    Ok(())
}

#[test]
fn a_damaged_or_missing_chunk_or_a_truncated_manifest_in_s3_is_refused_and_starts_nothing(
) -> Result<()> {
    require_root!(Ok(()));
    let server = S3Server::start();
    let mut w = Work::start("heap_checksum", &["8"])?;
    let url = format!("s3://{BUCKET}/bad/img");
    let pid = w.pid.to_string();
    run(&server, &["dump", "--pid", &pid, "--image", &url], &[])?.ok()?;
    w.wait_killed()?;
    let chunks = chunk_files(&server, "bad");
    ensure!(chunks.len() >= 2, "only {} chunks", chunks.len());

    // One flipped byte in the payload of the largest chunk.
    let victim = chunks
        .iter()
        .max_by_key(|p| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0))
        .context("no chunk")?
        .clone();
    let mut bytes = std::fs::read(&victim)?;
    let at = bytes.len() - 100;
    bytes[at] ^= 0x40;
    std::fs::write(&victim, &bytes)?;
    let name = victim.file_name().unwrap().to_string_lossy().into_owned();
    expect_refused(&server, &url, w.pid, &name, "corrupted")?;
    bytes[at] ^= 0x40;
    std::fs::write(&victim, &bytes)?;

    // The same chunk gone.
    std::fs::remove_file(&victim)?;
    expect_refused(&server, &url, w.pid, &name, "missing")?;

    // The manifest cut short.
    let manifest = server.bucket_dir().join("bad/images/img/manifest.ckpt");
    let bytes = std::fs::read(&manifest)?;
    std::fs::write(&manifest, &bytes[..bytes.len() / 2])?;
    let r = run(&server, &["restore", "--image", &url], &[])?;
    ensure!(!r.success(), "restore from a truncated manifest succeeded");
    ensure!(
        r.stderr.contains("truncated") || r.stderr.contains("corrupt"),
        "the error does not say the manifest is damaged: {}",
        r.describe()
    );
    ensure!(
        !is_alive(w.pid),
        "PID {} runs after a refused restore",
        w.pid
    );
    Ok(())
}

#[test]
fn the_store_killed_during_the_upload_aborts_the_dump_and_the_tree_runs_on() -> Result<()> {
    require_root!(Ok(()));
    let mut server = S3Server::start();
    // Large enough that the upload takes a while; kill mode, so that a commit
    // would kill the tree.
    let w = Work::start("bench_mem", &["384"])?;
    let url = format!("s3://{BUCKET}/down/img");
    let pid = w.pid.to_string();
    let dump = spawn_dump(&server, &pid, &url, &[("CKPT_STORE_RETRY_SECS", "2")]);
    // Kill the server once the first chunks have arrived.
    let started = wait_for(
        || chunk_files(&server, "down").len() >= 4,
        Duration::from_secs(60),
    );
    let t_kill = Instant::now();
    server.kill();
    let r = dump.join().expect("dump thread")?;
    eprintln!("dump with its store killed said:\n{}", r.stderr);
    ensure!(started, "no chunk reached the store: {}", r.describe());
    ensure!(!r.success(), "the dump succeeded with its store down");
    ensure!(
        r.stderr.contains("unreachable") && r.stderr.contains(&server.endpoint()),
        "the error does not name the store: {}",
        r.describe()
    );
    ensure!(
        r.stderr.contains("left running"),
        "the error does not say the tree runs on: {}",
        r.describe()
    );
    ensure!(
        t_kill.elapsed() < Duration::from_secs(60),
        "the dump took {:?} to give up",
        t_kill.elapsed()
    );
    ensure!(!server
        .bucket_dir()
        .join("down/images/img/manifest.ckpt")
        .exists());
    ensure!(is_alive(w.pid), "the tree died");
    wait_for_tick(&w.log(), w.last() + 5, WAIT)?;
    check_log(&w.log())?;
    Ok(())
}

/// The restore writes chunks into the husks while they arrive, before each is
/// verified: a store lost half-way must still leave no process behind, and say which
/// store.
#[test]
fn the_store_killed_during_a_restore_fails_it_and_starts_nothing() -> Result<()> {
    require_root!(Ok(()));
    let mut server = S3Server::start();
    let mut w = Work::start("bench_mem", &["384"])?;
    let url = format!("s3://{BUCKET}/gone/img");
    let pid = w.pid.to_string();
    run(&server, &["dump", "--pid", &pid, "--image", &url], &[])?.ok()?;
    w.wait_killed()?;
    let env: Vec<(String, String)> = server
        .env()
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .chain([("CKPT_STORE_RETRY_SECS".to_string(), "2".to_string())])
        .collect();
    let restore = std::thread::spawn(move || {
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        run_agent_env(agent(), &["restore", "--image", &url], &env, AGENT_TIMEOUT)
    });
    // The husk takes the old PID before its memory is filled: kill the server a
    // moment into the fill.
    let husk = wait_for(|| is_alive(w.pid), Duration::from_secs(60));
    std::thread::sleep(Duration::from_millis(150));
    let t_kill = Instant::now();
    server.kill();
    let r = restore.join().expect("restore thread")?;
    eprintln!("restore with its store killed said:\n{}", r.stderr);
    ensure!(husk, "the restore never made its husk: {}", r.describe());
    ensure!(
        !r.success(),
        "the restore finished before the server was killed (too fast for this test): {}",
        r.describe()
    );
    ensure!(
        r.stderr.contains(&server.endpoint()) && r.stderr.contains("no process was started"),
        "the error does not name the store or does not say nothing started: {}",
        r.describe()
    );
    ensure!(
        t_kill.elapsed() < Duration::from_secs(60),
        "the restore took {:?} to give up",
        t_kill.elapsed()
    );
    ensure!(
        wait_for(|| !is_alive(w.pid), Duration::from_secs(5)),
        "PID {} runs after a failed restore",
        w.pid
    );
    Ok(())
}

#[test]
fn images_in_a_shared_file_store_share_chunks_and_restore() -> Result<()> {
    require_root!(Ok(()));
    let store = tempfile::tempdir()?;
    let mut w = Work::start("bench_mem", &["16"])?;
    let pid = w.pid.to_string();
    let base = format!("file://{}", store.path().display());
    let first = run_agent_env(
        agent(),
        &[
            "dump",
            "--pid",
            &pid,
            "--image",
            &format!("{base}/a"),
            "--leave-running",
            "--json",
        ],
        &[],
        AGENT_TIMEOUT,
    )?
    .ok()?;
    let second = run_agent_env(
        agent(),
        &[
            "dump",
            "--pid",
            &pid,
            "--image",
            &format!("{base}/b"),
            "--json",
        ],
        &[],
        AGENT_TIMEOUT,
    )?
    .ok()?;
    let (a, b) = (stored_bytes(&first)?, stored_bytes(&second)?);
    ensure!(a >= 16 << 20 && b * 10 < a, "stored {a} then {b} bytes");
    w.wait_killed()?;
    let at_dump = w.last();
    ensure!(store.path().join("images/b/manifest.ckpt").is_file());
    let restored = run_agent_env(
        agent(),
        &["restore", "--image", &format!("{base}/b")],
        &[],
        AGENT_TIMEOUT,
    )?;
    guard_restored(&restored, &mut w.root);
    restored.ok()?;
    wait_for_tick(&w.log(), at_dump + MORE, WAIT)?;
    w.root.kill();
    check_log(&w.log())?;
    Ok(())
}

/// `ckpt-agent images ...` against `store`.
fn images(server: Option<&S3Server>, args: &[&str]) -> Result<AgentRun> {
    let mut all = vec!["images"];
    all.extend_from_slice(args);
    match server {
        Some(s) => run(s, &all, &[]),
        None => run_agent_env(agent(), &all, &[], AGENT_TIMEOUT),
    }
}

/// The names `images list --json` gives for the images in `store`.
fn image_names(store: &str) -> Result<Vec<String>> {
    let listed = images(None, &["list", "--store", store, "--json"])?.ok()?;
    Ok(listed
        .json("images list --json")?
        .as_array()
        .context("list --json is not an array")?
        .iter()
        .filter_map(|r| r["name"].as_str().map(String::from))
        .collect())
}

fn gc_report(run: &AgentRun) -> Result<serde_json::Value> {
    run.json("images gc --json")
}

#[test]
fn gc_beside_a_checkpoint_in_progress_deletes_nothing_and_the_checkpoint_commits() -> Result<()> {
    require_root!(Ok(()));
    let server = S3Server::start();
    let store = format!("s3://{BUCKET}/gc");
    let mut w = Work::start("bench_mem", &["384"])?;
    let pid = w.pid.to_string();
    let image = format!("{store}/job.1");
    let dump = spawn_dump(&server, &pid, &image, &[]);
    let started = wait_for(
        || chunk_files(&server, "gc").len() >= 4,
        Duration::from_secs(60),
    );
    let during = images(Some(&server), &["gc", "--store", &store, "--json"])?;
    let d = dump.join().expect("dump thread")?;
    ensure!(started, "no chunk reached the store: {}", d.describe());
    d.ok()?;
    ensure!(
        !during.success(),
        "gc ran beside a checkpoint: {}",
        during.describe()
    );
    ensure!(
        during.stderr.contains("in progress") && during.stderr.contains("job.1"),
        "gc did not say why it stopped: {}",
        during.describe()
    );
    // After the commit: everything is referenced, nothing goes, and no marker is left.
    let after = images(Some(&server), &["gc", "--store", &store, "--json"])?.ok()?;
    let r = gc_report(&after)?;
    ensure!(r["deleted"] == 0 && r["images"] == 1, "{r}");
    ensure!(std::fs::read_dir(server.bucket_dir().join("gc/pending"))
        .map(|d| d.count() == 0)
        .unwrap_or(true));
    w.wait_killed()?;
    let at_dump = w.last();
    let restored = run(&server, &["restore", "--image", &image], &[])?;
    guard_restored(&restored, &mut w.root);
    restored.ok()?;
    wait_for_tick(&w.log(), at_dump + MORE, WAIT)?;
    w.root.kill();
    check_log(&w.log())?;
    Ok(())
}

#[test]
fn a_checkpoint_that_finds_a_gc_running_waits_then_gives_up_before_freezing() -> Result<()> {
    require_root!(Ok(()));
    let server = S3Server::start();
    let w = Work::start("bench_mem", &["8"])?;
    let pid = w.pid.to_string();
    // A gc in progress, as its marker says (written behind the server's back).
    let gc_dir = server.bucket_dir().join("gcw/gc");
    std::fs::create_dir_all(&gc_dir)?;
    std::fs::write(gc_dir.join("gc.4242.1"), b"gc.4242.1")?;
    let image = format!("s3://{BUCKET}/gcw/job.1");
    let t = Instant::now();
    let r = run(
        &server,
        &["dump", "--pid", &pid, "--image", &image],
        &[("CKPT_GC_WAIT_SECS", "2")],
    )?;
    ensure!(!r.success(), "the dump ran beside a gc: {}", r.describe());
    ensure!(
        r.stderr.contains("a gc has been running") && r.stderr.contains("gc.4242.1"),
        "{}",
        r.describe()
    );
    ensure!(t.elapsed() >= Duration::from_secs(2), "it did not wait");
    ensure!(is_alive(w.pid));
    wait_for_tick(&w.log(), w.last() + 3, WAIT)?;
    check_log(&w.log())?;
    // Its own marker went with it; once the gc is over, the dump goes through.
    ensure!(std::fs::read_dir(server.bucket_dir().join("gcw/pending"))
        .map(|d| d.count() == 0)
        .unwrap_or(true));
    std::fs::remove_file(gc_dir.join("gc.4242.1"))?;
    run(
        &server,
        &["dump", "--pid", &pid, "--image", &image, "--leave-running"],
        &[],
    )?
    .ok()?;
    Ok(())
}

/// `images prune --job J` finds what the product itself writes: the rank images of
/// a job checkpoint (`J-<attempt>.r<N>`) go or stay together, with the checkpoint's
/// job manifest, and another job's images (`J0-…`) are not touched.
#[test]
fn prune_removes_whole_job_checkpoints_by_the_names_the_controller_gives() -> Result<()> {
    require_root!(Ok(()));
    let dir = tempfile::tempdir()?;
    let store = format!("file://{}", dir.path().display());
    let w = Work::start("heap_checksum", &["4"])?;
    let pid = w.pid.to_string();
    let names = [
        ckpt_shared::proto::rank_image_name("sim-100", 0),
        ckpt_shared::proto::rank_image_name("sim-100", 1),
        ckpt_shared::proto::rank_image_name("sim0-150", 0),
        ckpt_shared::proto::rank_image_name("sim-200", 0),
        ckpt_shared::proto::rank_image_name("sim-200", 1),
    ];
    for n in &names {
        let image = format!("{store}/{n}");
        run_agent_env(
            agent(),
            &["dump", "--pid", &pid, "--image", &image, "--leave-running"],
            &[],
            AGENT_TIMEOUT,
        )?
        .ok()?;
    }
    // The job manifests a controller writes beside them (`jobs/<ckpt>`).
    let jobs = dir.path().join(ckpt_shared::catalog::JOBS_DIR);
    std::fs::create_dir_all(&jobs)?;
    for ck in ["sim-100", "sim0-150", "sim-200"] {
        std::fs::write(jobs.join(ck), b"job manifest")?;
    }
    let pruned = images(
        None,
        &["prune", "--store", &store, "--job", "sim", "--keep", "1"],
    )?
    .ok()?;
    ensure!(
        pruned.stdout.contains("removed sim-100.r0")
            && pruned.stdout.contains("removed sim-100.r1")
            && pruned.stdout.contains("removed 2"),
        "{}",
        pruned.describe()
    );
    let left = image_names(&store)?;
    ensure!(
        left == ["sim-200.r0", "sim-200.r1", "sim0-150.r0"],
        "left: {left:?}"
    );
    ensure!(
        !jobs.join("sim-100").exists(),
        "the job manifest of the pruned checkpoint is left"
    );
    ensure!(jobs.join("sim-200").exists() && jobs.join("sim0-150").exists());
    Ok(())
}

#[test]
fn rm_prune_and_gc_delete_exactly_the_chunks_no_image_references() -> Result<()> {
    require_root!(Ok(()));
    let dir = tempfile::tempdir()?;
    let store = format!("file://{}", dir.path().display());
    let w = Work::start("heap_checksum", &["8"])?;
    let pid = w.pid.to_string();
    // Three checkpoints of a job; heap_checksum changes its heap as it runs, so each
    // has chunks of its own beside the ones they share.
    for n in 1..=3 {
        let image = format!("{store}/job.{n}");
        run_agent_env(
            agent(),
            &["dump", "--pid", &pid, "--image", &image, "--leave-running"],
            &[],
            AGENT_TIMEOUT,
        )?
        .ok()?;
        wait_for_tick(&w.log(), w.last() + 3, WAIT)?;
    }
    let count = || {
        let mut n = 0;
        for shard in std::fs::read_dir(dir.path().join("chunks"))
            .into_iter()
            .flatten()
            .flatten()
        {
            n += std::fs::read_dir(shard.path())
                .map(|d| d.count())
                .unwrap_or(0);
        }
        n
    };
    let before = count();
    let r = gc_report(&images(None, &["gc", "--store", &store, "--json"])?.ok()?)?;
    ensure!(r["deleted"] == 0 && r["images"] == 3, "{r}");
    ensure!(count() == before);

    // A name that is not there removes nothing and says so.
    let bad = images(None, &["rm", "--store", &store, "job.9", "job.1"])?;
    ensure!(
        !bad.success() && bad.stderr.contains("no image \"job.9\""),
        "{}",
        bad.describe()
    );
    ensure!(dir.path().join("images/job.1/manifest.ckpt").is_file());

    let pruned = images(
        None,
        &["prune", "--store", &store, "--job", "job", "--keep", "1"],
    )?
    .ok()?;
    ensure!(
        pruned.stdout.contains("removed job.1") && pruned.stdout.contains("removed job.2"),
        "{}",
        pruned.describe()
    );
    let names = image_names(&store)?;
    ensure!(names == ["job.3"], "left: {names:?}");
    let r = gc_report(&images(None, &["gc", "--store", &store, "--json"])?.ok()?)?;
    let deleted = r["deleted"].as_u64().unwrap_or(0) as usize;
    ensure!(deleted > 0, "gc deleted nothing after a prune: {r}");
    ensure!(count() == before - deleted);
    ensure!(r["referenced"].as_u64() == Some(count() as u64), "{r}");

    // Every chunk of what is left is there and intact (read and verified). A
    // restore is not the check here: the tree ran on, so its log no longer matches.
    let loc = ckpt_shared::location::Location::parse(&format!("{store}/job.3"))?;
    let img_store = ckpt_shared::location::ImageStore::open(&loc, &Default::default())?;
    let img = ckpt_shared::codec::decode_image(&img_store.get_manifest()?)?;
    let mut verified = 0;
    for e in img
        .processes
        .iter()
        .flat_map(|p| p.mappings.iter().flat_map(|m| m.data.iter()))
    {
        let mut buf = vec![0u8; e.chunk.len as usize];
        img_store.get_chunk(&e.chunk, &mut buf)?;
        verified += 1;
    }
    ensure!(verified > 0);
    Ok(())
}

/// `dump --json` of `pid` to `image` (a shared-store URL), with more arguments.
fn dump_json(
    pid: i32,
    image: &str,
    more: &[&str],
    env: &[(&str, &str)],
) -> Result<serde_json::Value> {
    let pid = pid.to_string();
    let mut args = vec!["dump", "--pid", &pid, "--image", image, "--json"];
    args.extend_from_slice(more);
    let r = run_agent_env(agent(), &args, env, AGENT_TIMEOUT)?.ok()?;
    r.json("dump --json")
}

/// Restores `image` into `w`'s PID and waits for `more` ticks after `at`.
fn restore_into(w: &mut Work, image: &str, at: u64) -> Result<()> {
    let restored = run_agent_env(agent(), &["restore", "--image", image], &[], AGENT_TIMEOUT)?;
    guard_restored(&restored, &mut w.root);
    restored.ok()?;
    wait_for_tick(&w.log(), at + MORE, WAIT)?;
    Ok(())
}

#[test]
fn a_chain_of_incremental_dumps_restores_a_tree_that_keeps_writing() -> Result<()> {
    require_root!(Ok(()));
    let dir = tempfile::tempdir()?;
    let store = format!("file://{}", dir.path().display());
    // heap_checksum rewrites parts of its 32 MiB heap every tick and checks the
    // running checksum of all of it: a page taken wrongly from a parent shows.
    let mut w = Work::start("heap_checksum", &["32"])?;
    let a = dump_json(w.pid, &format!("{store}/job.a"), &["--leave-running"], &[])?;
    ensure!(a["parent"].is_null() && a["reused_bytes"] == 0, "{a}");
    wait_for_tick(&w.log(), w.last() + 3, WAIT)?;
    let b = dump_json(
        w.pid,
        &format!("{store}/job.b"),
        &["--leave-running", "--parent", "job.a"],
        &[],
    )?;
    ensure!(
        b["parent"].as_str().is_some_and(|p| p.ends_with("/job.a")),
        "not incremental: {b}"
    );
    ensure!(b["reused_bytes"].as_u64().unwrap_or(0) > 0, "{b}");
    let shown = run_agent_env(
        agent(),
        &["inspect", "--image", &format!("{store}/job.b")],
        &[],
        AGENT_TIMEOUT,
    )?
    .ok()?;
    ensure!(
        shown.stdout.contains("incremental:") && shown.stdout.contains("/job.a"),
        "inspect does not show the parent: {}",
        shown.describe()
    );
    wait_for_tick(&w.log(), w.last() + 3, WAIT)?;
    // The last one in kill mode, then back from it.
    let c = dump_json(
        w.pid,
        &format!("{store}/job.c"),
        &["--parent", "job.b"],
        &[],
    )?;
    eprintln!("a: {a}\nb: {b}\nc: {c}");
    ensure!(c["reused_bytes"].as_u64().unwrap_or(0) > 0, "{c}");
    w.wait_killed()?;
    let at = w.last();
    restore_into(&mut w, &format!("{store}/job.c"), at)?;
    w.root.kill();
    let ticks = check_log(&w.log())?;
    ensure!(ticks.iter().all(|t| t.hex("csum").is_some()));
    Ok(())
}

#[test]
fn an_incremental_dump_stores_only_the_written_pages_and_they_come_back() -> Result<()> {
    require_root!(Ok(()));
    use std::os::unix::fs::FileExt;
    let server = S3Server::start();
    let store = format!("s3://{BUCKET}/inc");
    let mut w = Work::start("bench_mem", &["64"])?;
    let env: Vec<(&str, String)> = server.env();
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let full = dump_json(w.pid, &format!("{store}/job.1"), &["--leave-running"], &env)?;
    // 5% of the big mapping's pages, picked at random, get new bytes from outside.
    let (start, end) = ckpt_tests::process::largest_anon_mapping(w.pid)?;
    let pages = (end - start) / 4096;
    let mem = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(format!("/proc/{}/mem", w.pid))?;
    let mut s = 0x1234_5678_9abc_def1u64;
    let mut next = || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        s
    };
    let mut chosen = std::collections::BTreeMap::new();
    while (chosen.len() as u64) < pages / 20 {
        let p = next() % pages;
        let bytes: Vec<u8> = (0..512).flat_map(|_| next().to_le_bytes()).collect();
        chosen.insert(p, bytes);
    }
    for (p, bytes) in &chosen {
        mem.write_all_at(bytes, start + p * 4096)?;
    }
    let changed = chosen.len() as u64 * 4096;
    let inc = dump_json(
        w.pid,
        &format!("{store}/job.2"),
        &["--parent", "job.1"],
        &env,
    )?;
    eprintln!("full: {full}\nincremental, {changed} bytes changed: {inc}");
    let stored = inc["stored_bytes"].as_u64().context("stored_bytes")?;
    let reused = inc["reused_bytes"].as_u64().context("reused_bytes")?;
    // The written pages, plus what the program itself wrote (its stack, libc's
    // data: a few pages), in packed chunks with their headers.
    ensure!(
        stored <= changed + changed / 10 + (256 << 10),
        "stored {stored} bytes for {changed} changed (full: {})",
        full["stored_bytes"]
    );
    ensure!(
        reused >= (64 << 20) - changed - (1 << 20),
        "reused only {reused}: {inc}"
    );
    w.wait_killed()?;
    // Back from the incremental image: the written pages are ours, the others the
    // workload's own.
    let restored = run(
        &server,
        &["restore", "--image", &format!("{store}/job.2")],
        &[],
    )?;
    guard_restored(&restored, &mut w.root);
    restored.ok()?;
    let mem = std::fs::File::open(format!("/proc/{}/mem", w.pid))?;
    let mut page = vec![0u8; 4096];
    for (p, bytes) in &chosen {
        mem.read_exact_at(&mut page, start + p * 4096)?;
        ensure!(&page == bytes, "page {p} did not come back as written");
    }
    let untouched = (0..pages)
        .find(|p| !chosen.contains_key(p))
        .context("no page left")?;
    mem.read_exact_at(&mut page, start + untouched * 4096)?;
    ensure!(
        page.iter().any(|&b| b != 0),
        "unwritten page {untouched} came back empty"
    );
    Ok(())
}

#[test]
fn a_failed_dump_after_arming_makes_the_next_incremental_one_full() -> Result<()> {
    require_root!(Ok(()));
    let dir = tempfile::tempdir()?;
    let store = format!("file://{}", dir.path().display());
    let mut w = Work::start("heap_checksum", &["16"])?;
    dump_json(w.pid, &format!("{store}/job.a"), &["--leave-running"], &[])?;
    wait_for_tick(&w.log(), w.last() + 2, WAIT)?;
    // This one scans and protects the written pages again, then fails.
    let pid = w.pid.to_string();
    let failed = run_agent_env(
        agent(),
        &[
            "dump",
            "--pid",
            &pid,
            "--image",
            &format!("{store}/job.b"),
            "--leave-running",
            "--parent",
            "job.a",
        ],
        &[("CKPT_FAULT", "before-commit")],
        AGENT_TIMEOUT,
    )?;
    ensure!(!failed.success(), "the induced failure did not fail");
    wait_for_tick(&w.log(), w.last() + 2, WAIT)?;
    // Against job.a again: the pages written before the failed dump are not known
    // any more, so this must be a full dump, and say so.
    let c = run_agent_env(
        agent(),
        &[
            "dump",
            "--pid",
            &pid,
            "--image",
            &format!("{store}/job.c"),
            "--parent",
            "job.a",
        ],
        &[],
        AGENT_TIMEOUT,
    )?
    .ok()?;
    ensure!(
        c.stdout.contains("full dump: write tracking"),
        "{}",
        c.describe()
    );
    w.wait_killed()?;
    let at = w.last();
    restore_into(&mut w, &format!("{store}/job.c"), at)?;
    w.root.kill();
    check_log(&w.log())?;
    Ok(())
}
