//! End-to-end tests of the memory objects: shared anonymous memory and POSIX
//! shared memory under `/dev/shm` updated under one process-shared mutex, a
//! System V producer and consumer, and a process holding deleted files and sealed
//! memfds. Each workload (`tests/workloads/`) checks its own state at every tick
//! (printing `FAIL` when something is off), and the log proves continuity
//! (`ckpt_tests::ticks`).
//!
//! Every test owns a temporary directory and guards that SIGKILL, by PID, every
//! process it started or restored, and remove the `/dev/shm` file or System V
//! segment it made, even when it panics.

use std::fs;
use std::path::PathBuf;
use std::process::Command;

use anyhow::{bail, ensure, Context, Result};
use ckpt_tests::ticks::check_log;
use ckpt_tests::{inspect_json, is_alive, require_root, run_restore, send_signal, Tick};

mod common;
use common::agent;
#[path = "common/tree.rs"]
mod tree;
use tree::Tree;

/// How many ticks a workload must make after a dump or a restore.
const MORE: u64 = 20;

/// A name of our own under `/dev/shm`, removed when dropped.
struct DevShm {
    name: String,
}

impl DevShm {
    fn new(what: &str) -> DevShm {
        DevShm {
            name: format!("ckpt-test-{what}-{}", std::process::id()),
        }
    }

    fn path(&self) -> PathBuf {
        PathBuf::from("/dev/shm").join(&self.name)
    }
}

impl Drop for DevShm {
    fn drop(&mut self) {
        let _ = fs::remove_file(self.path());
    }
}

/// A System V key of our own; its segment is removed when dropped.
struct SysvKey(u32);

impl Drop for SysvKey {
    fn drop(&mut self) {
        let _ = Command::new("ipcrm")
            .args(["-M", &format!("{:#x}", self.0)])
            .output();
    }
}

/// The objects of `inspect --json`, as (kind, path or name).
fn objects(json: &serde_json::Value) -> Result<Vec<(String, String)>> {
    let shm = json["shared_memory"]
        .as_array()
        .context("inspect: shared_memory")?;
    Ok(shm
        .iter()
        .map(|s| {
            let b = &s["backing"];
            let what = b["path"]
                .as_str()
                .or(b["name"].as_str())
                .map(str::to_owned)
                .or_else(|| b["key"].as_i64().map(|k| format!("{k:#x}")))
                .unwrap_or_default();
            (b["kind"].as_str().unwrap_or("?").to_owned(), what)
        })
        .collect())
}

/// The (device, inode) that `pid` maps `path` (a maps line's name) with.
fn mapped_object(pid: i32, path: &str) -> Result<(String, String)> {
    let maps = fs::read_to_string(format!("/proc/{pid}/maps"))?;
    let line = maps
        .lines()
        .find(|l| l.ends_with(path) || l.ends_with(&format!("{path} (deleted)")))
        .with_context(|| format!("process {pid} does not map {path}"))?;
    let f: Vec<&str> = line.split_whitespace().collect();
    ensure!(
        f.len() >= 6 && f[1].ends_with('s'),
        "process {pid}: {path} is not mapped shared: {line}"
    );
    Ok((f[3].to_owned(), f[4].to_owned()))
}

/// `shm_mutex` ticks: the two processes' counts add up to the total, and both
/// processes counted by the end (the child may start after the first tick).
fn check_totals(ticks: &[Tick]) -> Result<()> {
    for t in ticks {
        let (total, p, c) = (t.num("total"), t.num("parent"), t.num("child"));
        ensure!(
            matches!((total, p, c), (Some(a), Some(b), Some(d)) if a == b + d),
            "tick {}: total {total:?} parent {p:?} child {c:?}",
            t.n
        );
    }
    let last = ticks.last().context("no ticks")?;
    ensure!(
        last.num("parent") > Some(0) && last.num("child") > Some(0),
        "the last tick {} counts parent {:?} child {:?}",
        last.n,
        last.num("parent"),
        last.num("child")
    );
    Ok(())
}

/// Both processes of `shm_mutex` map one /dev/shm file, and the image holds it
/// and the shared anonymous region as objects.
fn check_shm_mutex_image(t: &Tree, shm: &DevShm) -> Result<()> {
    let json = inspect_json(agent(), &t.image)?;
    let objs = objects(&json)?;
    let path = shm.path().to_string_lossy().into_owned();
    ensure!(
        objs.iter().any(|(k, p)| k == "tmpfs" && *p == path),
        "the image's objects {objs:?} lack the /dev/shm file {path}"
    );
    ensure!(
        objs.iter().any(|(k, _)| k == "anon"),
        "the image's objects {objs:?} lack the shared anonymous region"
    );
    Ok(())
}

