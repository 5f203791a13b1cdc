/*
 * fork_pipes: a fork tree joined by pipes that always hold data in flight.
 *
 * usage: fork_pipes
 *
 *   P (root, producer) --pipe1--> C1 (child of P, relay)
 *   C1 --pipe2--> G (child of C1, relay) --pipe3--> C2 (child of P, consumer)
 *
 * Records are 256 bytes: a sequence number, a hop count, a payload generated from
 * the sequence number, and a checksum. The producer writes bursts of 32 records
 * (8 KiB) every 5 ms; each stage is slower than the one before it, so every pipe
 * stays (nearly) full and the producer mostly sleeps in write(): a checkpoint always
 * finds a few hundred KiB in the pipes.
 *
 * Each relay checks the record (sequence in order, hop count, checksum, payload),
 * bumps the hop count, re-seals it and forwards it. The consumer checks the same
 * with the hop count 2 and prints, after every 16 records,
 *   tick <n> <chain> seq <last seq> inq <bytes queued in pipe3>
 * so seq == 16 * n - 1. A record lost, repeated, reordered or damaged in a pipe
 * prints FAIL. Every child also checks that its parent is still the process that
 * forked it (getppid), so the tree shape must survive a restore.
 *
 * End of input (an upstream stage gone) is reported without FAIL and ends the
 * stage: that is how the tree winds down when the test kills it.
 */
#include "common.h"

#include <signal.h>
#include <sys/ioctl.h>

#define REC_SIZE 256
#define PAYLOAD (REC_SIZE - 3 * 8)

struct rec {
	uint64_t seq;
	uint64_t hops;
	uint8_t payload[PAYLOAD];
	uint64_t csum;
};
_Static_assert(sizeof(struct rec) == REC_SIZE, "record size");

static uint64_t rec_csum(const struct rec *r)
{
	uint64_t h = chain_step(r->seq, r->hops + 1);
	const uint64_t *w = (const uint64_t *)r->payload;
	for (size_t i = 0; i < PAYLOAD / 8; i++)
		h = chain_step(h ^ w[i], i + 1);
	return h;
}

static void make_payload(uint64_t seq, uint8_t *out)
{
	uint64_t s = seq * 0x9E3779B97F4A7C15ULL + 1;
	uint64_t *w = (uint64_t *)out;
	for (size_t i = 0; i < PAYLOAD / 8; i++)
		w[i] = rng_next(&s);
}

static int read_rec(int fd, struct rec *r)
{
	size_t got = 0;
	while (got < REC_SIZE) {
		ssize_t n = read(fd, (char *)r + got, REC_SIZE - got);
		if (n < 0) {
			if (errno == EINTR) {
				FAIL("read on pipe fd %d: EINTR", fd);
				continue;
			}
			FAIL("read on pipe fd %d: %s", fd, strerror(errno));
			return 0;
		}
		if (n == 0) {
			if (got != 0)
				FAIL("pipe fd %d ended inside a record (%zu bytes)", fd, got);
			return 0;
		}
		got += (size_t)n;
	}
	return 1;
}

/* Verify a record that should be number `expect` after `hops` relays. */
static void check_rec(const char *stage, const struct rec *r, uint64_t expect, uint64_t hops)
{
	static uint8_t want[PAYLOAD];
	if (r->seq != expect)
		FAIL("%s: record seq %llu, expected %llu", stage, (unsigned long long)r->seq,
		     (unsigned long long)expect);
	if (r->hops != hops)
		FAIL("%s: record %llu has hop count %llu, expected %llu", stage,
		     (unsigned long long)r->seq, (unsigned long long)r->hops,
		     (unsigned long long)hops);
	if (rec_csum(r) != r->csum)
		FAIL("%s: record %llu checksum mismatch", stage, (unsigned long long)r->seq);
	make_payload(r->seq, want);
	if (memcmp(want, r->payload, PAYLOAD) != 0)
		FAIL("%s: record %llu payload damaged", stage, (unsigned long long)r->seq);
}

static void check_parent(const char *stage, pid_t parent)
{
	if (getppid() != parent)
		FAIL("%s: parent is %d, expected %d", stage, (int)getppid(), (int)parent);
}

static void relay(const char *stage, int in, int out, uint64_t hops_in, long delay_us, pid_t parent)
{
	struct rec r;
	uint64_t expect = 0;
	while (read_rec(in, &r)) {
		check_rec(stage, &r, expect, hops_in);
		expect = r.seq + 1;
		r.hops++;
		r.csum = rec_csum(&r);
		write_all(out, &r, sizeof r);
		if ((expect & 63) == 0)
			check_parent(stage, parent);
		sleep_us(delay_us);
	}
	emit("%s: upstream closed after %llu records, exiting", stage, (unsigned long long)expect);
	_exit(0);
}

static void consume(int in, pid_t parent)
{
	struct ticker t = { 0, 0 };
	struct rec r;
	uint64_t expect = 0;
	while (read_rec(in, &r)) {
		check_rec("consumer", &r, expect, 2);
		expect = r.seq + 1;
		if ((expect & 15) == 0) {
			uint64_t n = ticker_next(&t);
			int inq = -1;
			ioctl(in, FIONREAD, &inq);
			check_parent("consumer", parent);
			emit("tick %llu %016llx seq %llu inq %d", (unsigned long long)n,
			     (unsigned long long)t.chain, (unsigned long long)r.seq, inq);
		}
		sleep_us(400);
	}
	emit("consumer: upstream closed after %llu records, exiting", (unsigned long long)expect);
	_exit(0);
}

int main(void)
{
	int p1[2], p2[2], p3[2];
	if (pipe(p1) < 0 || pipe(p3) < 0) {
		FAIL("pipe: %s", strerror(errno));
		return 1;
	}
	pid_t root = getpid();

	pid_t c1 = fork();
	if (c1 < 0) {
		FAIL("fork: %s", strerror(errno));
		return 1;
	}
	if (c1 == 0) {
		close(p1[1]);
		close(p3[0]);
		if (pipe(p2) < 0) {
			FAIL("pipe: %s", strerror(errno));
			_exit(1);
		}
		pid_t me = getpid();
		pid_t g = fork();
		if (g < 0) {
			FAIL("fork: %s", strerror(errno));
			_exit(1);
		}
		if (g == 0) {
			close(p1[0]);
			close(p2[1]);
			relay("relay2", p2[0], p3[1], 1, 150, me);
		}
		close(p2[0]);
		close(p3[1]);
		relay("relay1", p1[0], p2[1], 0, 100, root);
	}

	pid_t c2 = fork();
	if (c2 < 0) {
		FAIL("fork: %s", strerror(errno));
		return 1;
	}
	if (c2 == 0) {
		close(p1[0]);
		close(p1[1]);
		close(p3[1]);
		consume(p3[0], root);
	}
	close(p1[0]);
	close(p3[0]);
	close(p3[1]);
	emit("fork_pipes producer %d relay1 %d consumer %d", (int)root, (int)c1, (int)c2);

	/* producer */
	static struct rec burst[32];
	uint64_t seq = 0;
	for (;;) {
		for (int i = 0; i < 32; i++) {
			struct rec *r = &burst[i];
			r->seq = seq++;
			r->hops = 0;
			make_payload(r->seq, r->payload);
			r->csum = rec_csum(r);
		}
		write_all(p1[1], burst, sizeof burst);
		sleep_ms(5);
	}
}
