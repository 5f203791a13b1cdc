//! ckpt-controller: the job registry, the global barrier (a pure state machine), the
//! checkpoint catalog and the user CLI.
//!
//! Not built yet: this crate is the skeleton that the "Job checkpoints" issue fills.
//! Nothing here is wired into any command; the single-process engine lives in
//! `ckpt-agent` (`ckpt-agent dump` / `restore` / `inspect`).