fn check_shm_mutex_restored(t: &Tree, shm: &DevShm) -> Result<()> {
    let path = shm.path().to_string_lossy().into_owned();
    let [parent, child] = t.pids[..] else {
        bail!("tree {:?}", t.pids);
    };
    let (po, co) = (mapped_object(parent, &path)?, mapped_object(child, &path)?);
    ensure!(
        po == co,
        "parent and child map different files: {po:?} and {co:?}"
    );
    let meta = fs::metadata(shm.path()).with_context(|| format!("{path} after the restore"))?;
    ensure!(meta.len() == 1 << 20, "{path} is {} bytes", meta.len());
    Ok(())
}

#[test]
fn anonymous_and_dev_shm_memory_under_a_shared_mutex_come_back_shared() -> Result<()> {
    require_root!(Ok(()));
    let shm = DevShm::new("mutex");
    let mut t = Tree::start("shm", "shm_mutex", &[&shm.name])?;
    t.ready(5, 2)?;
    t.dump_and_kill()?;
    check_shm_mutex_image(&t, &shm)?;
    let at_dump = t.last_tick();
    t.restore_untraced()?;
    check_shm_mutex_restored(&t, &shm)?;
    t.advance(MORE)?;
    let ticks = t.finish()?;
    ensure!(ticks.len() as u64 >= at_dump + MORE);
    check_totals(&ticks)
}

/// As on another node: the /dev/shm file is gone when the image is restored.
#[test]
fn dev_shm_memory_is_made_again_when_its_file_is_gone() -> Result<()> {
    require_root!(Ok(()));
    let shm = DevShm::new("gone");
    let mut t = Tree::start("shm", "shm_mutex", &[&shm.name])?;
    t.ready(5, 2)?;
    t.dump_and_kill()?;
    fs::remove_file(shm.path())?;
    t.restore_untraced()?;
    check_shm_mutex_restored(&t, &shm)?;
    t.advance(MORE)?;
    check_totals(&t.finish()?)
}

/// `--leave-running`: the tree changes its /dev/shm file after the dump, then dies;
/// the restore brings back the file as it was at the dump (replacing the changed
/// one), consistent with the processes' own memory.
#[test]
fn dev_shm_memory_of_a_running_dump_comes_back_as_it_was_at_the_dump() -> Result<()> {
    require_root!(Ok(()));
    let shm = DevShm::new("running");
    let mut t = Tree::start("shm", "shm_mutex", &[&shm.name])?;
    t.ready(5, 2)?;
    t.dump(&["--leave-running"])?.ok()?;
    t.advance(MORE)?;
    t.kill()?;
    let changed = fs::metadata(shm.path())?;
    t.restore_untraced()?;
    check_shm_mutex_restored(&t, &shm)?;
    {
        use std::os::unix::fs::MetadataExt;
        let now = fs::metadata(shm.path())?;
        ensure!(
            now.ino() != changed.ino(),
            "the restore wrote into the file the killed tree left instead of replacing it"
        );
    }
    t.advance(MORE)?;
    check_totals(&t.finish()?)
}

/// `sysv_pc` dumped, killed and restored; `rmid`: its segment marked for removal
/// while attached.
fn sysv_round(low: u32, rmid: bool) -> Result<()> {
    let key = SysvKey(0x7e50_0000 | (std::process::id() & 0xfff) << 4 | low);
    let key_arg = format!("{:#x}", key.0);
    let args: &[&str] = if rmid {
        &[&key_arg, "rmid"]
    } else {
        &[&key_arg]
    };
    let mut t = Tree::start("shm", "sysv_pc", args)?;
    t.ready(5, 2)?;
    t.dump_and_kill()?;
    let json = inspect_json(agent(), &t.image)?;
    let shm = json["shared_memory"].as_array().context("shared_memory")?;
    let seg = shm
        .iter()
        .find(|s| s["backing"]["kind"] == "sysv")
        .with_context(|| format!("the image has no System V segment: {shm:?}"))?;
    let (want_key, shmid) = (
        if rmid { 0 } else { key.0 as i64 },
        &seg["backing"]["shmid"],
    );
    ensure!(
        seg["backing"]["key"].as_i64() == Some(want_key) && seg["backing"]["removed"] == rmid,
        "the image's segment {seg}, expected key {want_key:#x} removed {rmid}"
    );
    let shmid = shmid.as_u64().context("shmid")?;
    let seq_at = |ticks: &[Tick]| ticks.last().and_then(|t| t.num("seq")).unwrap_or(0);
    let before = seq_at(&check_log(&t.log)?);
    t.restore_untraced()?;
    // Both processes attach the one segment, by its old id (the child twice).
    let attached = |pid: i32| -> Result<Vec<String>> {
        let maps = fs::read_to_string(format!("/proc/{pid}/maps"))?;
        Ok(maps
            .lines()
            .filter(|l| l.contains("/SYSV"))
            .map(|l| l.split_whitespace().nth(4).unwrap_or("").to_owned())
            .collect())
    };
    let (p, c) = (attached(t.pids[0])?, attached(t.pids[1])?);
    let id = shmid.to_string();
    ensure!(
        p == [id.clone()] && c == [id.clone(), id.clone()],
        "the segment's attachments after the restore: parent {p:?}, child {c:?}, expected \
         segment {id}"
    );
    t.advance(MORE)?;
    let ticks = t.finish()?;
    ensure!(
        seq_at(&ticks) > before,
        "the consumer did not go past record {before}"
    );
    Ok(())
}

