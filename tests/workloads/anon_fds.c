/*
 * eventfd, timerfd and signalfd together under one epoll instance.
 *
 *   anon_fds [interval_ms]
 *
 * A periodic CLOCK_MONOTONIC timerfd (default 10 ms) is read only every 10th loop
 * of 200 ms, so expirations (a hundred on average) are waiting unread when the
 * tree is frozen. Each
 * loop adds 1 to an eventfd, which is read (and so reset) every 3rd loop: its
 * counter carries writes not yet read. SIGUSR1 is blocked and taken through a
 * signalfd. The program checks itself:
 *
 * - expirations: the total read never exceeds the monotonic time elapsed since
 *   the timer was armed, divided by the interval (+1). The test checks the other
 *   bound (none lost) against the time it knows the tree was away.
 * - eventfd: every read returns exactly the writes made since the last read.
 * - signalfd: each SIGUSR1 read is counted, with its sender.
 *
 * Each tick line: tick N CHAIN exp E elapsed_ms M loops L sigs S from PID.
 */
#include "common.h"

#include <signal.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/signalfd.h>
#include <sys/timerfd.h>

static uint64_t mono_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

int main(int argc, char **argv)
{
	long interval_ms = arg_long(argc, argv, 1, 10);
	sigset_t mask;
	sigemptyset(&mask);
	sigaddset(&mask, SIGUSR1);
	if (sigprocmask(SIG_BLOCK, &mask, NULL) < 0)
		return 2;

	int ep = epoll_create1(EPOLL_CLOEXEC);
	int efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
	int tfd = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC);
	int sfd = signalfd(-1, &mask, SFD_NONBLOCK | SFD_CLOEXEC);
	if (ep < 0 || efd < 0 || tfd < 0 || sfd < 0)
		return 3;
	struct epoll_event ev = { .events = EPOLLIN };
	ev.data.u64 = 1;
	epoll_ctl(ep, EPOLL_CTL_ADD, efd, &ev);
	ev.data.u64 = 2;
	epoll_ctl(ep, EPOLL_CTL_ADD, tfd, &ev);
	ev.data.u64 = 3;
	epoll_ctl(ep, EPOLL_CTL_ADD, sfd, &ev);

	struct itimerspec its = {
		.it_interval = { .tv_sec = interval_ms / 1000, .tv_nsec = (interval_ms % 1000) * 1000000L },
		.it_value = { .tv_sec = interval_ms / 1000, .tv_nsec = (interval_ms % 1000) * 1000000L },
	};
	uint64_t armed = mono_ns();
	if (timerfd_settime(tfd, 0, &its, NULL) < 0)
		return 4;

	struct ticker t = { 0, 0 };
	uint64_t expirations = 0, loops = 0, unread_writes = 0, sigs = 0;
	int last_sender = 0;
	uint64_t interval_ns = (uint64_t)interval_ms * 1000000ULL;
	emit("anon_fds pid %d interval_ms %ld", getpid(), interval_ms);
	for (;;) {
		sleep_ms(200);
		uint64_t one = 1;
		if (write(efd, &one, 8) != 8)
			FAIL("eventfd write: %s", strerror(errno));
		unread_writes++;
		loops++;
		struct epoll_event got[8];
		int n = epoll_wait(ep, got, 8, 1000);
		for (int i = 0; i < n; i++) {
			if (got[i].data.u64 == 1 && loops % 3 == 0) {
				uint64_t v = 0;
				if (read(efd, &v, 8) != 8)
					FAIL("eventfd read: %s", strerror(errno));
				else if (v != unread_writes)
					FAIL("eventfd counter %llu, %llu writes since the last read",
					     (unsigned long long)v, (unsigned long long)unread_writes);
				unread_writes = 0;
			} else if (got[i].data.u64 == 2 && loops % 10 == 0) {
				uint64_t v = 0;
				if (read(tfd, &v, 8) == 8)
					expirations += v;
			} else if (got[i].data.u64 == 3) {
				struct signalfd_siginfo si;
				while (read(sfd, &si, sizeof si) == (ssize_t)sizeof si) {
					if (si.ssi_signo != SIGUSR1)
						FAIL("signalfd gave signal %u", si.ssi_signo);
					sigs++;
					last_sender = (int)si.ssi_pid;
				}
			}
		}
		uint64_t elapsed = mono_ns() - armed;
		if (expirations > elapsed / interval_ns + 1)
			FAIL("%llu expirations in %llu ms of %ld ms", (unsigned long long)expirations,
			     (unsigned long long)(elapsed / 1000000), interval_ms);
		ticker_next(&t);
		emit("tick %llu %016llx exp %llu elapsed_ms %llu loops %llu sigs %llu from %d",
		     (unsigned long long)t.n, (unsigned long long)t.chain,
		     (unsigned long long)expirations, (unsigned long long)(elapsed / 1000000),
		     (unsigned long long)loops, (unsigned long long)sigs, last_sender);
	}
}
