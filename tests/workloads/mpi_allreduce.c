/*
 * mpi_allreduce: an unmodified-style Open MPI program, a running allreduce with a
 * checksum. Built with mpicc, started under mpirun.
 *
 * usage: mpirun -n R mpi_allreduce [ROUNDS [MS]]
 *
 * Round n (n = 1 .. ROUNDS, 0 = forever): every rank contributes
 * v(rank, n) = (rank + 1) * n + (n * n) % 7, MPI_Allreduce sums them, and every
 * rank checks the sum against the closed form it can compute alone. A second
 * allreduce (MAX over each rank's own running chain) checks that every rank saw
 * every round: the ranks' chains are all the same value. Rank 0 then prints
 *
 *   tick <n> <chain> sum <sum> ranks <R>
 *
 * (the common.h line protocol) and sleeps MS milliseconds (default 50). After the
 * last round rank 0 prints "done <rounds> <chain>". A wrong sum or a rank whose
 * chain differs prints a FAIL line. A restore that loses a message, duplicates one
 * or brings a rank back with the wrong memory shows up as a FAIL, a gap, or a hang.
 */
#include "common.h"
#include <mpi.h>

static uint64_t contribution(long rank, uint64_t n)
{
	return (uint64_t)(rank + 1) * n + (n * n) % 7;
}

int main(int argc, char **argv)
{
	MPI_Init(&argc, &argv);
	int rank, size;
	MPI_Comm_rank(MPI_COMM_WORLD, &rank);
	MPI_Comm_size(MPI_COMM_WORLD, &size);
	long rounds = arg_long(argc, argv, 1, 0);
	long ms = arg_long(argc, argv, 2, 50);

	struct ticker t = { 0, 0 };
	for (uint64_t n = 1; rounds == 0 || n <= (uint64_t)rounds; n++) {
		uint64_t mine = contribution(rank, n), sum = 0;
		MPI_Allreduce(&mine, &sum, 1, MPI_UINT64_T, MPI_SUM, MPI_COMM_WORLD);
		uint64_t want = 0;
		for (long r = 0; r < size; r++)
			want += contribution(r, n);
		if (sum != want)
			FAIL("rank %d round %llu: sum %llu, want %llu", rank,
			     (unsigned long long)n, (unsigned long long)sum,
			     (unsigned long long)want);
		ticker_next(&t);
		uint64_t most = 0, least = 0;
		MPI_Allreduce(&t.chain, &most, 1, MPI_UINT64_T, MPI_MAX, MPI_COMM_WORLD);
		MPI_Allreduce(&t.chain, &least, 1, MPI_UINT64_T, MPI_MIN, MPI_COMM_WORLD);
		if (most != t.chain || least != t.chain)
			FAIL("rank %d round %llu: chains differ between ranks", rank,
			     (unsigned long long)n);
		if (rank == 0)
			emit("tick %llu %016llx sum %llu ranks %d", (unsigned long long)t.n,
			     (unsigned long long)t.chain, (unsigned long long)sum, size);
		sleep_ms(ms);
	}
	if (rank == 0)
		emit("done %llu %016llx", (unsigned long long)t.n, (unsigned long long)t.chain);
	MPI_Finalize();
	return 0;
}
