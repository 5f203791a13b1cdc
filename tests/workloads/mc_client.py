#!/usr/bin/env python3
"""mc_client: a memcached client that holds one connection open for its whole life.

usage: python3 -u mc_client.py HOST PORT

Over a single TCP connection it stores key k<i> with a value computed from i
("set"), then reads back key k<i-7> ("get") and checks the value, for i = 1, 2,
3, ... without end, pausing 2 ms every 16 steps. Every 16 steps it prints
  tick <n> <chain> i <i>
in the protocol of common.h. A wrong or missing value, an unexpected answer or a
connection that ends prints FAIL and exits: the session, and the server's data,
must survive the checkpoint.
"""

import socket
import sys
import time

MASK = (1 << 64) - 1


def chain_step(acc, n):
    z = (acc + n * 0x9E3779B97F4A7C15) & MASK
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK
    return z ^ (z >> 31)


def value(i):
    return (b"v%d-" % i) * (1 + i % 7)


def fail(what):
    print("FAIL", what, flush=True)
    sys.exit(1)


host, port = sys.argv[1], int(sys.argv[2])
for attempt in range(300):
    try:
        s = socket.create_connection((host, port))
        break
    except OSError:
        time.sleep(0.05)
else:
    fail("cannot connect to memcached")
f = s.makefile("rb")
print("mc_client connected from", s.getsockname(), flush=True)
n, chain, i = 0, 0, 0
while True:
    i += 1
    v = value(i)
    s.sendall(b"set k%d 0 0 %d\r\n%s\r\n" % (i, len(v), v))
    line = f.readline()
    if line != b"STORED\r\n":
        fail("set k%d answered %r" % (i, line))
    if i > 7:
        j = i - 7
        s.sendall(b"get k%d\r\n" % j)
        head = f.readline()
        want = value(j)
        if head != b"VALUE k%d 0 %d\r\n" % (j, len(want)):
            fail("get k%d answered %r" % (j, head))
        data = f.read(len(want) + 2)
        end = f.readline()
        if data != want + b"\r\n" or end != b"END\r\n":
            fail("k%d holds %r" % (j, data))
    if i % 16 == 0:
        n += 1
        chain = chain_step(chain, n)
        print("tick %d %016x i %d" % (n, chain, i), flush=True)
        time.sleep(0.002)
