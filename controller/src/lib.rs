//! ckpt-controller: the job registry, the global barrier (a pure state machine),
//! the checkpoint catalog and the user CLI. `main.rs` only sets up logging and
//! calls [`cli::run`]; everything else is here.
//!
//! - [`barrier`]: the state machine of one checkpoint attempt (FREEZE → FROZEN →
//!   CAPTURE → CAPTURED → RESUME or STORE → STORED → commit → KILL, or ABORT) and
//!   of a restore, with no I/O, tested with up to 1,000 simulated agents and every
//!   failure;
//! - [`serve`]: `ckpt-controller serve`: the agents' QUIC connections (mutual
//!   TLS), the registry of agents and jobs, the catalog read from the store, and
//!   the driver that feeds each save's and restore's barrier; the local API socket
//!   and, with `api_listen`, the TCP API whose callers prove themselves with
//!   [`munge`];
//! - [`readdress`]: the new addresses of a job's TCP connections when it is
//!   restored on other nodes (a pure function);
//! - [`api`]: the requests and answers of the local API; [`client`]: its client
//!   side, with the progress bar and the summaries the commands print;
//! - [`cli`]: the arguments (`--help`) and the commands: `ca`, `serve`, `job`,
//!   `ckpt`, `nodes`, `demo`; it is the only place that reads the environment
//!   (into [`serve::ServeOptions`]);
//! - [`demo`]: `ckpt-controller demo`, the whole path on one machine;
//! - [`tls`] (from the shared crate): the cluster CA (`ca init`, `ca issue`) and
//!   the QUIC configurations; `ckpt_shared::report`: an error and its causes on
//!   one line, each once.
//!
//! Each module's failures are one `thiserror` enum named after its operation
//! (`ServeError`, `ClientError`, ...). Cargo feature `test-hooks` (tests only) adds
//! the `CKPT_TEST_PAUSE` hook to `serve`.

pub mod api;
pub mod barrier;
pub mod cli;
pub mod client;
pub mod demo;
pub mod munge;
pub mod readdress;
pub mod serve;
pub use ckpt_shared::tls;
