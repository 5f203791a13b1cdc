/*
 * many_fds: a process holding N descriptors of mixed kinds, for the engine
 * benchmark's freeze figure (agent/benches/engine.rs).
 *
 * usage: many_fds N
 *
 * Opens N descriptors (rounded down to groups of 10), each group: a pipe (2), a
 * UNIX stream socketpair (2), an eventfd, a timerfd (armed, 1 h), a signalfd, an
 * epoll watching the group's eventfd, /dev/null, and a regular file (the
 * program's own executable, read-only). Raises its soft RLIMIT_NOFILE to the hard
 * one first. Then ticks every 10 ms, checking that every eventfd still reads as
 * its group number (a descriptor swapped or lost by a checkpoint shows as FAIL):
 *   tick <n> <chain> fds <count>
 */
#include "common.h"

#include <fcntl.h>
#include <signal.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/resource.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/timerfd.h>

int main(int argc, char **argv)
{
	long want = arg_long(argc, argv, 1, 10);
	long groups = want / 10;
	struct rlimit rl;
	getrlimit(RLIMIT_NOFILE, &rl);
	rl.rlim_cur = rl.rlim_max;
	setrlimit(RLIMIT_NOFILE, &rl);

	int *efd = calloc((size_t)groups, sizeof *efd);
	sigset_t usr2;
	sigemptyset(&usr2);
	sigaddset(&usr2, SIGUSR2);
	sigprocmask(SIG_BLOCK, &usr2, NULL);
	for (long g = 0; g < groups; g++) {
		int p[2], s[2];
		if (pipe(p) < 0 || socketpair(AF_UNIX, SOCK_STREAM, 0, s) < 0) {
			FAIL("group %ld: pipe/socketpair: %s", g, strerror(errno));
			return 1;
		}
		efd[g] = eventfd(0, EFD_NONBLOCK);
		uint64_t v = (uint64_t)g + 1;
		if (efd[g] < 0 || write(efd[g], &v, sizeof v) != sizeof v) {
			FAIL("group %ld: eventfd: %s", g, strerror(errno));
			return 1;
		}
		int t = timerfd_create(CLOCK_MONOTONIC, 0);
		struct itimerspec its = { .it_value = { .tv_sec = 3600 } };
		int sfd = signalfd(-1, &usr2, 0);
		int ep = epoll_create1(0);
		struct epoll_event ev = { .events = EPOLLIN, .data.u64 = (uint64_t)g };
		int null = open("/dev/null", O_RDWR);
		int self = open("/proc/self/exe", O_RDONLY);
		if (t < 0 || timerfd_settime(t, 0, &its, NULL) < 0 || sfd < 0 || ep < 0 ||
		    epoll_ctl(ep, EPOLL_CTL_ADD, efd[g], &ev) < 0 || null < 0 || self < 0) {
			FAIL("group %ld: %s", g, strerror(errno));
			return 1;
		}
	}
	struct ticker tk = { 0, 0 };
	for (;;) {
		for (long g = 0; g < groups; g++) {
			uint64_t v = 0;
			/* Read and write back: the counter stays the group's number. */
			if (read(efd[g], &v, sizeof v) != sizeof v || v != (uint64_t)g + 1)
				FAIL("eventfd of group %ld reads %llu", g, (unsigned long long)v);
			v = (uint64_t)g + 1;
			if (write(efd[g], &v, sizeof v) != sizeof v)
				FAIL("eventfd of group %ld: write: %s", g, strerror(errno));
		}
		ticker_next(&tk);
		emit("tick %llu %016llx fds %ld", (unsigned long long)tk.n,
		     (unsigned long long)tk.chain, groups * 10);
		sleep_ms(10);
	}
}
