/*
 * shared_anon: a parent and a child talking through 8 MiB of shared anonymous
 * memory (mmap MAP_SHARED|MAP_ANONYMOUS before fork).
 *
 * usage: shared_anon
 *
 * Layout of the region: page 0 is a header of atomics, pages 1..2047 are data.
 * Every data page starts with a pattern unique to the page (filled by the parent
 * before the fork), so the whole 8 MiB must be stored and brought back.
 *
 * Round r (r = 1, 2, ...), in lock step:
 *   parent: writes pattern(r, p) over all of data page p = 1 + (r - 1) % 2047,
 *           increments `hits`, then publishes ping = r (release);
 *   child:  waits for ping == r (acquire), checks page p holds pattern(r, p),
 *           increments `hits`, stores its checksum of page p in `echo` and
 *           publishes pong = r (release);
 *   parent: waits for pong == r, checks echo equals its own checksum of page p
 *           and hits == 2 r, re-checks 64 other data pages (each must still hold
 *           the pattern of the last round that wrote it, or the initial one),
 *           and prints
 *             tick <r> <chain> pong <pong> hits <hits> checked <pages so far>
 * A round completes only if each process sees the other's writes: after a restore
 * that did not map the region SHARED in both processes the rounds stop (and the
 * test sees no more ticks). Any wrong value prints FAIL. The child also checks
 * that its parent is still the process that forked it, and the parent that the
 * child's PID did not change. Neither side ever gives up waiting: a checkpoint
 * freezes both, so wall-clock timeouts would only cause false alarms.
 */
#include "common.h"

#include <sched.h>
#include <stdatomic.h>
#include <sys/mman.h>

#define REGION (8UL << 20)
#define PAGE 4096UL
#define NPAGES (REGION / PAGE)
#define NDATA (NPAGES - 1)
#define WORDS (PAGE / 8)

struct header {
	_Atomic uint64_t ping;
	_Atomic uint64_t pong;
	_Atomic uint64_t hits;
	_Atomic uint64_t echo;
	_Atomic int32_t child_pid;
};

static unsigned char *region;

static uint64_t *page_words(uint64_t p)
{
	return (uint64_t *)(region + p * PAGE);
}

static uint64_t pattern(uint64_t round, uint64_t p, uint64_t j)
{
	return chain_step((round << 20) ^ (p << 9) ^ j, 0xA11 + j);
}

static void fill_page(uint64_t round, uint64_t p)
{
	uint64_t *w = page_words(p);
	for (uint64_t j = 0; j < WORDS; j++)
		w[j] = pattern(round, p, j);
}

/* Index of the first wrong word of page p against pattern(round, p), or -1. */
static long check_page(uint64_t round, uint64_t p)
{
	const uint64_t *w = page_words(p);
	for (uint64_t j = 0; j < WORDS; j++)
		if (w[j] != pattern(round, p, j))
			return (long)j;
	return -1;
}

static uint64_t page_sum(uint64_t p)
{
	const uint64_t *w = page_words(p);
	uint64_t h = p;
	for (uint64_t j = 0; j < WORDS; j++)
		h = chain_step(h ^ w[j], j + 1);
	return h;
}

static uint64_t page_of_round(uint64_t r)
{
	return 1 + (r - 1) % NDATA;
}

/* The round that last wrote data page p when round `now` is complete (0: none). */
static uint64_t last_writer(uint64_t p, uint64_t now)
{
	if (now < p)
		return 0;
	return p + NDATA * ((now - p) / NDATA);
}

static void wait_until(_Atomic uint64_t *v, uint64_t want)
{
	unsigned spins = 0;
	while (atomic_load_explicit(v, memory_order_acquire) < want) {
		if (++spins < 100)
			sched_yield();
		else
			sleep_us(200);
	}
}

