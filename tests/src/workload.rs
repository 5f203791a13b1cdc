//! The workload programs of `tests/workloads/`, and starting them.
//!
//! C workloads are compiled with `gcc -O1 -g -pthread` into a cache directory
//! (`$CKPT_WORKLOAD_CACHE`, by default `<tmp>/ckpt-workloads/`), one binary per
//! content hash of the source and the headers beside it, so an edited workload is
//! rebuilt and an unchanged one is compiled once per machine. A binary is written
//! under a temporary name and renamed into place, never rewritten: an image
//! records the inode and mtime of the executable it maps, and a restore that finds
//! another file there is right to refuse it. Within one test process a mutex makes
//! concurrent tests wait for one compilation instead of racing.
//!
//! Python workloads (`*.py`) are not compiled; they run as `python3 -u SCRIPT`.
//! MPI workloads (`mpi_*.c`) are compiled with Open MPI's `mpicc` wrapper (the
//! same flags) and started under `mpirun` by their tests.

use std::collections::hash_map::DefaultHasher;
use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs::{self, OpenOptions};
use std::hash::{Hash, Hasher};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Mutex, OnceLock};

use anyhow::{bail, Context, Result};

use crate::process::{become_subreaper, ProcGuard};

/// The flags every C workload is built with.
const CFLAGS: &[&str] = &["-O1", "-g", "-pthread", "-Wall"];

/// The directory of the workload sources.
pub fn workloads_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("workloads")
}

fn cache_dir() -> PathBuf {
    std::env::var_os("CKPT_WORKLOAD_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| std::env::temp_dir().join("ckpt-workloads"))
}

/// The runnable file of workload `name`: `name` is `counter` for `counter.c`, or
/// `stateful.py` for a Python script (returned as is). Compiles a C workload on
/// first use; a compilation error carries gcc's output.
pub fn workload(name: &str) -> Result<PathBuf> {
    static BUILT: OnceLock<Mutex<HashMap<String, PathBuf>>> = OnceLock::new();
    let dir = workloads_dir();
    if name.ends_with(".py") {
        let script = dir.join(name);
        if !script.is_file() {
            bail!("no Python workload {}", script.display());
        }
        return Ok(script);
    }
    let mut built = BUILT
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    if let Some(path) = built.get(name) {
        return Ok(path.clone());
    }
    let source = dir.join(format!("{name}.c"));
    let text =
        fs::read(&source).with_context(|| format!("reading workload {}", source.display()))?;

    // Key: the source, every header beside it, and the flags.
    let mut hasher = DefaultHasher::new();
    name.hash(&mut hasher);
    text.hash(&mut hasher);
    CFLAGS.hash(&mut hasher);
    let mut headers: Vec<PathBuf> = fs::read_dir(&dir)
        .with_context(|| format!("listing {}", dir.display()))?
        .filter_map(|e| Some(e.ok()?.path()))
        .filter(|p| p.extension() == Some(OsStr::new("h")))
        .collect();
    headers.sort();
    for h in &headers {
        h.file_name().hash(&mut hasher);
        fs::read(h)
            .with_context(|| format!("reading {}", h.display()))?
            .hash(&mut hasher);
    }
    let cache = cache_dir();
    fs::create_dir_all(&cache).with_context(|| format!("creating {}", cache.display()))?;
    let binary = cache.join(format!("{name}-{:016x}", hasher.finish()));

    if !binary.is_file() {
        let tmp = cache.join(format!(
            ".{name}-{}-{:?}.tmp",
            std::process::id(),
            std::thread::current().id()
        ));
        let cc = if name.starts_with("mpi_") {
            "mpicc"
        } else {
            "gcc"
        };
        let out = Command::new(cc)
            .args(CFLAGS)
            .arg("-o")
            .arg(&tmp)
            .arg(&source)
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("running {cc} (is it installed?)"))?;
        if !out.status.success() {
            let _ = fs::remove_file(&tmp);
            bail!(
                "{cc} failed to build workload {} ({}):\n{}{}",
                source.display(),
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        // Another test process may have won the race; either binary is the same.
        if binary.is_file() {
            let _ = fs::remove_file(&tmp);
        } else {
            fs::rename(&tmp, &binary)
                .with_context(|| format!("moving {} into place", binary.display()))?;
        }
    }
    built.insert(name.to_owned(), binary.clone());
    Ok(binary)
}

/// Starts workload `name` with `args`, as the root of a new session (so the tree is
/// self-contained: its session and process group are its own), with stdin from
/// `/dev/null` and stdout and stderr appended to the file `log` (created if need
/// be). The working directory is the log's directory.
///
/// The log is a file and not a pipe to the test: a pipe's other end would be
/// outside the dumped tree. Workloads write their lines with one `write(2)` each,
/// so the log shows progress at once. Returns a guard that kills the root.
pub fn spawn_workload<I, S>(name: &str, args: I, log: &Path) -> Result<ProcGuard>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let program = workload(name)?;
    let mut cmd = if name.ends_with(".py") {
        let mut c = Command::new("python3");
        c.arg("-u").arg(&program);
        c
    } else {
        Command::new(&program)
    };
    cmd.args(args);
    spawn_command(cmd, log).with_context(|| format!("starting workload {}", program.display()))
}

/// Starts the executable at `program` (a C workload copied elsewhere, for instance)
/// with `args`, set up exactly as [`spawn_workload`] sets up a workload: its own
/// session, stdin from `/dev/null`, stdout and stderr appended to `log`, the log's
/// directory as working directory, and only fds 0-2 open. Returns a guard that kills
/// it.
pub fn spawn_program<I, S>(program: &Path, args: I, log: &Path) -> Result<ProcGuard>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let mut cmd = Command::new(program);
    cmd.args(args);
    spawn_command(cmd, log).with_context(|| format!("starting {}", program.display()))
}

