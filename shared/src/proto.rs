//! Messages between the controller and the agents, and their frames.
//!
//! Every message travels in the envelope of [`crate::codec`] (magic, version,
//! kind, length, BLAKE3, MessagePack with field names) behind a 4-byte length, and
//! is at most [`MAX_FRAME`] bytes: a peer that sends more, or garbage, is refused
//! before anything is allocated for it. The messages carry the protocol version in
//! [`Hello`]; an agent and a controller of different versions refuse each other at
//! the handshake with a message that names both.
//!
//! This is the vocabulary of the barrier (../shared/DESIGN.md, "Data flow of a checkpoint");
//! the state machine that speaks it is `ckpt_controller::barrier`.

use serde::{Deserialize, Serialize};

use crate::codec::{self, CodecError};

/// Version of this protocol.
pub const PROTO_VERSION: u32 = 1;

/// Largest frame accepted or sent (length prefix excluded).
pub const MAX_FRAME: usize = 16 << 20;

/// Envelope kind of controller-to-agent messages.
pub const KIND_TO_AGENT: [u8; 4] = *b"C2AG";
/// Envelope kind of agent-to-controller messages.
pub const KIND_TO_CONTROLLER: [u8; 4] = *b"AG2C";

/// One checkpoint attempt of a job; every message of the barrier names it, and a
/// message of another attempt is ignored.
pub type AttemptId = u64;

/// A rank of a job on its node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RankRef {
    pub rank: u32,
    pub pid: i32,
}

/// The first message on a connection, each way.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    pub proto_version: u32,
    /// The node name (an agent) or "controller".
    pub name: String,
}

/// What a node is, as its agent registers it: the controller places restored ranks
/// only on nodes whose kernel and CPU match the image's.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeInfo {
    pub name: String,
    /// Its IP addresses (not loopback).
    pub addrs: Vec<String>,
    /// `uname -r`.
    pub kernel: String,
    /// CPU model name and the XSAVE features the kernel enables (XCR0).
    pub cpu: String,
    pub agent_version: String,
}

/// What a save does with a TCP connection whose other end is not a rank of the
/// job (a server outside it, say): such a connection cannot be moved.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ExternalTcp {
    /// The save aborts, naming the connections, and the job runs on.
    #[default]
    Fail,
    /// The save goes on; a restore gives the application such a connection as
    /// reset by its peer (an ordinary connection error).
    Close,
}

impl std::str::FromStr for ExternalTcp {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "fail" => Ok(ExternalTcp::Fail),
            "close" => Ok(ExternalTcp::Close),
            _ => Err(format!("{s:?}: the policy is fail or close")),
        }
    }
}

impl std::fmt::Display for ExternalTcp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ExternalTcp::Fail => "fail",
            ExternalTcp::Close => "close",
        })
    }
}

/// A rank attached to an agent: a process tree that belongs to a job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttachedRank {
    pub job: String,
    pub rank: u32,
    pub pid: i32,
    /// Owner of the process (its real uid): only they, or root, may act on the job.
    pub uid: u32,
    /// The job's policy for connections that leave it, if the rank was attached
    /// with one (`ckpt-agent attach --external-tcp`).
    #[serde(default)]
    pub external_tcp: Option<ExternalTcp>,
}

/// How one save of a job is made.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SaveSpec {
    pub job: String,
    /// The checkpoint's id; rank N's image is `<store>/<ckpt>.r<N>`.
    pub ckpt: String,
    /// The store (`file:///...` or `s3://bucket/prefix`).
    pub store: crate::objstore::StoreUrl,
    /// Keep the ranks frozen while they are stored, and kill them once committed.
    pub kill: bool,
    /// zstd level of the chunks; `None` stores them raw.
    pub zstd_level: Option<i32>,
    /// How to reach the store, as the controller is configured (its `[s3]`
    /// settings, or its environment): what it leaves unset, the agent takes from
    /// its own ([`crate::objstore::StoreConfig::or`]).
    #[serde(default)]
    pub store_config: Box<crate::objstore::StoreConfig>,
}

