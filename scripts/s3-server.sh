#!/usr/bin/env bash
# A real S3-compatible server for ckpt's tests: install it, start it, stop it.
#
#   scripts/s3-server.sh install               build the server binary (idempotent)
#   scripts/s3-server.sh start DATA_DIR PORT   serve DATA_DIR on 127.0.0.1:PORT
#   scripts/s3-server.sh stop                  stop the server that `start` started
#   scripts/s3-server.sh path                  print the binary's path
#
# The server is s3s-fs (the `s3s` project's S3 server over a local directory): a
# separate process that speaks HTTP with SigV4 signatures, so the S3 backend is
# tested against a real server, never a mock inside the test process (DESIGN.md,
# "Test environment"). Weighed against it:
# - moto (PyPI `moto[server]`): also real HTTP, but a Python service that pulls in
#   some 40 packages (boto3, botocore, cryptography, werkzeug, ...) and emulates all
#   of AWS; slower to start, and one more language runtime in CI.
# - MinIO, Garage, Ceph RGW: not in the package registries this project can use.
# s3s-fs is one crate from the same registry as the rest of the build, built with
# the same Rust toolchain; it stores each bucket as a directory under DATA_DIR and
# each object as a file, so a test can also damage an object on disk.
#
# The version is pinned: s3s-fs 0.14.1 is the newest release that builds with Rust
# 1.92 or later (0.15 and after need 1.96). Its binary sits behind the `binary`
# feature. `--locked` builds the dependency versions its authors tested.
# It is built at opt-level 1: measured on the 2-core dev machine (with other builds
# running), 5.6 minutes against 10 at the release default of 3, and the same
# throughput (64 MiB of 1 MiB chunks: put 0.6 s, get 1.0 s); a debug build takes 4
# minutes but puts 10 times slower, too slow for image-sized tests.
#
# Environment:
#   CKPT_TOOLS             install root (default /opt/ckpt-tools; binary in bin/)
#   AWS_ACCESS_KEY_ID      access key the server accepts (default ckpt-test)
#   AWS_SECRET_ACCESS_KEY  its secret (default ckpt-test-secret)
#   CKPT_S3_BUCKET         bucket created by `start` (default ckpt)
#   CKPT_S3_PIDFILE        where `start` records the PID (default /tmp/ckpt-s3-server.pid)
#
# The server listens on 127.0.0.1 only. `start` prints the environment a client
# needs (AWS_ENDPOINT_URL and the credentials) as shell `export` lines.
set -euo pipefail

S3S_FS_VERSION=0.14.1
TOOLS=${CKPT_TOOLS:-/opt/ckpt-tools}
BIN=$TOOLS/bin/s3s-fs
PIDFILE=${CKPT_S3_PIDFILE:-/tmp/ckpt-s3-server.pid}
BUCKET=${CKPT_S3_BUCKET:-ckpt}
ACCESS_KEY=${AWS_ACCESS_KEY_ID:-ckpt-test}
SECRET_KEY=${AWS_SECRET_ACCESS_KEY:-ckpt-test-secret}

usage() {
    sed -n '4,7p' "$0" | sed 's/^# //' >&2
    exit 2
}

installed() {
    [ -x "$BIN" ] && "$BIN" --version 2>/dev/null | grep -q " $S3S_FS_VERSION\$"
}

cmd_install() {
    if installed; then
        echo "s3-server: s3s-fs $S3S_FS_VERSION already installed at $BIN"
        return 0
    fi
    if ! command -v cargo >/dev/null 2>&1; then
        echo "s3-server: cargo (Rust) is required to build s3s-fs and was not found on PATH" >&2
        exit 1
    fi
    echo "s3-server: building s3s-fs $S3S_FS_VERSION into $TOOLS (a few minutes)"
    local start=$SECONDS
    # A private target directory: never share one with a concurrent workspace build.
    local target
    target=$(mktemp -d)
    local rc=0
    CARGO_PROFILE_RELEASE_OPT_LEVEL=1 cargo install s3s-fs --version "=$S3S_FS_VERSION" --features binary --locked \
        --root "$TOOLS" --target-dir "$target" --force || rc=$?
    rm -rf "$target"
    if [ "$rc" -ne 0 ]; then
        echo "s3-server: building s3s-fs failed (cargo exit $rc)" >&2
        exit "$rc"
    fi
    echo "s3-server: installed $BIN in $((SECONDS - start)) s"
}

port_open() {
    # bash's /dev/tcp: no netcat needed.
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

cmd_start() {
    [ $# -eq 2 ] || usage
    local data=$1 port=$2
    if ! installed; then
        echo "s3-server: s3s-fs is not installed at $BIN: run scripts/s3-server.sh install" >&2
        exit 1
    fi
    if [ -f "$PIDFILE" ] && kill -0 "$(cat "$PIDFILE")" 2>/dev/null; then
        echo "s3-server: already running (PID $(cat "$PIDFILE"), $PIDFILE); stop it first" >&2
        exit 1
    fi
    if port_open "$port"; then
        echo "s3-server: port $port on 127.0.0.1 is taken; pick another" >&2
        exit 1
    fi
    mkdir -p "$data/$BUCKET"
    local log=${PIDFILE%.pid}.log
    nohup "$BIN" --host 127.0.0.1 --port "$port" \
        --access-key "$ACCESS_KEY" --secret-key "$SECRET_KEY" "$data" \
        >"$log" 2>&1 </dev/null &
    local pid=$!
    echo "$pid" >"$PIDFILE"
    for _ in $(seq 100); do
        if port_open "$port"; then
            echo "s3-server: s3s-fs PID $pid on http://127.0.0.1:$port, data in $data, log $log" >&2
            echo "export AWS_ENDPOINT_URL=http://127.0.0.1:$port"
            echo "export AWS_ACCESS_KEY_ID=$ACCESS_KEY"
            echo "export AWS_SECRET_ACCESS_KEY=$SECRET_KEY"
            echo "export AWS_REGION=${AWS_REGION:-us-east-1}"
            echo "# store URL: s3://$BUCKET/"
            return 0
        fi
        if ! kill -0 "$pid" 2>/dev/null; then
            echo "s3-server: s3s-fs exited at start; its log ($log):" >&2
            cat "$log" >&2
            rm -f "$PIDFILE"
            exit 1
        fi
        sleep 0.1
    done
    echo "s3-server: s3s-fs (PID $pid) is not listening on port $port after 10 s; log $log" >&2
    kill "$pid" 2>/dev/null || true
    rm -f "$PIDFILE"
    exit 1
}

cmd_stop() {
    if [ ! -f "$PIDFILE" ]; then
        echo "s3-server: not running (no $PIDFILE)"
        return 0
    fi
    local pid
    pid=$(cat "$PIDFILE")
    if kill "$pid" 2>/dev/null; then
        for _ in $(seq 50); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        kill -9 "$pid" 2>/dev/null || true
        echo "s3-server: stopped PID $pid"
    fi
    rm -f "$PIDFILE"
}

case ${1:-} in
install) cmd_install ;;
start) shift; cmd_start "$@" ;;
stop) cmd_stop ;;
path) echo "$BIN" ;;
*) usage ;;
esac
