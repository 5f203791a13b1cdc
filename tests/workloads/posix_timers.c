/*
 * posix_timers: periodic POSIX timers (timer_create) checked every tick.
 *
 * usage: posix_timers
 *
 * Set-up:
 *   - timer A: CLOCK_MONOTONIC, SIGEV_SIGNAL with SIGRTMIN+3 and sigev_value
 *     0xA11CE, periodic every 3 ms. Its SA_SIGINFO handler counts, and checks
 *     si_code == SI_TIMER and the sigev_value.
 *   - timer B: CLOCK_MONOTONIC, SIGEV_THREAD_ID with SIGRTMIN+4 directed at a
 *     worker thread, sigev_value 0xB0B, periodic every 4 ms. The handler counts
 *     and checks that it runs on that worker thread (gettid()), and the value.
 *   - timer C: CLOCK_MONOTONIC, SIGEV_NONE, one-shot, armed for one hour: it
 *     never fires; timer_gettime must keep showing time left and no interval.
 *   The worker thread blocks SIGRTMIN+3, so timer A's signal goes to the main
 *   thread. Nobody blocks SIGRTMIN+4: a timer B restored as process-directed
 *   (SIGEV_SIGNAL) would then deliver to the main thread as often as not, and the
 *   handler's thread check would catch it.
 * Every tick (about 20 ms) the main thread checks, for each timer ID it got from
 * timer_create, that timer_gettime still succeeds and reports the same interval,
 * and that both signal counters moved since the last tick (it waits for them,
 * counting 5 ms sleeps, and prints FAIL only after 400 sleeps without progress:
 * a checkpoint freezes the process, so wall-clock time is no measure). It prints
 *   tick <n> <chain> a <count A> b <count B> c_left_ms <ms left on C>
 *       ids <A>,<B>,<C>
 */
#include "common.h"

#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <sys/syscall.h>

#define SIG_A (SIGRTMIN + 3)
#define SIG_B (SIGRTMIN + 4)
#define VAL_A 0xA11CE
#define VAL_B 0xB0B
#define PERIOD_A_NS 3000000L
#define PERIOD_B_NS 4000000L
#define C_SECONDS 3600

static _Atomic uint64_t count_a, count_b;
static _Atomic uint64_t bad_a, bad_b, wrong_thread_b;
static _Atomic pid_t worker_tid;

static pid_t gettid_(void)
{
	return (pid_t)syscall(SYS_gettid);
}

static void on_a(int sig, siginfo_t *si, void *uc)
{
	(void)uc;
	if (sig != SIG_A || si->si_code != SI_TIMER || si->si_value.sival_int != VAL_A)
		atomic_fetch_add(&bad_a, 1);
	atomic_fetch_add(&count_a, 1);
}

static void on_b(int sig, siginfo_t *si, void *uc)
{
	(void)uc;
	if (sig != SIG_B || si->si_code != SI_TIMER || si->si_value.sival_int != VAL_B)
		atomic_fetch_add(&bad_b, 1);
	if (gettid_() != atomic_load(&worker_tid))
		atomic_fetch_add(&wrong_thread_b, 1);
	atomic_fetch_add(&count_b, 1);
}

static void *worker(void *arg)
{
	(void)arg;
	sigset_t s;
	sigemptyset(&s);
	sigaddset(&s, SIG_A);
	pthread_sigmask(SIG_BLOCK, &s, NULL);
	atomic_store(&worker_tid, gettid_());
	for (;;)
		pause();
	return NULL;
}

static int install(int sig, void (*fn)(int, siginfo_t *, void *))
{
	struct sigaction sa;
	memset(&sa, 0, sizeof sa);
	sa.sa_sigaction = fn;
	sa.sa_flags = SA_SIGINFO | SA_RESTART;
	sigemptyset(&sa.sa_mask);
	return sigaction(sig, &sa, NULL);
}

static int make_timer(timer_t *id, int notify, int sig, int value, pid_t tid)
{
	struct sigevent sev;
	memset(&sev, 0, sizeof sev);
	sev.sigev_notify = notify;
	sev.sigev_signo = sig;
	sev.sigev_value.sival_int = value;
	if (notify == SIGEV_THREAD_ID)
		sev._sigev_un._tid = tid;
	return timer_create(CLOCK_MONOTONIC, &sev, id);
}

static int arm(timer_t id, long value_ns, long interval_ns, time_t value_s)
{
	struct itimerspec its = {
		.it_interval = { .tv_sec = 0, .tv_nsec = interval_ns },
		.it_value = { .tv_sec = value_s, .tv_nsec = value_ns },
	};
	return timer_settime(id, 0, &its, NULL);
}

