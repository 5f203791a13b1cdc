"""mp_pool: a Python multiprocessing pool (fork), for the engine tests.

usage: python3 -u mp_pool.py [WORKERS=3]

A Pool of WORKERS processes (pipes and a SimpleQueue between them, a lock and a
semaphore that live in /dev/shm), a multiprocessing.Value in shared memory, and a
Manager-free Event. Every tick the parent maps a batch of tasks over the pool;
each task squares its argument and adds it to the shared Value under its lock.
The parent checks each result and the shared total against what it computed
alone, and prints (the common.h line protocol)

    tick <n> <chain> total <total> workers <WORKERS>

A wrong result or total prints a FAIL line.
"""
import multiprocessing as mp
import sys
import time

MASK = (1 << 64) - 1


def chain_step(acc, n):
    z = (acc + n * 0x9E3779B97F4A7C15) & MASK
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK
    return z ^ (z >> 31)


total = None
sem = None


def init(t, s):
    global total, sem
    total, sem = t, s


def work(x):
    with sem:
        with total.get_lock():
            total.value += x * x
    return x * x


def main():
    workers = int(sys.argv[1]) if len(sys.argv) > 1 else 3
    ctx = mp.get_context("fork")
    t = ctx.Value("q", 0)
    s = ctx.Semaphore(2)
    want_total = 0
    chain = 0
    with ctx.Pool(workers, initializer=init, initargs=(t, s)) as pool:
        n = 0
        while True:
            n += 1
            args = list(range(n, n + 8))
            got = pool.map(work, args)
            want = [a * a for a in args]
            want_total += sum(want)
            if got != want:
                print(f"FAIL tick {n}: results {got}, want {want}", flush=True)
            with t.get_lock():
                have = t.value
            if have != want_total:
                print(f"FAIL tick {n}: shared total {have}, want {want_total}", flush=True)
            chain = chain_step(chain, n)
            print(f"tick {n} {chain:016x} total {have} workers {workers}", flush=True)
            time.sleep(0.02)


if __name__ == "__main__":
    main()
