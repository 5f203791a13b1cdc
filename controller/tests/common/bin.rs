//! What every controller test binary needs: the `ckpt-controller` binary Cargo
//! built for these tests (`CARGO_BIN_EXE_*` exists only here), and the check that
//! skips a test needing root. Included with `#[path = "common/bin.rs"] mod bin;`.

#![allow(dead_code)]

use std::path::PathBuf;

pub fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_ckpt-controller"))
}

/// Whether this process may run job checkpoints (root with ptrace and namespace
/// capabilities); if not, says why the test is skipped.
pub fn root() -> bool {
    match ckpt_tests::root_skip_reason() {
        Some(why) => {
            eprintln!("skipped: {why}");
            false
        }
        None => true,
    }
}
