//! More end-to-end tests of the dump/restore engine, beside `engine.rs`: the host
//! checks of restore, `restore --new-pid-ns`, the file checks of a `--leave-running`
//! image, shared anonymous memory, POSIX timers, descriptors of more kinds,
//! `inspect`, and dumps that must be refused.
//!
//! Same method as `engine.rs`: a workload from `tests/workloads/` runs in a session
//! of its own with its output in a log file, is dumped, restored and left to tick
//! on, and its log proves continuity (`ckpt_tests::ticks`: tick numbers without gap
//! or repeat, chain values right, no `FAIL` line from the workload's own checks).
//! Each scenario then checks the specific property it is about.
//!
//! The host-check scenarios simulate an image from another host: they decode a real
//! manifest with `ckpt_shared::codec`, change one field, encode it again (the
//! envelope checksum is recomputed) and write it back. A refused restore must exit
//! non-zero, name what differs, and leave nothing running at the original PIDs.
//!
//! Every test owns a temporary directory and guards that SIGKILL, by PID, every
//! process it started or restored, even when it panics.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use anyhow::{bail, ensure, Context, Result};
use ckpt_shared::codec;
use ckpt_shared::image::{self, Image};
use ckpt_tests::process::{start_time, wait_gone};
use ckpt_tests::ticks::{check_log, last_tick, parse_tick};
use ckpt_tests::workload::{spawn_program, workload};
use ckpt_tests::{
    digits_tokens, ensure_untraced, expect_killed_by_dump, guard_restored, inspect_json, is_alive,
    is_stopped, last_line_pid, path_str, proc_ppid, read_log_lines, require_root, run_agent_env,
    run_dump, run_restore, send_signal, spawn_workload, thread_ids, tracer_pids, tree_pids,
    wait_for, wait_for_tick, AgentRun, PidsGuard, ProcGuard, Tick, AGENT_TIMEOUT,
};
use tempfile::TempDir;

mod common;
use common::{agent, WAIT};

/// How many ticks a workload must make after a dump or a restore.
const MORE: u64 = 20;

/// A workload tree under test. Field order is drop order: descendants, root, then
/// whatever a `--new-pid-ns` restore added, then the directory.
struct Tree {
    descendants: PidsGuard,
    root: ProcGuard,
    /// Processes outside the tree that a test must also kill (a namespace's init).
    extra: PidsGuard,
    dir: TempDir,
    log: PathBuf,
    image: PathBuf,
    pid: i32,
    /// The tree's PIDs at the last snapshot, root first.
    pids: Vec<i32>,
}

impl Tree {
    fn new_dir(name: &str) -> Result<TempDir> {
        Ok(tempfile::Builder::new()
            .prefix(&format!("ckpt-more-{name}-"))
            .tempdir()?)
    }

    fn with_root(dir: TempDir, root: ProcGuard) -> Tree {
        let pid = root.id();
        Tree {
            descendants: PidsGuard::default(),
            root,
            extra: PidsGuard::default(),
            log: dir.path().join("log"),
            image: dir.path().join("img"),
            dir,
            pid,
            pids: vec![pid],
        }
    }

    /// Starts workload `name` (from `tests/workloads/`).
    fn start(name: &str, args: &[&str]) -> Result<Tree> {
        let dir = Tree::new_dir(name)?;
        let root = spawn_workload(name, args, &dir.path().join("log"))?;
        Ok(Tree::with_root(dir, root))
    }

    /// Starts the executable `program` (already inside `dir`).
    fn start_program(dir: TempDir, program: &Path) -> Result<Tree> {
        let root = spawn_program(program, std::iter::empty::<&str>(), &dir.path().join("log"))?;
        Ok(Tree::with_root(dir, root))
    }

    fn lines(&self) -> Vec<String> {
        read_log_lines(&self.log).unwrap_or_default()
    }

    fn last_tick(&self) -> u64 {
        last_tick(&self.log).unwrap_or(0)
    }

    /// Waits for tick 5 and for the tree to have `procs` processes; guards them.
    fn ready(&mut self, procs: usize) -> Result<()> {
        wait_for_tick(&self.log, 5, WAIT)?;
        ensure!(
            wait_for(|| tree_pids(self.pid).len() == procs, WAIT),
            "the tree of {} should have {procs} processes, it has {:?}",
            self.pid,
            tree_pids(self.pid)
        );
        self.snapshot();
        Ok(())
    }

    /// Records the tree's PIDs and guards the descendants.
    fn snapshot(&mut self) {
        let pids = tree_pids(self.pid);
        self.descendants.forget();
        self.descendants = PidsGuard::new(pids.iter().copied().skip(1));
        self.pids = pids;
    }

    fn start_times(&self) -> Vec<Option<u64>> {
        self.pids.iter().map(|&p| start_time(p)).collect()
    }

    fn dump(&self, extra: &[&str]) -> Result<AgentRun> {
        run_dump(agent(), self.pid, &self.image, extra, &[])
    }

    /// Dumps without --leave-running; checks the tree is gone (and reaped) and the
    /// manifest committed.
    fn dump_and_kill(&mut self) -> Result<()> {
        let run = self.dump(&[])?.ok()?;
        expect_killed_by_dump(&run, &mut self.root, &self.descendants, &self.image, WAIT)
    }

