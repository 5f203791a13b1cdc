//! A real S3-compatible server for the tests: s3s-fs, a separate process speaking
//! HTTP with SigV4 over a local directory (`scripts/s3-server.sh install` builds it).
//! Each test that needs one starts its own on a free port of 127.0.0.1 with a fresh
//! data directory and one bucket; dropping the [`S3Server`] kills it by PID (also
//! when the test panics, and then its log is shown) and removes the directory.
//!
//! When the server is not installed, [`S3Server::start`] panics with the command
//! that installs it: CI installs it, and a missing server must not pass for a green
//! S3 backend.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Access key the test server accepts.
pub const ACCESS_KEY: &str = "ckpt-test";
/// Its secret.
pub const SECRET_KEY: &str = "ckpt-test-secret";
/// The bucket every test server starts with.
pub const BUCKET: &str = "ckpt";

/// Where `scripts/s3-server.sh install` puts the server, or `CKPT_S3S_FS`.
pub fn s3s_fs_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("CKPT_S3S_FS") {
        return p.into();
    }
    let tools = std::env::var_os("CKPT_TOOLS").unwrap_or_else(|| "/opt/ckpt-tools".into());
    let installed = PathBuf::from(tools).join("bin/s3s-fs");
    if installed.is_file() {
        return installed;
    }
    let on_path = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .map(|d| d.join("s3s-fs"))
        .find(|p| p.is_file());
    on_path.unwrap_or_else(|| {
        panic!(
            "the S3 test server s3s-fs is not installed (looked for {}, then s3s-fs on \
             PATH): run scripts/s3-server.sh install",
            installed.display()
        )
    })
}

/// A port on 127.0.0.1 with nothing listening on it (at the time of the call).
pub fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    l.local_addr().expect("local address").port()
}

/// The server's process, killed by PID when dropped.
struct Process {
    child: Child,
    log: PathBuf,
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            let _ = writeln!(
                std::io::stderr(),
                "s3s-fs log ({}):\n{}",
                self.log.display(),
                read_log(&self.log)
            );
        }
    }
}

fn read_log(path: &Path) -> String {
    let mut s = String::new();
    if let Ok(mut f) = std::fs::File::open(path) {
        let _ = f.read_to_string(&mut s);
    }
    s
}

/// A running s3s-fs on 127.0.0.1 with a fresh data directory holding [`BUCKET`].
pub struct S3Server {
    // Dropped first: the process dies before its directory is removed.
    process: Option<Process>,
    host: String,
    port: u16,
    data: tempfile::TempDir,
}

impl S3Server {
    /// Starts a server on 127.0.0.1 (a few tries, in case its port is taken
    /// meanwhile).
    pub fn start() -> S3Server {
        S3Server::start_with(
            "127.0.0.1",
            |cmd| Ok(cmd.spawn()?),
            |port| TcpStream::connect(("127.0.0.1", port)).is_ok(),
        )
    }

    /// Starts a server inside network namespace `netns` of `cluster` (its hub,
    /// say), listening on `host` there: the nodes reach it over the cluster's
    /// bridge, as they would reach an S3 service on the site's network.
    pub fn start_in(cluster: &crate::cluster::Cluster, netns: &str, host: &str) -> S3Server {
        let probe = |port: u16| {
            let mut bash = Command::new("bash");
            bash.args(["-c", &format!("exec 3<>/dev/tcp/{host}/{port}")]);
            cluster
                .run_in(netns, &mut bash)
                .map(|o| o.status.success())
                .unwrap_or(false)
        };
        S3Server::start_with(host, |cmd| cluster.spawn_in(netns, cmd), probe)
    }

    fn start_with(
        host: &str,
        spawn: impl Fn(&mut Command) -> anyhow::Result<Child>,
        listening: impl Fn(u16) -> bool,
    ) -> S3Server {
        let bin = s3s_fs_binary();
        let data = tempfile::tempdir().expect("temporary directory");
        let root = data.path().join("root");
        // A bucket is a directory.
        std::fs::create_dir_all(root.join(BUCKET)).expect("create the bucket directory");
        let log = data.path().join("s3s-fs.log");
        for _ in 0..5 {
            let port = free_port();
            let out = std::fs::File::create(&log).expect("create the server log");
            let mut cmd = Command::new(&bin);
            cmd.args(["--host", host, "--port", &port.to_string()])
                .args(["--access-key", ACCESS_KEY, "--secret-key", SECRET_KEY])
                .arg(&root)
                .stdin(Stdio::null())
                .stdout(out.try_clone().expect("dup the log descriptor"))
                .stderr(out);
            let child =
                spawn(&mut cmd).unwrap_or_else(|e| panic!("start {}: {e:#}", bin.display()));
            let mut process = Process {
                child,
                log: log.clone(),
            };
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if listening(port) {
                    return S3Server {
                        process: Some(process),
                        host: host.to_string(),
                        port,
                        data,
                    };
                }
                if process.child.try_wait().ok().flatten().is_some() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            drop(process);
            eprintln!(
                "s3s-fs did not come up on port {port}; its log:\n{}",
                read_log(&log)
            );
        }
        panic!("s3s-fs ({}) did not start in 5 tries", bin.display());
    }

    /// `http://HOST:PORT` (127.0.0.1 unless started with [`S3Server::start_in`]).
    pub fn endpoint(&self) -> String {
        format!("http://{}:{}", self.host, self.port)
    }

    /// The environment a client process needs (`AWS_*`).
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("AWS_ENDPOINT_URL", self.endpoint()),
            ("AWS_REGION", "us-east-1".into()),
            ("AWS_ACCESS_KEY_ID", ACCESS_KEY.into()),
            ("AWS_SECRET_ACCESS_KEY", SECRET_KEY.into()),
        ]
    }

    /// The directory holding the bucket's objects (`<bucket>/<key>` files), for tests
    /// that damage an object behind the server's back.
    pub fn bucket_dir(&self) -> PathBuf {
        self.data.path().join("root").join(BUCKET)
    }

    /// The server's PID, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.process.as_ref().map(|p| p.child.id())
    }

    /// Kills the server now (SIGKILL by PID) and reaps it: the store is down.
    pub fn kill(&mut self) {
        self.process = None;
    }
}