impl SaveSpec {
    /// The image of rank `rank` of this checkpoint.
    pub fn image_of(&self, rank: u32) -> crate::location::Location {
        crate::location::Location::Named {
            store: self.store.clone(),
            name: rank_image_name(&self.ckpt, rank),
        }
    }
}

/// The image URL of rank `rank` of checkpoint `ckpt` in `store`.
pub fn rank_image(store: &str, ckpt: &str, rank: u32) -> String {
    format!(
        "{}/{}",
        store.trim_end_matches('/'),
        rank_image_name(ckpt, rank)
    )
}

/// The image name (in its store) of rank `rank` of checkpoint `ckpt`.
pub fn rank_image_name(ckpt: &str, rank: u32) -> String {
    format!("{ckpt}.r{rank}")
}

/// A rank to rebuild.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RestoreRank {
    pub rank: u32,
    /// Its image.
    pub image: crate::location::Location,
    /// New 4-tuples for its TCP connections (old → new), when it or its peers move
    /// to other nodes: both ends of a connection inside the job get mirror images
    /// of the same new 4-tuple.
    #[serde(default)]
    pub readdress: Vec<(ConnRef, ConnRef)>,
    /// New addresses for its listening sockets (old → new).
    #[serde(default)]
    pub relisten: Vec<(std::net::SocketAddr, std::net::SocketAddr)>,
    /// For its connections whose other end is in the job (by old 4-tuple): the
    /// next sequence number that other end expects (its `rcv_nxt` at the cut).
    /// The rank's send queue is trimmed to start there.
    #[serde(default)]
    pub peer_recv: Vec<(ConnRef, u32)>,
    /// Its connections to peers outside the job, saved under `--external-tcp
    /// close`: they come back reset.
    #[serde(default)]
    pub reset: Vec<ConnRef>,
    /// The job's own policy, kept by the restored ranks.
    #[serde(default)]
    pub external_tcp: Option<ExternalTcp>,
}

/// One TCP connection of a rank, from its end.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConnRef {
    pub local: std::net::SocketAddr,
    pub remote: std::net::SocketAddr,
}

/// A rank's connection as saved: its 4-tuple and the bytes queued each way.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedConn {
    pub local: std::net::SocketAddr,
    pub remote: std::net::SocketAddr,
    /// Written by the rank, not yet acknowledged by the peer.
    #[serde(default)]
    pub send_queued: u64,
    /// Received, not yet read by the rank.
    #[serde(default)]
    pub recv_queued: u64,
    /// The sequence number of the first byte the rank's peer has not acknowledged
    /// (`snd_una`) and of the next byte it expects from its peer (`rcv_nxt`), as
    /// captured. A restore compares them with the other end's: bytes acknowledged
    /// after the network lock was taken are in both the sender's queue and the
    /// receiver's, and the sender's copy is dropped.
    #[serde(default)]
    pub send_una: Option<u32>,
    #[serde(default)]
    pub recv_nxt: Option<u32>,
    /// The other end is not a rank of the job (set at the commit, under
    /// `--external-tcp close`): a restore gives it back reset.
    #[serde(default)]
    pub external: bool,
}

/// What one rank's dump produced.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RankManifest {
    pub rank: u32,
    /// Where the rank's image is (a shared-store location).
    pub image: crate::location::Location,
    pub memory_bytes: u64,
    pub stored_bytes: u64,
    /// Its established TCP connections and listening addresses.
    #[serde(default)]
    pub tcp: Vec<SavedConn>,
    #[serde(default)]
    pub listen: Vec<std::net::SocketAddr>,
    /// The addresses its UDP sockets are bound to.
    #[serde(default)]
    pub udp: Vec<std::net::SocketAddr>,
}

