//! Store benchmark: `ckpt-agent dump` to and `restore` from a local S3 server,
//! against plain `object_store` transfers of the same bytes to the same server in
//! the same run, and the cost of a second checkpoint after 5% of the pages changed.
//!
//!     cargo bench -p ckpt-agent --bench store
//!
//! The server is s3s-fs (`scripts/s3-server.sh install`), started here on 127.0.0.1
//! with its data in a fresh directory under `CKPT_BENCH_DIR` (default `/var/tmp`),
//! and killed by PID at the end. The workload is `tests/workloads/bench_mem.c` with
//! `CKPT_BENCH_S3_MIB` MiB (default 1024) of incompressible memory. Per repetition
//! (`CKPT_BENCH_REPS`, default 3):
//!
//! - baseline up: the same number of random bytes uploaded as one object with
//!   `object_store`'s multipart writer (8 MiB parts, 16 in flight);
//! - baseline down: that object read back with 16 parallel ranged GETs of 8 MiB;
//!   and, after the full dump, every chunk object of the image GET whole, 16 in
//!   flight (the same requests the restore makes, without its work);
//! - `dump --leave-running` of the workload to `s3://ckpt/bench-N/full` (wall time);
//! - the bench writes new random bytes into 5% of the workload's pages, picked at
//!   random, through `/proc/PID/mem`, then `dump --leave-running --parent full` to
//!   `.../incr` in the same store (incremental: only written pages are read):
//!   bytes stored and wall time, against the full dump;
//! - the workload is killed and `restore` from `.../full` is timed (the workload's
//!   own checks then fail on the pages the bench changed: it is only timed).
//!
//! Before each timed read the page cache's dirty pages are synced, and each
//! repetition's objects are removed at its end, so every read starts alike.
//!
//! Nothing is asserted: the figures and their ratios to the baselines are printed,
//! median and min–max. The dumps run with `--max-snapshot 0`, so they stream from
//! the frozen tree with the agent holding only its workers' chunks; the agent's peak
//! memory (VmHWM, sampled) is printed: that bound.

