/*
 * sysv_pc: a producer and a consumer over a System V shared memory segment.
 *
 * usage: sysv_pc KEY [rmid]
 *
 * The parent makes the segment (shmget KEY, 256 KiB, IPC_CREAT|IPC_EXCL) and
 * attaches it; the child, after the fork, looks the key up and attaches it
 * again at an address of its own (the inherited attachment stays too, so the
 * child maps the segment twice). The segment is a ring of 4096 records of 56
 * bytes. With `rmid`, the parent marks the segment for removal (IPC_RMID) once
 * the child has attached it: it lives on, keyless, while attached. The producer
 * (parent) writes record seq = 1, 2, ... (its sequence number
 * and a checksum of it and of the record before) and advances `head`; the
 * consumer (child) reads each record through its own attachment, checks its
 * number and its checksum chain, checks the inherited attachment shows the same
 * bytes, advances `tail`, and prints every 200 records
 *   tick <n> <chain> seq <last seq> sum <running checksum>
 * A restore that lost the segment, its content, or its sharing breaks the chain
 * (FAIL) or stops the ticks. The parent also checks that the segment id it got is
 * still the one `shmget(KEY)` finds (with `rmid`: that the key finds none and
 * the segment is still marked for removal), and `shmctl(IPC_STAT)` works on it.
 */
#include "common.h"

#include <sched.h>
#include <stdatomic.h>
#include <sys/ipc.h>
#include <sys/shm.h>

#define SIZE (256UL << 10)
#define NREC 4096UL

struct rec {
	uint64_t seq;
	uint64_t sum;
	uint64_t pad[5];
};

struct ring {
	_Atomic uint64_t head; /* records written */
	_Atomic uint64_t tail; /* records read */
	_Atomic uint64_t attached; /* the child has its own attachment */
	uint64_t pad[5];
	struct rec r[NREC];
};

static uint64_t rec_sum(uint64_t prev, uint64_t seq)
{
	return chain_step(prev ^ seq, seq);
}

int main(int argc, char **argv)
{
	long key = arg_long(argc, argv, 1, 0);
	int rmid = argc > 2 && strcmp(argv[2], "rmid") == 0;
	if (key == 0) {
		FAIL("usage: sysv_pc KEY");
		return 2;
	}
	int id = shmget((key_t)key, SIZE, IPC_CREAT | IPC_EXCL | 0600);
	if (id < 0) {
		FAIL("shmget %lx: %s", key, strerror(errno));
		return 1;
	}
	struct ring *inherited = shmat(id, NULL, 0);
	if (inherited == (void *)-1) {
		FAIL("shmat: %s", strerror(errno));
		return 1;
	}
	pid_t kid = fork();
	if (kid == 0) {
		int cid = shmget((key_t)key, 0, 0);
		struct ring *g = cid < 0 ? (void *)-1 : shmat(cid, NULL, 0);
		if (g == (void *)-1) {
			FAIL("child shmat: %s", strerror(errno));
			_exit(1);
		}
		emit("sysv_pc child %d segment %d at %p and %p", (int)getpid(), cid, (void *)g,
		     (void *)inherited);
		atomic_store(&g->attached, 1);
		struct ticker t = { 0, 0 };
		uint64_t seq = 0, sum = 0;
		for (;;) {
			while (atomic_load_explicit(&g->head, memory_order_acquire) == seq)
				sleep_us(100);
			seq++;
			const struct rec *r = &g->r[seq % NREC];
			uint64_t want = rec_sum(sum, seq);
			if (r->seq != seq || r->sum != want)
				FAIL("record %llu: seq %llu sum %016llx, expected sum %016llx",
				     (unsigned long long)seq, (unsigned long long)r->seq,
				     (unsigned long long)r->sum, (unsigned long long)want);
			if (inherited->r[seq % NREC].sum != r->sum)
				FAIL("the two attachments differ at record %llu", (unsigned long long)seq);
			sum = want;
			atomic_store_explicit(&g->tail, seq, memory_order_release);
			if (seq % 200 == 0) {
				uint64_t n = ticker_next(&t);
				emit("tick %llu %016llx seq %llu sum %016llx", (unsigned long long)n,
				     (unsigned long long)t.chain, (unsigned long long)seq,
				     (unsigned long long)sum);
			}
		}
	}
	emit("sysv_pc producer %d segment %d key %lx at %p", (int)getpid(), id, key, (void *)inherited);
	struct ring *g = inherited;
	if (rmid) {
		while (atomic_load(&g->attached) == 0)
			sleep_us(100);
		if (shmctl(id, IPC_RMID, NULL) < 0)
			FAIL("IPC_RMID: %s", strerror(errno));
	}
	uint64_t seq = 0, sum = 0;
	for (;;) {
		while (seq - atomic_load_explicit(&g->tail, memory_order_acquire) >= NREC - 1)
			sleep_us(100);
		seq++;
		sum = rec_sum(sum, seq);
		g->r[seq % NREC].seq = seq;
		g->r[seq % NREC].sum = sum;
		atomic_store_explicit(&g->head, seq, memory_order_release);
		if (seq % 1000 == 0) {
			int now = shmget((key_t)key, 0, 0);
			struct shmid_ds ds;
			int want = rmid ? -1 : id;
			if (now != want || shmctl(id, IPC_STAT, &ds) < 0)
				FAIL("segment id %d, shmget(key) finds %d (%s)", id, now, strerror(errno));
			else if (ds.shm_segsz != SIZE)
				FAIL("segment size %zu", (size_t)ds.shm_segsz);
			else if (rmid && !(ds.shm_perm.mode & SHM_DEST))
				FAIL("segment %d is no longer marked for removal", id);
		}
		sleep_us(20);
	}
}
