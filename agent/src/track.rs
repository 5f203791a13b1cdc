//! Write tracking between checkpoints, for incremental dumps.
//!
//! After a `--leave-running` dump into a shared store, the private anonymous memory
//! of every process is write-protected through a userfaultfd in asynchronous mode
//! (`UFFD_FEATURE_WP_ASYNC`, Linux 6.7): the process runs on as before, and a first
//! write to a protected page is let through by the kernel, which only drops the
//! protection. The next dump asks `PAGEMAP_SCAN` which pages were written (and
//! protects them again in the same call): only those are read and stored; every
//! other page is taken from the parent image's chunks. This kernel has no
//! soft-dirty bits (`CONFIG_MEM_SOFT_DIRTY` is off), which is the older way.
//!
//! The userfaultfd is created inside the process (one injected `userfaultfd(2)`,
//! then `pidfd_getfd` and an injected `close`), so the process never holds it. It
//! must stay open between dumps, and this command exits: a small holder process
//! (`ckpt-agent __hold-uffd`) keeps the descriptors until every tracked process has
//! exited. A registry file per tracked process, in `/run/ckpt/track` (tmpfs: it goes
//! with a reboot, as the tracking does), names the holder, the descriptor, and the
//! image whose freeze armed the tracking (the epoch).
//!
//! When is a page taken from the parent? Only when all of these hold, else the
//! process is dumped in full (and the summary says so):
//! - the registry's epoch is exactly the parent image, and the parent is committed:
//!   a dump that armed tracking and then failed leaves its own name there, so the
//!   next dump against an older parent is full;
//! - the holder still runs (PID and start time) and holds a userfaultfd;
//! - the mapping is still registered for tracking (`uw` in its smaps `VmFlags`): a
//!   mapping created, moved (mremap) or replaced since the arming is not, and is
//!   stored in full. Unregistered ranges are never scanned (the kernel would skip
//!   them silently).
//!
//! Each process costs a page fault per page on its first write after a dump (about
//! 1.6 µs here), as soft-dirty tracking does. `dump --no-track` turns arming off.

use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::path::PathBuf;

use libc::pid_t;
use serde::{Deserialize, Serialize};
use tracing::debug;

use crate::inject::{InjectError, Remote};
use crate::sys::{self, proc};

/// Where the registry lives unless `--track-dir` (or `CKPT_TRACK_DIR`) says
/// otherwise.
pub const DEFAULT_DIR: &str = "/run/ckpt/track";

/// The registry of tracked processes: one small JSON file per process, named
/// `<pid>.<start time>`, in one directory.
#[derive(Debug, Clone)]
pub struct Registry {
    dir: PathBuf,
}

impl Default for Registry {
    fn default() -> Self {
        Registry::new(DEFAULT_DIR)
    }
}

/// One tracked process.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Entry {
    pub pid: pid_t,
    pub start_time: u64,
    pub holder_pid: pid_t,
    pub holder_start: u64,
    /// The descriptor number in the holder.
    pub fd: RawFd,
    /// The image whose freeze armed the tracking.
    pub epoch: String,
}

impl Registry {
    /// The registry in directory `dir` (created when the first entry is saved).
    pub fn new(dir: impl Into<PathBuf>) -> Registry {
        Registry { dir: dir.into() }
    }

    fn entry_path(&self, pid: pid_t, start_time: u64) -> PathBuf {
        self.dir.join(format!("{pid}.{start_time}"))
    }

    /// The registry entry of process `pid` started at `start_time`, if any.
    pub fn load(&self, pid: pid_t, start_time: u64) -> Option<Entry> {
        let s = std::fs::read_to_string(self.entry_path(pid, start_time)).ok()?;
        serde_json::from_str(&s).ok()
    }

    /// Writes (atomically) the entry.
    pub fn save(&self, e: &Entry) -> std::io::Result<()> {
        std::fs::create_dir_all(&self.dir)?;
        let path = self.entry_path(e.pid, e.start_time);
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, serde_json::to_vec(e)?)?;
        std::fs::rename(&tmp, &path)
    }

    /// Says that tracking of the process now counts from `epoch` (before its
    /// written pages are scanned and protected again: a dump that then fails leaves
    /// its own name, and the next dump against an older parent is full).
    pub fn set_epoch(&self, pid: pid_t, start_time: u64, epoch: &str) {
        if let Some(mut e) = self.load(pid, start_time) {
            e.epoch = epoch.to_string();
            if let Err(err) = self.save(&e) {
                debug!(pid, %err, "could not update the tracking registry");
                // Without the update, the entry must not be trusted again.
                let _ = std::fs::remove_file(self.entry_path(pid, start_time));
            }
        }
    }

    /// Starts a holder for `fds` (tracked PID, its start time, our userfaultfd)
    /// and records each here with `epoch`. The holder keeps them until every
    /// tracked process has exited. Returns the holder's PID.
    pub fn park(&self, fds: &[(pid_t, u64, OwnedFd)], epoch: &str) -> std::io::Result<pid_t> {
        self.prune();
        let holder_pid = spawn_holder(fds)?;
        let holder_start = proc::stat(holder_pid)
            .map(|s| s.start_time)
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        for (i, (pid, start_time, _)) in fds.iter().enumerate() {
            self.save(&Entry {
                pid: *pid,
                start_time: *start_time,
                holder_pid,
                holder_start,
                fd: 3 + i as RawFd,
                epoch: epoch.to_string(),
            })?;
        }
        Ok(holder_pid)
    }

    /// Removes the entries of processes that have exited.
    fn prune(&self) {
        let Ok(dir) = std::fs::read_dir(&self.dir) else {
            return;
        };
        for f in dir.flatten() {
            let name = f.file_name().to_string_lossy().into_owned();
            let Some((pid, start)) = name.split_once('.') else {
                continue;
            };
            let (Ok(pid), Ok(start)) = (pid.parse::<pid_t>(), start.parse::<u64>()) else {
                continue;
            };
            let alive = proc::stat(pid)
                .map(|s| s.start_time == start)
                .unwrap_or(false);
            if !alive {
                let _ = std::fs::remove_file(f.path());
            }
        }
    }
}

