//! The controller's local API: what `ckpt-controller job ...` and `ckpt ...` send
//! over its UNIX socket, one JSON request per connection, answered by JSON lines
//! (progress events, then one final line).
//!
//! Who asks is read from the socket (`SO_PEERCRED`), not from the request: a user
//! may act only on their own jobs and checkpoints, root on all.

use serde::{Deserialize, Serialize};

use ckpt_shared::catalog::JobManifest;

/// A request.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// The running jobs, their ranks and nodes.
    Jobs,
    /// The connected agents.
    Nodes,
    /// Save a job; with `wait`, answer with progress and the outcome, otherwise
    /// answer as soon as it started.
    Save {
        job: String,
        kill: bool,
        wait: bool,
        /// Overrides the job's policy for connections that leave it.
        #[serde(default)]
        external_tcp: Option<ckpt_shared::proto::ExternalTcp>,
    },
    /// Restore checkpoint `ckpt` (an id, or `JOB:latest`); `place` maps ranks to
    /// nodes (empty: every rank on the node it was saved on).
    Restore {
        ckpt: String,
        #[serde(default)]
        nodes: Vec<String>,
        #[serde(default)]
        map: Vec<(u32, String)>,
    },
    /// The committed checkpoints (of `job`, if given).
    Ckpts {
        job: Option<String>,
    },
    Show {
        ckpt: String,
    },
    Remove {
        ckpt: String,
    },
    /// Keep the newest `keep` checkpoints of `job`, remove the rest.
    Prune {
        job: String,
        keep: usize,
    },
    /// Delete the chunks no image references (root only).
    Gc,
}

/// A rank of a running job.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct RankView {
    pub rank: u32,
    pub node: String,
    pub pid: i32,
}

/// A running job.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JobView {
    pub job: String,
    pub uid: u32,
    pub ranks: Vec<RankView>,
    /// The latest committed checkpoint.
    pub latest: Option<String>,
    /// The job's policy for connections that leave it, as its ranks were
    /// attached (`fail` if they disagree).
    #[serde(default)]
    pub external_tcp: Option<ckpt_shared::proto::ExternalTcp>,
}

/// A connected agent.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NodeView {
    pub name: String,
    pub addrs: Vec<String>,
    pub kernel: String,
    pub ranks: usize,
}

/// What a finished save or restore reports.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Outcome {
    pub ckpt: String,
    pub job: String,
    pub ranks: usize,
    pub nodes: Vec<String>,
    /// Save: how long the job stood still; restore: from RESTORE to released.
    pub freeze_ms: f64,
    pub total_ms: f64,
    pub memory_bytes: u64,
    pub stored_bytes: u64,
    /// Restore: the new PIDs, per rank.
    #[serde(default)]
    pub pids: Vec<RankView>,
}

/// One line of an answer.
// A few events per answer, never held in bulk: the size of `Done` costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    /// A phase of a save or restore advanced: `done` of `of` nodes answered.
    Progress {
        phase: String,
        done: usize,
        of: usize,
        ranks: usize,
        bytes: u64,
    },
    /// The last line: success with its payload, or the error.
    Done(Done),
}

/// The last line of an answer.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Done {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outcome: Option<Outcome>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub jobs: Vec<JobView>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nodes: Vec<NodeView>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ckpts: Vec<JobManifest>,
    /// A line for the user (gc's report).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

impl Done {
    pub fn ok() -> Done {
        Done {
            ok: true,
            ..Done::default()
        }
    }
}

impl Event {
    pub fn ok() -> Event {
        Event::Done(Done::ok())
    }
    pub fn error(e: impl std::fmt::Display) -> Event {
        Event::Done(Done {
            ok: false,
            error: Some(e.to_string()),
            ..Done::default()
        })
    }
}