int main(void)
{
	if (install(SIG_A, on_a) < 0 || install(SIG_B, on_b) < 0) {
		FAIL("sigaction: %s", strerror(errno));
		return 1;
	}
	pthread_t th;
	if (pthread_create(&th, NULL, worker, NULL) != 0) {
		FAIL("pthread_create");
		return 1;
	}
	while (atomic_load(&worker_tid) == 0)
		sleep_ms(1);
	pid_t wt = atomic_load(&worker_tid);

	timer_t a, b, c;
	if (make_timer(&a, SIGEV_SIGNAL, SIG_A, VAL_A, 0) < 0 ||
	    make_timer(&b, SIGEV_THREAD_ID, SIG_B, VAL_B, wt) < 0 ||
	    make_timer(&c, SIGEV_NONE, 0, 0, 0) < 0) {
		FAIL("timer_create: %s", strerror(errno));
		return 1;
	}
	if (arm(a, PERIOD_A_NS, PERIOD_A_NS, 0) < 0 || arm(b, PERIOD_B_NS, PERIOD_B_NS, 0) < 0 ||
	    arm(c, 0, 0, C_SECONDS) < 0) {
		FAIL("timer_settime: %s", strerror(errno));
		return 1;
	}
	emit("posix_timers pid %d worker %d timers %ld %ld %ld", (int)getpid(), (int)wt,
	     (long)(intptr_t)a, (long)(intptr_t)b, (long)(intptr_t)c);

	struct ticker t = { 0, 0 };
	uint64_t last_a = 0, last_b = 0;
	for (;;) {
		sleep_ms(20);
		int waits = 0;
		while ((atomic_load(&count_a) == last_a || atomic_load(&count_b) == last_b) &&
		       waits < 400) {
			sleep_ms(5);
			waits++;
		}
		uint64_t ca = atomic_load(&count_a), cb = atomic_load(&count_b);
		if (ca == last_a)
			FAIL("timer A (SIGEV_SIGNAL): no signal for 400 sleeps (count %llu)",
			     (unsigned long long)ca);
		if (cb == last_b)
			FAIL("timer B (SIGEV_THREAD_ID): no signal for 400 sleeps (count %llu)",
			     (unsigned long long)cb);
		last_a = ca;
		last_b = cb;
		if (atomic_load(&bad_a))
			FAIL("timer A: %llu signals with a wrong code or value",
			     (unsigned long long)atomic_load(&bad_a));
		if (atomic_load(&bad_b))
			FAIL("timer B: %llu signals with a wrong code or value",
			     (unsigned long long)atomic_load(&bad_b));
		if (atomic_load(&wrong_thread_b))
			FAIL("timer B: %llu signals ran on a thread other than worker %d",
			     (unsigned long long)atomic_load(&wrong_thread_b), (int)wt);
		if (gettid_() != getpid())
			FAIL("main thread TID %d is not the PID %d", (int)gettid_(), (int)getpid());

		struct itimerspec ia, ib, ic;
		if (timer_gettime(a, &ia) < 0)
			FAIL("timer_gettime A (id %ld): %s", (long)(intptr_t)a, strerror(errno));
		else if (ia.it_interval.tv_sec != 0 || ia.it_interval.tv_nsec != PERIOD_A_NS)
			FAIL("timer A interval is %ld.%09ld", (long)ia.it_interval.tv_sec,
			     ia.it_interval.tv_nsec);
		if (timer_gettime(b, &ib) < 0)
			FAIL("timer_gettime B (id %ld): %s", (long)(intptr_t)b, strerror(errno));
		else if (ib.it_interval.tv_sec != 0 || ib.it_interval.tv_nsec != PERIOD_B_NS)
			FAIL("timer B interval is %ld.%09ld", (long)ib.it_interval.tv_sec,
			     ib.it_interval.tv_nsec);
		long c_left_ms = -1;
		if (timer_gettime(c, &ic) < 0) {
			FAIL("timer_gettime C (id %ld): %s", (long)(intptr_t)c, strerror(errno));
		} else {
			c_left_ms = (long)ic.it_value.tv_sec * 1000 + ic.it_value.tv_nsec / 1000000;
			if (ic.it_interval.tv_sec != 0 || ic.it_interval.tv_nsec != 0)
				FAIL("timer C has an interval %ld.%09ld", (long)ic.it_interval.tv_sec,
				     ic.it_interval.tv_nsec);
			if (c_left_ms <= 0 || c_left_ms > C_SECONDS * 1000L)
				FAIL("timer C (SIGEV_NONE, one hour) shows %ld ms left", c_left_ms);
		}
		uint64_t n = ticker_next(&t);
		emit("tick %llu %016llx a %llu b %llu c_left_ms %ld ids %ld,%ld,%ld",
		     (unsigned long long)n, (unsigned long long)t.chain, (unsigned long long)ca,
		     (unsigned long long)cb, c_left_ms, (long)(intptr_t)a, (long)(intptr_t)b,
		     (long)(intptr_t)c);
	}
}