use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::{Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use ckpt_tests::s3::{S3Server, ACCESS_KEY, BUCKET, SECRET_KEY};
use ckpt_tests::stats::{self, Samples};
use ckpt_tests::{require_root, spawn_workload, wait_for, ProcGuard};
use object_store::aws::AmazonS3Builder;
use object_store::path::Path as ObjPath;
use object_store::{ObjectStore, ObjectStoreExt, WriteMultipart};

const AGENT: &str = env!("CARGO_BIN_EXE_ckpt-agent");
const PART: usize = 8 << 20;
const IN_FLIGHT: usize = 16;
const CHANGED: f64 = 0.05;

fn env_usize(k: &str, d: usize) -> usize {
    std::env::var(k)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(d)
}

/// The high median (the store bench has always printed a measured value, not a
/// mean of two); NaN without samples.
fn med(s: &Samples) -> f64 {
    s.median_high().unwrap_or(f64::NAN)
}

/// `min - max`; without samples, the `inf - -inf` of an empty fold.
fn range(s: &Samples) -> String {
    let (lo, hi) = s.min_max().unwrap_or((f64::INFINITY, f64::NEG_INFINITY));
    stats::range(lo, hi, 2, " - ")
}

fn row(s: &Samples, name: &str, unit: &str) {
    println!("  {name:<46} {:>9.2} {unit:<5} {:>16}", med(s), range(s));
}

#[derive(Default)]
struct R {
    up: Samples,
    down: Samples,
    down_chunks: Samples,
    dump: Samples,
    restore: Samples,
    full_stored: Samples,
    incr_stored: Samples,
    incr_time: Samples,
    changed: Samples,
}

fn main() -> ExitCode {
    require_root!(ExitCode::SUCCESS);
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            println!("store bench FAILED: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<()> {
    let mib = env_usize("CKPT_BENCH_S3_MIB", 1024);
    let reps = env_usize("CKPT_BENCH_REPS", 3);
    let base = std::env::var("CKPT_BENCH_DIR").unwrap_or_else(|_| "/var/tmp".into());
    std::env::set_var("TMPDIR", &base); // the server's data directory goes there
    let bytes = mib << 20;
    let server = S3Server::start();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let s3: std::sync::Arc<dyn ObjectStore> = {
        let _g = rt.enter();
        std::sync::Arc::new(
            AmazonS3Builder::new()
                .with_endpoint(server.endpoint())
                .with_allow_http(true)
                .with_region("us-east-1")
                .with_bucket_name(BUCKET)
                .with_access_key_id(ACCESS_KEY)
                .with_secret_access_key(SECRET_KEY)
                // s3s-fs completes a multipart upload by copying every part into
                // one file: for 4 GiB that can take longer than the default 30 s
                // timeout, whose retry then finds the upload gone.
                .with_client_options(
                    object_store::ClientOptions::new()
                        .with_allow_http(true)
                        .with_timeout(Duration::from_secs(600)),
                )
                .build()?,
        )
    };
    println!(
        "ckpt store benchmark: {mib} MiB, {reps} repetition(s), s3s-fs at {}",
        server.endpoint()
    );
    let mut r = R::default();
    let mut data = vec![0u8; bytes];
    for rep in 0..reps {
        eprintln!("[store] repetition {}/{reps}", rep + 1);
        fill(&mut data, rep as u64 + 1);
        // Baselines.
        let key = ObjPath::from(format!("plain/{rep}"));
        let t = Instant::now();
        rt.block_on(async {
            let up = s3.put_multipart(&key).await?;
            let mut w = WriteMultipart::new_with_chunk_size(up, PART);
            for part in data.chunks(PART) {
                w.wait_for_capacity(IN_FLIGHT).await?;
                w.write(part);
            }
            w.finish().await?;
            anyhow::Ok(())
        })?;
        r.up.push(bytes as f64 / t.elapsed().as_secs_f64() / 1e9);
        settle();
        let t = Instant::now();
        let got = rt.block_on(async {
            use futures_util::StreamExt;
            let ranges: Vec<_> = (0..bytes as u64)
                .step_by(PART)
                .map(|s| s..(s + PART as u64).min(bytes as u64))
                .collect();
            let mut total = 0usize;
            let mut st = futures_util::stream::iter(ranges)
                .map(|rg| {
                    let s3 = s3.clone();
                    let key = key.clone();
                    async move { s3.get_range(&key, rg).await }
                })
                .buffer_unordered(IN_FLIGHT);
            while let Some(b) = st.next().await {
                total += b?.len();
            }
            anyhow::Ok(total)
        })?;
        ensure!(got == bytes, "downloaded {got} of {bytes} bytes");
        r.down.push(bytes as f64 / t.elapsed().as_secs_f64() / 1e9);
        rt.block_on(s3.delete(&key))?;

        // The agent.
        // Output to /dev/null: the restore checks every file the image refers to,
        // and a log that grew since the dump would be refused.
        let mut w = spawn_workload("bench_mem", [mib.to_string()], Path::new("/dev/null"))?;
        let pid = w.id();
        wait_filled(pid, bytes)?;
        let prefix = format!("s3://{BUCKET}/bench-{rep}");
        let (secs, full) = dump(&server, pid, &format!("{prefix}/full"), None)?;
        r.dump.push(bytes as f64 / secs / 1e9);
        r.full_stored.push(full as f64 / (1 << 20) as f64);
        // Second baseline: the image's own chunk objects (only the full image's are
        // in the store yet), fetched whole with the same requests in flight.
        settle();
        let t = Instant::now();
        let got = rt.block_on(get_all(&s3, &format!("bench-{rep}/chunks")))?;
        ensure!(
            got >= bytes,
            "the chunk objects hold {got} bytes, fewer than {bytes}"
        );
        r.down_chunks
            .push(got as f64 / t.elapsed().as_secs_f64() / 1e9);
        let changed = change_pages(pid, CHANGED, rep as u64)?;
        r.changed.push(changed as f64 / (1 << 20) as f64);
        let (isecs, incr) = dump(&server, pid, &format!("{prefix}/incr"), Some("full"))?;
        r.incr_stored.push(incr as f64 / (1 << 20) as f64);
        r.incr_time.push(isecs / secs);
        w.kill();
        settle();
        let t = Instant::now();
        let out = agent(&server, &["restore", "--image", &format!("{prefix}/full")])?;
        let rt_secs = t.elapsed().as_secs_f64();
        let restored: i32 = out
            .lines()
            .last()
            .and_then(|l| l.trim().parse().ok())
            .context("restore printed no PID")?;
        let mut g = ProcGuard::adopt(restored);
        g.kill();
        r.restore.push(bytes as f64 / rt_secs / 1e9);
        // Each repetition starts from the same state: the last one's objects would
        // otherwise crowd this one's out of the page cache (4 GiB each, 24 GiB here).
        std::fs::remove_dir_all(server.bucket_dir().join(format!("bench-{rep}")))?;
    }
    println!("== {mib} MiB to s3s-fs on this machine (median, min - max) ==");
    row(
        &r.up,
        "plain multipart upload (8 MiB parts, 16 in flight)",
        "GB/s",
    );
    row(&r.dump, "dump --leave-running to s3:// (wall)", "GB/s");
    row(
        &r.down,
        "plain parallel ranged download (16 in flight)",
        "GB/s",
    );
    row(
        &r.down_chunks,
        "plain GETs of the image's chunk objects (16 in flight)",
        "GB/s",
    );
    row(&r.restore, "restore from s3:// (wall)", "GB/s");
    row(&r.full_stored, "full checkpoint: stored", "MiB");
    row(&r.changed, "pages changed by the bench (5%)", "MiB");
    row(&r.incr_stored, "second checkpoint: stored", "MiB");
    row(&r.incr_time, "second checkpoint time / full time", "");
    let v = |ok: bool| if ok { "PASS" } else { "MISS" };
    // Each ratio is taken within a repetition (the transfer and its baseline ran
    // a minute apart on the same server), then the median over repetitions: the
    // server's speed drifts between repetitions more than within one.
    let up = r.dump.ratios(&r.up);
    let down = r.restore.ratios(&r.down);
    let down_chunks = r.restore.ratios(&r.down_chunks);
    let inc = med(&r.incr_stored) / med(&r.changed);
    println!("  ratios per repetition (median, min - max):");
    println!(
        "  checkpoint / plain upload      {:.2} ({})  target >= 0.8   {}",
        med(&up),
        range(&up),
        v(med(&up) >= 0.8)
    );
    println!(
        "  restore / plain download       {:.2} ({})  target >= 0.8   {}",
        med(&down),
        range(&down),
        v(med(&down) >= 0.8)
    );
    println!(
        "  restore / plain chunk GETs     {:.2} ({})  (the same objects the restore reads)",
        med(&down_chunks),
        range(&down_chunks)
    );
    println!(
        "  incremental stored / changed   {inc:.2}  target <= 1.1   {}",
        v(inc <= 1.1)
    );
    println!(
        "  incremental time / full time   {:.2}  target <= 0.15  {}",
        med(&r.incr_time),
        v(med(&r.incr_time) <= 0.15)
    );
    println!(
        "  the agent's peak memory (VmHWM, any run): {} MiB for a {mib} MiB process \
         (no snapshot; bounded by the chunks in hand: dump 16 workers x 2 chunks, \
         restore 16 requests x 1 chunk, 4 MiB chunks for s3://)",
        AGENT_PEAK_KB.load(Ordering::Relaxed) / 1024
    );
    Ok(())
}

/// Before each timed read: what the writes before it left dirty goes to disk, so
/// that no read competes with their writeback (the dump leaves 4 GiB of it behind).
fn settle() {
    // SAFETY: sync(2) takes no arguments and cannot fail.
    unsafe { libc::sync() };
    std::thread::sleep(Duration::from_secs(1));
}

/// GETs every object under `prefix`, whole, `IN_FLIGHT` at a time; returns the bytes.
async fn get_all(s3: &std::sync::Arc<dyn ObjectStore>, prefix: &str) -> Result<usize> {
    use futures_util::{StreamExt, TryStreamExt};
    let keys: Vec<ObjPath> = s3
        .list(Some(&ObjPath::from(prefix)))
        .map_ok(|m| m.location)
        .try_collect()
        .await?;
    let mut total = 0usize;
    let mut st = futures_util::stream::iter(keys)
        .map(|k| {
            let s3 = s3.clone();
            async move { anyhow::Ok(s3.get(&k).await?.bytes().await?.len()) }
        })
        .buffer_unordered(IN_FLIGHT);
    while let Some(n) = st.next().await {
        total += n?;
    }
    Ok(total)
}

/// The largest VmHWM seen of any agent run (kB): the agent's own peak memory.
static AGENT_PEAK_KB: AtomicU64 = AtomicU64::new(0);

fn vm_hwm_kb(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let l = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    l.split_whitespace().nth(1)?.parse().ok()
}

/// Runs the agent with the server's environment, sampling its peak memory.
fn agent(server: &S3Server, args: &[&str]) -> Result<String> {
    let mut c = Command::new(AGENT);
    c.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in server.env() {
        c.env(k, v);
    }
    let mut child = c.spawn()?;
    let mut out = child.stdout.take().context("stdout")?;
    let mut err = child.stderr.take().context("stderr")?;
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let ereader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let status = loop {
        if let Some(kb) = vm_hwm_kb(child.id()) {
            AGENT_PEAK_KB.fetch_max(kb, Ordering::Relaxed);
        }
        if let Some(st) = child.try_wait()? {
            break st;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let out = reader.join().unwrap_or_default();
    let err = ereader.join().unwrap_or_default();
    if !status.success() {
        bail!("ckpt-agent {args:?}: {err}");
    }
    Ok(out)
}

/// Dumps with --leave-running (incremental against `parent` if given); returns the
/// wall time (s) and the bytes stored.
fn dump(server: &S3Server, pid: i32, image: &str, parent: Option<&str>) -> Result<(f64, u64)> {
    let pid = pid.to_string();
    let mut args = vec![
        "dump",
        "--pid",
        &pid,
        "--image",
        image,
        "--leave-running",
        // No snapshot: the tree stays frozen while it streams, and the agent
        // holds only its workers' chunks (the bound shown at the end).
        "--max-snapshot",
        "0",
        "--json",
    ];
    if let Some(p) = parent {
        args.extend(["--parent", p]);
    }
    let t = Instant::now();
    let out = agent(server, &args)?;
    let secs = t.elapsed().as_secs_f64();
    let v: serde_json::Value = serde_json::from_str(&out)?;
    Ok((secs, v["stored_bytes"].as_u64().context("no stored_bytes")?))
}

/// Writes new random bytes into `share` of the pages of the workload's largest
/// anonymous mapping, chosen at random; returns the bytes changed.
fn change_pages(pid: i32, share: f64, seed: u64) -> Result<u64> {
    let (start, end) = ckpt_tests::process::largest_anon_mapping(pid)?;
    let pages = (end - start) / 4096;
    let want = (pages as f64 * share) as u64;
    let mem = std::fs::OpenOptions::new()
        .write(true)
        .open(format!("/proc/{pid}/mem"))?;
    let mut s = 0x2545_F491_4F6C_DD1Du64 ^ seed;
    let mut next = || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        s
    };
    let mut chosen = std::collections::HashSet::new();
    while (chosen.len() as u64) < want {
        chosen.insert(next() % pages);
    }
    let mut page = vec![0u8; 4096];
    for p in chosen {
        for w in page.chunks_exact_mut(8) {
            w.copy_from_slice(&next().to_le_bytes());
        }
        mem.write_all_at(&page, start + p * 4096)?;
    }
    Ok(want * 4096)
}

/// Waits until the workload's anonymous memory holds `bytes` (its fill is done).
fn wait_filled(pid: i32, bytes: usize) -> Result<()> {
    let anon = || -> u64 {
        std::fs::read_to_string(format!("/proc/{pid}/status"))
            .ok()
            .and_then(|s| {
                let l = s.lines().find(|l| l.starts_with("RssAnon:"))?.to_string();
                l.split_whitespace().nth(1)?.parse().ok()
            })
            .unwrap_or(0)
            * 1024
    };
    ensure!(
        wait_for(|| anon() >= bytes as u64, Duration::from_secs(300)),
        "the workload did not fill its {bytes} bytes"
    );
    // The last pages are being written as RssAnon reaches the size.
    std::thread::sleep(Duration::from_millis(300));
    Ok(())
}

fn fill(buf: &mut [u8], seed: u64) {
    let mut s = 0x9E37_79B9_7F4A_7C15u64 ^ seed;
    for w in buf.chunks_exact_mut(8) {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        w.copy_from_slice(&s.to_le_bytes());
    }
}