/// Controller to agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ToAgent {
    Hello(Hello),
    /// Seize every thread of these ranks (and lock their connections); answer
    /// `Frozen`.
    Freeze {
        attempt: AttemptId,
        spec: SaveSpec,
        ranks: Vec<RankRef>,
    },
    /// Everyone is frozen: read the state; answer `Captured`.
    Capture {
        attempt: AttemptId,
    },
    /// Everyone has captured: let the ranks run on, and store; answer `Stored`.
    Resume {
        attempt: AttemptId,
    },
    /// Store while the ranks stay frozen (a save that kills); answer `Stored`.
    Store {
        attempt: AttemptId,
    },
    /// The checkpoint is committed: kill the ranks (a save that kills).
    Kill {
        attempt: AttemptId,
    },
    /// The attempt failed: thaw, unlock and detach; drop what was captured (a
    /// restore: kill what was rebuilt).
    Abort {
        attempt: AttemptId,
        reason: String,
    },
    /// Rebuild these ranks of `job` and hold them; answer `Rebuilt`.
    Restore {
        attempt: AttemptId,
        job: String,
        ranks: Vec<RestoreRank>,
        /// How to reach the store (as in [`SaveSpec::store_config`]).
        #[serde(default)]
        store_config: Box<crate::objstore::StoreConfig>,
    },
    /// Every rank of the restored job is rebuilt: release them; answer `Released`.
    Release {
        attempt: AttemptId,
    },
    /// The controller is alive: renews the agent's lease.
    Ping,
}

/// Agent to controller.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum FromAgent {
    Hello(Hello),
    Frozen {
        attempt: AttemptId,
    },
    Captured {
        attempt: AttemptId,
    },
    Stored {
        attempt: AttemptId,
        ranks: Vec<RankManifest>,
    },
    /// This agent cannot go on with the attempt.
    Failed {
        attempt: AttemptId,
        reason: String,
    },
    /// Sent once after `Hello`.
    Register(NodeInfo),
    /// Every rank attached to this agent now (sent after `Register` and on change).
    Ranks(Vec<AttachedRank>),
    /// Restore: every rank is rebuilt and held; their PIDs.
    Rebuilt {
        attempt: AttemptId,
        ranks: Vec<RankRef>,
    },
    Released {
        attempt: AttemptId,
    },
    /// Answer to `Ping`.
    Pong,
}

/// Errors of framing.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("frame of {len} bytes is larger than the limit of {MAX_FRAME}: not a ckpt peer?")]
    TooLarge { len: usize },
    #[error("frame is cut short: {have} of {need} bytes")]
    Short { have: usize, need: usize },
    #[error(transparent)]
    Codec(#[from] CodecError),
}

fn frame(kind: [u8; 4], value: &impl Serialize) -> Result<Vec<u8>, FrameError> {
    let body = codec::encode(kind, value)?;
    if body.len() > MAX_FRAME {
        return Err(FrameError::TooLarge { len: body.len() });
    }
    let mut out = Vec::with_capacity(4 + body.len());
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(&body);
    Ok(out)
}

/// The length of the frame that `prefix` (at least 4 bytes) starts, checked
/// against [`MAX_FRAME`] before anything is read for it.
pub fn frame_len(prefix: &[u8]) -> Result<usize, FrameError> {
    let Some(p) = prefix.get(..4) else {
        return Err(FrameError::Short {
            have: prefix.len(),
            need: 4,
        });
    };
    let len = u32::from_le_bytes(p.try_into().expect("4 bytes")) as usize;
    if len > MAX_FRAME {
        return Err(FrameError::TooLarge { len });
    }
    Ok(len)
}

fn unframe<T: serde::de::DeserializeOwned>(kind: [u8; 4], bytes: &[u8]) -> Result<T, FrameError> {
    let len = frame_len(bytes)?;
    let body = &bytes[4..];
    if body.len() != len {
        return Err(FrameError::Short {
            have: body.len(),
            need: len,
        });
    }
    Ok(codec::decode(kind, body)?)
}

