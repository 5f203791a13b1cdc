#!/usr/bin/env bash
# Installs what ckpt's demo and tests need on a fresh Debian 12 machine (run as root).
# Idempotent: packages already present are not reinstalled.
set -euo pipefail

need=()
command -v gcc >/dev/null 2>&1 || need+=(gcc)
[ -e /usr/include/stdio.h ] || need+=(libc6-dev)
command -v python3 >/dev/null 2>&1 || need+=(python3)
# The test cluster's network namespaces, veth pairs and bridge.
command -v ip >/dev/null 2>&1 || need+=(iproute2)
# MUNGE: how the CLI proves its user to a controller on another host.
command -v munged >/dev/null 2>&1 || need+=(munge)
# nftables: the network lock of a checkpoint (one table per attempt).
command -v nft >/dev/null 2>&1 || need+=(nftables)
# memcached: a real server, written by others, checkpointed with its clients.
command -v memcached >/dev/null 2>&1 || need+=(memcached)
# Open MPI: the MPI jobs the engine is tried on (mpirun, and mpicc for the workload).
command -v mpirun >/dev/null 2>&1 || need+=(openmpi-bin)
command -v mpicc >/dev/null 2>&1 || need+=(libopenmpi-dev)
if [ ${#need[@]} -gt 0 ]; then
    echo "setup: installing ${need[*]}"
    export DEBIAN_FRONTEND=noninteractive
    # Packages must not start their services here (memcached would): a
    # policy-rc.d that says no, for the time of the install, unless one exists.
    policy=""
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        policy=/usr/sbin/policy-rc.d
        printf '#!/bin/sh\nexit 101\n' > "$policy"
        chmod +x "$policy"
        trap 'rm -f "$policy"' EXIT
    fi
    apt-get update -q
    apt-get install -y -q "${need[@]}"
    [ -z "$policy" ] || rm -f "$policy"
fi
if ! command -v cargo >/dev/null 2>&1; then
    echo "setup: cargo (Rust) is required and was not found on PATH" >&2
    exit 1
fi
# The S3-compatible server the storage tests run against (a real server process,
# built from the crate registry; skipped when already installed).
if [ "${CKPT_SETUP_S3:-1}" = 1 ]; then
    "$(dirname "$0")/s3-server.sh" install
fi
