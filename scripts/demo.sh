#!/usr/bin/env bash
# The main job on one machine with the embedded default (a local store directory):
# `ckpt-controller demo` starts a controller and an agent, a job of 4 ranks, saves
# it while it runs, saves it with --kill, restores it, and checks every rank's
# output against a recomputation. Run as root.
set -euo pipefail
cd "$(dirname "$0")/.."
CKPT_SETUP_S3=0 scripts/setup.sh
cargo build --release --locked -p ckpt-agent -p ckpt-controller
exec target/release/ckpt-controller demo "$@"