impl ToAgent {
    pub fn to_frame(&self) -> Result<Vec<u8>, FrameError> {
        frame(KIND_TO_AGENT, self)
    }
    pub fn from_frame(bytes: &[u8]) -> Result<ToAgent, FrameError> {
        unframe(KIND_TO_AGENT, bytes)
    }
}

impl FromAgent {
    pub fn to_frame(&self) -> Result<Vec<u8>, FrameError> {
        frame(KIND_TO_CONTROLLER, self)
    }
    pub fn from_frame(bytes: &[u8]) -> Result<FromAgent, FrameError> {
        unframe(KIND_TO_CONTROLLER, bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip_through_frames() {
        let msgs = vec![
            ToAgent::Hello(Hello {
                proto_version: PROTO_VERSION,
                name: "controller".into(),
            }),
            ToAgent::Freeze {
                attempt: 7,
                spec: SaveSpec {
                    job: "job42".into(),
                    ckpt: "job42-7".into(),
                    store: crate::objstore::StoreUrl::parse("file:///var/lib/ckpt").unwrap(),
                    kill: false,
                    zstd_level: Some(1),
                    store_config: Default::default(),
                },
                ranks: vec![RankRef { rank: 0, pid: 4121 }],
            },
            ToAgent::Abort {
                attempt: 7,
                reason: "node b timed out in CAPTURE".into(),
            },
        ];
        for m in msgs {
            assert_eq!(ToAgent::from_frame(&m.to_frame().unwrap()).unwrap(), m);
        }
        let up = FromAgent::Stored {
            attempt: 7,
            ranks: vec![RankManifest {
                rank: 0,
                image: crate::location::Location::parse("s3://ckpt/c1/job42.7.r0").unwrap(),
                memory_bytes: 1 << 30,
                stored_bytes: 1 << 20,
                tcp: vec![],
                listen: vec![],
                udp: vec![],
            }],
        };
        assert_eq!(FromAgent::from_frame(&up.to_frame().unwrap()).unwrap(), up);
    }

    #[test]
    fn a_frame_of_the_other_direction_or_cut_short_or_too_long_is_refused() {
        let f = FromAgent::Frozen { attempt: 1 }.to_frame().unwrap();
        assert!(
            ToAgent::from_frame(&f).is_err(),
            "kinds are not interchangeable"
        );
        assert!(matches!(
            FromAgent::from_frame(&f[..f.len() - 1]),
            Err(FrameError::Short { .. })
        ));
        let mut huge = f.clone();
        huge[..4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            FromAgent::from_frame(&huge),
            Err(FrameError::TooLarge { .. })
        ));
        let mut flipped = f;
        let last = flipped.len() - 1;
        flipped[last] ^= 1;
        assert!(FromAgent::from_frame(&flipped).is_err());
    }

    #[test]
    fn mutated_frames_never_panic() {
        // What `shared/fuzz` (decode_frame) does properly, without nightly: damage a
        // real frame's payload, re-seal the envelope so the checksum passes, decode.
        let good = rmp_serde::to_vec_named(&FromAgent::Stored {
            attempt: 3,
            ranks: vec![RankManifest {
                rank: 1,
                image: crate::location::Location::parse("s3://b/x").unwrap(),
                memory_bytes: 5,
                stored_bytes: 6,
                tcp: vec![],
                listen: vec![],
                udp: vec![],
            }],
        })
        .unwrap();
        crate::codec::tests::for_each_mutation(&good, 3000, |p| {
            let body = crate::codec::tests::frame_raw(KIND_TO_CONTROLLER, p);
            let mut f = (body.len() as u32).to_le_bytes().to_vec();
            f.extend_from_slice(&body);
            let _ = FromAgent::from_frame(&f);
        });
    }
}