    /// `ckpt-agent restore --image IMAGE extra...`; the restored root PID, when the
    /// restore succeeded, is guarded at once (before anything is checked).
    fn restore_run(&mut self, extra: &[&str]) -> Result<AgentRun> {
        let run = run_restore(agent(), &self.image, extra, &[])?;
        if run.success() {
            guard_restored(&run, &mut self.root);
            self.descendants.rearm();
        }
        Ok(run)
    }

    /// Restores with the original PIDs and checks the tree is back, running and
    /// untraced, with the same PIDs and thread counts.
    fn restore(&mut self) -> Result<()> {
        let run = self.restore_run(&[])?.ok()?;
        let pid = last_line_pid(&run)?;
        ensure!(
            pid == self.pid,
            "restore printed PID {pid}, the original root PID was {}",
            self.pid
        );
        for &p in &self.pids {
            ensure!(is_alive(p), "process {p} is not running after the restore");
            ensure_untraced(p, Duration::from_secs(5))?;
        }
        let mut now = tree_pids(self.pid);
        now.sort_unstable();
        let mut want = self.pids.clone();
        want.sort_unstable();
        ensure!(
            now == want,
            "the restored tree is {now:?}, the dumped one was {want:?}"
        );
        Ok(())
    }

    fn advance(&self, more: u64) -> Result<u64> {
        wait_for_tick(&self.log, self.last_tick() + more, WAIT)
    }

    fn stop(&mut self) {
        self.descendants.kill_all();
        self.root.kill();
        self.extra.kill_all();
    }

    fn finish(&mut self) -> Result<Vec<Tick>> {
        self.stop();
        check_log(&self.log)
    }

    /// Like [`Tree::finish`] after a `--new-pid-ns` restore: kills the tree, then
    /// gives the namespace's init (in `extra`) a few seconds to exit by itself, as it
    /// should once the tree is gone (it would otherwise be left behind by every such
    /// restore), and kills it anyway.
    fn finish_ns(&mut self) -> Result<Vec<Tick>> {
        self.descendants.kill_all();
        self.root.kill();
        let left = self.extra.wait_gone(Duration::from_secs(10));
        self.extra.kill_all();
        let ticks = check_log(&self.log)?;
        ensure!(
            left.is_empty(),
            "the PID namespace's init {left:?} still runs 10 s after the restored tree is gone"
        );
        Ok(ticks)
    }

    /// The manifest, decoded.
    fn manifest(&self) -> Result<Image> {
        let bytes = fs::read(self.image.join("manifest.ckpt"))?;
        Ok(codec::decode_image(&bytes)?)
    }
}

// ---------------------------------------------------------------------------
// 1. Host checks: refused before anything is created, naming what differs.
// ---------------------------------------------------------------------------

/// Decodes the manifest of `image`, lets `edit` change it, encodes it again (with a
/// fresh envelope checksum) and writes it back. Returns the original bytes.
fn rewrite_manifest(image: &Path, edit: impl FnOnce(&mut Image)) -> Result<Vec<u8>> {
    let path = image.join("manifest.ckpt");
    let orig = fs::read(&path)?;
    let mut img = codec::decode_image(&orig).context("decoding the dumped manifest")?;
    edit(&mut img);
    let bytes = codec::encode_image(&img).context("encoding the edited manifest")?;
    fs::write(&path, bytes)?;
    Ok(orig)
}

/// Restores `t`'s image and checks the refusal: a normal non-zero exit, stderr
/// containing every one of `needles` (for each, one of its alternatives,
/// case-insensitively), and no process at any of the original PIDs.
fn expect_refused(t: &mut Tree, what: &str, needles: &[&[&str]]) -> Result<AgentRun> {
    let run = t.restore_run(&[])?;
    // Whatever happens, kill anything that came up at the original PIDs.
    let strays: Vec<i32> = t.pids.iter().copied().filter(|&p| is_alive(p)).collect();
    let _guard = PidsGuard::new(strays.iter().copied());
    ensure!(
        !run.success(),
        "restore of an image with {what} succeeded\n{}",
        run.describe()
    );
    ensure!(
        run.status.code().is_some_and(|c| c != 0),
        "restore of an image with {what} did not exit normally with an error code\n{}",
        run.describe()
    );
    let msg = run.stderr.to_lowercase();
    for alternatives in needles {
        ensure!(
            alternatives.iter().any(|n| msg.contains(&n.to_lowercase())),
            "the refusal of an image with {what} does not mention {alternatives:?}\n{}",
            run.describe()
        );
    }
    ensure!(
        strays.is_empty(),
        "a refused restore left processes {strays:?} at the original PIDs"
    );
    for &p in &t.pids {
        ensure!(
            wait_gone(p, Duration::ZERO),
            "PID {p} is in use after a refused restore"
        );
    }
    Ok(run)
}

/// After a refusal, puts the original manifest back and restores it for real: the
/// refused attempt left nothing behind that stands in the way (PIDs, files), and the
/// image itself was fine.
fn restore_original_and_continue(t: &mut Tree, orig: &[u8]) -> Result<()> {
    fs::write(t.image.join("manifest.ckpt"), orig)?;
    let at_dump = t.last_tick();
    t.restore()
        .context("the unmodified image no longer restores after the refusal")?;
    t.advance(MORE)?;
    let ticks = t.finish()?;
    ensure!(ticks.len() as u64 >= at_dump + MORE);
    Ok(())
}

/// A counter, dumped (killed).
fn dumped_counter() -> Result<Tree> {
    let mut t = Tree::start("counter", &[])?;
    t.ready(1)?;
    t.dump_and_kill()?;
    Ok(t)
}