/// A copy of the tracked process's userfaultfd, taken from the holder, if the
/// entry still holds.
pub fn take(e: &Entry) -> Option<OwnedFd> {
    let holder_ok = proc::stat(e.holder_pid)
        .map(|s| s.start_time == e.holder_start)
        .unwrap_or(false);
    if !holder_ok {
        debug!(
            pid = e.pid,
            holder = e.holder_pid,
            "tracking holder is gone"
        );
        return None;
    }
    let pidfd = sys::pidfd_open(e.holder_pid).ok()?;
    let fd = sys::pidfd_getfd(&pidfd, e.holder_pid, e.fd).ok()?;
    let link = std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd())).ok()?;
    link.to_string_lossy().contains("userfaultfd").then_some(fd)
}

/// Creates a userfaultfd for the process of `r`, in async write-protect mode (see
/// [`crate::inject::userfaultfd_of`]); `None` where the kernel refuses (older than
/// 6.7, no userfaultfd): no write tracking then.
pub fn create(r: &mut Remote) -> Result<Option<OwnedFd>, InjectError> {
    crate::inject::userfaultfd_of(r, sys::uffd::FEATURE_WP_ASYNC)
}

/// Registers and write-protects `[start, end)` ranges; returns how many took (a
/// range the kernel refuses is simply not tracked: its pages count as written).
pub fn arm(uffd: &OwnedFd, pid: pid_t, ranges: &[(u64, u64)]) -> usize {
    let mut ok = 0;
    for &(s, e) in ranges {
        let r = sys::uffd::register_wp(uffd.as_fd(), s, e - s)
            .and_then(|()| sys::uffd::write_protect(uffd.as_fd(), s, e - s));
        match r {
            Ok(()) => ok += 1,
            Err(err) => debug!(pid, start = format!("{s:#x}"), %err, "not tracked"),
        }
    }
    ok
}

/// Pages written since the last protection in `[start, end)` (a range registered
/// for tracking), protected again by the same call.
pub fn written(pagemap: &File, start: u64, end: u64) -> Result<Vec<(u64, u64)>, sys::SysError> {
    sys::pagemap_scan_written(pagemap, start, end, true)
}

/// Starts `ckpt-agent __hold-uffd` with `fds`' userfaultfds as its descriptors
/// 3, 4, …, in a session of its own. It is not waited for: it outlives us.
fn spawn_holder(fds: &[(pid_t, u64, OwnedFd)]) -> std::io::Result<pid_t> {
    let exe = std::env::current_exe()?;
    let mut cmd = std::process::Command::new(exe);
    cmd.arg("__hold-uffd")
        .args(fds.iter().map(|(p, _, _)| p.to_string()))
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    let held: Vec<&OwnedFd> = fds.iter().map(|(_, _, f)| f).collect();
    let child = sys::spawn::spawn_with_fds(&mut cmd, &held)?;
    let holder_pid = child.id() as pid_t;
    // The holder is not waited for here: it outlives this command.
    std::mem::forget(child);
    Ok(holder_pid)
}

/// Ends an older holder once a new one holds what it held (by PID and start
/// time; never by name).
pub fn retire(holder_pid: pid_t, holder_start: u64) {
    let same = proc::stat(holder_pid)
        .map(|s| s.start_time == holder_start)
        .unwrap_or(false);
    if same {
        let _ = sys::kill(holder_pid, libc::SIGKILL);
    }
}

/// `ckpt-agent __hold-uffd PID...`: holds descriptors 3.. until every PID has exited.
pub fn hold(pids: &[pid_t]) -> ! {
    let pidfds: Vec<OwnedFd> = pids
        .iter()
        .filter_map(|&p| sys::pidfd_open(p).ok())
        .collect();
    // Do not pin the directory we were started in.
    let _ = std::env::set_current_dir("/");
    sys::spawn::wait_all_exited(&pidfds);
    drop(pidfds);
    // Exiting closes descriptors 3.., which ends the tracking.
    std::process::exit(0)
}