static void child(struct header *h, pid_t parent)
{
	uint64_t r = 0;
	for (;;) {
		r++;
		wait_until(&h->ping, r);
		uint64_t ping = atomic_load_explicit(&h->ping, memory_order_acquire);
		if (ping != r)
			FAIL("child: ping jumped to %llu, expected %llu", (unsigned long long)ping,
			     (unsigned long long)r);
		uint64_t p = page_of_round(r);
		long bad = check_page(r, p);
		if (bad >= 0)
			FAIL("child: round %llu: data page %llu word %ld is not what the parent wrote",
			     (unsigned long long)r, (unsigned long long)p, bad);
		if (getppid() != parent)
			FAIL("child: parent is %d, expected %d", (int)getppid(), (int)parent);
		atomic_fetch_add_explicit(&h->hits, 1, memory_order_acq_rel);
		atomic_store_explicit(&h->echo, page_sum(p), memory_order_relaxed);
		atomic_store_explicit(&h->pong, r, memory_order_release);
	}
}

int main(void)
{
	region = mmap(NULL, REGION, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
	if (region == MAP_FAILED) {
		FAIL("mmap: %s", strerror(errno));
		return 1;
	}
	struct header *h = (struct header *)region;
	for (uint64_t p = 1; p < NPAGES; p++)
		fill_page(0, p);

	pid_t parent = getpid();
	pid_t kid = fork();
	if (kid < 0) {
		FAIL("fork: %s", strerror(errno));
		return 1;
	}
	if (kid == 0) {
		atomic_store(&h->child_pid, (int32_t)getpid());
		child(h, parent);
	}
	emit("shared_anon parent %d child %d region %p size %lu", (int)parent, (int)kid,
	     (void *)region, REGION);

	struct ticker t = { 0, 0 };
	uint64_t checked = 0, cursor = 1;
	for (;;) {
		uint64_t r = t.n + 1;
		uint64_t p = page_of_round(r);
		fill_page(r, p);
		uint64_t want_sum = page_sum(p);
		atomic_fetch_add_explicit(&h->hits, 1, memory_order_acq_rel);
		atomic_store_explicit(&h->ping, r, memory_order_release);

		wait_until(&h->pong, r);
		uint64_t pong = atomic_load_explicit(&h->pong, memory_order_acquire);
		if (pong != r)
			FAIL("parent: pong jumped to %llu, expected %llu", (unsigned long long)pong,
			     (unsigned long long)r);
		uint64_t echo = atomic_load_explicit(&h->echo, memory_order_relaxed);
		if (echo != want_sum)
			FAIL("parent: round %llu: the child's checksum of page %llu is %016llx, "
			     "expected %016llx", (unsigned long long)r, (unsigned long long)p,
			     (unsigned long long)echo, (unsigned long long)want_sum);
		uint64_t hits = atomic_load_explicit(&h->hits, memory_order_acquire);
		if (hits != 2 * r)
			FAIL("parent: round %llu: hits %llu, expected %llu", (unsigned long long)r,
			     (unsigned long long)hits, (unsigned long long)(2 * r));
		int32_t cp = atomic_load(&h->child_pid);
		if (cp != kid)
			FAIL("parent: child pid in shared memory is %d, expected %d", (int)cp, (int)kid);
		for (int i = 0; i < 64; i++) {
			uint64_t q = cursor;
			cursor = cursor % NDATA + 1;
			long bad = check_page(last_writer(q, r), q);
			if (bad >= 0)
				FAIL("parent: round %llu: data page %llu word %ld lost its round-%llu "
				     "pattern", (unsigned long long)r, (unsigned long long)q, bad,
				     (unsigned long long)last_writer(q, r));
			checked++;
		}
		uint64_t n = ticker_next(&t);
		emit("tick %llu %016llx pong %llu hits %llu checked %llu", (unsigned long long)n,
		     (unsigned long long)t.chain, (unsigned long long)pong,
		     (unsigned long long)hits, (unsigned long long)checked);
		sleep_ms(10);
	}
}
