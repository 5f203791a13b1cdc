/*
 * heap_checksum: a large randomised heap under constant mutation.
 *
 * usage: heap_checksum [MiB=64] [seed]
 *
 * Half of the memory is one big malloc'd block (an mmap of its own), the other half
 * is hundreds of blocks of random sizes from 16 B to 512 KiB (brk heap and mmaps
 * mixed). A running checksum over every word is kept up to date incrementally as
 * each tick
 *   - overwrites a few thousand random words in random blocks,
 *   - fills a random run of the big block,
 *   - frees one small block and allocates a fresh one of another size (the heap
 *     layout, brk and the set of mappings keep changing).
 * Every tick the whole checksum is recomputed from memory and compared with the
 * running one; a mismatch (a page lost, stale or misplaced by a checkpoint) prints
 * FAIL. The checksum weighs each word by its index and its block id, so swapped
 * words or pages are caught too, not only changed ones.
 */
#include "common.h"

struct block {
	uint64_t *p;
	size_t words;
	uint64_t mult; /* odd multiplier derived from the block id */
};

static uint64_t term(uint64_t word, size_t i, uint64_t mult)
{
	return (word + (uint64_t)i) * mult;
}

static uint64_t block_sum(const struct block *b)
{
	uint64_t s = 0;
	for (size_t i = 0; i < b->words; i++)
		s += term(b->p[i], i, b->mult);
	return s;
}

static uint64_t rng;
static uint64_t next_id = 1;

static size_t random_words(void)
{
	/* log-uniform between 2 words (16 B) and 64 Ki words (512 KiB) */
	unsigned shift = 1 + (unsigned)(rng_next(&rng) % 15);
	size_t w = ((size_t)1 << shift) + (size_t)(rng_next(&rng) % ((size_t)1 << shift));
	return w;
}

static void fill_block(struct block *b, size_t words)
{
	b->p = malloc(words * sizeof(uint64_t));
	if (!b->p) {
		FAIL("malloc of %zu words", words);
		exit(1);
	}
	b->words = words;
	b->mult = (next_id++ << 1) | 1;
	for (size_t i = 0; i < words; i++)
		b->p[i] = rng_next(&rng);
}

int main(int argc, char **argv)
{
	long mib = arg_long(argc, argv, 1, 64);
	if (mib < 2)
		mib = 2;
	rng = (uint64_t)arg_long(argc, argv, 2, 0);
	if (rng == 0)
		rng = ((uint64_t)time(NULL) << 20) ^ (uint64_t)getpid() ^ 0x5DEECE66DULL;

	struct ticker t = { 0, 0 };
	size_t total_words = (size_t)mib * 1024 * 1024 / 8;

	struct block big;
	fill_block(&big, total_words / 2);

	size_t cap = 1024, nblocks = 0, small_words = 0;
	struct block *blocks = malloc(cap * sizeof *blocks);
	while (small_words < total_words / 2) {
		if (nblocks == cap) {
			cap *= 2;
			blocks = realloc(blocks, cap * sizeof *blocks);
			if (!blocks) {
				FAIL("realloc of the block table");
				return 1;
			}
		}
		fill_block(&blocks[nblocks], random_words());
		small_words += blocks[nblocks].words;
		nblocks++;
	}

	uint64_t csum = block_sum(&big);
	for (size_t b = 0; b < nblocks; b++)
		csum += block_sum(&blocks[b]);
	emit("heap_checksum MiB %ld blocks %zu seed-state %016llx", mib, nblocks + 1,
	     (unsigned long long)rng);

	for (;;) {
		/* random words in random blocks */
		for (int k = 0; k < 4096; k++) {
			struct block *b = (k & 7) == 0 ? &big : &blocks[rng_next(&rng) % nblocks];
			size_t i = rng_next(&rng) % b->words;
			uint64_t v = rng_next(&rng);
			csum -= term(b->p[i], i, b->mult);
			b->p[i] = v;
			csum += term(v, i, b->mult);
		}
		/* a run of the big block */
		size_t len = 1 + rng_next(&rng) % 65536;
		size_t start = rng_next(&rng) % (big.words - len);
		uint64_t fill = rng_next(&rng);
		for (size_t i = start; i < start + len; i++) {
			csum -= term(big.p[i], i, big.mult);
			big.p[i] = fill ^ i;
			csum += term(big.p[i], i, big.mult);
		}
		/* replace a small block */
		size_t victim = rng_next(&rng) % nblocks;
		csum -= block_sum(&blocks[victim]);
		free(blocks[victim].p);
		fill_block(&blocks[victim], random_words());
		csum += block_sum(&blocks[victim]);

		/* full verification */
		uint64_t full = block_sum(&big);
		for (size_t b = 0; b < nblocks; b++)
			full += block_sum(&blocks[b]);
		uint64_t n = ticker_next(&t);
		if (full != csum) {
			FAIL("tick %llu heap checksum %016llx, running checksum %016llx",
			     (unsigned long long)n, (unsigned long long)full,
			     (unsigned long long)csum);
			csum = full; /* report each corruption once */
		}
		emit("tick %llu %016llx csum %016llx", (unsigned long long)n,
		     (unsigned long long)t.chain, (unsigned long long)csum);
		sleep_ms(5);
	}
}
