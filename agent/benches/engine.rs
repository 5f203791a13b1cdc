//! Engine benchmark: `ckpt-agent dump` and `restore` of a large, incompressible
//! process, set against memory and disk baselines measured in the same run.
//!
//!     cargo bench -p ckpt-agent --bench engine
//!
//! The development machines are shared and noisy, so no absolute figure means much
//! on its own and nothing here asserts a timing: every figure is printed next to a
//! baseline taken on the same machine, in the same run, interleaved with the agent
//! runs (each repetition measures its baselines and then its agent runs), and the
//! verdicts against the targets are printed, never enforced. The baselines
//! are the work a restore or a dump cannot avoid:
//!
//! - `memcpy` between two warm buffers: the memory bandwidth;
//! - filling fresh memory mapped with `MAP_POPULATE`: what a restore must do at
//!   least (map, fault in, copy), and the same with page-by-page faults;
//! - a sequential write plus `fsync` (the dump syncs its image) and a sequential
//!   read of the same file, cold (after `drop_caches`) and warm.
//!
//! The workload is `tests/workloads/bench_mem.c`, compiled here with `gcc -O2`: one
//! anonymous mapping of S MiB filled with xorshift64 output. Each repetition starts
//! it, dumps it with `--leave-running` (freeze time), dumps it again in kill mode,
//! reaps it, restores it warm (the image still in the page cache) and, after
//! putting its log file back as it was at the dump and dropping the caches, cold.
//! Every restore must give back the same PID and continue the tick sequence
//! exactly where it stopped; the workload re-checks random pages every tick.
//!
//! Settings (environment): `CKPT_BENCH_SIZES_MIB` (default `1024,4096`),
//! `CKPT_BENCH_REPS` (default 3), `CKPT_BENCH_DIR` (default `/var/tmp`; a fresh
//! directory is made inside it for the images and the baseline file, so they share
//! a disk). Needs root. Everything it creates is removed at the end, and every
//! process it started or restored is SIGKILLed by PID (never by name) by a guard,
//! even on an error or a panic.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use ckpt_tests::stats::Samples;
use ckpt_tests::{path_str, root_skip_reason};

const AGENT: &str = env!("CARGO_BIN_EXE_ckpt-agent");
const WORKLOAD_SRC: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../tests/workloads/bench_mem.c"
);

/// How long any single wait may take: a workload filling its memory, an agent
/// command, a dumped process disappearing.
const WAIT: Duration = Duration::from_secs(120);
/// How long a restored workload has to print its next tick (it ticks every 100 ms).
const TICK_WAIT: Duration = Duration::from_secs(10);
/// How long a killed process has to disappear.
const KILL_WAIT: Duration = Duration::from_secs(10);

const MIB: usize = 1 << 20;
/// The I/O size of the plain write and read baselines.
const IO_CHUNK: usize = MIB;
/// The small process of the latency targets.
const SMALL_MIB: usize = 8;
const SMALL_DUMP_TARGET_MS: f64 = 20.0;
const SMALL_RESTORE_TARGET_MS: f64 = 50.0;
/// Dump and restore throughput as a share of plain write and read.
const THROUGHPUT_TARGET: f64 = 0.70;
/// Restore time as a multiple of the `MAP_POPULATE` fill.
const POPULATE_TARGET: f64 = 1.3;
/// CRIU 4.2 on the machine: (MiB, freeze s, restore s).
const CRIU: [(usize, f64, f64); 2] = [(1024, 1.18, 1.20), (4096, 5.66, 5.54)];

