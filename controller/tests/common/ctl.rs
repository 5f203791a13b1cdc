//! The fixtures the controller's tests and benches share: a real controller
//! (`serve::start`) on 127.0.0.1 with a CA of its own and a local directory store,
//! and a small tokio runtime. Included with `#[path = "common/ctl.rs"] mod ctl;`,
//! as `simagent.rs` is, so each test binary takes only what it uses.

#![allow(dead_code)]

use std::path::PathBuf;

use ckpt_controller::{serve, tls};

/// A controller in this process, stopped (and its directory removed) on drop.
pub struct LocalController {
    pub certs: PathBuf,
    pub socket: PathBuf,
    pub ctl: serve::Running,
    // Dropped last: the controller's socket and store live in it.
    pub dir: tempfile::TempDir,
}

/// Starts a controller for `agents` (a certificate each) on a fresh directory:
/// QUIC on 127.0.0.1 (port of the kernel's choice), API socket `ctl.sock`, store
/// `file://DIR/store`, lease `lease_secs`; `tweak` may change the rest of the
/// configuration before the start.
pub fn start(
    agents: &[&str],
    lease_secs: f64,
    tweak: impl FnOnce(&mut serve::Config),
) -> LocalController {
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs");
    let agents: Vec<String> = agents.iter().map(|a| a.to_string()).collect();
    tls::ca_init(&certs, &["127.0.0.1".into()], &agents).unwrap();
    std::fs::create_dir_all(dir.path().join("store")).unwrap();
    let socket = dir.path().join("ctl.sock");
    let mut cfg = serve::Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        store: format!("file://{}", dir.path().join("store").display()),
        certs: certs.clone(),
        socket: socket.clone(),
        lease_secs,
        ..serve::Config::default()
    };
    tweak(&mut cfg);
    let ctl = serve::start(cfg, serve::ServeOptions::default()).unwrap();
    LocalController {
        certs,
        socket,
        ctl,
        dir,
    }
}

/// A multi-threaded tokio runtime of `threads` workers with I/O and time.
pub fn rt(threads: usize) -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .build()
        .unwrap()
}
