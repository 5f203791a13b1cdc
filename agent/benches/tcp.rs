//! TCP benchmark (issue 5): how the freeze time of a dump grows with the number of
//! TCP connections a process holds, and how soon a rebuilt connection carries data
//! after its release.
//!
//!     cargo bench -p ckpt-agent --bench tcp
//!
//! Nothing here asserts a timing (the machines are shared and noisy); the figures
//! are printed beside a baseline from the same run, with the issue's targets.
//!
//! 1. **Freeze time against connections.** A Python process holds K established
//!    loopback connections to a peer process (which stands for the other ranks and
//!    is not dumped), with 1,000 bytes queued and unread each way. The engine
//!    dumps it with
//!    `--leave-running` (the network lock, the capture of every socket with
//!    `TCP_REPAIR`, the memory snapshot) and reports how long the process stood
//!    still. The baseline is the same process with no connection (K = 0): the
//!    target is that 1,000 connections add under 50 ms.
//! 2. **First byte after the release.** A connection with data queued both ways is
//!    captured under the lock, its ends are closed silently and rebuilt in repair
//!    mode (as a restore does), and the lock is lifted; then both ends are
//!    finished (repair off, send queue written) as at a job's RELEASE, and the
//!    time to the first byte of the restored send queue at the other end is
//!    measured. Baseline: the same write and read on a fresh connection. Target:
//!    under 10 ms; a send queue left to the retransmission timer would show up as
//!    200 ms or more.
//!
//! Everything runs in a network namespace of the bench's own (`unshare` of the
//! main thread before anything starts), so the locks and connections touch
//! nothing else. Settings: `CKPT_BENCH_REPS` (default 7). Needs root; the Python
//! workload is killed by PID, even on a panic.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsFd;
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use ckpt_agent::fd::tcp;
use ckpt_agent::netlock::NetLock;
use ckpt_shared::location::Location;
use ckpt_tests::stats::{self, Samples};

// The loopback pair and its `Conn` are the ones the netcut tests use.
#[path = "../tests/common/mod.rs"]
mod common;
use common::{conn_of, pair};

/// The peer: accepts K connections and sends 1,000 bytes on each; never reads.
/// It stands for the other ranks, and is not dumped.
const PEER: &str = r#"
import resource, socket, sys, time
k = int(sys.argv[1])
resource.setrlimit(resource.RLIMIT_NOFILE, (8192, 8192))
l = socket.socket()
l.bind(("127.0.0.1", 0))
l.listen(1024)
print("port", l.getsockname()[1], flush=True)
keep = []
for i in range(k):
    a, _ = l.accept()
    a.send(b"y" * 1000)
    keep.append(a)
time.sleep(3600)
"#;

/// The dumped process: K connections to the peer, 1,000 bytes sent on each.
const HOLDER: &str = r#"
import resource, socket, sys, time
k, port = int(sys.argv[1]), int(sys.argv[2])
resource.setrlimit(resource.RLIMIT_NOFILE, (8192, 8192))
keep = []
for i in range(k):
    c = socket.create_connection(("127.0.0.1", port))
    c.send(b"x" * 1000)
    keep.append(c)
time.sleep(0.2)
print("ready", flush=True)
time.sleep(3600)
"#;

struct Holder(Child);

