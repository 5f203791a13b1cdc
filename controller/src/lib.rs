//! ckpt-controller: the job registry, the global barrier (a pure state machine), the
//! checkpoint catalog and the user CLI.
//!
//! Built so far: [`barrier`], the state machine of one checkpoint attempt (FREEZE →
//! FROZEN → CAPTURE → CAPTURED → RESUME or STORE → STORED → commit → KILL, or ABORT),
//! with no I/O, tested with up to 1,000 simulated agents and every failure. Not built
//! yet (the "Job checkpoints" issue): the QUIC/mTLS driver that feeds it, the job
//! registry, the catalog, the CLI and `ckpt-controller demo`. No command uses this
//! crate yet.

pub mod barrier;
