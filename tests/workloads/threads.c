/*
 * threads: N threads pass a token round-robin under a mutex and a condition variable.
 *
 * usage: threads [N=4]
 *
 * Thread i may take the token only when token % N == i; it then bumps the shared
 * token count and its own __thread counter, holds the token for ~200 us (so threads
 * are caught in every state: futex wait, nanosleep, running) and hands it on.
 * Every ~10 ms the main thread takes the mutex and checks:
 *   - the sum of all TLS counters equals the token count (each pass counted once),
 *   - the counters are balanced (round-robin: they differ by at most one) and the
 *     token count is never smaller than at the last tick,
 *   - each thread's gettid() and pthread_self() are still what they were at start
 *     (threads restored with their TIDs, TLS and thread pointers in place),
 * and prints "tick <n> <chain> tokens <count>". The test checks that the token count
 * keeps growing after a restore, i.e. that no thread is left stuck.
 */
#include "common.h"

#include <pthread.h>
#include <sys/syscall.h>

#define MAX_THREADS 64

static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t cv = PTHREAD_COND_INITIALIZER;
static uint64_t tokens;
static int nthreads;

static __thread uint64_t tls_count;
static __thread int tls_index = -1;

struct slot {
	uint64_t *count; /* address of the thread's tls_count */
	pid_t tid;
	pthread_t self;
	int started;
};
static struct slot slots[MAX_THREADS];

static void *worker(void *arg)
{
	int me = (int)(intptr_t)arg;
	tls_index = me;
	pthread_mutex_lock(&mu);
	slots[me].count = &tls_count;
	slots[me].tid = (pid_t)syscall(SYS_gettid);
	slots[me].self = pthread_self();
	slots[me].started = 1;
	pthread_cond_broadcast(&cv);
	for (;;) {
		while ((int)(tokens % (uint64_t)nthreads) != me)
			pthread_cond_wait(&cv, &mu);
		if (tls_index != me)
			FAIL("thread %d: TLS index is %d", me, tls_index);
		if ((pid_t)syscall(SYS_gettid) != slots[me].tid)
			FAIL("thread %d: gettid %d, was %d", me, (int)syscall(SYS_gettid),
			     (int)slots[me].tid);
		tls_count++;
		tokens++;
		sleep_us(200); /* hold the token a little, mutex held */
		pthread_cond_broadcast(&cv);
	}
	return NULL;
}

int main(int argc, char **argv)
{
	nthreads = (int)arg_long(argc, argv, 1, 4);
	if (nthreads < 1 || nthreads > MAX_THREADS) {
		FAIL("thread count %d out of range 1..%d", nthreads, MAX_THREADS);
		return 1;
	}
	struct ticker t = { 0, 0 };
	pid_t main_tid = (pid_t)syscall(SYS_gettid);

	pthread_t th[MAX_THREADS];
	for (int i = 0; i < nthreads; i++) {
		if (pthread_create(&th[i], NULL, worker, (void *)(intptr_t)i) != 0) {
			FAIL("pthread_create %d", i);
			return 1;
		}
	}
	pthread_mutex_lock(&mu);
	for (int i = 0; i < nthreads; i++)
		while (!slots[i].started)
			pthread_cond_wait(&cv, &mu);
	char tids[512];
	int off = 0;
	for (int i = 0; i < nthreads; i++)
		off += snprintf(tids + off, sizeof tids - (size_t)off, " %d", (int)slots[i].tid);
	pthread_mutex_unlock(&mu);
	emit("threads %d main %d workers%s", nthreads, (int)main_tid, tids);

	uint64_t last_tokens = 0;
	for (;;) {
		sleep_ms(10);
		pthread_mutex_lock(&mu);
		uint64_t sum = 0, min = UINT64_MAX, max = 0;
		for (int i = 0; i < nthreads; i++) {
			uint64_t c = *slots[i].count;
			sum += c;
			if (c < min)
				min = c;
			if (c > max)
				max = c;
			if (!pthread_equal(slots[i].self, th[i]))
				FAIL("thread %d: pthread_self changed", i);
		}
		uint64_t tk = tokens;
		pthread_mutex_unlock(&mu);

		uint64_t n = ticker_next(&t);
		if (sum != tk)
			FAIL("tick %llu: TLS counters sum to %llu, token count is %llu",
			     (unsigned long long)n, (unsigned long long)sum,
			     (unsigned long long)tk);
		if (max - min > 1)
			FAIL("tick %llu: unbalanced counters min %llu max %llu",
			     (unsigned long long)n, (unsigned long long)min,
			     (unsigned long long)max);
		if (tk < last_tokens)
			FAIL("tick %llu: token count went back from %llu to %llu",
			     (unsigned long long)n, (unsigned long long)last_tokens,
			     (unsigned long long)tk);
		if ((pid_t)syscall(SYS_gettid) != main_tid || getpid() != main_tid)
			FAIL("main thread: gettid %d getpid %d, was %d", (int)syscall(SYS_gettid),
			     (int)getpid(), (int)main_tid);
		last_tokens = tk;
		emit("tick %llu %016llx tokens %llu", (unsigned long long)n,
		     (unsigned long long)t.chain, (unsigned long long)tk);
	}
}
