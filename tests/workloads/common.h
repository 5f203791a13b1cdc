/*
 * Shared helpers of the ckpt test workloads.
 *
 * The line protocol every workload follows (parsed by ckpt_tests::ticks):
 *
 *   tick <n> <chain> [extra fields...]
 *
 * <n> starts at 1 and grows by exactly one per line; <chain> is 16 hex digits,
 * chain_n = chain_step(chain_{n-1}, n) with chain_0 = 0, computed by the program
 * from its own in-memory state. A test recomputes it from n, so a lost, repeated
 * or corrupted state shows up as a wrong value, a gap or a repeat. Any
 * inconsistency a workload finds in its own state is printed as a line that
 * starts with "FAIL". Other lines are free-form information.
 *
 * Output goes through write(2) on fd 1, never stdio, so a forked child cannot
 * duplicate buffered text and every line reaches the log as soon as it is made.
 */
#ifndef CKPT_WORKLOAD_COMMON_H
#define CKPT_WORKLOAD_COMMON_H

#define _GNU_SOURCE
#include <errno.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

/* splitmix64-style step; ckpt_tests::ticks::chain_step is the same function. */
static inline uint64_t chain_step(uint64_t acc, uint64_t n)
{
	uint64_t z = acc + n * 0x9E3779B97F4A7C15ULL;
	z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
	z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
	return z ^ (z >> 31);
}

/* Write all of buf to fd, retrying on EINTR and short writes. */
static inline void write_all(int fd, const void *buf, size_t len)
{
	const char *p = buf;
	while (len > 0) {
		ssize_t n = write(fd, p, len);
		if (n < 0) {
			if (errno == EINTR)
				continue;
			_exit(111);
		}
		p += n;
		len -= (size_t)n;
	}
}

/* printf-like line to fd 1 in a single write(2). */
__attribute__((format(printf, 1, 2)))
static inline void emit(const char *fmt, ...)
{
	char buf[1024];
	va_list ap;
	va_start(ap, fmt);
	int n = vsnprintf(buf, sizeof buf - 1, fmt, ap);
	va_end(ap);
	if (n < 0)
		return;
	if ((size_t)n > sizeof buf - 2)
		n = sizeof buf - 2;
	buf[n++] = '\n';
	write_all(1, buf, (size_t)n);
}

#define FAIL(...) emit("FAIL " __VA_ARGS__)

/* The state behind the tick lines of one workload. */
struct ticker {
	uint64_t n;
	uint64_t chain;
};

/* Advance the ticker; returns the new tick number. */
static inline uint64_t ticker_next(struct ticker *t)
{
	t->n++;
	t->chain = chain_step(t->chain, t->n);
	return t->n;
}

/* Sleep ms milliseconds of CLOCK_MONOTONIC, resuming after signal handlers. */
static inline void sleep_ms(long ms)
{
	struct timespec ts = { .tv_sec = ms / 1000, .tv_nsec = (ms % 1000) * 1000000L };
	while (nanosleep(&ts, &ts) < 0 && errno == EINTR)
		;
}

static inline void sleep_us(long us)
{
	struct timespec ts = { .tv_sec = us / 1000000, .tv_nsec = (us % 1000000) * 1000L };
	while (nanosleep(&ts, &ts) < 0 && errno == EINTR)
		;
}

/* xorshift64*: the workloads' PRNG; its state lives in process memory. */
static inline uint64_t rng_next(uint64_t *s)
{
	uint64_t x = *s;
	x ^= x >> 12;
	x ^= x << 25;
	x ^= x >> 27;
	*s = x;
	return x * 0x2545F4914F6CDD1DULL;
}

static inline long arg_long(int argc, char **argv, int i, long dflt)
{
	if (argc > i && argv[i][0] != '\0') {
		char *end;
		long v = strtol(argv[i], &end, 0);
		if (*end == '\0')
			return v;
	}
	return dflt;
}

#endif
