//! Every printing command of `ckpt-controller` into a pipe whose reader is gone
//! (`ckpt-controller job list | head -n1`): it stops writing and exits 0, as `cat`
//! does, instead of panicking on EPIPE (exit 101). The reader's end is closed
//! before the command starts, so every write fails, whatever the timing.

use std::process::{Command, Output, Stdio};

#[path = "common/ctl.rs"]
mod ctl;

fn controller_bin() -> &'static str {
    env!("CARGO_BIN_EXE_ckpt-controller")
}

/// `args` with standard output into a pipe whose read end is already closed.
fn into_closed_pipe(args: &[&str]) -> Output {
    let (read_end, write_end) = nix::unistd::pipe().unwrap();
    drop(read_end);
    Command::new(controller_bin())
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::from(write_end))
        .stderr(Stdio::piped())
        .output()
        .unwrap()
}

/// `args` with standard output read to its end: what the command prints.
fn printed(args: &[&str]) -> String {
    let out = Command::new(controller_bin())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {} {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The command prints something when it can, and exits 0 without a panic when
/// its reader has gone.
fn check(args: &[&str]) {
    assert!(!printed(args).is_empty(), "{args:?} prints nothing");
    check_closed(args);
}

/// Exits 0 without a panic into a closed pipe; what it printed is lost, not what
/// it did.
fn check_closed(args: &[&str]) {
    let out = into_closed_pipe(args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && !stderr.contains("panicked"),
        "{args:?} into a closed pipe: {} {stderr}",
        out.status
    );
}

#[test]
fn the_ca_commands_exit_0_into_a_closed_pipe() {
    let dir = tempfile::tempdir().unwrap();
    let init = |certs: &str| {
        [
            "ca",
            "init",
            "--dir",
            certs,
            "--controller-name",
            "127.0.0.1",
            "--agent",
            "n0",
        ]
        .map(String::from)
    };
    let a = dir.path().join("a");
    let b = dir.path().join("b");
    let (a, b) = (a.to_str().unwrap(), b.to_str().unwrap());
    assert!(!printed(&init(a).each_ref().map(String::as_str)).is_empty());
    check_closed(&init(b).each_ref().map(String::as_str));
    assert!(dir.path().join("b/agents/n0.pem").exists());
    check_closed(&["ca", "issue", "--dir", a, "--agent", "n1"]);
    assert!(dir.path().join("a/agents/n1.pem").exists());
}

#[test]
fn the_commands_that_ask_the_controller_exit_0_into_a_closed_pipe() {
    let c = ctl::start(&[], 3.0, |_| {});
    let socket = c.socket.to_str().unwrap();
    for args in [
        vec!["nodes"],
        vec!["nodes", "--json"],
        vec!["job", "list"],
        vec!["job", "list", "--json"],
        vec!["ckpt", "list"],
        vec!["ckpt", "list", "--json"],
        vec!["ckpt", "prune", "--job", "nojob", "--keep", "1"],
        vec!["ckpt", "gc"],
    ] {
        let mut args = args;
        args.extend(["--socket", socket]);
        check(&args);
    }
}
