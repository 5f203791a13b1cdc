/*
 * busy_log: a ticker that never sleeps, beside a block of memory worth storing.
 *
 * usage: busy_log [mib=32]
 *
 * Fills `mib` MiB with PRNG output (not compressible, not zero, so a dump has to
 * store all of it), then prints "tick <n> <chain> word <hex>" as fast as it can,
 * each tick with one pseudo-random word of the block (FAIL if it is zero, which
 * the PRNG never produces). Its log grows every few microseconds:
 * whatever a `--leave-running` dump does after it thawed the tree, the log has
 * changed by then.
 */
#include "common.h"

int main(int argc, char **argv)
{
	long mib = arg_long(argc, argv, 1, 32);
	size_t words = (size_t)mib << 17;
	uint64_t *block = malloc(words * 8);
	if (!block) {
		FAIL("malloc %ld MiB", mib);
		return 1;
	}
	uint64_t s = 0xB05E;
	for (size_t i = 0; i < words; i++)
		block[i] = rng_next(&s);
	emit("busy_log pid %d block %ld MiB", (int)getpid(), mib);

	struct ticker t = { 0, 0 };
	uint64_t pick = 0x5EED;
	for (;;) {
		uint64_t n = ticker_next(&t);
		size_t i = (size_t)(rng_next(&pick) % words);
		uint64_t w = block[i];
		if (w == 0)
			FAIL("word %zu of the block is zero", i);
		emit("tick %llu %016llx word %016llx", (unsigned long long)n,
		     (unsigned long long)t.chain, (unsigned long long)w);
	}
}
