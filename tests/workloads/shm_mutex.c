/*
 * shm_mutex: a parent and a child updating two shared regions under one
 * process-shared mutex: an anonymous MAP_SHARED region (made before the fork)
 * and a POSIX shared memory segment (shm_open NAME, 1 MiB, mapped shared by
 * each process after the fork, its descriptor kept open by both).
 *
 * usage: shm_mutex NAME        (NAME without the leading '/': /dev/shm/NAME)
 *
 * The anonymous region holds the mutex (PTHREAD_PROCESS_SHARED) and per-process
 * counters; the segment holds the same counters and a running total. Each
 * update, under the mutex, adds one to the process's counter in both regions,
 * one to both totals, and rewrites one data page of the segment (page
 * 1 + total % 255) with a pattern of the total. Under the mutex, the parent
 * checks that the two regions agree (counters, totals = sum of counters) and that
 * every data page holds the pattern of the last update that wrote it; then prints
 *   tick <n> <chain> total <total> parent <count> child <count> pages <checked>
 * A restore that lost either region, brought back different bytes for them, or
 * did not keep them shared (the counts of the two processes would stop adding
 * up) prints FAIL or stops ticking.
 */
#include "common.h"

#include <fcntl.h>
#include <pthread.h>
#include <sched.h>
#include <sys/mman.h>
#include <sys/stat.h>

#define SEG (1UL << 20)
#define PAGE 4096UL
#define NDATA 255UL

struct anon {
	pthread_mutex_t lock;
	uint64_t count[2];
	uint64_t total;
};

struct seg {
	uint64_t count[2];
	uint64_t total;
	uint64_t magic;
};

static struct anon *a;
static unsigned char *s;

static uint64_t word(uint64_t writer, uint64_t p, uint64_t j)
{
	return chain_step(writer * 7919 + p, j + 1);
}

static void fill(uint64_t writer, uint64_t p)
{
	uint64_t *w = (uint64_t *)(s + p * PAGE);
	for (uint64_t j = 0; j < PAGE / 8; j++)
		w[j] = word(writer, p, j);
}

/* The total of the last update that wrote data page p when the total is t (0: the initial fill). */
static uint64_t last_writer(uint64_t p, uint64_t t)
{
	/* update with total u writes page 1 + u % NDATA. */
	uint64_t best = 0;
	for (uint64_t u = t; u > 0 && u + NDATA > t; u--)
		if (1 + u % NDATA == p) {
			best = u;
			break;
		}
	return best;
}

static void update(int me)
{
	pthread_mutex_lock(&a->lock);
	struct seg *g = (struct seg *)s;
	a->count[me]++;
	g->count[me]++;
	a->total++;
	g->total++;
	fill(a->total, 1 + a->total % NDATA);
	pthread_mutex_unlock(&a->lock);
}

static unsigned char *map_segment(const char *name, int *fd_out)
{
	int fd = shm_open(name, O_RDWR, 0);
	if (fd < 0) {
		FAIL("shm_open %s: %s", name, strerror(errno));
		_exit(1);
	}
	unsigned char *p = mmap(NULL, SEG, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
	if (p == MAP_FAILED) {
		FAIL("mmap %s: %s", name, strerror(errno));
		_exit(1);
	}
	*fd_out = fd;
	return p;
}

int main(int argc, char **argv)
{
	if (argc < 2) {
		FAIL("usage: shm_mutex NAME");
		return 2;
	}
	char name[256];
	snprintf(name, sizeof name, "/%s", argv[1]);
	int fd = shm_open(name, O_RDWR | O_CREAT | O_EXCL, 0640);
	if (fd < 0 || ftruncate(fd, SEG) < 0) {
		FAIL("shm_open/ftruncate %s: %s", name, strerror(errno));
		return 1;
	}
	close(fd);
	a = mmap(NULL, PAGE, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
	pthread_mutexattr_t at;
	pthread_mutexattr_init(&at);
	pthread_mutexattr_setpshared(&at, PTHREAD_PROCESS_SHARED);
	pthread_mutex_init(&a->lock, &at);

	pid_t kid = fork();
	if (kid == 0) {
		s = map_segment(name, &fd);
		for (;;) {
			update(1);
			sleep_us(300);
		}
	}
	s = map_segment(name, &fd);
	pthread_mutex_lock(&a->lock);
	((struct seg *)s)->magic = 0x5eed;
	for (uint64_t p = 1; p <= NDATA; p++)
		fill(0, p);
	pthread_mutex_unlock(&a->lock);
	emit("shm_mutex parent %d child %d segment /dev/shm%s fd %d anon %p", (int)getpid(), (int)kid,
	     name, fd, (void *)a);

	struct ticker t = { 0, 0 };
	uint64_t checked = 0;
	for (;;) {
		for (int i = 0; i < 5; i++) {
			update(0);
			sleep_us(300);
		}
		pthread_mutex_lock(&a->lock);
		struct seg *g = (struct seg *)s;
		if (g->magic != 0x5eed)
			FAIL("segment magic %llx", (unsigned long long)g->magic);
		if (a->total != g->total || a->count[0] != g->count[0] || a->count[1] != g->count[1])
			FAIL("regions disagree: anon total %llu (%llu+%llu), segment total %llu (%llu+%llu)",
			     (unsigned long long)a->total, (unsigned long long)a->count[0],
			     (unsigned long long)a->count[1], (unsigned long long)g->total,
			     (unsigned long long)g->count[0], (unsigned long long)g->count[1]);
		if (a->total != a->count[0] + a->count[1])
			FAIL("total %llu is not %llu + %llu", (unsigned long long)a->total,
			     (unsigned long long)a->count[0], (unsigned long long)a->count[1]);
		for (uint64_t p = 1; p <= NDATA; p++) {
			uint64_t wr = last_writer(p, a->total);
			const uint64_t *w = (const uint64_t *)(s + p * PAGE);
			for (uint64_t j = 0; j < PAGE / 8; j += 61)
				if (w[j] != word(wr, p, j)) {
					FAIL("page %llu word %llu: not the pattern of update %llu",
					     (unsigned long long)p, (unsigned long long)j,
					     (unsigned long long)wr);
					break;
				}
			checked++;
		}
		uint64_t tot = a->total, c0 = a->count[0], c1 = a->count[1];
		/* The descriptor still reaches the mapped file. */
		uint64_t via_fd = 0;
		if (pread(fd, &via_fd, 8, 16) != 8 || via_fd != tot)
			FAIL("the descriptor reads total %llu, the mapping %llu", (unsigned long long)via_fd,
			     (unsigned long long)tot);
		pthread_mutex_unlock(&a->lock);
		struct stat st;
		if (fstat(fd, &st) < 0 || st.st_size != (off_t)SEG)
			FAIL("fstat of the segment's descriptor: size %lld", (long long)st.st_size);
		uint64_t n = ticker_next(&t);
		emit("tick %llu %016llx total %llu parent %llu child %llu pages %llu", (unsigned long long)n,
		     (unsigned long long)t.chain, (unsigned long long)tot, (unsigned long long)c0,
		     (unsigned long long)c1, (unsigned long long)checked);
		sleep_ms(10);
	}
}
