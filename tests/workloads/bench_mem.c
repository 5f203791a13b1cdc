/*
 * bench_mem: a large, incompressible, otherwise idle memory image for the engine
 * benchmark (agent/benches/engine.rs).
 *
 * usage: bench_mem MiB
 *
 * One anonymous private mmap of MiB mebibytes is filled with xorshift64 output,
 * 8 bytes per step. Each 4 KiB page runs its own generator, seeded from the page
 * index, so that any page can be regenerated and checked on its own: the data is
 * as incompressible as one long stream, yet verifying a sample costs 512 steps per
 * page instead of replaying everything before it. Then "ready" is printed, and
 * every 100 ms a tick re-checks a few random pages and prints the usual
 * "tick <n> <chain>" line (see common.h); a page that does not match prints FAIL,
 * so a restore that lost or misplaced memory shows up in the log.
 *
 * The program opens nothing and prints nothing at exit: the benchmark kills it.
 */
#include <sys/mman.h>

#include "common.h"

#define PAGE 4096UL
#define WORDS_PER_PAGE (PAGE / sizeof(uint64_t))
#define SAMPLE_PAGES 8

/* A non-zero xorshift64 seed for page i (splitmix64 finaliser of the index). */
static uint64_t page_seed(uint64_t i)
{
	return chain_step(0x6A09E667F3BCC909ULL, i) | 1;
}

/* Plain xorshift64: three shifts and xors per 8 bytes. */
static inline uint64_t xorshift64(uint64_t *s)
{
	uint64_t x = *s;
	x ^= x << 13;
	x ^= x >> 7;
	x ^= x << 17;
	*s = x;
	return x;
}

static void fill_page(uint64_t *p, uint64_t i)
{
	uint64_t s = page_seed(i);
	for (size_t w = 0; w < WORDS_PER_PAGE; w++)
		p[w] = xorshift64(&s);
}

/* Returns the index of the first wrong word of page i, or -1 if it is intact. */
static long check_page(const uint64_t *p, uint64_t i)
{
	uint64_t s = page_seed(i);
	for (size_t w = 0; w < WORDS_PER_PAGE; w++)
		if (p[w] != xorshift64(&s))
			return (long)w;
	return -1;
}

int main(int argc, char **argv)
{
	long mib = arg_long(argc, argv, 1, 0);
	if (mib <= 0) {
		emit("usage: bench_mem MiB (MiB > 0)");
		return 2;
	}
	size_t len = (size_t)mib << 20;
	uint64_t *mem = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (mem == MAP_FAILED) {
		FAIL("mmap of %ld MiB: %s", mib, strerror(errno));
		return 1;
	}
	size_t pages = len / PAGE;
	for (size_t i = 0; i < pages; i++)
		fill_page(mem + i * WORDS_PER_PAGE, i);
	emit("ready");

	struct ticker t = { 0, 0 };
	uint64_t rng = 0x9E3779B97F4A7C15ULL;
	for (;;) {
		sleep_ms(100);
		for (int k = 0; k < SAMPLE_PAGES; k++) {
			uint64_t i = rng_next(&rng) % pages;
			long w = check_page(mem + i * WORDS_PER_PAGE, i);
			if (w >= 0)
				FAIL("page %lu word %ld does not match its generator", (unsigned long)i, w);
		}
		ticker_next(&t);
		emit("tick %lu %016lx", (unsigned long)t.n, (unsigned long)t.chain);
	}
}
