//! Cancellation of a command by SIGINT or SIGTERM.
//!
//! The command-line layer installs the handler ([`crate::sys::signal::cancel_on`]),
//! which does nothing but store the signal's number in the token; the operation
//! looks at the token between its phases and inside its long loops (the memory
//! store checks it before each chunk), and gives up with an error that says which
//! signal stopped it. Giving up takes the ordinary error path, whose `Drop` guards
//! thaw the tree, lift the network lock and remove what was written: a signal does
//! the same as any other failure, only on the user's word.
//!
//! Why a flag and not the signal's default action, or a handler that cleans up: the
//! default action ends the process wherever it is (a tree left frozen in the middle
//! of an injection, a lock table left behind), and a handler may call nothing that
//! takes a lock or allocates, which rules out all of the clean-up.

use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::Arc;

/// Set once a cancelling signal arrived; clones share it.
#[derive(Debug, Clone, Default)]
pub struct Cancel(Arc<AtomicI32>);

impl Cancel {
    pub fn new() -> Cancel {
        Cancel::default()
    }

    /// The signal that cancelled the operation, if one did.
    pub fn signal(&self) -> Option<i32> {
        match self.0.load(Ordering::SeqCst) {
            0 => None,
            s => Some(s),
        }
    }

    /// Cancels as signal `sig` would (the daemon's own shutdown, tests).
    pub fn cancel(&self, sig: i32) {
        self.0.store(sig, Ordering::SeqCst);
    }

    /// `Err(signal)` once cancelled.
    pub fn check(&self) -> Result<(), i32> {
        self.signal().map_or(Ok(()), Err)
    }

    /// The flag the signal handler sets.
    pub fn flag(&self) -> Arc<AtomicI32> {
        self.0.clone()
    }
}

/// The signal's name, for messages: `SIGTERM`, `SIGINT`, or its number.
pub fn signal_name(sig: i32) -> String {
    match sig {
        libc::SIGINT => "SIGINT".into(),
        libc::SIGTERM => "SIGTERM".into(),
        libc::SIGHUP => "SIGHUP".into(),
        s => format!("signal {s}"),
    }
}

/// A command stopped by a signal: `main` prints it on one line and exits with 128
/// plus the signal's number, as a shell reports a process killed by it.
#[derive(Debug, thiserror::Error)]
#[error("{what} stopped by {}: {outcome}", signal_name(*signal))]
pub struct Interrupted {
    pub signal: i32,
    /// What was stopped: "dump of PID 4121".
    pub what: String,
    /// What it left: "nothing was committed; the tree runs on as before".
    pub outcome: String,
}

impl Interrupted {
    /// The exit status: 128 + the signal.
    pub fn exit_code(&self) -> u8 {
        (128 + self.signal).clamp(0, 255) as u8
    }
}
