#!/usr/bin/env bash
# The main job on one machine with the embedded default (a local image directory):
# start a sample program with a large, constantly mutated heap, dump it (the dump
# kills it), restore it with its original PID, and show that it carries on from the
# same state. Run as root.
set -euo pipefail
cd "$(dirname "$0")/.."
CKPT_SETUP_S3=0 scripts/setup.sh
cargo build --release --locked -p ckpt-agent
agent="$PWD/target/release/ckpt-agent"

work=$(mktemp -d /tmp/ckpt-demo.XXXXXX)
pid=""
cleanup() {
    # End only what this script started, by PID.
    if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then kill -9 "$pid" 2>/dev/null || true; fi
    rm -rf "$work"
}
trap cleanup EXIT

mib=${CKPT_DEMO_MIB:-256}
gcc -O2 -pthread -o "$work/heap_checksum" tests/workloads/heap_checksum.c
echo "== starting heap_checksum with a ${mib} MiB heap (it re-verifies its whole heap every tick)"
# Descriptors beyond stdio are closed: a pipe to this shell would lead out of the tree.
(
    cd "$work"
    for fd in /proc/$BASHPID/fd/*; do n=${fd##*/}; if [ "$n" -gt 2 ]; then eval "exec $n>&-"; fi; done 2>/dev/null
    exec setsid ./heap_checksum "$mib" 42 </dev/null >"$work/log" 2>&1
) &
pid=$!
for _ in $(seq 100); do grep -q '^tick 5 ' "$work/log" 2>/dev/null && break; sleep 0.1; done
echo "   pid $pid, last line before the dump: $(grep '^tick' "$work/log" | tail -1)"

echo "== ckpt-agent dump --pid $pid --image $work/img"
"$agent" dump --pid "$pid" --image "$work/img"
before=$(grep -c '^tick' "$work/log")
wait "$pid" 2>/dev/null || true
echo "   the program is gone: $(kill -0 "$pid" 2>/dev/null && echo STILL RUNNING || echo yes)"

echo "== ckpt-agent inspect --image $work/img (first lines)"
"$agent" inspect --image "$work/img" | head -8

echo "== ckpt-agent restore --image $work/img"
start=$(date +%s%N)
newpid=$("$agent" restore --image "$work/img" | tail -1)
end=$(date +%s%N)
echo "   restored PID $newpid in $(( (end - start) / 1000000 )) ms (command wall time)"
pid=$newpid
sleep 2
after=$(grep -c '^tick' "$work/log")
echo "   ticks before the dump: $before, now: $after"
python3 - "$work/log" <<'PY'
import sys
ticks = [l.split() for l in open(sys.argv[1]) if l.startswith("tick")]
fails = [l for l in open(sys.argv[1]) if l.startswith("FAIL")]
ns = [int(t[1]) for t in ticks]
ok = ns == list(range(1, len(ns) + 1)) and not fails
print(f"   continuity: ticks 1..{ns[-1]} with no gap or repeat, {len(fails)} FAIL lines: {'OK' if ok else 'BROKEN'}")
sys.exit(0 if ok else 1)
PY
echo "   last line: $(grep '^tick' "$work/log" | tail -1)"