#[test]
fn host_check_refuses_another_format_version_naming_both_versions() -> Result<()> {
    require_root!(Ok(()));
    let mut t = dumped_counter()?;
    let orig = rewrite_manifest(&t.image, |img| img.format_version = 99)?;
    let run = expect_refused(&mut t, "format version 99", &[&["version"]])?;
    let tokens = digits_tokens(&run.stderr);
    let ours = image::FORMAT_VERSION.to_string();
    ensure!(
        tokens.contains(&"99") && tokens.contains(&ours.as_str()),
        "the refusal does not name both versions (99 and {ours})\n{}",
        run.describe()
    );
    restore_original_and_continue(&mut t, &orig)
}

#[test]
fn host_check_refuses_another_architecture_naming_it() -> Result<()> {
    require_root!(Ok(()));
    let mut t = dumped_counter()?;
    let orig = rewrite_manifest(&t.image, |img| img.arch = "aarch64".into())?;
    expect_refused(
        &mut t,
        "architecture aarch64",
        &[&["aarch64"], &[image::ARCH]],
    )?;
    restore_original_and_continue(&mut t, &orig)
}

#[test]
fn host_check_refuses_xsave_features_this_cpu_lacks() -> Result<()> {
    require_root!(Ok(()));
    let mut t = dumped_counter()?;
    // The image was dumped here, so its XCR0 is this host's: a bit it lacks is one
    // this CPU does not enable. Bit 62 (AMD LWP, long gone) unless, oddly, set.
    let xcr0 = t.manifest()?.host.xcr0;
    let bit = (10..=62)
        .rev()
        .map(|b| 1u64 << b)
        .find(|b| xcr0 & b == 0)
        .context("XCR0 has every bit set")?;
    let orig = rewrite_manifest(&t.image, |img| img.host.xcr0 |= bit)?;
    let hex = format!("{bit:x}");
    expect_refused(
        &mut t,
        &format!("XCR0 bit {bit:#x} added"),
        &[&["cpu"], &["feature", "xcr0", "xsave"], &[&hex]],
    )?;
    restore_original_and_continue(&mut t, &orig)
}

#[test]
fn host_check_refuses_another_vdso() -> Result<()> {
    require_root!(Ok(()));
    let mut t = dumped_counter()?;
    let orig = rewrite_manifest(&t.image, |img| img.host.vdso_hash[0] ^= 0xff)?;
    expect_refused(&mut t, "a different vDSO hash", &[&["vdso"]])?;
    restore_original_and_continue(&mut t, &orig)
}

/// Copies the counter binary into a fresh directory (so the test can change it
/// without touching the shared workload cache) and starts it from there.
fn counter_from_a_copy() -> Result<(Tree, PathBuf)> {
    let dir = Tree::new_dir("counter-copy")?;
    let bin = dir.path().join("counter-copy");
    fs::copy(workload("counter")?, &bin)?;
    fs::set_permissions(&bin, fs::Permissions::from_mode(0o755))?;
    let mut t = Tree::start_program(dir, &bin)?;
    t.ready(1)?;
    Ok((t, bin))
}

#[test]
fn host_check_refuses_a_changed_executable_naming_its_path() -> Result<()> {
    require_root!(Ok(()));
    let (mut t, bin) = counter_from_a_copy()?;
    t.dump_and_kill()?;
    let bin_str = path_str(&bin)?.to_owned();
    ensure!(
        t.manifest()?.file_checks.iter().any(|c| c.path == bin_str),
        "the image has no file check for the executable {bin_str}"
    );
    let len = fs::metadata(&bin)?.len();
    fs::OpenOptions::new()
        .append(true)
        .open(&bin)?
        .write_all(b"x")?;
    expect_refused(&mut t, "a changed executable", &[&[&bin_str]])?;

    // Put the content back (a new mtime, same bytes): now it is accepted.
    fs::OpenOptions::new()
        .write(true)
        .open(&bin)?
        .set_len(len)?;
    let orig = fs::read(t.image.join("manifest.ckpt"))?;
    restore_original_and_continue(&mut t, &orig)
}

#[test]
fn host_check_accepts_a_touched_executable_with_the_same_content() -> Result<()> {
    require_root!(Ok(()));
    let (mut t, bin) = counter_from_a_copy()?;
    t.dump_and_kill()?;
    let bin_str = path_str(&bin)?.to_owned();
    let check = t
        .manifest()?
        .file_checks
        .into_iter()
        .find(|c| c.path == bin_str)
        .with_context(|| format!("the image has no file check for {bin_str}"))?;
    ensure!(
        check.hash.is_some(),
        "the executable ({} bytes) was not hashed at dump: the test proves nothing",
        check.size
    );
    // A new mtime, an hour back: only the content can tell it is the same file.
    let f = fs::File::open(&bin)?;
    f.set_modified(SystemTime::now() - Duration::from_secs(3600))?;
    drop(f);
    let m = fs::metadata(&bin)?;
    let mtime_ns = m.mtime() as i128 * 1_000_000_000 + m.mtime_nsec() as i128;
    ensure!(
        mtime_ns != check.mtime_ns,
        "touching {bin_str} did not change its mtime"
    );
    let at_dump = t.last_tick();
    t.restore()
        .context("a touched but unchanged executable was refused")?;
    t.advance(MORE)?;
    let ticks = t.finish()?;
    ensure!(ticks.len() as u64 >= at_dump + MORE);
    Ok(())
}

