//! The controller's TCP API with MUNGE, against a real munged (one of the test's
//! own, see `ckpt_tests::munge`) and the real controller: root's credential saves
//! root's job; nobody's is refused on it; a replayed, a garbage and a tampered
//! credential are refused with the reason.

use std::io::{BufRead, Write};
use std::os::unix::process::CommandExt;
use std::time::Duration;

use ckpt_controller::api::Request;
use ckpt_controller::{client, munge};
use ckpt_tests::munge::Munged;

#[path = "common/ctl.rs"]
mod ctl;
#[path = "common/simagent.rs"]
mod simagent;

fn raw(addr: std::net::SocketAddr, line: &str) -> String {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(line.as_bytes()).unwrap();
    s.write_all(b"\n").unwrap();
    let mut out = String::new();
    std::io::BufReader::new(s).read_line(&mut out).unwrap();
    out
}

#[test]
fn requests_over_tcp_are_judged_by_their_munge_credential() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: needs root (it runs the CLI as nobody)");
        return;
    }
    assert!(
        Munged::available(),
        "munged is not installed: scripts/setup.sh installs the munge package"
    );
    let m = Munged::start().unwrap();
    let c = ctl::start(&["n0"], 5.0, |cfg| {
        cfg.api_listen = Some("127.0.0.1:0".parse().unwrap());
        cfg.munge_socket = Some(m.socket());
    });
    let (certs, ctl) = (&c.certs, &c.ctl);
    let api = ctl.api_addr.unwrap();
    // One agent (protocol only) with one rank of root's job "j".
    let _agent = simagent::spawn_one(certs, "n0", ctl.addr, "j");
    std::thread::sleep(Duration::from_millis(200));
    let target = client::Target::Munge {
        addr: api.to_string(),
        socket: Some(m.socket()),
    };
    // Root, over TCP with MUNGE: sees and saves its job.
    let save = Request::Save {
        job: "j".into(),
        kill: false,
        wait: true,
        external_tcp: None,
    };
    client::call_at(&target, &save, |_| {}).expect("root's save over TCP");
    // Nobody, through the real CLI: refused on root's job.
    let bin = env!("CARGO_BIN_EXE_ckpt-controller");
    let out = std::process::Command::new(bin)
        .args([
            "job",
            "save",
            "j",
            "--wait",
            "--controller",
            &api.to_string(),
        ])
        .arg("--munge-socket")
        .arg(m.socket())
        .uid(65534)
        .gid(65534)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "nobody saved root's job");
    assert!(
        err.contains("uid 65534 may save only its own jobs"),
        "{err}"
    );
    // A credential used twice: the second use is refused.
    let cred = munge::encode(Some(&m.socket()), r#"{"op":"jobs"}"#).unwrap();
    let line = serde_json::json!({ "munge": cred }).to_string();
    assert!(raw(api, &line).contains("\"ok\":true"));
    let again = raw(api, &line);
    assert!(again.contains("Replayed"), "{again}");
    // Garbage, and a credential with a byte changed.
    let r = raw(api, r#"{"munge":"MUNGE:garbage:"}"#);
    assert!(r.contains("refused"), "{r}");
    let cred = munge::encode(Some(&m.socket()), r#"{"op":"jobs"}"#).unwrap();
    let mut b = cred.into_bytes();
    let i = b.len() / 2;
    b[i] = if b[i] == b'A' { b'B' } else { b'A' };
    let r = raw(
        api,
        &serde_json::json!({ "munge": String::from_utf8(b).unwrap() }).to_string(),
    );
    assert!(r.contains("refused"), "{r}");
    let r = raw(api, "not json");
    assert!(r.contains("bad request"), "{r}");
}
