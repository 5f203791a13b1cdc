//! The test hooks are in the binary that the end-to-end tests run: the
//! `test-hooks` feature, turned on by this crate's dev-dependency on itself, must
//! reach the `ckpt-controller` of `env!("CARGO_BIN_EXE_ckpt-controller")`. If it
//! did not, `CKPT_TEST_PAUSE` would be ignored and the tests of a controller killed
//! mid-save (`tests/jobs.rs`) would test nothing.

use std::io::BufRead;
use std::process::{Command, Stdio};
use std::time::Duration;

use ckpt_controller::api::Request;
use ckpt_controller::{client, tls};

#[path = "common/simagent.rs"]
mod simagent;

/// Kills the controller even when the test panics.
struct Kill(std::process::Child);

impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn the_controller_binary_of_the_tests_pauses_at_frozen() {
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs");
    tls::ca_init(&certs, &["127.0.0.1".into()], &["n0".into()]).unwrap();
    std::fs::create_dir_all(dir.path().join("store")).unwrap();
    let socket = dir.path().join("ctl.sock");
    let mut child = Command::new(env!("CARGO_BIN_EXE_ckpt-controller"))
        .args(["serve", "--listen", "127.0.0.1:0", "--store"])
        .arg(format!("file://{}", dir.path().join("store").display()))
        .arg("--certs")
        .arg(&certs)
        .arg("--socket")
        .arg(&socket)
        .env("CKPT_TEST_PAUSE", "frozen")
        .env("CKPT_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let _kill = Kill(child);
    let (lines_tx, lines) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        for l in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            if lines_tx.send(l).is_err() {
                break;
            }
        }
    });
    let wait_for = |what: &str| -> String {
        loop {
            match lines.recv_timeout(Duration::from_secs(20)) {
                Ok(l) if l.contains(what) => return l,
                Ok(_) => {}
                Err(e) => panic!("no line with {what:?} from the controller: {e}"),
            }
        }
    };
    // "ckpt-controller: serving agents on ADDR (QUIC), ..."
    let serving = wait_for("serving agents on ");
    let addr: std::net::SocketAddr = serving
        .split("serving agents on ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no address in {serving:?}"));
    let _agent = simagent::spawn_one(&certs, "n0", addr, "j");
    // The rank list may not have arrived yet: retry until the save starts.
    let save = Request::Save {
        job: "j".into(),
        kill: false,
        wait: false,
        external_tcp: None,
    };
    let mut started = false;
    for _ in 0..100 {
        if client::call(&socket, &save, |_| {}).is_ok() {
            started = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(started, "the save did not start");
    wait_for("test pause at frozen (CKPT_TEST_PAUSE)");
}
