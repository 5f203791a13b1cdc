//! ckpt-controller: the job registry, the global barrier (a pure state machine), the
//! checkpoint catalog and the user CLI.
//!
//! Built so far:
//! - [`barrier`]: the state machine of one checkpoint attempt (FREEZE → FROZEN →
//!   CAPTURE → CAPTURED → RESUME or STORE → STORED → commit → KILL, or ABORT), with
//!   no I/O, tested with up to 1,000 simulated agents and every failure;
//! - [`tls`]: the cluster CA (`ckpt-controller ca init` / `ca issue`) and the
//!   mutual-TLS QUIC configurations, tested on real QUIC connections;
//! - [`cli`]: `ckpt-controller ca ...`.
//!
//! Not built yet (the "Job checkpoints" issue): the driver that feeds the barrier
//! over QUIC, `ckpt-agent serve`, the job registry, the catalog, the job and ckpt
//! commands and `ckpt-controller demo`.

pub mod api;
pub mod barrier;
pub mod cli;
pub mod client;
pub mod demo;
pub mod munge;
pub mod readdress;
pub mod report;
pub mod serve;
pub use ckpt_shared::tls;
