/*
 * pidns_counter: a counter that says which PID namespace each tick comes from.
 *
 * usage: pidns_counter [interval_ms=10]
 *
 * Prints "tick <n> <chain> pid <getpid()> ns <inode of /proc/self/ns/pid>" every
 * interval. The ns field tells apart lines written by the original process and by
 * a copy restored with `restore --new-pid-ns`, which both append to the same log
 * (the restored descriptor is the same file, O_APPEND). getpid() must stay the
 * PID it started with: a restore into a new PID namespace keeps the original PID
 * inside the namespace, so a change prints FAIL. The namespace is read afresh on
 * every tick (it legitimately changes with --new-pid-ns).
 */
#include "common.h"

#include <sys/stat.h>

static unsigned long long pid_ns_inode(void)
{
	struct stat st;
	if (stat("/proc/self/ns/pid", &st) < 0) {
		FAIL("stat /proc/self/ns/pid: %s", strerror(errno));
		return 0;
	}
	return (unsigned long long)st.st_ino;
}

int main(int argc, char **argv)
{
	long interval = arg_long(argc, argv, 1, 10);
	struct ticker t = { 0, 0 };
	pid_t pid = getpid();

	emit("pidns_counter pid %d ns %llu interval %ld ms", (int)pid, pid_ns_inode(), interval);
	for (;;) {
		uint64_t n = ticker_next(&t);
		if (getpid() != pid)
			FAIL("getpid changed from %d to %d", (int)pid, (int)getpid());
		emit("tick %llu %016llx pid %d ns %llu", (unsigned long long)n,
		     (unsigned long long)t.chain, (int)getpid(), pid_ns_inode());
		sleep_ms(interval);
	}
}