#[test]
fn system_v_producer_and_consumer_continue_after_restore() -> Result<()> {
    require_root!(Ok(()));
    sysv_round(1, false)
}

/// A segment marked for removal (`IPC_RMID`) while attached: keyless, it comes
/// back under its id and is marked again.
#[test]
fn system_v_segment_marked_for_removal_comes_back_marked() -> Result<()> {
    require_root!(Ok(()));
    sysv_round(2, true)
}

/// A segment with the image's key that some process still has attached (here:
/// the original tree, left running) is not taken over: the restore is refused,
/// naming the key, before any process exists, and the running tree is untouched.
#[test]
fn restore_refuses_a_system_v_segment_in_use() -> Result<()> {
    require_root!(Ok(()));
    let key = SysvKey(0x7e50_0000 | (std::process::id() & 0xfff) << 4 | 3);
    let key_arg = format!("{:#x}", key.0);
    let mut t = Tree::start("shm", "sysv_pc", &[&key_arg])?;
    t.ready(5, 2)?;
    t.dump(&["--leave-running"])?.ok()?;
    // Held still (the restore cuts its grown log back at the release, so the
    // log's check does not refuse it); in a new PID namespace, so that the PIDs
    // do not either.
    for &p in &t.pids {
        send_signal(p, libc::SIGSTOP)?;
    }
    let run = run_restore(agent(), &t.image, &["--new-pid-ns"], &[]);
    for &p in &t.pids {
        send_signal(p, libc::SIGCONT)?;
    }
    let run = run?;
    ensure!(
        !run.success(),
        "a restore over a segment in use succeeded\n{}",
        run.describe()
    );
    ensure!(
        run.stderr.contains("in use") && run.stderr.contains(&key_arg),
        "the refusal does not say the segment {key_arg} is in use\n{}",
        run.describe()
    );
    for &p in &t.pids {
        ensure!(is_alive(p), "process {p} of the running tree is gone");
    }
    // The tree goes on (its log has a gap where it was cut: no continuity check,
    // but none of its own checks may fail).
    t.advance(MORE)?;
    t.descendants.kill_all();
    t.root.kill();
    let log = fs::read_to_string(&t.log)?;
    ensure!(
        !log.lines().any(|l| l.starts_with("FAIL")),
        "the running tree failed its checks:\n{log}"
    );
    Ok(())
}

#[test]
fn deleted_files_and_sealed_memfds_come_back_with_their_content() -> Result<()> {
    require_root!(Ok(()));
    let work = tempfile::Builder::new().prefix("ckpt-deleted-").tempdir()?;
    let dir = work.path().to_str().context("dir")?.to_owned();
    let mut t = Tree::start("shm", "memfd_deleted", &[&dir])?;
    t.ready(5, 1)?;
    t.dump_and_kill()?;
    let json = inspect_json(agent(), &t.image)?;
    let objs = objects(&json)?;
    for (kind, what) in [
        ("memfd", "ckpt-ring".to_string()),
        ("memfd", "ckpt-ro".into()),
        ("memfd", "ckpt-plain".into()),
        ("deleted", format!("{dir}/deleted-{}", t.pid)),
        ("deleted", format!("{dir}/probe-{}", t.pid)),
    ] {
        ensure!(
            objs.iter().any(|(k, w)| k == kind && *w == what),
            "the image's objects {objs:?} lack the {kind} {what}"
        );
    }
    let at_dump = t.last_tick();
    t.restore_untraced()?;
    // The deleted files are deleted again, in the same directory, and nothing was
    // left there under a name.
    let left: Vec<_> = fs::read_dir(work.path())?.collect();
    ensure!(left.is_empty(), "the restore left {left:?} in {dir}");
    let links: Vec<String> = fs::read_dir(format!("/proc/{}/fd", t.pid))?
        .filter_map(|e| fs::read_link(e.ok()?.path()).ok())
        .map(|p| p.to_string_lossy().into_owned())
        .collect();
    ensure!(
        links
            .iter()
            .filter(|l| l.starts_with(&dir) && l.ends_with(" (deleted)"))
            .count()
            == 2,
        "the restored descriptors {links:?} should hold two deleted files in {dir}"
    );
    t.advance(MORE)?;
    let ticks = t.finish()?;
    ensure!(ticks.len() as u64 >= at_dump + MORE);
    Ok(())
}
