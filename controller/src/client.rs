//! The client side of the local API ([`crate::api`]): what the `job` and `ckpt`
//! commands do, and how they show progress and outcomes (used by the CLI and by
//! the demo alike, so neither depends on the other).

use std::io::{BufRead, IsTerminal, Write};
use std::path::Path;

use ckpt_shared::outln;
use ckpt_shared::stdout::StdoutError;

use crate::api::{Done, Event, Request};
use crate::munge::MungeError;

/// A request to the controller that did not get its answer, or was refused.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(
        "cannot reach the controller at {}: is `ckpt-controller serve` running \
         (and is this its --socket)? From another host, use --controller HOST:PORT",
        socket.display()
    )]
    ConnectSocket {
        socket: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot reach the controller's TCP API at {addr} (its api_listen)")]
    ConnectTcp {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("encoding the request")]
    Encode {
        #[source]
        source: serde_json::Error,
    },
    #[error(transparent)]
    Munge(#[from] MungeError),
    #[error("sending the request to the controller")]
    Send {
        #[source]
        source: std::io::Error,
    },
    #[error("reading the controller's answer")]
    Read {
        #[source]
        source: std::io::Error,
    },
    #[error("bad answer: {line:?}")]
    BadAnswer {
        line: String,
        #[source]
        source: serde_json::Error,
    },
    /// The controller's own words: they say what to do.
    #[error("{reason}")]
    Refused { reason: String },
    #[error("the controller closed the connection without an answer")]
    NoAnswer,
}

/// Where the controller's API is.
#[derive(Debug, Clone)]
pub enum Target {
    /// Its local socket (the caller is known by SO_PEERCRED).
    Local(std::path::PathBuf),
    /// Its TCP API at `addr` (host:port), with a MUNGE credential from `munged`.
    Munge {
        addr: String,
        socket: Option<std::path::PathBuf>,
    },
}

/// Sends `req` to the local socket and hands every progress event to `progress`;
/// returns the final event, or an error if the controller refused or failed.
pub fn call(
    socket: &Path,
    req: &Request,
    progress: impl FnMut(&Event),
) -> Result<Event, ClientError> {
    call_at(&Target::Local(socket.to_path_buf()), req, progress)
}

/// [`call`] to any [`Target`].
pub fn call_at(
    target: &Target,
    req: &Request,
    mut progress: impl FnMut(&Event),
) -> Result<Event, ClientError> {
    let stream: Box<dyn ReadWrite> = match target {
        Target::Local(socket) => Box::new(
            std::os::unix::net::UnixStream::connect(socket).map_err(|source| {
                ClientError::ConnectSocket {
                    socket: socket.clone(),
                    source,
                }
            })?,
        ),
        Target::Munge { addr, .. } => {
            Box::new(std::net::TcpStream::connect(addr).map_err(|source| {
                ClientError::ConnectTcp {
                    addr: addr.clone(),
                    source,
                }
            })?)
        }
    };
    let encode = |source| ClientError::Encode { source };
    let mut line = match target {
        Target::Local(_) => serde_json::to_string(req).map_err(encode)?,
        Target::Munge { socket, .. } => {
            let payload = serde_json::to_string(req).map_err(encode)?;
            let cred = crate::munge::encode(socket.as_deref(), &payload)?;
            serde_json::to_string(&serde_json::json!({ "munge": cred })).map_err(encode)?
        }
    };
    line.push('\n');
    let mut stream = stream;
    stream
        .write_all(line.as_bytes())
        .map_err(|source| ClientError::Send { source })?;
    for l in std::io::BufReader::new(stream).lines() {
        let l = l.map_err(|source| ClientError::Read { source })?;
        let ev: Event = match serde_json::from_str(&l) {
            Ok(ev) => ev,
            Err(source) => return Err(ClientError::BadAnswer { line: l, source }),
        };
        match &ev {
            Event::Progress { .. } => progress(&ev),
            Event::Done(Done {
                ok: false, error, ..
            }) => {
                return Err(ClientError::Refused {
                    reason: error.clone().unwrap_or_else(|| "failed".into()),
                })
            }
            Event::Done(_) => return Ok(ev),
        }
    }
    Err(ClientError::NoAnswer)
}

/// A stream to the controller.
pub trait ReadWrite: std::io::Read + std::io::Write {}
impl<T: std::io::Read + std::io::Write> ReadWrite for T {}

/// Human-readable bytes.
pub fn human(b: u64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < units.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", units[u])
    }
}

/// Prints the summary of a finished save or restore.
pub fn print_outcome(what: &str, o: &crate::api::Outcome) -> Result<(), StdoutError> {
    outln!(
        "{what} {} of job {}: {} ranks on {}",
        o.ckpt,
        o.job,
        o.ranks,
        o.nodes.join(",")
    );
    if what == "saved" {
        outln!(
            "  job stood still {:.1} ms; total {:.1} ms; memory {}, stored {} ({}/s)",
            o.freeze_ms,
            o.total_ms,
            human(o.memory_bytes),
            human(o.stored_bytes),
            human((o.memory_bytes as f64 / (o.total_ms.max(0.001) / 1e3)) as u64)
        );
    } else {
        outln!(
            "  released after {:.1} ms; memory {}",
            o.total_ms,
            human(o.memory_bytes)
        );
        for p in &o.pids {
            outln!("  rank {:>4} on {:<12} PID {}", p.rank, p.node, p.pid);
        }
    }
    Ok(())
}

/// Progress on stderr: one bar redrawn in place on a terminal, one line per step
/// otherwise (logs of batch jobs).
pub struct Bar {
    tty: bool,
    last: String,
}

impl Default for Bar {
    fn default() -> Self {
        Bar {
            tty: std::io::stderr().is_terminal(),
            last: String::new(),
        }
    }
}

impl Bar {
    pub fn show(&mut self, ev: &Event) {
        let Event::Progress {
            phase,
            done,
            of,
            ranks,
            bytes,
        } = ev
        else {
            return;
        };
        let width = 20;
        let filled = if *of == 0 { 0 } else { done * width / of };
        let bar: String = "#".repeat(filled) + &"-".repeat(width - filled);
        let text = format!(
            "{phase:<8} [{bar}] {done}/{of} nodes, {ranks} ranks, {}",
            human(*bytes)
        );
        if text == self.last {
            return;
        }
        if self.tty {
            eprint!("\r{text}\x1b[K");
        } else {
            eprintln!("{text}");
        }
        self.last = text;
    }

    pub fn finish(&mut self) {
        if self.tty && !self.last.is_empty() {
            eprintln!();
        }
        self.last.clear();
    }
}
