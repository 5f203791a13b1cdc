//! The controller's QUIC port under bad input, against the real controller
//! (`serve::start`) on 127.0.0.1: datagrams of garbage, a certified peer that
//! announces an oversized frame or sends a damaged one, a peer that registers under
//! a name its certificate is not for, and peers without a certificate or with one
//! of another CA. Each is dropped, and the controller goes on serving a good agent.

use std::time::Duration;

use ckpt_controller::api::{Done, Event, Request};
use ckpt_controller::{client, tls};
use ckpt_shared::proto::{FromAgent, Hello, PROTO_VERSION};
use ckpt_shared::wire;

#[path = "common/ctl.rs"]
mod ctl;
#[path = "common/simagent.rs"]
mod simagent;

type Ctl = ctl::LocalController;

fn controller() -> Ctl {
    ctl::start(&["good", "liar"], 3.0, |_| {})
}

fn rt() -> tokio::runtime::Runtime {
    ctl::rt(2)
}

/// Connects as `name` with `id`, sends `bytes` raw on the stream, and returns how
/// the connection ended (or that it did not within 5 s).
async fn send_raw(c: &Ctl, id: &tls::Identity, bytes: Vec<u8>) -> String {
    let ep = wire::endpoint("127.0.0.1:0".parse().unwrap(), None).unwrap();
    let cfg = tls::client_config(id, true).unwrap();
    let conn = match ep
        .connect_with(cfg, c.ctl.addr, "controller")
        .unwrap()
        .await
    {
        Ok(c) => c,
        Err(e) => return format!("refused: {e}"),
    };
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    let _ = send.write_all(&bytes).await;
    // The controller answers nothing to these; it drops the connection.
    let mut buf = [0u8; 64];
    match tokio::time::timeout(Duration::from_secs(5), recv.read(&mut buf)).await {
        Ok(Ok(Some(n))) => format!("answered {n} bytes"),
        Ok(Ok(None)) => "stream finished".into(),
        Ok(Err(e)) => format!("closed: {e}: {:?}", conn.close_reason()),
        Err(_) => "still open".into(),
    }
}

fn nodes(c: &Ctl) -> Vec<String> {
    match client::call(&c.socket, &Request::Nodes, |_| {}).unwrap() {
        Event::Done(Done { nodes, .. }) => nodes.into_iter().map(|n| n.name).collect(),
        _ => vec![],
    }
}

#[test]
fn garbage_oversized_and_lying_peers_are_dropped_and_a_good_agent_is_still_served() {
    let c = controller();
    let rt = rt();
    // 1. Datagrams of garbage on the port.
    let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let mut x = 0x1234_5678_9abc_def0u64;
    for i in 0..2000usize {
        let len = 1 + (i * 37) % 1400;
        let d: Vec<u8> = (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        udp.send_to(&d, c.ctl.addr).unwrap();
    }
    let good = tls::Identity::agent(&c.certs, "good").unwrap();
    rt.block_on(async {
        // 2. A certified peer announcing a frame of 4 GiB.
        let r = send_raw(&c, &good, u32::MAX.to_le_bytes().to_vec()).await;
        assert!(r.starts_with("closed"), "oversized frame: {r}");
        // 3. A frame of the right size whose content is damaged.
        let mut f = FromAgent::Hello(Hello {
            proto_version: PROTO_VERSION,
            name: "good".into(),
        })
        .to_frame()
        .unwrap();
        let last = f.len() - 1;
        f[last] ^= 0xff;
        let r = send_raw(&c, &good, f).await;
        assert!(r.starts_with("closed"), "damaged frame: {r}");
        // 4. Certified as "liar", registering as "good".
        let liar = tls::Identity::agent(&c.certs, "liar").unwrap();
        let hello = FromAgent::Hello(Hello {
            proto_version: PROTO_VERSION,
            name: "good".into(),
        })
        .to_frame()
        .unwrap();
        let r = send_raw(&c, &liar, hello).await;
        assert!(r.contains("name not in certificate"), "impostor: {r}");
    });
    assert!(nodes(&c).is_empty(), "a bad peer was registered");
    // 5. Without a certificate, and with one of another CA: refused at the handshake.
    let other = tempfile::tempdir().unwrap();
    tls::ca_init(other.path(), &[], &["good".into()]).unwrap();
    let foreign = tls::Identity::agent(other.path(), "good").unwrap();
    rt.block_on(async {
        let ep = wire::endpoint("127.0.0.1:0".parse().unwrap(), None).unwrap();
        for (what, id, present) in [
            ("no certificate", &good, false),
            ("another CA", &foreign, true),
        ] {
            // Trust our CA so that only the client side is wrong.
            let mut id2 = tls::Identity {
                chain: id.chain.clone(),
                key: id.key.clone_key(),
                ca: good.ca.clone(),
            };
            if !present {
                id2.chain = good.chain.clone();
            }
            let cfg = tls::client_config(&id2, present).unwrap();
            let r = match ep
                .connect_with(cfg, c.ctl.addr, "controller")
                .unwrap()
                .await
            {
                Err(e) => format!("refused: {e}"),
                Ok(conn) => {
                    // TLS 1.3: the server judges the client's certificate after the
                    // client's side of the handshake; the refusal closes the connection.
                    match tokio::time::timeout(Duration::from_secs(5), conn.closed()).await {
                        Ok(e) => format!("refused: {e}"),
                        Err(_) => "still open".into(),
                    }
                }
            };
            assert!(r.starts_with("refused"), "{what}: {r}");
        }
    });
    assert!(nodes(&c).is_empty());
    // 6. A good agent is served: registered, and a save of its job commits.
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let ep = {
        let _g = rt.enter();
        wire::endpoint("127.0.0.1:0".parse().unwrap(), None).unwrap()
    };
    let addr = c.ctl.addr;
    rt.spawn(async move {
        let _ = simagent::run(ep, &good, "good".into(), addr, "j".into(), 0, tx).await;
    });
    rt.block_on(rx.recv()).unwrap();
    assert_eq!(nodes(&c), vec!["good".to_string()]);
    let mut ok = false;
    for _ in 0..100 {
        let r = client::call(
            &c.socket,
            &Request::Save {
                job: "j".into(),
                kill: false,
                wait: true,
                external_tcp: None,
            },
            |_| {},
        );
        if r.is_ok() {
            ok = true;
            break;
        }
        // The rank list may not have arrived yet.
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(ok, "the good agent's job could not be saved");
}
