//! Running `ckpt-agent` from tests.
//!
//! The agent runs with its stdout and stderr piped to the test and a deadline
//! ([`AGENT_TIMEOUT`] by default), after which it is killed and the test fails with
//! what it printed so far. The pipes are drained by threads while it runs, so a
//! chatty agent cannot block on a full pipe. After it exits the threads get a few
//! seconds more to see end of file; if a process it left behind (a restored tree)
//! still holds the pipes, the output read so far is used and a warning printed,
//! since a restored tree should not inherit the restore command's pipes.

use std::io::Read;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Command, ExitStatus, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::process::{become_subreaper, PidsGuard, ProcGuard};
use crate::wait_for;

/// Default deadline of one agent command.
pub const AGENT_TIMEOUT: Duration = Duration::from_secs(60);

/// How long the pipe readers may take after the agent exited.
const DRAIN_GRACE: Duration = Duration::from_secs(5);

/// The result of one agent command, with helpers for assertions.
#[derive(Debug, Clone)]
pub struct AgentRun {
    pub args: Vec<String>,
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl AgentRun {
    pub fn success(&self) -> bool {
        self.status.success()
    }

    /// A description for assertion messages: command, status, stdout and stderr.
    pub fn describe(&self) -> String {
        format!(
            "`ckpt-agent {}` exited with {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.args.join(" "),
            self.status,
            self.stdout.trim_end(),
            self.stderr.trim_end()
        )
    }

    /// Fails unless the command succeeded.
    pub fn ok(self) -> Result<AgentRun> {
        if !self.success() {
            bail!("{}", self.describe());
        }
        Ok(self)
    }

    /// The first line of stderr that starts with `ckpt-agent: error:` (the error
    /// as the user reads it, with its causes), or an empty string when there is none.
    pub fn error_line(&self) -> String {
        self.stderr
            .lines()
            .find(|l| l.starts_with("ckpt-agent: error:"))
            .unwrap_or_default()
            .to_string()
    }

    /// Its stdout parsed as JSON (a `--json` command); `what` names the command
    /// in the error, which also shows the whole run.
    pub fn json(&self, what: &str) -> Result<serde_json::Value> {
        serde_json::from_str(&self.stdout)
            .with_context(|| format!("{what} printed no JSON: {}", self.describe()))
    }
}

impl From<AgentRun> for Output {
    fn from(r: AgentRun) -> Output {
        Output {
            status: r.status,
            stdout: r.stdout.into_bytes(),
            stderr: r.stderr.into_bytes(),
        }
    }
}

fn drain(mut from: impl Read + Send + 'static) -> (Arc<Mutex<Vec<u8>>>, thread::JoinHandle<()>) {
    let buf = Arc::new(Mutex::new(Vec::new()));
    let sink = Arc::clone(&buf);
    let handle = thread::spawn(move || {
        let mut chunk = [0u8; 8192];
        loop {
            match from.read(&mut chunk) {
                Ok(0) | Err(_) => break,
                Ok(n) => sink
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .extend_from_slice(&chunk[..n]),
            }
        }
    });
    (buf, handle)
}

/// Runs `bin args...` with [`AGENT_TIMEOUT`].
pub fn run_agent(bin: &Path, args: &[&str]) -> Result<AgentRun> {
    run_agent_env(bin, args, &[], AGENT_TIMEOUT)
}

/// Runs `bin args...` with extra environment variables and a deadline. `CKPT_FAULT`
/// and `CKPT_FILL` are removed from the inherited environment unless `env` sets
/// them, so a variable left in a developer's shell cannot change every run. Fails only if the agent could
/// not be started or ran past `timeout` (then it is killed); an agent that exits
/// non-zero is an `Ok` whose [`AgentRun::success`] is false.
pub fn run_agent_env(
    bin: &Path,
    args: &[&str],
    env: &[(&str, &str)],
    timeout: Duration,
) -> Result<AgentRun> {
    become_subreaper();
    let mut cmd = Command::new(bin);
    cmd.args(args)
        .env_remove("CKPT_FAULT")
        .env_remove("CKPT_FILL")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    let (out, out_h) = drain(child.stdout.take().expect("piped stdout"));
    let (err, err_h) = drain(child.stderr.take().expect("piped stderr"));

    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(s) = child.try_wait().context("waiting for ckpt-agent")? {
            break Some(s);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        thread::sleep(Duration::from_millis(5));
    };
    let drained = wait_for(|| out_h.is_finished() && err_h.is_finished(), DRAIN_GRACE);
    let text = |b: &Arc<Mutex<Vec<u8>>>| {
        String::from_utf8_lossy(&b.lock().unwrap_or_else(|e| e.into_inner())).into_owned()
    };
    let (stdout, stderr) = (text(&out), text(&err));
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    let Some(status) = status else {
        bail!(
            "`ckpt-agent {}` ran past {timeout:?} and was killed\n--- stdout ---\n{}\n--- stderr ---\n{}",
            args.join(" "),
            stdout.trim_end(),
            stderr.trim_end()
        );
    };
    if !drained {
        eprintln!(
            "ckpt-tests: `ckpt-agent {}` exited but its stdout/stderr are still open \
             (inherited by a process it left behind?)",
            args.join(" ")
        );
    }
    Ok(AgentRun {
        args,
        status,
        stdout,
        stderr,
    })
}

/// The PID that `ckpt-agent restore` printed as the last line of its stdout.
pub fn last_line_pid(run: &AgentRun) -> Result<i32> {
    let last = run
        .stdout
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .with_context(|| format!("no PID on stdout\n{}", run.describe()))?;
    last.trim()
        .parse()
        .with_context(|| format!("last stdout line {last:?} is not a PID\n{}", run.describe()))
}

/// `ckpt-agent inspect --image DIR --json`, parsed.
pub fn inspect_json(bin: &Path, image: &Path) -> Result<serde_json::Value> {
    let image = image.to_str().context("image path is not UTF-8")?;
    let run = run_agent(bin, &["inspect", "--image", image, "--json"])?.ok()?;
    serde_json::from_str(&run.stdout)
        .with_context(|| format!("inspect --json printed invalid JSON\n{}", run.describe()))
}

/// The runs of ASCII digits in `s`: an agent's message names a PID or a descriptor
/// number somewhere in its text, and a test checks that the number is among these
/// (rather than a substring, which `12` would also be of `4121`).
pub fn digits_tokens(s: &str) -> Vec<&str> {
    s.split(|c: char| !c.is_ascii_digit())
        .filter(|w| !w.is_empty())
        .collect()
}

/// `ckpt-agent dump --pid PID --image IMAGE extra...` with `env`, with
/// [`AGENT_TIMEOUT`].
pub fn run_dump(
    bin: &Path,
    pid: i32,
    image: &Path,
    extra: &[&str],
    env: &[(&str, &str)],
) -> Result<AgentRun> {
    let pid = pid.to_string();
    let mut args = vec!["dump", "--pid", &pid, "--image", crate::path_str(image)?];
    args.extend_from_slice(extra);
    run_agent_env(bin, &args, env, AGENT_TIMEOUT)
}

/// `ckpt-agent restore --image IMAGE extra...` with `env`, with [`AGENT_TIMEOUT`].
pub fn run_restore(
    bin: &Path,
    image: &Path,
    extra: &[&str],
    env: &[(&str, &str)],
) -> Result<AgentRun> {
    let mut args = vec!["restore", "--image", crate::path_str(image)?];
    args.extend_from_slice(extra);
    run_agent_env(bin, &args, env, AGENT_TIMEOUT)
}

/// Points `root` at the root PID a restore printed, if it printed one, so that the
/// restored tree is killed with the test; call it before checking anything else
/// about the run.
pub fn guard_restored(run: &AgentRun, root: &mut ProcGuard) {
    if let Ok(pid) = last_line_pid(run) {
        root.set_pid(pid);
    }
}

/// After a kill-mode dump that succeeded (`run`): checks that the root was
/// SIGKILLed (when it is our child, so that its status is known) and reaped, that
/// every descendant is gone within `timeout` (so that their PIDs are free for the
/// restore), and that the image at `image` has its manifest committed.
pub fn expect_killed_by_dump(
    run: &AgentRun,
    root: &mut ProcGuard,
    descendants: &PidsGuard,
    image: &Path,
    timeout: Duration,
) -> Result<()> {
    let status = root
        .wait_exit(timeout)
        .with_context(|| format!("the root survived the dump\n{}", run.describe()))?;
    if let Some(status) = status {
        anyhow::ensure!(
            status.signal() == Some(libc::SIGKILL),
            "the root should have been SIGKILLed by the dump, it ended with {status}"
        );
    }
    let left = descendants.wait_gone(timeout);
    anyhow::ensure!(left.is_empty(), "processes {left:?} survived the dump");
    anyhow::ensure!(
        image.join("manifest.ckpt").is_file(),
        "the dump succeeded but committed no manifest\n{}",
        run.describe()
    );
    Ok(())
}
