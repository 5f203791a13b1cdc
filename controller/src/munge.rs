//! MUNGE credentials for the controller's TCP API, the way Slurm proves users
//! across hosts: the CLI asks the local `munged` (through `munge`) for a credential
//! that carries the request as its payload; the controller has its `munged` decode
//! it (through `unmunge`), which yields the caller's UID, proves the payload was not
//! changed, and refuses a credential that is expired or used a second time. Both
//! hosts share the MUNGE key, as the nodes of a Slurm cluster do.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};

/// A credential that could not be made or was not accepted.
#[derive(Debug, thiserror::Error)]
pub enum MungeError {
    #[error("running `{program}`{hint}")]
    Spawn {
        program: &'static str,
        /// What to do about it, when the program may simply be missing.
        hint: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("handing the credential to `unmunge`")]
    Pipe {
        #[source]
        source: std::io::Error,
    },
    #[error("munge could not make a credential: {stderr}")]
    Encode { stderr: String },
    #[error("the MUNGE credential was refused: {why}")]
    Refused { why: String },
    #[error("unmunge gave no UID")]
    NoUid,
}

fn with_socket(cmd: &mut Command, socket: Option<&Path>) {
    if let Some(s) = socket {
        cmd.arg("--socket").arg(s);
    }
}

/// A credential of the calling user with `payload`.
pub fn encode(socket: Option<&Path>, payload: &str) -> Result<String, MungeError> {
    let mut cmd = Command::new("munge");
    with_socket(&mut cmd, socket);
    cmd.arg("--string").arg(payload);
    let out = cmd.output().map_err(|source| MungeError::Spawn {
        program: "munge",
        hint: " (install the munge package, and run munged)",
        source,
    })?;
    if !out.status.success() {
        return Err(MungeError::Encode {
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// Decodes `cred`: the UID it proves and its payload. An invalid, expired or
/// replayed credential is an error that says which.
pub fn decode(socket: Option<&Path>, cred: &str) -> Result<(u32, Vec<u8>), MungeError> {
    let mut cmd = Command::new("unmunge");
    with_socket(&mut cmd, socket);
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| MungeError::Spawn {
            program: "unmunge",
            hint: "",
            source,
        })?;
    let pipe = |source| MungeError::Pipe { source };
    child
        .stdin
        .take()
        .expect("piped")
        .write_all(cred.as_bytes())
        .map_err(pipe)?;
    let out = child.wait_with_output().map_err(pipe)?;
    let text = String::from_utf8_lossy(&out.stdout);
    let field = |name: &str| {
        text.lines()
            .find(|l| l.starts_with(name))
            .map(|l| l[name.len()..].trim().to_string())
    };
    if !out.status.success() {
        let why = field("STATUS:")
            .unwrap_or_else(|| String::from_utf8_lossy(&out.stderr).trim().to_string());
        return Err(MungeError::Refused { why });
    }
    let uid = field("UID:")
        .and_then(|u| {
            let open = u.rfind('(')?;
            u[open + 1..].trim_end_matches(')').parse().ok()
        })
        .ok_or(MungeError::NoUid)?;
    // The payload follows the first empty line.
    let raw = &out.stdout;
    let start = raw
        .windows(2)
        .position(|w| w == b"\n\n")
        .map(|i| i + 2)
        .unwrap_or(raw.len());
    Ok((uid, raw[start..].to_vec()))
}
