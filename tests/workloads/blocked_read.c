/*
 * blocked_read: spends its life blocked in read(2) on a FIFO.
 *
 * usage: blocked_read FIFO
 *
 * Opens FIFO for reading (O_NONBLOCK only for the open, so it does not wait for a
 * writer) and for writing (a write end of its own, so read() blocks rather than
 * seeing end of file when the test's writer goes away). Then, for round r = 1, 2, ...
 *   - prints "waiting <r>" and blocks in read() on the FIFO;
 *   - the test writes "msg-<r>\n"; the program prints "got <r> msg-<r>" and checks
 *     the message; read() returning -1 (EINTR or anything else), 0, or other bytes
 *     prints FAIL: a checkpoint taken while blocked must restart the read
 *     transparently;
 *   - prints 10 ticks, ~10 ms apart ("tick <n> <chain> round <r>"), and goes back
 *     to waiting.
 * The test checks the usual tick continuity plus the "got" lines.
 */
#include "common.h"

#include <fcntl.h>

int main(int argc, char **argv)
{
	if (argc < 2) {
		FAIL("usage: blocked_read FIFO");
		return 2;
	}
	int rfd = open(argv[1], O_RDONLY | O_NONBLOCK);
	if (rfd < 0) {
		FAIL("open %s for reading: %s", argv[1], strerror(errno));
		return 1;
	}
	int keep = open(argv[1], O_WRONLY);
	if (keep < 0) {
		FAIL("open %s for writing: %s", argv[1], strerror(errno));
		return 1;
	}
	int fl = fcntl(rfd, F_GETFL);
	if (fcntl(rfd, F_SETFL, fl & ~O_NONBLOCK) < 0) {
		FAIL("fcntl: %s", strerror(errno));
		return 1;
	}
	emit("blocked_read %s read fd %d write fd %d", argv[1], rfd, keep);

	struct ticker t = { 0, 0 };
	for (int round = 1;; round++) {
		emit("waiting %d", round);
		char buf[256];
		ssize_t n = read(rfd, buf, sizeof buf - 1);
		if (n < 0) {
			FAIL("round %d: read returned -1, errno %d (%s)", round, errno, strerror(errno));
			round--;
			continue;
		}
		if (n == 0) {
			FAIL("round %d: read returned end of file", round);
			sleep_ms(100);
			round--;
			continue;
		}
		buf[n] = '\0';
		char want[64];
		snprintf(want, sizeof want, "msg-%d\n", round);
		int ok = strcmp(buf, want) == 0;
		for (ssize_t i = 0; i < n; i++)
			if (buf[i] == '\n')
				buf[i] = i == n - 1 ? '\0' : ' ';
		if (!ok)
			FAIL("round %d: read %zd bytes '%s', expected 'msg-%d'", round, n, buf, round);
		emit("got %d %s", round, buf);
		for (int i = 0; i < 10; i++) {
			uint64_t k = ticker_next(&t);
			emit("tick %llu %016llx round %d", (unsigned long long)k,
			     (unsigned long long)t.chain, round);
			sleep_ms(10);
		}
	}
}
