/*
 * tcp_mesh: one rank of a job in which every rank streams to every other rank
 * over TCP, both ways, all the time.
 *
 * usage: tcp_mesh RANK PORT HOST0 HOST1 ... HOST(N-1)
 *
 * Rank r listens on 0.0.0.0:(PORT + r), connects to every lower rank j at
 * HOSTj:(PORT + j) (retrying until it listens) and accepts one connection from
 * every higher rank; a connection starts with the connecting rank's number (4
 * bytes). On every connection each side then writes 64-byte records: the stream's
 * sequence number, source and destination rank, a payload computed from the three,
 * and a checksum. The writer writes up to 64 records per peer per round without
 * waiting for the reader, the reader takes at most 48 per peer per round, a round
 * sleeps 1 ms, and the socket buffers are 32 KiB: so the send and receive queues
 * are full, and the windows often closed, whenever the job is frozen. The reader checks each record (in order, from the right rank, intact).
 * A lost, repeated, reordered or damaged record, a connection that ends or fails,
 * prints FAIL. Every 256 records received in all prints
 *   tick <n> <chain> recv <total>
 */
#include "common.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>

#define REC 64
#define MAXR 16

struct peer {
	int fd;
	int rank;
	uint64_t sent, got;
	uint8_t out[REC], in[REC];
	size_t out_off, in_off;
};

static int me;

static void seal(uint8_t *r, uint64_t seq, uint32_t src, uint32_t dst)
{
	uint64_t csum = 0x9e3779b97f4a7c15ull ^ ((uint64_t)src << 32 | dst);
	memcpy(r, &seq, 8);
	memcpy(r + 8, &src, 4);
	memcpy(r + 12, &dst, 4);
	for (int i = 16; i < REC - 8; i++) {
		r[i] = (uint8_t)(seq * 131 + i + src * 7 + dst * 13);
		csum = (csum ^ r[i]) * 0x100000001b3ull;
	}
	csum ^= seq;
	memcpy(r + REC - 8, &csum, 8);
}

/* Small fixed buffers: the queues fill, and the writers meet a closed window. */
static void small_bufs(int s)
{
	int sz = 32 << 10;
	setsockopt(s, SOL_SOCKET, SO_SNDBUF, &sz, sizeof(sz));
	setsockopt(s, SOL_SOCKET, SO_RCVBUF, &sz, sizeof(sz));
}

static int sock_to(const char *host, int port)
{
	struct sockaddr_in a = { .sin_family = AF_INET, .sin_port = htons(port) };
	if (inet_pton(AF_INET, host, &a.sin_addr) != 1) {
		FAIL("bad address %s", host);
		_exit(1);
	}
	for (int tries = 0; tries < 3000; tries++) {
		int s = socket(AF_INET, SOCK_STREAM, 0);
		small_bufs(s);
		if (connect(s, (struct sockaddr *)&a, sizeof(a)) == 0)
			return s;
		close(s);
		sleep_ms(10);
	}
	FAIL("cannot connect to %s:%d", host, port);
	_exit(1);
}

static void read_exact(int fd, void *buf, size_t n)
{
	size_t got = 0;
	while (got < n) {
		ssize_t k = read(fd, (char *)buf + got, n - got);
		if (k <= 0) {
			if (k < 0 && errno == EINTR)
				continue;
			FAIL("handshake read: %s", k ? strerror(errno) : "end of stream");
			_exit(1);
		}
		got += k;
	}
}

int main(int argc, char **argv)
{
	if (argc < 4) {
		emit("usage: tcp_mesh RANK PORT HOST0 HOST1 ...");
		return 2;
	}
	me = atoi(argv[1]);
	int port = atoi(argv[2]);
	int n = argc - 3;
	if (n > MAXR || me < 0 || me >= n) {
		emit("bad rank %d of %d", me, n);
		return 2;
	}
	int l = socket(AF_INET, SOCK_STREAM, 0);
	int one = 1;
	setsockopt(l, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
	small_bufs(l);
	struct sockaddr_in a = { .sin_family = AF_INET, .sin_port = htons(port + me) };
	a.sin_addr.s_addr = htonl(INADDR_ANY);
	if (bind(l, (struct sockaddr *)&a, sizeof(a)) < 0 || listen(l, MAXR) < 0) {
		FAIL("listen on %d: %s", port + me, strerror(errno));
		return 1;
	}
	emit("tcp_mesh rank %d of %d pid %d listening on port %d", me, n, (int)getpid(),
	     port + me);
	struct peer peers[MAXR];
	int np = 0;
	for (int j = 0; j < me; j++) {
		int s = sock_to(argv[3 + j], port + j);
		uint32_t r = (uint32_t)me;
		write_all(s, &r, 4);
		peers[np++] = (struct peer){ .fd = s, .rank = j, .out_off = REC };
	}
	for (int k = me + 1; k < n; k++) {
		int s = accept(l, NULL, NULL);
		if (s < 0) {
			FAIL("accept: %s", strerror(errno));
			return 1;
		}
		uint32_t r;
		read_exact(s, &r, 4);
		if ((int)r <= me || (int)r >= n) {
			FAIL("hello from unexpected rank %u", r);
			return 1;
		}
		peers[np++] = (struct peer){ .fd = s, .rank = (int)r, .out_off = REC };
	}
	emit("tcp_mesh rank %d connected to %d peers", me, np);
	for (int i = 0; i < np; i++)
		fcntl(peers[i].fd, F_SETFL, O_NONBLOCK);
	struct ticker t = { 0, 0 };
	uint64_t total = 0;
	for (;;) {
		for (int i = 0; i < np; i++) {
			struct peer *p = &peers[i];
			for (int k = 0; k < 64; k++) {
				if (p->out_off == REC) {
					seal(p->out, p->sent, (uint32_t)me, (uint32_t)p->rank);
					p->out_off = 0;
				}
				ssize_t w = write(p->fd, p->out + p->out_off, REC - p->out_off);
				if (w < 0 && (errno == EAGAIN || errno == EINTR))
					break;
				if (w <= 0) {
					FAIL("write to rank %d: %s", p->rank, strerror(errno));
					return 1;
				}
				p->out_off += w;
				if (p->out_off == REC)
					p->sent++;
				else
					break;
			}
			for (int k = 0; k < 48;) {
				ssize_t r = read(p->fd, p->in + p->in_off, REC - p->in_off);
				if (r < 0 && (errno == EAGAIN || errno == EINTR))
					break;
				if (r <= 0) {
					FAIL("read from rank %d: %s", p->rank,
					     r ? strerror(errno) : "end of stream");
					return 1;
				}
				p->in_off += r;
				if (p->in_off < REC)
					continue;
				uint8_t good[REC];
				seal(good, p->got, (uint32_t)p->rank, (uint32_t)me);
				if (memcmp(good, p->in, REC) != 0) {
					uint64_t seq;
					memcpy(&seq, p->in, 8);
					FAIL("record %llu from rank %d is wrong (carries seq %llu)",
					     (unsigned long long)p->got, p->rank,
					     (unsigned long long)seq);
					return 1;
				}
				p->got++;
				p->in_off = 0;
				k++;
				if (++total % 256 == 0) {
					uint64_t tn = ticker_next(&t);
					emit("tick %llu %016llx recv %llu", (unsigned long long)tn,
					     (unsigned long long)t.chain, (unsigned long long)total);
				}
			}
		}
		sleep_ms(1);
	}
}
