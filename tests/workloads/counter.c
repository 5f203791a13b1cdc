/*
 * counter: the minimal ticker.
 *
 * usage: counter [interval_ms=10]
 *
 * Prints "tick <n> <chain>" every interval. Its whole state is the ticker, so
 * continuity is proved by the tick protocol alone (see common.h): the test
 * recomputes <chain> from <n>. It also checks that getpid() stays the PID it
 * started with, which a restore with the original PID must keep true.
 * Used for the SIGSTOP, fault-injection and taken-PID tests.
 */
#include "common.h"

int main(int argc, char **argv)
{
	long interval = arg_long(argc, argv, 1, 10);
	struct ticker t = { 0, 0 };
	pid_t pid = getpid();

	emit("counter pid %d interval %ld ms", (int)pid, interval);
	for (;;) {
		uint64_t n = ticker_next(&t);
		if (getpid() != pid)
			FAIL("getpid changed from %d to %d", (int)pid, (int)getpid());
		emit("tick %llu %016llx", (unsigned long long)n, (unsigned long long)t.chain);
		sleep_ms(interval);
	}
}
