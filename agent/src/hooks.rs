//! Test hooks: a failure injected at a named stage of a dump, a pause at a named
//! point of a job's save or restore. The end-to-end tests use them to put the agent
//! inside a window it would otherwise cross in microseconds.
//!
//! They exist only in a build with the `test-hooks` feature, which nothing but the
//! tests turns on (`agent/Cargo.toml`'s dev-dependency on itself): a release binary
//! carries no hook, and [`Hooks`] is empty there. The values are read from the
//! environment by the command-line layer (`CKPT_FAULT`, `CKPT_TEST_PAUSE`,
//! `CKPT_FILL`), never below it.

/// The hooks of one command.
#[derive(Debug, Clone, Default)]
pub struct Hooks {
    /// Stage at which a dump fails (`before-freeze`, `after-seize`, `after-regs`, `after-files`,
    /// `after-memory`, `before-commit`), or a restore (`restore:tree`: every husk
    /// exists; `restore:threads`: every thread too).
    #[cfg(feature = "test-hooks")]
    pub fault: Option<String>,
    /// Point of a job's save or restore at which the daemon stops answering
    /// (`frozen`, `captured`, `stored`, `rebuilt`), as if it hung there; a point
    /// of a restore at which it hangs (`restore:cloned`, ... see
    /// [`crate::restore`]'s `PAUSE_POINTS`), for a test to SIGKILL it there;
    /// `monitor`: the daemon never drops a rank whose process exited; or a stage
    /// of a dump (`before-freeze`, `after-seize`, `after-regs`, `after-files`,
    /// `after-memory`, `before-commit`) at which it waits until SIGINT or SIGTERM.
    #[cfg(feature = "test-hooks")]
    pub pause: Option<String>,
}

impl Hooks {
    /// Whether a dump is to fail at `stage`.
    pub fn fails_at(&self, stage: &str) -> bool {
        #[cfg(feature = "test-hooks")]
        if self.fault.as_deref() == Some(stage) {
            return true;
        }
        let _ = stage;
        false
    }

    /// Whether a job's operation is to hang at `point`.
    pub fn pauses_at(&self, point: &str) -> bool {
        #[cfg(feature = "test-hooks")]
        if self.pause.as_deref() == Some(point) {
            return true;
        }
        let _ = point;
        false
    }

    /// Hangs for good at `point` if a pause is asked there, after saying so on
    /// stderr (`ckpt-agent: test pause at POINT`): a test waits for that line and
    /// kills the process in a known state.
    pub fn hang_at(&self, point: &str) {
        if self.pauses_at(point) {
            eprintln!("ckpt-agent: test pause at {point} (CKPT_TEST_PAUSE)");
            loop {
                std::thread::sleep(std::time::Duration::from_secs(3600));
            }
        }
    }
}
