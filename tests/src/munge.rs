//! A real `munged` per test, with a key and a socket of its own in a temporary
//! directory (so it never meets the system's munged), killed by PID on drop.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

pub struct Munged {
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl Munged {
    /// Whether munged is installed (scripts/setup.sh installs it).
    pub fn available() -> bool {
        Command::new("munged")
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok()
    }

    pub fn start() -> Result<Munged> {
        let dir = tempfile::Builder::new().prefix("ckpt-munge").tempdir()?;
        // Other users reach the socket (munged warns otherwise, and the tests call
        // munge as nobody).
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))?;
        let key = dir.path().join("munge.key");
        let mut bytes = vec![0u8; 1024];
        std::fs::File::open("/dev/urandom")
            .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut bytes))
            .context("reading /dev/urandom")?;
        std::fs::write(&key, &bytes)?;
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o400))?;
        let base = dir.path().to_path_buf();
        let p = |n: &str| base.join(n);
        let child = Command::new("munged")
            .args(["--foreground", "--force"])
            .arg(format!("--socket={}", p("munge.socket").display()))
            .arg(format!("--key-file={}", key.display()))
            .arg(format!("--log-file={}", p("munged.log").display()))
            .arg(format!("--pid-file={}", p("munged.pid").display()))
            .arg(format!("--seed-file={}", p("munged.seed").display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting munged (apt-get install munge)")?;
        let m = Munged {
            dir,
            child: Some(child),
        };
        let t = Instant::now();
        while !m.socket().exists() {
            if t.elapsed() > Duration::from_secs(10) {
                bail!(
                    "munged did not start: {}",
                    std::fs::read_to_string(p("munged.log")).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(m)
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("munge.socket")
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Munged {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
