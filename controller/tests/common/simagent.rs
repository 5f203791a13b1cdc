//! A protocol-only agent: it speaks the real protocol over a real QUIC connection
//! with its real certificate, but answers each step of the barrier at once without
//! freezing or dumping anything. It exists to measure the controller's protocol
//! overhead with many agents in one process (`cargo bench --bench barrier`), and for
//! the tests of the controller's port and TCP API. It never touches a process.
//!
//! A test fixture, so it is not part of the library: each test or bench that needs
//! it includes this file (`#[path = ...] mod simagent;`). It needs nothing of the
//! library's (only the shared crate's protocol, TLS and framing), so a cargo
//! feature that compiled it into the library for tests would only put a fixture
//! one `--all-features` away from a release build.

use std::net::SocketAddr;

use anyhow::{bail, Context, Result};
use ckpt_shared::proto::{
    AttachedRank, FromAgent, Hello, NodeInfo, RankManifest, ToAgent, PROTO_VERSION,
};
use ckpt_shared::tls::{self, Identity};
use ckpt_shared::wire;

/// One protocol-only agent `name` (its certificate from `certs`) with rank 0 of
/// `job`, on a runtime of its own, connected to the controller at `addr`; returns
/// once it has registered. Dropping the runtime ends it. (Not every includer of
/// this file uses it.)
#[allow(dead_code)]
pub fn spawn_one(
    certs: &std::path::Path,
    name: &str,
    addr: SocketAddr,
    job: &str,
) -> tokio::runtime::Runtime {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let ep = {
        let _g = rt.enter();
        wire::endpoint("127.0.0.1:0".parse().unwrap(), None).unwrap()
    };
    let id = Identity::agent(certs, name).unwrap();
    let (name, job) = (name.to_string(), job.to_string());
    rt.spawn(async move {
        let _ = run(ep, &id, name, addr, job, 0, tx).await;
    });
    rt.block_on(rx.recv()).unwrap();
    rt
}

/// Connects as agent `name` (with `id`) to the controller at `addr`, registers one
/// rank of `job`, and answers the barrier until the connection ends. `ready` is
/// signalled once registered.
pub async fn run(
    ep: quinn::Endpoint,
    id: &Identity,
    name: String,
    addr: SocketAddr,
    job: String,
    rank: u32,
    ready: tokio::sync::mpsc::UnboundedSender<()>,
) -> Result<()> {
    let cfg = tls::client_config(id, true)?;
    let conn = ep
        .connect_with(cfg, addr, "controller")?
        .await
        .context("connecting")?;
    let (mut send, mut recv) = conn.open_bi().await?;
    let hello = FromAgent::Hello(Hello {
        proto_version: PROTO_VERSION,
        name: name.clone(),
    });
    wire::write_frame(&mut send, &hello.to_frame()?).await?;
    let info = NodeInfo {
        name: name.clone(),
        addrs: vec![],
        kernel: "sim".into(),
        cpu: "sim".into(),
        agent_version: env!("CARGO_PKG_VERSION").into(),
    };
    wire::write_frame(&mut send, &FromAgent::Register(info).to_frame()?).await?;
    match ToAgent::from_frame(&wire::read_frame(&mut recv).await?.context("no Hello")?)? {
        ToAgent::Hello(_) => {}
        other => bail!("expected Hello, got {other:?}"),
    }
    let ranks = FromAgent::Ranks(vec![AttachedRank {
        external_tcp: None,
        job: job.clone(),
        rank,
        pid: 1_000_000 + rank as i32,
        uid: 0,
    }]);
    wire::write_frame(&mut send, &ranks.to_frame()?).await?;
    let _ = ready.send(());
    while let Some(f) = wire::read_frame(&mut recv).await? {
        let reply = match ToAgent::from_frame(&f)? {
            ToAgent::Ping => Some(FromAgent::Pong),
            ToAgent::Freeze { attempt, .. } => Some(FromAgent::Frozen { attempt }),
            ToAgent::Capture { attempt } => Some(FromAgent::Captured { attempt }),
            ToAgent::Resume { attempt } | ToAgent::Store { attempt } => Some(FromAgent::Stored {
                attempt,
                ranks: vec![RankManifest {
                    rank,
                    image: ckpt_shared::location::Location::Named {
                        store: ckpt_shared::objstore::StoreUrl::File("/sim".into()),
                        name: format!("sim-{name}"),
                    },
                    memory_bytes: 0,
                    stored_bytes: 0,
                    tcp: vec![],
                    listen: vec![],
                    udp: vec![],
                }],
            }),
            _ => None,
        };
        if let Some(r) = reply {
            wire::write_frame(&mut send, &r.to_frame()?).await?;
        }
    }
    Ok(())
}
