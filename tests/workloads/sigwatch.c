/*
 * sigwatch: N threads that sleep and watch their own signal state, for the tests
 * that kill the agent in the middle of a dump.
 *
 * usage: sigwatch [N=1]
 *
 * At start the main thread blocks SIGRTMIN+1 and sends it to itself, so one signal
 * stays pending for good; each thread i (main is 0) also blocks SIGRTMIN+2 and, if
 * i is odd, SIGRTMIN+3: every thread has a mask of its own. SIGUSR1 has a handler
 * that counts deliveries.
 *
 * Each thread sleeps 2 ms at a time (so a freeze finds it in nanosleep), then
 * checks that its mask is still the one it set and counts a pass. Every ~10 ms the
 * main thread also checks that SIGRTMIN+1 is still pending, that every thread
 * passed since the last check 100 ticks ago (none is stuck), and prints
 *   tick <n> <chain> usr1 <deliveries>
 * Any difference is printed as a "FAIL" line and the program exits with 1; a
 * thread that crashes takes the process with it.
 */
#include "common.h"

#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>

#define MAX_THREADS 512

static atomic_ulong passes[MAX_THREADS];
static atomic_ulong usr1;
static int nthreads;

static void on_usr1(int sig)
{
	(void)sig;
	atomic_fetch_add(&usr1, 1);
}

static void own_mask(int i, sigset_t *set)
{
	sigemptyset(set);
	sigaddset(set, SIGRTMIN + 2);
	if (i % 2)
		sigaddset(set, SIGRTMIN + 3);
	if (i == 0)
		sigaddset(set, SIGRTMIN + 1);
}

static void check_mask(int i)
{
	sigset_t want, now;
	own_mask(i, &want);
	pthread_sigmask(SIG_SETMASK, NULL, &now);
	for (int s = 1; s < NSIG; s++) {
		if (sigismember(&want, s) != sigismember(&now, s)) {
			emit("FAIL thread %d: signal %d is %s in its mask", i, s,
			     sigismember(&now, s) ? "blocked" : "not blocked");
			_exit(1);
		}
	}
}

static void nap(void)
{
	struct timespec ts = { 0, 2 * 1000 * 1000 };
	while (nanosleep(&ts, &ts) < 0 && errno == EINTR)
		;
}

static void *worker(void *arg)
{
	int i = (int)(intptr_t)arg;
	sigset_t set;
	own_mask(i, &set);
	pthread_sigmask(SIG_SETMASK, &set, NULL);
	for (;;) {
		nap();
		check_mask(i);
		atomic_fetch_add(&passes[i], 1);
	}
	return NULL;
}

int main(int argc, char **argv)
{
	nthreads = argc > 1 ? atoi(argv[1]) : 1;
	if (nthreads < 1 || nthreads > MAX_THREADS) {
		emit("usage: sigwatch [N<=%d]", MAX_THREADS);
		return 2;
	}
	struct sigaction sa;
	memset(&sa, 0, sizeof sa);
	sa.sa_handler = on_usr1;
	sa.sa_flags = SA_RESTART;
	sigaction(SIGUSR1, &sa, NULL);
	sigset_t set;
	own_mask(0, &set);
	pthread_sigmask(SIG_SETMASK, &set, NULL);
	for (int i = 1; i < nthreads; i++) {
		pthread_t t;
		if (pthread_create(&t, NULL, worker, (void *)(intptr_t)i) != 0) {
			emit("FAIL pthread_create %d", i);
			return 1;
		}
	}
	pthread_kill(pthread_self(), SIGRTMIN + 1); /* pending on main only */
	uint64_t chain = 0, last[MAX_THREADS] = { 0 };
	for (uint64_t n = 1;; n++) {
		for (int k = 0; k < 5; k++) {
			nap();
			check_mask(0);
		}
		atomic_fetch_add(&passes[0], 1);
		sigset_t pend;
		sigpending(&pend);
		if (!sigismember(&pend, SIGRTMIN + 1)) {
			emit("FAIL the pending SIGRTMIN+1 is gone");
			return 1;
		}
		if (n % 100 == 0) {
			for (int i = 0; i < nthreads; i++) {
				unsigned long p = atomic_load(&passes[i]);
				if (p == last[i]) {
					emit("FAIL thread %d made no progress in 100 ticks", i);
					return 1;
				}
				last[i] = p;
			}
		}
		chain = chain_step(chain, n);
		emit("tick %llu %016llx usr1 %lu", (unsigned long long)n,
		     (unsigned long long)chain, atomic_load(&usr1));
	}
}