fn main() -> ExitCode {
    // The same check as the tests' `require_root!`.
    if let Some(why) = root_skip_reason() {
        println!(
            "engine bench: skipped: {why}. It ptraces its workload, writes \
             /proc/sys/vm/drop_caches and restores processes with their original PIDs; \
             run it as root."
        );
        return ExitCode::SUCCESS;
    }
    match run() {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => {
            eprintln!("engine bench: some measurements failed (see above)");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("engine bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

struct Config {
    sizes_mib: Vec<usize>,
    reps: usize,
    base_dir: PathBuf,
}

impl Config {
    fn from_env() -> Result<Self> {
        let sizes = std::env::var("CKPT_BENCH_SIZES_MIB").unwrap_or_else(|_| "1024,4096".into());
        let sizes_mib = sizes
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|s| match s.parse::<usize>() {
                Ok(n) if n > 0 => Ok(n),
                _ => bail!("CKPT_BENCH_SIZES_MIB: `{s}` is not a positive whole number of MiB"),
            })
            .collect::<Result<Vec<_>>>()?;
        ensure!(!sizes_mib.is_empty(), "CKPT_BENCH_SIZES_MIB names no size");
        let reps = match std::env::var("CKPT_BENCH_REPS") {
            Err(_) => 3,
            Ok(r) => match r.trim().parse::<usize>() {
                Ok(n) if n > 0 => n,
                _ => bail!("CKPT_BENCH_REPS: `{r}` is not a positive whole number"),
            },
        };
        let base_dir = std::env::var_os("CKPT_BENCH_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("/var/tmp"));
        Ok(Config {
            sizes_mib,
            reps,
            base_dir,
        })
    }
}

/// What every measurement needs: where to put things and what the host allows.
struct Ctx {
    work: PathBuf,
    workload: PathBuf,
    /// Whether `drop_caches` works here; without it the cold figures are skipped.
    can_drop_caches: bool,
    reps: usize,
}

fn run() -> Result<bool> {
    let cfg = Config::from_env()?;
    become_subreaper()?;
    fs::create_dir_all(&cfg.base_dir)
        .with_context(|| format!("cannot create CKPT_BENCH_DIR {}", cfg.base_dir.display()))?;
    let tmp = tempfile::Builder::new()
        .prefix("ckpt-bench-")
        .tempdir_in(&cfg.base_dir)
        .with_context(|| format!("cannot make a directory in {}", cfg.base_dir.display()))?;
    let work = tmp.path().to_path_buf();
    let workload = work.join("bench_mem");
    compile_workload(&workload)?;
    let can_drop_caches = drop_caches().is_ok();
    let ctx = Ctx {
        work,
        workload,
        can_drop_caches,
        reps: cfg.reps,
    };
    print_header(&cfg, &ctx);

    let mut all_ok = true;
    for &mib in &cfg.sizes_mib {
        let mut r = SizeResults::default();
        let outcome = measure_size(&ctx, mib, &mut r);
        print_size(&ctx, mib, &r);
        if let Err(e) = outcome {
            all_ok = false;
            println!(
                "!! {mib} MiB: FAILED after {} complete repetition(s): {e:#}",
                r.done
            );
        }
        println!();
    }

    let mut small = SmallResults::default();
    let outcome = measure_small(&ctx, &mut small);
    print_small(&small);
    if let Err(e) = outcome {
        all_ok = false;
        println!("!! {SMALL_MIB} MiB: FAILED: {e:#}");
    }
    println!();
    if let Err(e) = measure_rescue_cost(&ctx) {
        all_ok = false;
        println!("!! freeze with and without the rescue: FAILED: {e:#}");
    }
    println!();
    if let Err(e) = measure_many_fds(&ctx) {
        all_ok = false;
        println!("!! freeze of a process with {MANY_FDS} descriptors: FAILED: {e:#}");
    }
    println!();
    print_criu_reference();

    // The guards of every measurement have run by now; the directory goes last.
    tmp.close()
        .with_context(|| format!("cannot remove {}", ctx.work.display()))?;
    Ok(all_ok)
}

/// Threads of the rank that [`measure_rescue_cost`] dumps.
const RESCUE_THREADS: usize = 200;

/// What holding the tree in group-stop, with a journal and a watchdog
/// (agent/src/rescue.rs), adds to the freeze of a rank of [`RESCUE_THREADS`]
/// threads: the same `--leave-running` dump with the hidden
/// `--unsafe-interrupt-only` (PTRACE_INTERRUPT alone, as before), interleaved.
fn measure_rescue_cost(ctx: &Ctx) -> Result<()> {
    let log = ctx.work.join("sigwatch.log");
    let threads = RESCUE_THREADS.to_string();
    let rank = ckpt_tests::spawn_workload("sigwatch", [threads.as_str()], &log)?;
    ckpt_tests::wait_for_tick(&log, 3, WAIT)?;
    let pid = rank.id().to_string();
    let (mut with, mut without) = (Samples::new(), Samples::new());
    for i in 0..ctx.reps.max(5) {
        for (interrupt_only, v) in [(false, &mut with), (true, &mut without)] {
            let img = ctx.work.join(format!("threads-{i}-{interrupt_only}"));
            let mut args = vec![
                "dump",
                "--pid",
                &pid,
                "--image",
                path_str(&img)?,
                "--leave-running",
                "--json",
            ];
            if interrupt_only {
                args.push("--unsafe-interrupt-only");
            }
            let run = agent(&args).context("dump of the threaded rank")?;
            v.push(DumpStats::parse(&run.stdout)?.freeze_us as f64 / 1e3);
            fs::remove_dir_all(&img).with_context(|| format!("remove {}", img.display()))?;
        }
    }
    println!("freeze of a rank of {RESCUE_THREADS} threads, --leave-running (median, min - max):");
    row("group-stop + journal + watchdog (the default)", &with, "ms");
    row(
        "PTRACE_INTERRUPT alone (unsafe at agent death)",
        &without,
        "ms",
    );
    row("ratio, same pass", &with.ratios(&without), "x");
    Ok(())
}

/// Descriptors of mixed kinds held by the process of [`measure_many_fds`]
/// (tests/workloads/many_fds.c: pipes, UNIX socketpairs, eventfds, timerfds,
/// signalfds, epolls, /dev/null, a regular file).
const MANY_FDS: usize = 10_000;

/// The freeze of a process holding [`MANY_FDS`] descriptors against the same
/// program holding 10, interleaved, `--leave-running`. Target (issue 14): under
/// 100 ms more.
fn measure_many_fds(ctx: &Ctx) -> Result<()> {
    let mut procs = Vec::new();
    for n in [10, MANY_FDS] {
        let log = ctx.work.join(format!("many_fds-{n}.log"));
        let guard = ckpt_tests::spawn_workload("many_fds", [n.to_string()], &log)?;
        ckpt_tests::wait_for_tick(&log, 3, WAIT)?;
        procs.push((n, guard, log));
    }
    let (mut few, mut many) = (Samples::new(), Samples::new());
    for i in 0..ctx.reps.max(5) {
        for (n, guard, _) in &procs {
            let img = ctx.work.join(format!("fds-{i}-{n}"));
            let pid = guard.id().to_string();
            let args = [
                "dump",
                "--pid",
                &pid,
                "--image",
                path_str(&img)?,
                "--leave-running",
                "--json",
            ];
            let run = agent(&args).context("dump of many_fds")?;
            let v = if *n == MANY_FDS { &mut many } else { &mut few };
            v.push(DumpStats::parse(&run.stdout)?.freeze_us as f64 / 1e3);
            fs::remove_dir_all(&img).with_context(|| format!("remove {}", img.display()))?;
        }
    }
    for (_, _, log) in &procs {
        check_no_fail(&fs::read_to_string(log)?, log)?;
    }
    println!(
        "freeze of a process by the descriptors it holds, --leave-running (median, min - max):"
    );
    row(
        &format!("{MANY_FDS} descriptors of mixed kinds"),
        &many,
        "ms",
    );
    row("10 descriptors", &few, "ms");
    let extra: Samples = many
        .values()
        .iter()
        .zip(few.values())
        .map(|(a, b)| a - b)
        .collect();
    row("difference, same pass (target: under 100 ms)", &extra, "ms");
    Ok(())
}

fn compile_workload(out: &Path) -> Result<()> {
    let r = Command::new("gcc")
        .args(["-O2", "-Wall", "-o"])
        .arg(out)
        .arg(WORKLOAD_SRC)
        .stdin(Stdio::null())
        .output()
        .context("cannot run gcc, which builds the workload (apt-get install gcc)")?;
    ensure!(
        r.status.success(),
        "gcc {WORKLOAD_SRC} failed ({}):\n{}",
        r.status,
        String::from_utf8_lossy(&r.stderr)
    );
    Ok(())
}

fn print_header(cfg: &Config, ctx: &Ctx) {
    let read = |p: &str| fs::read_to_string(p).unwrap_or_default().trim().to_string();
    let mem_total = read("/proc/meminfo")
        .lines()
        .find(|l| l.starts_with("MemTotal:"))
        .map(|l| l.trim_start_matches("MemTotal:").trim().to_string())
        .unwrap_or_default();
    println!("ckpt engine benchmark");
    println!("  agent     {AGENT}");
    println!(
        "  host      Linux {}, {} CPUs, MemTotal {mem_total}, THP {}",
        read("/proc/sys/kernel/osrelease"),
        thread::available_parallelism().map_or(0, |n| n.get()),
        read("/sys/kernel/mm/transparent_hugepage/enabled")
    );
    println!(
        "  directory {} (images and baseline file)",
        ctx.work.display()
    );
    println!(
        "  sizes     {:?} MiB, {} repetition(s) each; cold cache figures: {}",
        cfg.sizes_mib,
        cfg.reps,
        if ctx.can_drop_caches {
            "yes"
        } else {
            "no (drop_caches is not writable)"
        }
    );
    println!(
        "  load      {} (the bench shares the machine; compare ratios)",
        loadavg()
    );
    println!("  figures   median, then min - max over the repetitions; GB = 1e9 bytes");
    println!(
        "  freeze    kill mode: until the tree is killed, after the image is synced; \
         --leave-running: until the thaw, before the sync"
    );
    println!();
}

// ---------------------------------------------------------------------------
// Samples and printing

/// GB/s of `bytes` moved in each of these times (in ms).
fn throughput(s: &Samples, bytes: usize) -> Samples {
    s.map(|ms| bytes as f64 / (ms / 1e3) / 1e9)
}

fn row(name: &str, s: &Samples, unit: &str) {
    match (s.median(), s.min(), s.max()) {
        (Some(med), Some(lo), Some(hi)) => {
            let p = precision(med);
            println!("  {name:<46} {med:>10.p$} {unit:<5} {lo:>10.p$} - {hi:.p$}");
        }
        _ => println!("  {name:<46} {:>10} {unit:<5}", "n/a"),
    }
}

fn precision(v: f64) -> usize {
    match v.abs() {
        x if x >= 100.0 => 0,
        x if x >= 10.0 => 1,
        _ => 2,
    }
}

/// Prints `num / den` of the medians against a target: `at_least` means the ratio
/// should be >= target, otherwise <= target.
fn ratio_row(name: &str, num: &Samples, den: &Samples, target: f64, at_least: bool) {
    let (Some(n), Some(d)) = (num.median(), den.median()) else {
        println!("  {name:<58} {:>6}", "n/a");
        return;
    };
    let r = n / d;
    let ok = if at_least { r >= target } else { r <= target };
    println!(
        "  {name:<58} {r:>6.2}   target {} {target:<4}  {}",
        if at_least { ">=" } else { "<=" },
        verdict(ok)
    );
}

fn verdict(ok: bool) -> &'static str {
    if ok {
        "PASS"
    } else {
        "MISS"
    }
}

/// The 1, 5 and 15 minute load averages.
fn loadavg() -> String {
    fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

// ---------------------------------------------------------------------------
// One size: baselines and agent runs, interleaved per repetition

/// Times in ms unless the name says otherwise.
#[derive(Default)]
struct SizeResults {
    done: usize,
    memcpy: Samples,
    fill_populate: Samples,
    fill_fault: Samples,
    write_fsync: Samples,
    read_cold: Samples,
    read_warm: Samples,
    workload_fill: Samples,
    lr_wall: Samples,
    lr_freeze: Samples,
    dump_wall: Samples,
    dump_freeze: Samples,
    dump_total: Samples,
    image_mib: Samples,
    stored_mib: Samples,
    warm: RestoreResults,
    cold: RestoreResults,
}

#[derive(Default)]
struct RestoreResults {
    wall: Samples,
    internal: Samples,
    fill: Samples,
}

fn measure_size(ctx: &Ctx, mib: usize, r: &mut SizeResults) -> Result<()> {
    let bytes = mib * MIB;
    for rep in 0..ctx.reps {
        eprintln!("[{mib} MiB] repetition {}/{}: baselines", rep + 1, ctx.reps);
        baselines(ctx, bytes, rep as u64, r).context("baselines")?;
        eprintln!("[{mib} MiB] repetition {}/{}: agent", rep + 1, ctx.reps);
        agent_runs(ctx, mib, rep, r)?;
        r.done += 1;
    }
    Ok(())
}

fn print_size(ctx: &Ctx, mib: usize, r: &SizeResults) {
    let bytes = mib * MIB;
    println!(
        "== {mib} MiB process ({} repetition(s) complete) ===========================",
        r.done
    );
    println!(
        "  {:<46} {:>10} {:<5} {:>10}   max",
        "metric", "median", "unit", "min"
    );
    println!("  (load average at the end: {})", loadavg());
    println!("  -- baselines");
    row(
        "memcpy, warm to warm",
        &throughput(&r.memcpy, bytes),
        "GB/s",
    );
    row("fill, mmap MAP_POPULATE + memcpy", &r.fill_populate, "ms");
    row("fill, mmap + memcpy (page faults)", &r.fill_fault, "ms");
    row(
        "plain write 1 MiB + fsync",
        &throughput(&r.write_fsync, bytes),
        "GB/s",
    );
    row("plain read, cold", &throughput(&r.read_cold, bytes), "GB/s");
    row("plain read, warm", &throughput(&r.read_warm, bytes), "GB/s");
    println!("  -- ckpt-agent");
    row("workload start to ready (fill)", &r.workload_fill, "ms");
    row("dump --leave-running: freeze_us", &r.lr_freeze, "ms");
    row("dump --leave-running: wall", &r.lr_wall, "ms");
    row("dump (kill): freeze_us", &r.dump_freeze, "ms");
    row("dump (kill): total_us", &r.dump_total, "ms");
    row("dump (kill): wall", &r.dump_wall, "ms");
    row(
        "dump (kill): throughput S / wall",
        &throughput(&r.dump_wall, bytes),
        "GB/s",
    );
    row("image on disk (du -sb)", &r.image_mib, "MiB");
    row("stored_bytes", &r.stored_mib, "MiB");
    for (name, rr) in [("warm", &r.warm), ("cold", &r.cold)] {
        if name == "cold" && !ctx.can_drop_caches {
            continue;
        }
        row(&format!("restore ({name}): wall"), &rr.wall, "ms");
        row(
            &format!("restore ({name}): agent's total"),
            &rr.internal,
            "ms",
        );
        row(&format!("restore ({name}): agent's fill"), &rr.fill, "ms");
        row(
            &format!("restore ({name}): throughput S / wall"),
            &throughput(&rr.wall, bytes),
            "GB/s",
        );
    }
    println!("  -- ratios (of medians) and the issue's targets");
    let tp = |s: &Samples| throughput(s, bytes);
    ratio_row(
        "dump throughput / plain write+fsync",
        &tp(&r.dump_wall),
        &tp(&r.write_fsync),
        THROUGHPUT_TARGET,
        true,
    );
    ratio_row(
        "restore (warm) throughput / plain read (warm)",
        &tp(&r.warm.wall),
        &tp(&r.read_warm),
        THROUGHPUT_TARGET,
        true,
    );
    if ctx.can_drop_caches {
        ratio_row(
            "restore (cold) throughput / plain read (cold)",
            &tp(&r.cold.wall),
            &tp(&r.read_cold),
            THROUGHPUT_TARGET,
            true,
        );
    }
    ratio_row(
        "restore (warm) time / MAP_POPULATE fill time",
        &r.warm.wall,
        &r.fill_populate,
        POPULATE_TARGET,
        false,
    );
    if ctx.can_drop_caches {
        ratio_row(
            "restore (cold) time / MAP_POPULATE fill time",
            &r.cold.wall,
            &r.fill_populate,
            POPULATE_TARGET,
            false,
        );
    }
    if let Some(&(_, freeze, restore)) = CRIU.iter().find(|c| c.0 == mib) {
        let ours = |s: &Samples| {
            s.median()
                .map_or("n/a".into(), |v| format!("{:.2} s", v / 1e3))
        };
        println!(
            "  -- CRIU 4.2 at this size: freeze {freeze:.2} s, restore {restore:.2} s; \
             ours: freeze {} (leave-running) / {} (kill, until killed), restore {} (warm) / {} (cold)",
            ours(&r.lr_freeze),
            ours(&r.dump_freeze),
            ours(&r.warm.wall),
            if ctx.can_drop_caches { ours(&r.cold.wall) } else { "n/a".into() }
        );
    }
}

fn print_criu_reference() {
    println!(
        "Reference (from the issue): CRIU 4.2 freezes a 1 GiB process for 1.18 s and a \
         4 GiB one for 5.66 s, and restores them in 1.20 s and 5.54 s."
    );
}

// ---------------------------------------------------------------------------
// Baselines

fn baselines(ctx: &Ctx, bytes: usize, seed: u64, r: &mut SizeResults) -> Result<()> {
    let mut src = Mapping::new(bytes, true)?;
    fill_random(src.bytes_mut(), seed);

    {
        let mut dst = Mapping::new(bytes, true)?;
        let t = Instant::now();
        dst.bytes_mut().copy_from_slice(src.bytes());
        std::hint::black_box(dst.bytes());
        r.memcpy.push(ms(t.elapsed()));
    }

    for populate in [true, false] {
        let t = Instant::now();
        let mut dst = Mapping::new(bytes, populate)?;
        dst.bytes_mut().copy_from_slice(src.bytes());
        std::hint::black_box(dst.bytes());
        let took = ms(t.elapsed());
        drop(dst); // the munmap is not part of the fill
        if populate {
            r.fill_populate.push(took);
        } else {
            r.fill_fault.push(took);
        }
    }

    let path = ctx.work.join("plain.dat");
    let _file_guard = RemoveOnDrop(vec![path.clone()]);
    sync();
    let t = Instant::now();
    let mut f = File::create(&path).with_context(|| format!("create {}", path.display()))?;
    for chunk in src.bytes().chunks(IO_CHUNK) {
        f.write_all(chunk)
            .with_context(|| format!("write {}", path.display()))?;
    }
    f.sync_all()
        .with_context(|| format!("fsync {}", path.display()))?;
    drop(f);
    r.write_fsync.push(ms(t.elapsed()));
    drop(src);

    let mut buf = vec![0u8; IO_CHUNK];
    if ctx.can_drop_caches {
        drop_caches()?;
        r.read_cold.push(read_file(&path, &mut buf, bytes)?);
    } else {
        read_file(&path, &mut buf, bytes)?; // bring it into the cache in any case
    }
    r.read_warm.push(read_file(&path, &mut buf, bytes)?);
    Ok(())
}

/// Writes `bytes` incompressible bytes to a new file in the work directory, 1 MiB
/// at a time, and fsyncs it; returns the time taken in ms (file removed after).
fn plain_write_fsync(ctx: &Ctx, bytes: usize, seed: u64) -> Result<f64> {
    let mut src = vec![0u8; bytes.next_multiple_of(8)];
    fill_random(&mut src, seed);
    let path = ctx.work.join("plain-small.dat");
    let _guard = RemoveOnDrop(vec![path.clone()]);
    sync();
    let t = Instant::now();
    let mut f = File::create(&path).with_context(|| format!("create {}", path.display()))?;
    for chunk in src[..bytes].chunks(IO_CHUNK) {
        f.write_all(chunk)
            .with_context(|| format!("write {}", path.display()))?;
    }
    f.sync_all()
        .with_context(|| format!("fsync {}", path.display()))?;
    Ok(ms(t.elapsed()))
}

/// Reads `path` sequentially through `buf`; returns the time taken in ms.
fn read_file(path: &Path, buf: &mut [u8], expect: usize) -> Result<f64> {
    let t = Instant::now();
    let mut f = File::open(path).with_context(|| format!("open {}", path.display()))?;
    let mut total = 0;
    loop {
        let n = f
            .read(buf)
            .with_context(|| format!("read {}", path.display()))?;
        if n == 0 {
            break;
        }
        total += n;
    }
    std::hint::black_box(&buf);
    let took = ms(t.elapsed());
    ensure!(
        total == expect,
        "read {total} bytes of {}, expected {expect}",
        path.display()
    );
    Ok(took)
}

/// xorshift64 over every 8 bytes: incompressible and fast.
fn fill_random(buf: &mut [u8], seed: u64) {
    let mut s = 0x9E37_79B9_7F4A_7C15u64 ^ seed.wrapping_mul(0xBF58_476D_1CE4_E5B9) | 1;
    for w in buf.chunks_exact_mut(8) {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        w.copy_from_slice(&s.to_le_bytes());
    }
}

/// An anonymous private mapping, unmapped on drop.
struct Mapping {
    ptr: *mut u8,
    len: usize,
}

impl Mapping {
    fn new(len: usize, populate: bool) -> Result<Self> {
        let flags =
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | if populate { libc::MAP_POPULATE } else { 0 };
        // SAFETY: an anonymous mapping at an address of the kernel's choosing aliases
        // no memory of ours; the result is checked before use.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                flags,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            bail!(
                "mmap of {} MiB failed: {}",
                len / MIB,
                io::Error::last_os_error()
            );
        }
        Ok(Mapping { ptr: p.cast(), len })
    }

    fn bytes(&self) -> &[u8] {
        // SAFETY: ptr..ptr+len is a live readable mapping owned by self for as long
        // as the borrow of self.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }

    fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: ptr..ptr+len is a live writable mapping owned by self, and the
        // mutable borrow of self makes this the only reference to it.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: ptr/len are exactly what mmap returned, and no slice of it can
        // outlive self.
        unsafe {
            libc::munmap(self.ptr.cast(), self.len);
        }
    }
}

fn sync() {
    // SAFETY: sync has no arguments and cannot fail.
    unsafe { libc::sync() };
}

/// Writes back dirty pages and drops the page cache, dentries and inodes.
fn drop_caches() -> Result<()> {
    sync();
    fs::write("/proc/sys/vm/drop_caches", "3\n").context("echo 3 > /proc/sys/vm/drop_caches")
}

// ---------------------------------------------------------------------------
// Agent runs

fn agent_runs(ctx: &Ctx, mib: usize, rep: usize, r: &mut SizeResults) -> Result<()> {
    let log = ctx.work.join(format!("bench_mem-{mib}-{rep}.log"));
    let img = ctx.work.join(format!("image-{mib}-{rep}"));
    let img_lr = ctx.work.join(format!("image-{mib}-{rep}-lr"));
    // Declared before the process guard so that it drops after it.
    let _files = RemoveOnDrop(vec![img.clone(), img_lr.clone(), log.clone()]);

    let t = Instant::now();
    let mut proc = Proc::spawn(&ctx.workload, mib, &log)?;
    let pid = proc.pid;
    wait_ready(&mut proc, &log)?;
    r.workload_fill.push(ms(t.elapsed()));

    // --leave-running: the freeze only; the image is thrown away.
    sync();
    let off = file_len(&log)?;
    let run = agent(&[
        "dump",
        "--pid",
        &pid.to_string(),
        "--image",
        path_str(&img_lr)?,
        "--leave-running",
        "--json",
    ])
    .context("dump --leave-running")?;
    let stats = DumpStats::parse(&run.stdout)?;
    r.lr_wall.push(ms(run.wall));
    r.lr_freeze.push(stats.freeze_us as f64 / 1e3);
    let last = last_tick(&log)?.unwrap_or(0);
    wait_tick_after(&log, off, last, None).context("after dump --leave-running")?;
    fs::remove_dir_all(&img_lr).with_context(|| format!("remove {}", img_lr.display()))?;

    // Kill mode.
    sync();
    let run = agent(&[
        "dump",
        "--pid",
        &pid.to_string(),
        "--image",
        path_str(&img)?,
        "--json",
    ])
    .context("dump (kill mode)")?;
    let stats = DumpStats::parse(&run.stdout)?;
    proc.wait_exit(WAIT).context("after dump (kill mode)")?;
    ensure!(
        stats.root_pid == pid,
        "dump reported root_pid {}, expected {pid}",
        stats.root_pid
    );
    r.dump_wall.push(ms(run.wall));
    r.dump_freeze.push(stats.freeze_us as f64 / 1e3);
    r.dump_total.push(stats.total_us as f64 / 1e3);
    r.stored_mib.push(stats.stored_bytes as f64 / MIB as f64);
    r.image_mib.push(du_bytes(&img)? as f64 / MIB as f64);

    // What the log held when the process died: each restore starts from there.
    let dumped_len = file_len(&log)?;
    let last = last_tick(&log)?.context("the workload printed no tick before the dump")?;

    let warm = restore_once(&img, pid, &log, last).context("restore (warm)")?;
    r.warm.push(warm);

    if ctx.can_drop_caches {
        // The agent refuses a file whose size changed since the dump (rightly): put
        // the log back as it was, which its content hash then accepts.
        OpenOptions::new()
            .write(true)
            .open(&log)
            .and_then(|f| f.set_len(dumped_len))
            .with_context(|| format!("truncate {}", log.display()))?;
        drop_caches()?;
        let cold = restore_once(&img, pid, &log, last).context("restore (cold)")?;
        r.cold.push(cold);
    }
    Ok(())
}

struct RestoreRun {
    wall_ms: f64,
    internal_ms: f64,
    fill_ms: f64,
}

impl RestoreResults {
    fn push(&mut self, run: RestoreRun) {
        self.wall.push(run.wall_ms);
        self.internal.push(run.internal_ms);
        self.fill.push(run.fill_ms);
    }
}

/// Restores `img`, checks that `pid` came back and ticks on from `last`, then kills
/// and reaps it.
fn restore_once(img: &Path, pid: i32, log: &Path, last: u64) -> Result<RestoreRun> {
    let off = file_len(log)?;
    let run = agent(&["restore", "--image", path_str(img)?])?;
    let got: i32 = run
        .stdout
        .lines()
        .last()
        .and_then(|l| l.trim().parse().ok())
        .with_context(|| format!("restore printed no PID as its last line: {:?}", run.stdout))?;
    // Guard it before anything else can fail.
    let mut restored = Proc::adopt(got);
    ensure!(got == pid, "restore gave PID {got}, expected {pid}");
    let (internal_ms, fill_ms) = parse_restore_times(&run.stderr)?;
    wait_tick_after(log, off, last, Some(last + 1))?;
    restored.kill()?;
    Ok(RestoreRun {
        wall_ms: ms(run.wall),
        internal_ms,
        fill_ms,
    })
}

/// Parses "restored X of memory in N ms (fill M ms)" from restore's stderr.
fn parse_restore_times(stderr: &str) -> Result<(f64, f64)> {
    let line = stderr
        .lines()
        .rev()
        .find(|l| l.starts_with("restored "))
        .with_context(|| format!("restore printed no summary line; stderr: {stderr:?}"))?;
    let num_before_ms = |s: &str| -> Option<f64> { s.split(" ms").next()?.trim().parse().ok() };
    let total = line
        .split(" in ")
        .nth(1)
        .and_then(num_before_ms)
        .with_context(|| format!("cannot read the time in {line:?}"))?;
    let fill = line
        .split("(fill ")
        .nth(1)
        .and_then(num_before_ms)
        .with_context(|| format!("cannot read the fill time in {line:?}"))?;
    Ok((total, fill))
}

struct DumpStats {
    root_pid: i32,
    freeze_us: u64,
    total_us: u64,
    stored_bytes: u64,
}

impl DumpStats {
    fn parse(stdout: &str) -> Result<Self> {
        let v: serde_json::Value = serde_json::from_str(stdout)
            .with_context(|| format!("dump --json printed no JSON: {stdout:?}"))?;
        let field = |k: &str| {
            v.get(k)
                .and_then(serde_json::Value::as_u64)
                .with_context(|| format!("dump --json has no `{k}`: {stdout}"))
        };
        Ok(DumpStats {
            root_pid: field("root_pid")? as i32,
            freeze_us: field("freeze_us")?,
            total_us: field("total_us")?,
            stored_bytes: field("stored_bytes")?,
        })
    }
}

struct AgentRun {
    wall: Duration,
    stdout: String,
    stderr: String,
}

/// Runs `ckpt-agent ARGS`, timed from spawn to exit, killed (by PID) after
/// [`WAIT`]. A failure carries the agent's own message.
fn agent(args: &[&str]) -> Result<AgentRun> {
    let what = format!("ckpt-agent {}", args.join(" "));
    let t = Instant::now();
    let child = Command::new(AGENT)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot start {what}"))?;
    let out = with_watchdog(child.id() as i32, WAIT, || child.wait_with_output());
    let wall = t.elapsed();
    let (out, timed_out) = out;
    let out = out.with_context(|| format!("waiting for {what}"))?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    ensure!(
        !timed_out,
        "{what} took over {WAIT:?} and was killed; stderr:\n{stderr}"
    );
    ensure!(
        out.status.success(),
        "{what} failed ({}):\n{}",
        out.status,
        stderr.trim_end()
    );
    Ok(AgentRun {
        wall,
        stdout,
        stderr,
    })
}

/// Runs `f` (a wait for the child `pid`), SIGKILLing `pid` if it takes longer than
/// `limit`. Returns f's result and whether the child was killed.
fn with_watchdog<T>(pid: i32, limit: Duration, f: impl FnOnce() -> T) -> (T, bool) {
    let (done_tx, done_rx) = mpsc::channel::<()>();
    let dog = thread::spawn(move || {
        if done_rx.recv_timeout(limit) == Err(mpsc::RecvTimeoutError::Timeout) {
            // SAFETY: kill takes no pointers; the child has not been reaped (f has not
            // returned), so its PID cannot have been reused.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            true
        } else {
            false
        }
    });
    let out = f();
    let _ = done_tx.send(());
    (out, dog.join().unwrap_or(false))
}

fn du_bytes(dir: &Path) -> Result<u64> {
    let out = Command::new("du")
        .arg("-sb")
        .arg(dir)
        .stdin(Stdio::null())
        .output()
        .context("cannot run du")?;
    ensure!(out.status.success(), "du -sb {} failed", dir.display());
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .with_context(|| format!("cannot read du -sb {}", dir.display()))
}

// ---------------------------------------------------------------------------
// The small process

#[derive(Default)]
struct SmallResults {
    done: usize,
    leave_freeze: Samples,
    leave_wall: Samples,
    dump_wall: Samples,
    dump_freeze: Samples,
    restore_wall: Samples,
    /// A plain write + fsync of as many bytes as the dump stored, to one new file.
    plain_write: Samples,
}

fn measure_small(ctx: &Ctx, r: &mut SmallResults) -> Result<()> {
    for rep in 0..ctx.reps {
        eprintln!("[{SMALL_MIB} MiB] repetition {}/{}", rep + 1, ctx.reps);
        let log = ctx.work.join(format!("small-{rep}.log"));
        let img = ctx.work.join(format!("small-{rep}"));
        let _files = RemoveOnDrop(vec![img.clone(), log.clone()]);
        let mut proc = Proc::spawn(&ctx.workload, SMALL_MIB, &log)?;
        let pid = proc.pid;
        wait_ready(&mut proc, &log)?;
        // A tick or two first, so that the restore has a sequence to continue.
        wait_tick_after(&log, 0, 0, None)?;
        let leave_img = ctx.work.join(format!("small-{rep}-leave"));
        let _leave = RemoveOnDrop(vec![leave_img.clone()]);
        let leave = agent(&[
            "dump",
            "--pid",
            &pid.to_string(),
            "--image",
            path_str(&leave_img)?,
            "--leave-running",
            "--json",
        ])
        .context("dump --leave-running")?;
        let leave_stats = DumpStats::parse(&leave.stdout)?;
        let run = agent(&[
            "dump",
            "--pid",
            &pid.to_string(),
            "--image",
            path_str(&img)?,
            "--json",
        ])
        .context("dump (kill mode)")?;
        let stats = DumpStats::parse(&run.stdout)?;
        proc.wait_exit(WAIT).context("after dump (kill mode)")?;
        let last = last_tick(&log)?.context("the workload printed no tick before the dump")?;
        let restored = restore_once(&img, pid, &log, last).context("restore")?;
        r.plain_write.push(plain_write_fsync(
            ctx,
            stats.stored_bytes as usize,
            rep as u64,
        )?);
        r.leave_freeze.push(leave_stats.freeze_us as f64 / 1e3);
        r.leave_wall.push(ms(leave.wall));
        r.dump_wall.push(ms(run.wall));
        r.dump_freeze.push(stats.freeze_us as f64 / 1e3);
        r.restore_wall.push(restored.wall_ms);
        r.done += 1;
    }
    Ok(())
}

fn print_small(r: &SmallResults) {
    println!(
        "== small process, {SMALL_MIB} MiB ({} repetition(s) complete, warm cache) ==========",
        r.done
    );
    row("dump --leave-running: freeze_us", &r.leave_freeze, "ms");
    row("dump --leave-running: wall", &r.leave_wall, "ms");
    row("dump (kill): freeze_us", &r.dump_freeze, "ms");
    row(
        "plain write+fsync of the stored bytes",
        &r.plain_write,
        "ms",
    );
    if let (Some(d), Some(w)) = (r.dump_wall.median(), r.plain_write.median()) {
        println!(
            "  {:<46} {:.2} (the image is durable when the dump returns; this disk's \
             own write+fsync of the same bytes is the floor)",
            "dump (kill) wall / plain write+fsync",
            d / w
        );
    }
    for (name, s, target) in [
        ("dump (kill): wall", &r.dump_wall, SMALL_DUMP_TARGET_MS),
        ("restore: wall", &r.restore_wall, SMALL_RESTORE_TARGET_MS),
    ] {
        row(name, s, "ms");
        if let Some(m) = s.median() {
            println!("  {:<46} target < {target} ms: {}", "", verdict(m < target));
        }
    }
}

// ---------------------------------------------------------------------------
// Processes and files, with their guards

/// A process we started or restored. Dropping it SIGKILLs it by PID — only if the
/// PID still belongs to the same incarnation (start time) — and reaps it.
struct Proc {
    pid: i32,
    start: Option<u64>,
    child: Option<Child>,
}

impl Proc {
    /// Starts `bench_mem MIB` in a session of its own, stdin /dev/null, stdout and
    /// stderr appended to `log`, and no other descriptor.
    fn spawn(bin: &Path, mib: usize, log: &Path) -> Result<Self> {
        let out = OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .with_context(|| format!("create {}", log.display()))?;
        let err = out.try_clone()?;
        let mut cmd = Command::new(bin);
        cmd.arg(mib.to_string())
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        // SAFETY: the closure runs between fork and exec and makes only
        // async-signal-safe system calls, touching no memory of the parent.
        unsafe {
            cmd.pre_exec(|| {
                if libc::setsid() < 0 {
                    return Err(io::Error::last_os_error());
                }
                // Descriptors this bench inherited from its shell without CLOEXEC
                // would reach the workload and make the dump refuse it. Marking them
                // CLOEXEC rather than closing them keeps std's own exec-error pipe
                // working until the exec.
                if libc::close_range(3, u32::MAX, libc::CLOSE_RANGE_CLOEXEC as libc::c_int) < 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("cannot start {}", bin.display()))?;
        let pid = child.id() as i32;
        Ok(Proc {
            pid,
            start: start_time(pid),
            child: Some(child),
        })
    }

    /// Guards a restored process. Thanks to PR_SET_CHILD_SUBREAPER it becomes our
    /// child once `ckpt-agent restore` exits, so it can be reaped.
    fn adopt(pid: i32) -> Self {
        Proc {
            pid,
            start: start_time(pid),
            child: None,
        }
    }

    /// Whether it has exited (reaping it if it is our child).
    fn exited(&mut self) -> Result<bool> {
        if let Some(c) = &mut self.child {
            return Ok(c.try_wait()?.is_some());
        }
        // SAFETY: waitpid with a null status pointer writes no memory.
        let r = unsafe { libc::waitpid(self.pid, std::ptr::null_mut(), libc::WNOHANG) };
        if r == self.pid {
            return Ok(true);
        }
        if r == 0 {
            return Ok(false);
        }
        // Not our child: gone when /proc says so (or it is a zombie, or another
        // incarnation holds the PID).
        Ok(match (proc_state(self.pid), start_time(self.pid)) {
            (None, _) | (Some('Z'), _) | (Some('X'), _) => true,
            (_, s) => s != self.start,
        })
    }

    /// Waits for it to exit on its own (after a dump in kill mode).
    fn wait_exit(&mut self, limit: Duration) -> Result<()> {
        let t = Instant::now();
        while !self.exited()? {
            ensure!(
                t.elapsed() < limit,
                "PID {} is still there {limit:?} later (state {:?})",
                self.pid,
                proc_state(self.pid)
            );
            thread::sleep(Duration::from_millis(2));
        }
        self.pid = 0;
        self.child = None;
        Ok(())
    }

    fn kill(&mut self) -> Result<()> {
        if self.pid <= 0 {
            return Ok(());
        }
        if self.exited()? {
            self.pid = 0;
            return Ok(());
        }
        if start_time(self.pid) == self.start {
            // SAFETY: kill takes no pointers; the PID is the incarnation we started
            // or restored (same start time) and it has not been reaped.
            unsafe { libc::kill(self.pid, libc::SIGKILL) };
        }
        self.wait_exit(KILL_WAIT)
            .with_context(|| format!("SIGKILLed PID {}", self.pid))
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Err(e) = self.kill() {
            eprintln!("engine bench: cleanup: {e:#}");
        }
    }
}

/// Removes files and directories when dropped.
struct RemoveOnDrop(Vec<PathBuf>);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        for p in &self.0 {
            let r = if p.is_dir() {
                fs::remove_dir_all(p)
            } else {
                fs::remove_file(p)
            };
            if let Err(e) = r {
                if e.kind() != io::ErrorKind::NotFound {
                    eprintln!("engine bench: cleanup: cannot remove {}: {e}", p.display());
                }
            }
        }
    }
}

fn become_subreaper() -> Result<()> {
    // SAFETY: PR_SET_CHILD_SUBREAPER takes an integer flag and touches no memory of
    // ours.
    let r = unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1 as libc::c_ulong, 0, 0, 0) };
    ensure!(
        r == 0,
        "PR_SET_CHILD_SUBREAPER: {}",
        io::Error::last_os_error()
    );
    Ok(())
}

