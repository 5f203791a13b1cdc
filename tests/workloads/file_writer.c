/*
 * file_writer: sequence-numbered records written through the file offset.
 *
 * usage: file_writer PATH
 *
 * Opens PATH twice: fd W with O_RDWR|O_CREAT|O_TRUNC (no O_APPEND), fd R with
 * O_RDONLY. Records are 64 bytes of text,
 *   "rec <seq, 10 digits> <record_hash(seq), 16 hex> <padding>\n"
 * (record_hash is ckpt_tests::ticks::record_hash). Each tick it
 *   - writes 4 records with write(W), relying on W's file offset, and checks that
 *     lseek(W, 0, SEEK_CUR) is then exactly records * 64;
 *   - reads every new record with read(R), relying on R's own offset, and checks it;
 *   - pread()s one random earlier record and checks it;
 * and prints "tick <n> <chain> records <count>". The test later checks that the
 * file holds every record exactly once, in order, with no hole or torn record:
 * both offsets, not only the data, must survive a checkpoint.
 */
#include "common.h"

#include <fcntl.h>

#define REC 64

static void format_rec(uint64_t seq, char *out)
{
	char tmp[REC + 1];
	int n = snprintf(tmp, sizeof tmp, "rec %010llu %016llx ", (unsigned long long)seq,
			 (unsigned long long)chain_step(seq, 0x5EC));
	memset(tmp + n, '.', (size_t)(REC - n));
	tmp[REC - 1] = '\n';
	memcpy(out, tmp, REC);
}

int main(int argc, char **argv)
{
	if (argc < 2) {
		FAIL("usage: file_writer PATH");
		return 2;
	}
	int w = open(argv[1], O_RDWR | O_CREAT | O_TRUNC, 0644);
	if (w < 0) {
		FAIL("open %s: %s", argv[1], strerror(errno));
		return 1;
	}
	int r = open(argv[1], O_RDONLY);
	if (r < 0) {
		FAIL("open %s: %s", argv[1], strerror(errno));
		return 1;
	}
	emit("file_writer %s write fd %d read fd %d", argv[1], w, r);

	struct ticker t = { 0, 0 };
	uint64_t written = 0, verified = 0;
	uint64_t rng = 0xF11E ^ (uint64_t)getpid();
	char want[REC], got[REC];

	for (;;) {
		for (int i = 0; i < 4; i++) {
			format_rec(written, want);
			write_all(w, want, REC);
			written++;
		}
		uint64_t n = ticker_next(&t);
		off_t pos = lseek(w, 0, SEEK_CUR);
		if (pos != (off_t)(written * REC))
			FAIL("tick %llu: write offset %lld, expected %llu", (unsigned long long)n,
			     (long long)pos, (unsigned long long)(written * REC));

		while (verified < written) {
			ssize_t k = read(r, got, REC);
			if (k != REC) {
				FAIL("tick %llu: read of record %llu returned %zd (%s)",
				     (unsigned long long)n, (unsigned long long)verified, k,
				     k < 0 ? strerror(errno) : "short");
				break;
			}
			format_rec(verified, want);
			if (memcmp(want, got, REC) != 0)
				FAIL("tick %llu: record %llu read back as '%.*s'", (unsigned long long)n,
				     (unsigned long long)verified, REC - 1, got);
			verified++;
		}
		off_t rpos = lseek(r, 0, SEEK_CUR);
		if (rpos != (off_t)(verified * REC))
			FAIL("tick %llu: read offset %lld, expected %llu", (unsigned long long)n,
			     (long long)rpos, (unsigned long long)(verified * REC));

		uint64_t pick = rng_next(&rng) % written;
		if (pread(r, got, REC, (off_t)(pick * REC)) != REC)
			FAIL("tick %llu: pread of record %llu: %s", (unsigned long long)n,
			     (unsigned long long)pick, strerror(errno));
		format_rec(pick, want);
		if (memcmp(want, got, REC) != 0)
			FAIL("tick %llu: pread record %llu is '%.*s'", (unsigned long long)n,
			     (unsigned long long)pick, REC - 1, got);

		emit("tick %llu %016llx records %llu", (unsigned long long)n,
		     (unsigned long long)t.chain, (unsigned long long)written);
		sleep_ms(10);
	}
}
