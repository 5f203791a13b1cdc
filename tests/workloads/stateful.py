#!/usr/bin/env python3
"""stateful: a Python interpreter with state spread over many kinds of objects.

usage: python3 -u stateful.py [interval_ms=10]

Each tick it advances
  - a generator (its frame holds an index and a 64-bit LCG state),
  - a dict of counts per bucket, a list of the last 100 values and the full history,
  - a running hashlib.sha256 (its state lives in OpenSSL's memory),
  - an object whose attribute mirrors the LCG state, computed independently,
and checks that they agree: the generator's index is the tick number, the LCG
value matches the mirror, the dict counts sum to the tick number, the list holds
the right values, and (every 50 ticks) the running hash equals a hash recomputed
from the history. It prints "tick <n> <chain> x <lcg> sha <16 hex>"; <chain> is the
protocol of ../workloads/common.h, so the test checks continuity as for the C
workloads. Any disagreement prints FAIL.
"""

import hashlib
import os
import sys
import time

MASK = (1 << 64) - 1
LCG_A = 6364136223846793005
LCG_C = 1442695040888963407


def chain_step(acc, n):
    z = (acc + n * 0x9E3779B97F4A7C15) & MASK
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK
    return z ^ (z >> 31)


def lcg_values(seed):
    i = 0
    x = seed
    while True:
        i += 1
        x = (x * LCG_A + LCG_C) & MASK
        yield i, x


class Mirror:
    def __init__(self, seed):
        self.x = seed

    def step(self):
        self.x = (self.x * LCG_A + LCG_C) & MASK
        return self.x


def fail(msg):
    print(f"FAIL {msg}", flush=True)


def main():
    interval = int(sys.argv[1]) / 1000.0 if len(sys.argv) > 1 else 0.01
    seed = 0xC0FFEE
    pid = os.getpid()
    gen = lcg_values(seed)
    mirror = Mirror(seed)
    counts = {}
    recent = []
    history = []
    running = hashlib.sha256()
    chain = 0
    n = 0
    print(f"stateful pid {pid} python {sys.version.split()[0]}", flush=True)
    while True:
        n += 1
        chain = chain_step(chain, n)
        i, x = next(gen)
        if i != n:
            fail(f"tick {n}: generator index {i}")
        if mirror.step() != x:
            fail(f"tick {n}: generator value {x:016x}, mirror {mirror.x:016x}")
        bucket = x % 17
        counts[bucket] = counts.get(bucket, 0) + 1
        recent.append(x)
        if len(recent) > 100:
            del recent[0]
        history.append(x)
        running.update(x.to_bytes(8, "little"))
        if sum(counts.values()) != n:
            fail(f"tick {n}: dict counts sum to {sum(counts.values())}")
        if len(recent) != min(n, 100) or recent[-1] != x or recent != history[-100:]:
            fail(f"tick {n}: recent list disagrees with history")
        if n % 50 == 0:
            again = hashlib.sha256(b"".join(v.to_bytes(8, "little") for v in history))
            if again.hexdigest() != running.hexdigest():
                fail(f"tick {n}: running sha256 disagrees with the history")
        if os.getpid() != pid:
            fail(f"tick {n}: getpid is {os.getpid()}, was {pid}")
        print(f"tick {n} {chain:016x} x {x:016x} sha {running.hexdigest()[:16]}", flush=True)
        time.sleep(interval)


if __name__ == "__main__":
    main()
