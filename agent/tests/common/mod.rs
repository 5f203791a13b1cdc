//! What the integration tests of `ckpt-agent` share and the harness crate
//! (`ckpt-tests`) cannot hold: the path of the `ckpt-agent` binary that Cargo built
//! for this crate's tests (`CARGO_BIN_EXE_*` exists only here), and the fixtures
//! that name this crate's types.
//!
//! Each test file includes it with `mod common;` (and the TCP bench with a
//! `#[path]`); a file uses only part of it, hence the `dead_code` allowance.

#![allow(dead_code)]

use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::time::Duration;

use ckpt_agent::netlock::Conn;

/// How long a workload may take to reach a tick. Generous: the development
/// machines have two cores and the tests run concurrently.
pub const WAIT: Duration = Duration::from_secs(60);

/// The `ckpt-agent` binary built for these tests (with the `test-hooks` feature).
pub fn agent() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_ckpt-agent"))
}

/// An established loopback TCP connection: (connecting end, accepted end).
pub fn pair() -> (TcpStream, TcpStream) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let a = TcpStream::connect(l.local_addr().unwrap()).unwrap();
    let (b, _) = l.accept().unwrap();
    (a, b)
}

/// The connection `s` is one end of, as the network lock names it.
pub fn conn_of(s: &TcpStream) -> Conn {
    Conn {
        local: s.local_addr().unwrap(),
        remote: s.peer_addr().unwrap(),
    }
}