/// The fields of `/proc/PID/stat` after the command name.
fn stat_fields(pid: i32) -> Option<Vec<String>> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 1..];
    Some(rest.split_whitespace().map(str::to_owned).collect())
}

fn proc_state(pid: i32) -> Option<char> {
    stat_fields(pid)?.first()?.chars().next()
}

/// Start time in clock ticks (field 22), which tells incarnations of a PID apart.
fn start_time(pid: i32) -> Option<u64> {
    stat_fields(pid)?.get(19)?.parse().ok()
}

fn file_len(p: &Path) -> Result<u64> {
    Ok(fs::metadata(p)
        .with_context(|| format!("stat {}", p.display()))?
        .len())
}

fn read_from(log: &Path, off: u64) -> Result<String> {
    let bytes = fs::read(log).with_context(|| format!("read {}", log.display()))?;
    let from = (off as usize).min(bytes.len());
    Ok(String::from_utf8_lossy(&bytes[from..]).into_owned())
}

fn tick_of(line: &str) -> Option<u64> {
    line.strip_prefix("tick ")?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

fn check_no_fail(text: &str, log: &Path) -> Result<()> {
    if let Some(l) = text.lines().find(|l| l.starts_with("FAIL")) {
        bail!("the workload reports `{l}` (log {})", log.display());
    }
    Ok(())
}

fn last_tick(log: &Path) -> Result<Option<u64>> {
    let text = read_from(log, 0)?;
    check_no_fail(&text, log)?;
    Ok(text.lines().filter_map(tick_of).max())
}

/// Waits until `log` holds "ready", failing early if the workload died.
fn wait_ready(proc: &mut Proc, log: &Path) -> Result<()> {
    let t = Instant::now();
    loop {
        let text = read_from(log, 0)?;
        if text.lines().any(|l| l == "ready") {
            return Ok(());
        }
        check_no_fail(&text, log)?;
        if proc.exited()? {
            bail!(
                "bench_mem (PID {}) exited before it was ready; its output: {text:?}",
                proc.pid
            );
        }
        ensure!(
            t.elapsed() < WAIT,
            "bench_mem (PID {}) not ready after {WAIT:?}; its output: {text:?}",
            proc.pid
        );
        thread::sleep(Duration::from_millis(5));
    }
}

/// Waits until `log`, from byte `off` on, holds a tick above `last`; if `first` is
/// given, the first tick there must be exactly that (the sequence continues).
fn wait_tick_after(log: &Path, off: u64, last: u64, first: Option<u64>) -> Result<()> {
    let t = Instant::now();
    loop {
        let text = read_from(log, off)?;
        check_no_fail(&text, log)?;
        let ticks: Vec<u64> = text.lines().filter_map(tick_of).collect();
        if let (Some(want), Some(&got)) = (first, ticks.first()) {
            ensure!(
                got == want,
                "the process ticked {got} first, expected {want}: the tick sequence \
                 did not continue (log {})",
                log.display()
            );
        }
        if ticks.iter().any(|&n| n > last) {
            return Ok(());
        }
        ensure!(
            t.elapsed() < TICK_WAIT,
            "no tick after {last} within {TICK_WAIT:?} (log {}, new text {text:?})",
            log.display()
        );
        thread::sleep(Duration::from_millis(5));
    }
}