// ---------------------------------------------------------------------------
// 2. restore --new-pid-ns.
// ---------------------------------------------------------------------------

/// The `NSpid:` line of `/proc/PID/status`: the PID in every namespace, outermost
/// first.
fn nspid(pid: i32) -> Vec<i32> {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("NSpid:"))
        .map(|v| {
            v.split_whitespace()
                .filter_map(|x| x.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// Inode of the PID namespace of `pid` (`self` for ours).
fn pid_ns(pid: &str) -> Result<u64> {
    Ok(fs::metadata(format!("/proc/{pid}/ns/pid"))
        .with_context(|| format!("stat /proc/{pid}/ns/pid"))?
        .ino())
}

/// The init (PID 1) of the PID namespace with inode `ns`, seen from ours.
fn ns_init_of(ns: u64) -> Option<i32> {
    fs::read_dir("/proc")
        .ok()?
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .find(|&p| {
            nspid(p).last() == Some(&1)
                && nspid(p).len() > 1
                && pid_ns(&p.to_string()).ok() == Some(ns)
        })
}

/// Restores `t` with --new-pid-ns and checks the result: the printed PID is ours to
/// kill (guarded at once, as is the namespace's init), it lives in another PID
/// namespace, and inside it has the original PID. Returns the host PID and the
/// namespace inode.
fn restore_new_pid_ns(t: &mut Tree) -> Result<(i32, u64)> {
    let original = t.pid;
    let run = t.restore_run(&["--new-pid-ns"])?;
    let host_pid = if run.success() {
        last_line_pid(&run)?
    } else {
        bail!("{}", run.describe());
    };
    let ns = pid_ns(&host_pid.to_string())?;
    let init = ns_init_of(ns);
    if let Some(init) = init {
        t.extra.push(init);
    }
    ensure!(
        init.is_some(),
        "found no init (PID 1) of the restored root's PID namespace {ns}"
    );
    ensure!(
        ns != pid_ns("self")?,
        "the restored root {host_pid} is in our own PID namespace"
    );
    let ids = nspid(host_pid);
    ensure!(
        ids.len() == 2 && ids[0] == host_pid && ids[1] == original,
        "NSpid of the restored root is {ids:?}, expected [{host_pid}, {original}]"
    );
    ensure!(
        wait_for(
            || tracer_pids(host_pid).iter().all(|&(_, t)| t == 0),
            Duration::from_secs(5)
        ),
        "the restored root is still traced: {:?}",
        tracer_pids(host_pid)
    );
    Ok((host_pid, ns))
}

/// Checks the `pid` and `ns` fields of `pidns_counter` ticks: ticks up to `split`
/// come from namespace `before`, later ones from `after`; all carry PID `pid`.
fn check_ns_fields(ticks: &[Tick], split: u64, before: u64, after: u64, pid: i32) -> Result<()> {
    for tk in ticks {
        let want = if tk.n <= split { before } else { after };
        ensure!(
            tk.num("ns") == Some(want),
            "tick {} comes from PID namespace {:?}, expected {want}",
            tk.n,
            tk.num("ns")
        );
        ensure!(
            tk.num("pid") == Some(pid as u64),
            "tick {} was printed by PID {:?}, expected {pid}",
            tk.n,
            tk.num("pid")
        );
    }
    Ok(())
}

#[test]
fn new_pid_ns_restore_keeps_the_original_pid_inside_a_new_namespace() -> Result<()> {
    require_root!(Ok(()));
    let mut t = Tree::start("pidns_counter", &[])?;
    t.ready(1)?;
    let host_ns = pid_ns("self")?;
    t.dump_and_kill()?;
    let at_dump = t.last_tick();
    let (host_pid, ns) = restore_new_pid_ns(&mut t)?;
    t.advance(MORE)?;
    ensure!(is_alive(host_pid), "the restored root died");
    // The workload's own check: getpid() inside is still the original PID (or FAIL).
    let ticks = t.finish_ns()?;
    ensure!(ticks.len() as u64 >= at_dump + MORE);
    check_ns_fields(&ticks, at_dump, host_ns, ns, t.pid)
}

/// The original keeps running while its copy runs in a new PID namespace with the
/// same PID number.
///
/// Both would append to the same log, and the image's file check would then see a
/// log that changed since the dump. So the original is stopped (SIGSTOP) for the
/// dump, its log is renamed away (it goes on writing there) and a copy of the log
/// as it was at the dump takes its place: same content, another inode and mtime,
/// which the content hash accepts. The restored copy opens the log by its path, so
/// the two processes end up with separate logs, each of which must be continuous.
/// The image records the stopped state, so the copy comes back stopped and both
/// are sent SIGCONT.
#[test]
fn new_pid_ns_restore_runs_beside_the_still_running_original() -> Result<()> {
    require_root!(Ok(()));
    let mut t = Tree::start("pidns_counter", &[])?;
    t.ready(1)?;
    let host_ns = pid_ns("self")?;
    send_signal(t.pid, libc::SIGSTOP)?;
    ensure!(
        wait_for(|| is_stopped(t.pid), WAIT),
        "SIGSTOP did not stop it"
    );
    std::thread::sleep(Duration::from_millis(50));
    let starts = t.start_times();
    t.dump(&["--leave-running"])?.ok()?;
    ensure!(
        t.start_times() == starts && is_stopped(t.pid),
        "the original is not the same stopped process after a --leave-running dump"
    );
    let at_dump = t.last_tick();

    let orig_log = t.dir.path().join("log.orig");
    fs::rename(&t.log, &orig_log)?;
    fs::copy(&orig_log, &t.log)?;
    send_signal(t.pid, libc::SIGCONT)?;
    let mut original = std::mem::take(&mut t.root);
    let orig_pid = t.pid;

    let (host_pid, ns) = restore_new_pid_ns(&mut t)?;
    ensure!(
        wait_for(|| is_stopped(host_pid), Duration::from_secs(5)),
        "the copy of a stopped process did not come back stopped"
    );
    send_signal(host_pid, libc::SIGCONT)?;

    // Both run at once, with the same PID number in their own namespaces.
    wait_for_tick(&t.log, at_dump + MORE, WAIT)?;
    let orig_target = last_tick(&orig_log).unwrap_or(0) + MORE;
    wait_for_tick(&orig_log, orig_target, WAIT)?;
    ensure!(
        is_alive(orig_pid) && start_time(orig_pid) == starts[0],
        "the original process did not keep running"
    );
    ensure!(is_alive(host_pid), "the restored copy died");
    ensure!(
        nspid(orig_pid) == vec![orig_pid],
        "the original is not in our namespace: NSpid {:?}",
        nspid(orig_pid)
    );

    original.kill();
    let copy = t.finish_ns()?;
    ensure!(copy.len() as u64 >= at_dump + MORE);
    check_ns_fields(&copy, at_dump, host_ns, ns, orig_pid)?;
    let orig_ticks = check_log(&orig_log)?;
    check_ns_fields(&orig_ticks, u64::MAX, host_ns, host_ns, orig_pid)?;
    ensure!(orig_ticks.len() as u64 >= orig_target);
    Ok(())
}

/// With --leave-running the tree runs on while the dump finishes, so the check of a
/// file the tree writes must describe the file as it was at the freeze, the moment
/// the image stands for, not as it is a little later. Here the log: `busy_log`
/// appends a line every few microseconds through an O_APPEND descriptor, so at the
/// freeze the file's size is exactly the descriptor's position, which the image
/// records too; a file check taken after the thaw sees a longer file (the 32 MiB of
/// memory `busy_log` holds make sure the dump still has work to do after the
/// thaw, so the difference shows every time). (That check is
/// what lets a restore refuse a file that changed since the checkpoint; one taken
/// late refuses the file as it was at the checkpoint and accepts it with lines
/// written after.)
#[test]
fn leave_running_dump_checks_files_as_they_were_at_the_freeze() -> Result<()> {
    require_root!(Ok(()));
    let mut t = Tree::start("busy_log", &["32"])?;
    t.ready(1)?;
    t.dump(&["--leave-running"])?.ok()?;
    t.stop();
    let img = t.manifest()?;
    let log = path_str(&t.log)?.to_owned();
    let pos = img.processes[0]
        .fds
        .iter()
        .find(|f| f.fd == 1)
        .and_then(|f| match &img.files[f.file as usize].kind {
            image::FileKind::Regular { pos, path, .. } if *path == log => Some(*pos),
            _ => None,
        })
        .with_context(|| format!("fd 1 of the image is not the log {log}"))?;
    let check = img
        .file_checks
        .iter()
        .find(|c| c.path == log)
        .with_context(|| format!("no file check for the log {log}"))?;
    ensure!(
        check.size == pos,
        "the image's check of {log} records {} bytes, but at the freeze the file held {pos} \
         (the O_APPEND offset of fd 1 in the same image): the check was taken after the \
         tree ran on",
        check.size
    );
    Ok(())
}

// ---------------------------------------------------------------------------
// 3. Shared anonymous memory between parent and child.
// ---------------------------------------------------------------------------

/// The `/proc/PID/maps` line of the mapping that starts at `start`.
fn maps_line(pid: i32, start: u64) -> Option<String> {
    let maps = fs::read_to_string(format!("/proc/{pid}/maps")).ok()?;
    maps.lines()
        .find(|l| {
            l.split('-')
                .next()
                .and_then(|s| u64::from_str_radix(s, 16).ok())
                == Some(start)
        })
        .map(str::to_owned)
}

#[test]
fn shared_anonymous_memory_stays_shared_between_parent_and_child() -> Result<()> {
    require_root!(Ok(()));
    let mut t = Tree::start("shared_anon", &[])?;
    t.ready(2)?;
    let region = t
        .lines()
        .first()
        .and_then(|l| {
            let hex = l.split_whitespace().skip_while(|w| *w != "region").nth(1)?;
            u64::from_str_radix(hex.trim_start_matches("0x"), 16).ok()
        })
        .context("shared_anon did not print its region")?;
    t.dump_and_kill()?;

    // The image holds one shared object of 8 MiB, mapped by both processes.
    let json = inspect_json(agent(), &t.image)?;
    let shm = json["shared_memory"]
        .as_array()
        .context("inspect: shared_memory")?;
    ensure!(
        shm.len() == 1 && shm[0]["size"].as_u64() == Some(8 << 20),
        "inspect: shared memory {shm:?}, expected one object of 8 MiB"
    );
    let id = shm[0]["id"].as_u64().context("shared memory id")?;
    ensure!(
        shm[0]["stored_bytes"].as_u64().unwrap_or(0) >= (8 << 20) - 4096,
        "only {:?} bytes of the shared object were stored",
        shm[0]["stored_bytes"]
    );
    let what = format!("[shared anon #{id}]");
    for p in json["processes"].as_array().context("inspect: processes")? {
        ensure!(
            p["mappings"]
                .as_array()
                .is_some_and(|ms| ms
                    .iter()
                    .any(|m| m["what"] == what.as_str()
                        && m["start"] == format!("{region:#x}").as_str())),
            "process {} does not map {what} at {region:#x}",
            p["pid"]
        );
    }

    let at_dump = t.last_tick();
    t.restore()?;
    // In the kernel: the same shared object (device and inode) in both processes.
    let [parent, child] = t.pids[..] else {
        bail!("tree {:?}", t.pids);
    };
    let obj = |pid: i32| -> Result<(String, String)> {
        let line = maps_line(pid, region)
            .with_context(|| format!("process {pid} has no mapping at {region:#x}"))?;
        let f: Vec<&str> = line.split_whitespace().collect();
        ensure!(
            f.len() >= 5 && f[1].ends_with('s'),
            "process {pid}: the region is not a shared mapping: {line}"
        );
        Ok((f[3].to_owned(), f[4].to_owned()))
    };
    let (po, co) = (obj(parent)?, obj(child)?);
    ensure!(
        po == co,
        "parent and child map different objects at {region:#x}: {po:?} and {co:?}"
    );
    // And in use: every round needs the other side's writes.
    t.advance(MORE)?;
    let ticks = t.finish()?;
    ensure!(ticks.len() as u64 >= at_dump + MORE);
    for tk in &ticks {
        ensure!(
            tk.num("pong") == Some(tk.n) && tk.num("hits") == Some(2 * tk.n),
            "tick {}: pong {:?} hits {:?}",
            tk.n,
            tk.num("pong"),
            tk.num("hits")
        );
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// 4. POSIX timers.
// ---------------------------------------------------------------------------

#[test]
fn posix_timers_keep_their_ids_intervals_and_keep_firing() -> Result<()> {
    require_root!(Ok(()));
    let mut t = Tree::start("posix_timers", &[])?;
    t.ready(1)?;
    let worker = thread_ids(t.pid)
        .into_iter()
        .find(|&tid| tid != t.pid)
        .context("posix_timers has no worker thread")?;
    t.dump_and_kill()?;
    // What the image says about the timers. A wrong record is reported at the end,
    // after the restored process has shown what it does with it.
    let img = t.manifest()?;
    let timers = &img.processes[0].posix_timers;
    let image_problem = if timers.len() != 3 {
        Some(format!(
            "the image holds {} POSIX timers, expected 3: {timers:?}",
            timers.len()
        ))
    } else {
        match timers.iter().find(|tm| tm.notify == libc::SIGEV_THREAD_ID) {
            None => Some(format!(
                "no timer recorded as SIGEV_THREAD_ID ({}) in the image: {timers:?}",
                libc::SIGEV_THREAD_ID
            )),
            Some(tm) if tm.notify_tid != worker => Some(format!(
                "the SIGEV_THREAD_ID timer targets {}, the worker was {worker}",
                tm.notify_tid
            )),
            Some(_) => None,
        }
    };
    let behaviour = restore_timers_and_check(&mut t, worker);
    match (behaviour, image_problem) {
        (Ok(()), None) => Ok(()),
        (Ok(()), Some(p)) => bail!("{p}"),
        (Err(e), None) => Err(e),
        (Err(e), Some(p)) => bail!("{p}\nand after the restore: {e:#}"),
    }
}

fn restore_timers_and_check(t: &mut Tree, worker: i32) -> Result<()> {
    let at_dump = t.last_tick();
    t.restore()?;
    ensure!(
        thread_ids(t.pid).contains(&worker),
        "the worker thread {worker} did not come back"
    );
    t.advance(MORE)?;
    let ticks = t.finish()?;
    ensure!(ticks.len() as u64 >= at_dump + MORE);
    let last_before = &ticks[at_dump as usize - 1];
    let last = ticks.last().context("no ticks")?;
    for key in ["a", "b"] {
        ensure!(
            last.num(key) > last_before.num(key),
            "timer {key} did not fire after the restore: {:?} at the dump, {:?} at the end",
            last_before.num(key),
            last.num(key)
        );
    }
    ensure!(
        last.fields.get("ids") == last_before.fields.get("ids"),
        "timer IDs changed: {:?} before, {:?} after",
        last_before.fields.get("ids"),
        last.fields.get("ids")
    );
    Ok(())
}

// ---------------------------------------------------------------------------
// 5. Descriptors of more kinds.
// ---------------------------------------------------------------------------

#[test]
fn directories_devices_append_nonblocking_and_dup_descriptors_survive() -> Result<()> {
    require_root!(Ok(()));
    let mut t = Tree::start("fds", &[])?;
    t.ready(1)?;
    // "fds dir D urandom U zero Z append A appr R pipe PR PW dupa X dupb Y"
    let header = t
        .lines()
        .into_iter()
        .find(|l| l.starts_with("fds "))
        .context("fds did not name its descriptors")?;
    let words: Vec<&str> = header.split_whitespace().collect();
    let fd_of = |key: &str, k: usize| -> Result<i64> {
        let i = words
            .iter()
            .position(|w| *w == key)
            .with_context(|| format!("no {key} in {header:?}"))?;
        words
            .get(i + k)
            .and_then(|w| w.parse().ok())
            .with_context(|| format!("bad {key} in {header:?}"))
    };
    // Dump early in a pass over the directory (302 entries, about 4 a tick), so that
    // its position is well inside the directory whatever the scheduling delays.
    ensure!(
        wait_for(
            || {
                let lines = t.lines();
                lines.iter().any(|l| l.contains("FAIL"))
                    || lines
                        .iter()
                        .enumerate()
                        .filter_map(|(i, l)| parse_tick(l, i))
                        .next_back()
                        .and_then(|tk| tk.num("idx"))
                        .is_some_and(|i| (20..=150).contains(&i))
            },
            WAIT
        ),
        "fds never reached the middle of a pass over its directory"
    );
    t.dump_and_kill()?;
    let at_dump = t.last_tick();
    let json = inspect_json(agent(), &t.image)?;
    let fds = json["processes"][0]["fds"]
        .as_array()
        .context("inspect: fds")?
        .clone();
    let entry = |fd: i64| -> Result<&serde_json::Value> {
        fds.iter()
            .find(|f| f["fd"].as_i64() == Some(fd))
            .with_context(|| format!("inspect lists no fd {fd}: {fds:?}"))
    };
    let dir = entry(fd_of("dir", 1)?)?;
    ensure!(
        dir["kind"] == "directory" && dir["path"].as_str().is_some_and(|p| p.ends_with("/dents")),
        "dir fd: {dir}"
    );
    ensure!(
        dir["pos"].as_u64().is_some_and(|p| p > 0),
        "the directory was dumped at position 0 (not mid-way): {dir}"
    );
    for (key, dev) in [("urandom", "/dev/urandom"), ("zero", "/dev/zero")] {
        let e = entry(fd_of(key, 1)?)?;
        ensure!(e["kind"] == "chardev" && e["path"] == dev, "{key} fd: {e}");
    }
    ensure!(
        entry(fd_of("urandom", 1)?)?["cloexec"] == true,
        "urandom lost its close-on-exec flag in the image"
    );
    let app = entry(fd_of("append", 1)?)?;
    let flags = app["flags"]
        .as_str()
        .and_then(|s| u32::from_str_radix(s.trim_start_matches("0o"), 8).ok())
        .with_context(|| format!("append fd flags: {app}"))?;
    ensure!(
        flags & libc::O_APPEND as u32 != 0,
        "the O_APPEND fd was dumped without O_APPEND: {app}"
    );
    for k in [1, 2] {
        let e = entry(fd_of("pipe", k)?)?;
        ensure!(e["kind"] == "pipe", "pipe fd: {e}");
        let fl = e["flags"]
            .as_str()
            .and_then(|s| u32::from_str_radix(s.trim_start_matches("0o"), 8).ok())
            .unwrap_or(0);
        ensure!(
            fl & libc::O_NONBLOCK as u32 != 0,
            "pipe end dumped without O_NONBLOCK: {e}"
        );
    }
    let (a, b) = (entry(fd_of("dupa", 1)?)?, entry(fd_of("dupb", 1)?)?);
    ensure!(
        a["file"].as_u64().is_some() && a["file"] == b["file"],
        "the dup'ed fds {} and {} do not share one file: {a} / {b}",
        a["fd"],
        b["fd"]
    );
    ensure!(
        entry(fd_of("appr", 1)?)?["file"] != app["file"],
        "two separate open() of append.dat were merged into one file"
    );

    t.restore()?;
    // Two full passes over the directory after the restore: the pass that was
    // interrupted must end with every name exactly once, and the next must read the
    // same order.
    let pass_at_dump = t
        .lines()
        .iter()
        .enumerate()
        .filter_map(|(i, l)| parse_tick(l, i))
        .take_while(|tk| tk.n <= at_dump)
        .last()
        .and_then(|tk| tk.num("pass"))
        .unwrap_or(0);
    ensure!(
        wait_for(
            || {
                let lines = t.lines();
                lines.iter().any(|l| l.contains("FAIL"))
                    || lines
                        .iter()
                        .enumerate()
                        .filter_map(|(i, l)| parse_tick(l, i))
                        .any(|tk| tk.num("pass") >= Some(pass_at_dump + 2))
            },
            WAIT
        ),
        "the directory was not read through twice after the restore"
    );
    t.advance(5)?;
    let ticks = t.finish()?;
    ensure!(ticks.len() as u64 >= at_dump + 5);
    ensure!(
        fs::metadata(t.dir.path().join("append.dat"))?.len() >= 16 * ticks.len() as u64,
        "append.dat is shorter than the records the workload wrote"
    );
    Ok(())
}

// ---------------------------------------------------------------------------
// 6. inspect.
// ---------------------------------------------------------------------------

#[test]
fn inspect_lists_every_process_with_threads_mappings_fds_and_buffered_pipes() -> Result<()> {
    require_root!(Ok(()));
    let mut t = Tree::start("fork_pipes", &[])?;
    t.ready(4)?;
    wait_for_tick(&t.log, 30, WAIT)?; // let the pipes fill up
    t.snapshot();
    let parents: Vec<(i32, Option<i32>)> = t.pids.iter().map(|&p| (p, proc_ppid(p))).collect();
    t.dump_and_kill()?;

    let json = inspect_json(agent(), &t.image)?;
    ensure!(
        json["root_pid"].as_i64() == Some(t.pid as i64),
        "root_pid: {}",
        json["root_pid"]
    );
    let procs = json["processes"].as_array().context("inspect: processes")?;
    let mut listed: Vec<i32> = procs
        .iter()
        .filter_map(|p| p["pid"].as_i64().map(|v| v as i32))
        .collect();
    listed.sort_unstable();
    let mut want = t.pids.clone();
    want.sort_unstable();
    ensure!(
        listed == want,
        "inspect lists {listed:?}, the tree was {want:?}"
    );
    let mut buffered = 0;
    for p in procs {
        let pid = p["pid"].as_i64().context("pid")? as i32;
        let ppid = parents
            .iter()
            .find(|(q, _)| *q == pid)
            .and_then(|(_, pp)| *pp);
        if pid != t.pid {
            ensure!(
                p["ppid"].as_i64().map(|v| v as i32) == ppid,
                "process {pid}: inspect says parent {}, it was {ppid:?}",
                p["ppid"]
            );
        }
        let threads = p["threads"].as_array().context("threads")?;
        ensure!(
            threads.len() == 1 && threads[0]["tid"].as_i64() == Some(pid as i64),
            "process {pid}: threads {threads:?}"
        );
        let maps = p["mappings"].as_array().context("mappings")?;
        ensure!(
            maps.iter().any(|m| m["what"] == "[stack]")
                && maps
                    .iter()
                    .any(|m| m["what"].as_str().is_some_and(|w| w.contains("libc"))),
            "process {pid}: mappings lack the stack or libc: {maps:?}"
        );
        let fds = p["fds"].as_array().context("fds")?;
        ensure!(
            fds.iter().any(|f| f["kind"] == "pipe"),
            "process {pid}: no pipe among its fds {fds:?}"
        );
        ensure!(
            fds.iter().any(|f| f["fd"] == 1 && f["kind"] == "file"),
            "process {pid}: fd 1 (the log) is not listed as a file: {fds:?}"
        );
        buffered += fds
            .iter()
            .filter(|f| f["kind"] == "pipe")
            .filter_map(|f| f["buffered"].as_u64())
            .sum::<u64>();
    }
    ensure!(buffered > 0, "inspect shows no byte buffered in any pipe");

    let text = run_agent_env(
        agent(),
        &["inspect", "--image", path_str(&t.image)?],
        &[],
        AGENT_TIMEOUT,
    )?
    .ok()?;
    ensure!(
        text.stdout.contains(&format!("root PID {}", t.pid)),
        "plain inspect does not name the root PID {}\n{}",
        t.pid,
        text.describe()
    );
    for p in &t.pids {
        ensure!(
            text.stdout.contains(&format!("PID {p} ")),
            "plain inspect does not list process {p}\n{}",
            text.describe()
        );
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// 7. Dumps that must be refused.
// ---------------------------------------------------------------------------

/// A PID that no process has now: that of a child we started and reaped.
fn free_pid() -> Result<i32> {
    let mut c = std::process::Command::new("true").spawn()?;
    let pid = c.id() as i32;
    c.wait()?;
    ensure!(!is_alive(pid), "PID {pid} is still in use");
    Ok(pid)
}

#[test]
fn dump_of_a_missing_pid_fails_naming_it_and_commits_nothing() -> Result<()> {
    require_root!(Ok(()));
    let dir = Tree::new_dir("nopid")?;
    let image = dir.path().join("img");
    let pid = free_pid()?;
    let pid_s = pid.to_string();
    let run = run_dump(agent(), pid, &image, &[], &[])?;
    ensure!(
        !run.success(),
        "a dump of missing PID {pid} succeeded\n{}",
        run.describe()
    );
    ensure!(
        run.status.code().is_some_and(|c| c != 0),
        "the dump did not exit with an error code\n{}",
        run.describe()
    );
    ensure!(
        digits_tokens(&run.stderr).contains(&pid_s.as_str()),
        "the error does not name PID {pid}\n{}",
        run.describe()
    );
    ensure!(
        !image.join("manifest.ckpt").exists(),
        "a failed dump committed a manifest"
    );
    Ok(())
}

#[test]
fn dump_into_a_directory_that_holds_an_image_is_refused_and_the_tree_runs_on() -> Result<()> {
    require_root!(Ok(()));
    let mut t = Tree::start("counter", &[])?;
    t.ready(1)?;
    t.dump(&["--leave-running"])?.ok()?;
    let manifest = t.image.join("manifest.ckpt");
    let before = fs::read(&manifest)?;
    let starts = t.start_times();
    // Without --leave-running: were it not refused, it would kill the tree.
    let run = t.dump(&[])?;
    ensure!(
        !run.success(),
        "a second dump into the same directory succeeded\n{}",
        run.describe()
    );
    let msg = run.stderr.to_lowercase();
    ensure!(
        msg.contains(&path_str(&t.image)?.to_lowercase())
            && (msg.contains("already") || msg.contains("exist")),
        "the error does not say that {} already holds an image\n{}",
        t.image.display(),
        run.describe()
    );
    ensure!(
        fs::read(&manifest)? == before,
        "the refused dump changed the existing manifest"
    );
    std::thread::sleep(Duration::from_millis(100));
    ensure!(
        is_alive(t.pid) && t.start_times() == starts,
        "the tree did not survive the refused dump"
    );
    ensure!(
        wait_for(
            || tracer_pids(t.pid).iter().all(|&(_, tr)| tr == 0),
            Duration::from_secs(5)
        ),
        "the process is still traced after the refused dump"
    );
    t.advance(MORE)?;
    t.finish()?;
    Ok(())
}
