"""eventfd_dups: many eventfds on the one anonymous inode they all share, some
of them duplicated: each duplicate must stay the same open file description.

usage: python3 -u eventfd_dups.py [N=64]

Makes N non-blocking eventfds and a dup() of every 3rd one. Every tick it writes
1 through each duplicate and reads it back through the original (which must see
exactly 1: a duplicate that became a description of its own leaves the original
empty), and checks every other eventfd reads empty. Prints

    tick <n> <chain> eventfds <N> dups <D>
"""
import os
import sys
import time

MASK = (1 << 64) - 1


def chain_step(acc, n):
    z = (acc + n * 0x9E3779B97F4A7C15) & MASK
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK
    return z ^ (z >> 31)


def read_count(fd):
    try:
        return int.from_bytes(os.read(fd, 8), "little")
    except BlockingIOError:
        return 0


def main():
    n_fds = int(sys.argv[1]) if len(sys.argv) > 1 else 64
    fds = [os.eventfd(0, os.EFD_NONBLOCK) for _ in range(n_fds)]
    dups = {i: os.dup(fds[i]) for i in range(0, n_fds, 3)}
    chain, n = 0, 0
    while True:
        n += 1
        for i, d in dups.items():
            os.write(d, (1).to_bytes(8, "little"))
        for i, fd in enumerate(fds):
            got = read_count(fd)
            want = 1 if i in dups else 0
            if got != want:
                print(f"FAIL tick {n}: eventfd {i} (fd {fd}) read {got}, want {want}", flush=True)
        chain = chain_step(chain, n)
        print(f"tick {n} {chain:016x} eventfds {n_fds} dups {len(dups)}", flush=True)
        time.sleep(0.01)


if __name__ == "__main__":
    main()