impl Drop for Holder {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `python3 -c script args` with its output in `log`, and waits for
/// `ready` in it.
fn start_py(script: &str, args: &[String], log: &std::path::Path, ready: &str) -> Result<Holder> {
    use std::os::unix::process::CommandExt;
    let out = std::fs::File::create(log)?;
    let mut cmd = Command::new("python3");
    cmd.arg("-c")
        .arg(script)
        .args(args)
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out);
    // SAFETY: close_range in the child before exec: only descriptors 0-2 go on
    // (cargo's jobserver pipe would otherwise be inherited, and refused by a dump).
    unsafe {
        cmd.pre_exec(|| {
            libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32);
            Ok(())
        });
    }
    let h = Holder(cmd.spawn().context("python3")?);
    let t = Instant::now();
    while !std::fs::read_to_string(log)?.contains(ready) {
        if t.elapsed() > Duration::from_secs(60) {
            bail!("python3 did not start: {}", std::fs::read_to_string(log)?);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(h)
}

/// The peer and the holder of K connections.
fn start_holder(k: usize, dir: &std::path::Path) -> Result<(Holder, Holder)> {
    let plog = dir.join(format!("peer-{k}.log"));
    let peer = start_py(PEER, &[k.to_string()], &plog, "port ")?;
    let port = std::fs::read_to_string(&plog)?
        .split_whitespace()
        .nth(1)
        .context("no port")?
        .to_string();
    let hlog = dir.join(format!("holder-{k}.log"));
    let holder = start_py(HOLDER, &[k.to_string(), port], &hlog, "ready")?;
    Ok((holder, peer))
}

/// The high median of the repetitions (at least one: `CKPT_BENCH_REPS=0` has nothing
/// to print).
fn median(v: &Samples) -> f64 {
    v.median_high().expect("CKPT_BENCH_REPS must be at least 1")
}

fn spread(v: &Samples) -> String {
    let (lo, hi) = v.min_max().expect("CKPT_BENCH_REPS must be at least 1");
    stats::range(lo, hi, 1, "–")
}

fn freeze_ms(k: usize, dir: &std::path::Path, n: usize) -> Result<f64> {
    let (h, _peer) = start_holder(k, dir)?;
    let image = Location::parse(&format!("file://{}/k{k}-{n}", dir.display()))?;
    let opts = ckpt_agent::dump::DumpOptions {
        pid: h.0.id() as i32,
        image,
        leave_running: true,
        zstd_level: None,
        workers: 2,
        snapshot_limit: ckpt_agent::dump::default_snapshot_limit(),
        parent: None,
        track: false,
        chunk_size: ckpt_agent::mem::CHUNK_MAX,
        store: Default::default(),
        leases: Default::default(),
        registry: Default::default(),
        hooks: Default::default(),
        rescue: None,
        hold: Default::default(),
        start_time: None,
        cancel: Default::default(),
    };
    let img = ckpt_agent::dump::dump(&opts).context("dump")?;
    let conns = img
        .files
        .iter()
        .filter(|f| matches!(f.kind, ckpt_shared::image::FileKind::Tcp { .. }))
        .count();
    if conns != k {
        bail!("the image holds {conns} connections, not {k}");
    }
    Ok(img.stats.freeze_us as f64 / 1e3)
}

/// Milliseconds from finishing both rebuilt ends to the first byte of the
/// restored send queue at the other end; and the same on a fresh connection.
fn first_byte_ms(n: u16) -> Result<(f64, f64)> {
    let (mut a, mut b) = pair();
    a.write_all(b"settle")?;
    let mut six = [0u8; 6];
    b.read_exact(&mut six)?;
    std::thread::sleep(Duration::from_millis(20));
    let lock = NetLock::lock(&format!("fb{n}"), &[conn_of(&a)])?;
    a.write_all(&[7u8; 4000])?;
    b.write_all(&[9u8; 300])?;
    std::thread::sleep(Duration::from_millis(20));
    let ca = tcp::capture(a.as_fd())?;
    let cb = tcp::capture(b.as_fd())?;
    tcp::silence(a.as_fd())?;
    tcp::silence(b.as_fd())?;
    drop((a, b));
    let na: SocketAddr = format!("127.0.1.{}:4000", 1 + n % 200).parse()?;
    let nb: SocketAddr = format!("127.0.2.{}:5000", 1 + n % 200).parse()?;
    let ra = tcp::rebuild(&ca, na, nb)?;
    let rb = tcp::rebuild(&cb, nb, na)?;
    lock.unlock()?;
    let t = Instant::now();
    let mut b2 = TcpStream::from(rb.finish()?);
    let a2 = TcpStream::from(ra.finish()?);
    let mut one = [0u8; 1];
    b2.set_read_timeout(Some(Duration::from_secs(5)))?;
    b2.read_exact(&mut one)?;
    let restored = t.elapsed().as_secs_f64() * 1e3;
    drop((a2, b2));
    // Baseline: a write and the first byte read on a fresh connection.
    let (mut a, mut b) = pair();
    let t = Instant::now();
    a.write_all(&[7u8; 4000])?;
    b.read_exact(&mut one)?;
    let fresh = t.elapsed().as_secs_f64() * 1e3;
    Ok((restored, fresh))
}

fn run() -> Result<()> {
    // SAFETY: unshare of the network namespace, on the main thread before any
    // other thread or child exists.
    if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
        bail!("unshare(CLONE_NEWNET): {}", std::io::Error::last_os_error());
    }
    let st = Command::new("ip")
        .args(["link", "set", "lo", "up"])
        .status()?;
    if !st.success() {
        bail!("ip link set lo up failed");
    }
    let reps: usize = std::env::var("CKPT_BENCH_REPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(7);
    let dir = tempfile::tempdir()?;
    println!("TCP bench: {reps} repetitions, network namespace of its own\n");
    println!("1. Freeze time of a --leave-running dump against connections held");
    println!("   (K loopback connections to a peer, 1,000 bytes queued each way)\n");
    println!(
        "{:>6} | {:>12} | {:>13} | {:>14}",
        "K", "freeze ms", "min–max", "added vs K=0"
    );
    let mut base = 0.0;
    let mut added_1000 = 0.0;
    for k in [0usize, 10, 100, 1000] {
        let mut v = Samples::new();
        for n in 0..reps {
            v.push(freeze_ms(k, dir.path(), n)?);
        }
        let m = median(&v);
        if k == 0 {
            base = m;
        }
        if k == 1000 {
            added_1000 = m - base;
        }
        println!(
            "{k:>6} | {m:>12.1} | {:>13} | {:>+11.1} ms",
            spread(&v),
            m - base
        );
    }
    println!(
        "\n   target: 1,000 connections add < 50 ms: {} ({added_1000:.1} ms)\n",
        if added_1000 < 50.0 { "PASS" } else { "FAIL" }
    );
    println!("2. First byte after the release of a rebuilt connection\n");
    let mut restored = Samples::new();
    let mut fresh = Samples::new();
    for n in 0..(reps * 3) {
        let (r, f) = first_byte_ms(n as u16)?;
        restored.push(r);
        fresh.push(f);
    }
    let (mr, mf) = (median(&restored), median(&fresh));
    println!(
        "   restored: median {mr:.3} ms ({} ms); fresh connection: {mf:.3} ms ({} ms); ratio {:.1}",
        spread(&restored),
        spread(&fresh),
        mr / mf.max(1e-6)
    );
    println!(
        "   target: < 10 ms after release: {}",
        if mr < 10.0 { "PASS" } else { "FAIL" }
    );
    Ok(())
}

fn main() -> ExitCode {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        println!("tcp bench: skipped: needs root (ptrace, namespaces, nftables, TCP_REPAIR)");
        return ExitCode::SUCCESS;
    }
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tcp bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}
