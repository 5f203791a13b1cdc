//! Mutual TLS over QUIC between the controller and agents, with the certificates
//! of `ca init` / `ca issue`, on real UDP sockets on 127.0.0.1: an agent with a
//! certificate of the cluster CA is let in and exchanges `Hello` frames; one with no
//! certificate, or one of another CA, is refused during the handshake; an agent
//! refuses a controller of another CA.

use std::net::SocketAddr;
use std::time::Duration;

use ckpt_controller::tls::{self, Identity};
use ckpt_shared::proto::{FromAgent, Hello, ToAgent, PROTO_VERSION};

#[path = "common/ctl.rs"]
mod ctl;

fn rt() -> tokio::runtime::Runtime {
    ctl::rt(2)
}

/// A controller endpoint that answers one Hello per connection.
fn serve(id: &Identity) -> (quinn::Endpoint, SocketAddr) {
    let ep = quinn::Endpoint::server(
        tls::server_config(id).unwrap(),
        "127.0.0.1:0".parse().unwrap(),
    )
    .unwrap();
    let addr = ep.local_addr().unwrap();
    let accept = ep.clone();
    tokio::spawn(async move {
        while let Some(incoming) = accept.accept().await {
            tokio::spawn(async move {
                let Ok(conn) = incoming.await else { return };
                let Ok((mut send, mut recv)) = conn.accept_bi().await else {
                    return;
                };
                let Ok(bytes) = recv.read_to_end(1 << 20).await else {
                    return;
                };
                let Ok(FromAgent::Hello(h)) = FromAgent::from_frame(&bytes) else {
                    return;
                };
                let reply = ToAgent::Hello(Hello {
                    proto_version: PROTO_VERSION,
                    name: format!("controller greets {}", h.name),
                });
                let _ = send.write_all(&reply.to_frame().unwrap()).await;
                let _ = send.finish();
                conn.closed().await;
            });
        }
    });
    (ep, addr)
}

/// An agent's attempt: connect, send Hello, read the answer.
async fn hello(id: &Identity, present: bool, addr: SocketAddr) -> Result<ToAgent, String> {
    let mut ep =
        quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).map_err(|e| e.to_string())?;
    ep.set_default_client_config(tls::client_config(id, present).map_err(|e| e.to_string())?);
    let conn = tokio::time::timeout(
        Duration::from_secs(10),
        ep.connect(addr, "controller").map_err(|e| e.to_string())?,
    )
    .await
    .map_err(|_| "handshake timed out".to_string())?
    .map_err(|e| e.to_string())?;
    let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
    let h = FromAgent::Hello(Hello {
        proto_version: PROTO_VERSION,
        name: "node-a".into(),
    });
    send.write_all(&h.to_frame().unwrap())
        .await
        .map_err(|e| e.to_string())?;
    send.finish().map_err(|e| e.to_string())?;
    let read = tokio::time::timeout(Duration::from_secs(10), recv.read_to_end(1 << 20))
        .await
        .map_err(|_| "no answer".to_string())?;
    // In TLS 1.3 the server judges the client's certificate after the client's side
    // of the handshake is done: a refusal shows as the connection closing, with
    // the TLS alert as its reason.
    let bytes = match read {
        Ok(b) => b,
        Err(e) => {
            let why = tokio::time::timeout(Duration::from_secs(5), conn.closed())
                .await
                .map(|r| r.to_string())
                .unwrap_or_default();
            return Err(format!("{e}: {why}"));
        }
    };
    ToAgent::from_frame(&bytes).map_err(|e| e.to_string())
}

#[test]
fn ca_init_and_issue_write_a_usable_cluster_ca_and_refuse_to_overwrite_it() {
    let d = tempfile::tempdir().unwrap();
    tls::ca_init(d.path(), &["127.0.0.1".into()], &["node-a".into()]).unwrap();
    for f in [
        "ca.pem",
        "ca.key",
        "controller.pem",
        "controller.key",
        "agents/node-a.pem",
    ] {
        assert!(d.path().join(f).is_file(), "{f}");
    }
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(d.path().join("ca.key"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    let e = tls::ca_init(d.path(), &[], &[]).unwrap_err().to_string();
    assert!(e.contains("already holds a cluster CA"), "{e}");
    tls::ca_issue(d.path(), "node-b").unwrap();
    let e = tls::ca_issue(d.path(), "node-b").unwrap_err().to_string();
    assert!(e.contains("already has a certificate"), "{e}");
    let e = tls::ca_issue(d.path(), "../evil").unwrap_err().to_string();
    assert!(e.contains("cannot name an agent"), "{e}");
    let none = tempfile::tempdir().unwrap();
    let e = tls::ca_issue(none.path(), "x").unwrap_err().to_string();
    assert!(e.contains("ca init"), "{e}");
}

#[test]
fn agents_of_the_cluster_ca_are_let_in_and_others_are_refused_at_the_handshake() {
    let d = tempfile::tempdir().unwrap();
    tls::ca_init(d.path(), &[], &["node-a".into()]).unwrap();
    tls::ca_issue(d.path(), "node-b").unwrap();
    let other = tempfile::tempdir().unwrap();
    tls::ca_init(other.path(), &[], &["node-a".into()]).unwrap();

    let rt = rt();
    rt.block_on(async {
        let (_ep, addr) = serve(&Identity::controller(d.path()).unwrap());
        // Agents of this CA, from init and from issue.
        for name in ["node-a", "node-b"] {
            let id = Identity::agent(d.path(), name).unwrap();
            match hello(&id, true, addr).await {
                Ok(ToAgent::Hello(h)) => assert!(h.name.contains("node-a"), "{h:?}"),
                other => panic!("{name}: {other:?}"),
            }
        }
        // No certificate.
        let id = Identity::agent(d.path(), "node-a").unwrap();
        let e = hello(&id, false, addr).await.unwrap_err();
        assert!(
            e.contains("handshake failed") && e.contains("no certificates"),
            "{e}"
        );
        // A certificate of another CA, trusting ours (so only the server refuses).
        let stranger = Identity {
            ca: Identity::agent(d.path(), "node-a").unwrap().ca,
            ..Identity::agent(other.path(), "node-a").unwrap()
        };
        let e = hello(&stranger, true, addr).await.unwrap_err();
        assert!(
            e.contains("handshake failed") && e.contains("invalid peer certificate"),
            "{e}"
        );
        // An agent of the other CA refuses our controller.
        let theirs = Identity::agent(other.path(), "node-a").unwrap();
        let e = hello(&theirs, true, addr).await.unwrap_err();
        assert!(
            e.contains("handshake failed") && e.contains("invalid peer certificate"),
            "{e}"
        );
    });
}