/// The set-up both spawners share: session, stdio to `log`, working directory, only
/// fds 0-2 inherited, and this test process as the subreaper.
fn spawn_command(cmd: Command, log: &Path) -> Result<ProcGuard> {
    let mut cmd = prepare_command(cmd, log)?;
    become_subreaper();
    let child = cmd.spawn()?;
    Ok(ProcGuard::new(child))
}

/// Sets `cmd` up as a workload (its own session, stdin from `/dev/null`, stdout and
/// stderr appended to `log`, the log's directory as working directory, only fds
/// 0-2 inherited) without starting it: for spawners of their own, such as the test
/// cluster's, which starts it inside a node.
pub fn workload_command<I, S>(name: &str, args: I, log: &Path) -> Result<Command>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let program = workload(name)?;
    let mut cmd = Command::new(&program);
    cmd.args(args);
    prepare_command(cmd, log)
}

/// A program that is not one of ours (`memcached`), started like a workload:
/// output to `log`, its own session, no stray descriptors.
pub fn program_command<I, S>(program: &str, args: I, log: &Path) -> Result<Command>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let mut cmd = Command::new(program);
    cmd.args(args);
    prepare_command(cmd, log)
}

fn prepare_command(mut cmd: Command, log: &Path) -> Result<Command> {
    let out = OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .with_context(|| format!("opening log {}", log.display()))?;
    let err = out.try_clone().context("duplicating the log descriptor")?;
    cmd.stdin(Stdio::null()).stdout(out).stderr(err);
    if let Some(dir) = log.parent().filter(|d| !d.as_os_str().is_empty()) {
        cmd.current_dir(dir);
    }
    cmd.env_remove("CKPT_FAULT");
    // SAFETY: the closure runs in the forked child before exec and makes only
    // async-signal-safe system calls (setsid, close_range, fcntl) on plain integers.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            mark_inherited_fds_cloexec();
            Ok(())
        });
    }
    Ok(cmd)
}

/// Marks every descriptor above 2 close-on-exec, in the child between fork and exec.
///
/// The test process holds descriptors that are not close-on-exec and mean nothing to
/// a workload: cargo's jobserver pipe above all. A workload that inherited one would
/// hold a pipe to a process outside its tree, which the dumper rightly refuses. So
/// the workload starts with fds 0, 1 and 2 only. CLOSE_RANGE_CLOEXEC (Linux 5.11)
/// rather than closing them: std's own exec-error pipe must stay open until exec.
fn mark_inherited_fds_cloexec() {
    // SAFETY: close_range with CLOSE_RANGE_CLOEXEC only sets flags on descriptors;
    // it touches no memory.
    let r = unsafe {
        libc::syscall(
            libc::SYS_close_range,
            3 as libc::c_uint,
            libc::c_uint::MAX,
            libc::CLOSE_RANGE_CLOEXEC,
        )
    };
    if r == 0 {
        return;
    }
    // Older kernels: walk the usual range by hand.
    for fd in 3..4096 {
        // SAFETY: fcntl on a descriptor number; an unused number just fails (EBADF).
        unsafe {
            libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC);
        }
    }
}

/// Creates a FIFO at `path` (mode 0600), as `blocked_read` expects.
pub fn mkfifo(path: &Path) -> Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).context("FIFO path has a NUL")?;
    // SAFETY: `c` is a valid NUL-terminated string that outlives the call.
    if unsafe { libc::mkfifo(c.as_ptr(), 0o600) } != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("mkfifo {}", path.display()));
    }
    Ok(())
}

/// Writes `data` to the FIFO at `path` in one write. Opens it without blocking, so
/// a FIFO that nobody reads is an error ("no reader", ENXIO) rather than a hang.
pub fn write_fifo(path: &Path, data: &[u8]) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .with_context(|| format!("opening FIFO {} for writing (no reader?)", path.display()))?;
    let n = f
        .write(data)
        .with_context(|| format!("writing to FIFO {}", path.display()))?;
    if n != data.len() {
        bail!(
            "short write to FIFO {}: {n} of {} bytes",
            path.display(),
            data.len()
        );
    }
    Ok(())
}
