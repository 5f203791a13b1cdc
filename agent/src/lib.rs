//! ckpt-agent: the per-node process engine.
//!
//! It freezes process trees with ptrace and dumps them from outside (no parasite
//! code in the target), and rebuilds them from an image inside ptrace-held husks.
//! See `../shared/DESIGN.md` (The stance, Restore, Storage).
//!
//! Layout: each resource keeps its dump and its restore together — [`thread`],
//! [`signals`], [`mem`], [`fd`] — while [`dump`] and [`restore`] only order the
//! steps. System calls are wrapped in [`sys`]; [`inject`] runs single system calls
//! inside a stopped thread.

#![deny(unsafe_code)]
#![deny(unsafe_op_in_unsafe_fn)]

pub mod cancel;
pub mod cli;
pub mod dump;
pub mod fd;
pub mod filecheck;
pub mod freeze;
pub mod gate;
pub mod hooks;
pub mod host;
pub mod inject;
pub mod inspect;
pub mod jobgate;
pub mod mem;
pub mod netlock;
pub mod process;
pub mod rescue;
pub mod restore;
pub mod serve;
pub mod signals;
// The one kernel boundary: every `unsafe` block of the crate is in `sys`, each
// with its `// SAFETY:` reason.
#[allow(unsafe_code)]
pub mod sys;
pub mod thread;
pub mod track;

/// Wall-clock time of the phases of one operation, logged at debug level
/// (`CKPT_LOG=debug`), so a slow dump or restore shows where its time went.
pub struct Phases {
    what: &'static str,
    last: std::time::Instant,
    marks: Vec<(&'static str, u128)>,
}

impl Phases {
    pub fn new(what: &'static str) -> Phases {
        Phases {
            what,
            last: std::time::Instant::now(),
            marks: Vec::new(),
        }
    }

    /// Close the phase that ran since the previous mark.
    pub fn mark(&mut self, phase: &'static str) {
        let now = std::time::Instant::now();
        self.marks
            .push((phase, now.duration_since(self.last).as_micros()));
        self.last = now;
    }
}

impl Drop for Phases {
    fn drop(&mut self) {
        let s: Vec<String> = self
            .marks
            .iter()
            .map(|(p, us)| format!("{p}={:.1}ms", *us as f64 / 1e3))
            .collect();
        tracing::debug!(op = self.what, phases = %s.join(" "), "timing");
    }
}
