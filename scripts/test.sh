#!/usr/bin/env bash
# The whole test suite: set-up, build, unit tests and end-to-end tests against the
# real kernel (ptrace, clone3 with set_tid, pidfd_getfd). Run as root.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo build --workspace --all-targets --locked
# Two test threads: the machine has two cores, and the end-to-end tests time
# workloads that must keep ticking while they are dumped.
cargo test --workspace --locked -- --test-threads=2
