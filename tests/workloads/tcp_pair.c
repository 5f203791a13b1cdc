/*
 * tcp_pair: a process and its child joined by a TCP connection over loopback that
 * always has data in flight, plus the listening socket it was accepted from.
 *
 * usage: tcp_pair                  (the pair: parent serves, forked child connects)
 *        tcp_pair serve PORT       (one side: listen on 0.0.0.0:PORT, serve one)
 *        tcp_pair connect IP PORT  (the other side, on another node)
 *
 * The child connects and streams 64-byte records (sequence number, payload from the
 * sequence number, checksum) as fast as the window allows, keeping up to 2048
 * records ahead of the echoes; the parent reads each record, checks it (sequence
 * in order, checksum), echoes it back, and after every 32 records prints
 *   tick <n> <chain> seq <last seq>
 * and pauses 2 ms, so both directions hold queued data whenever the pair is frozen.
 * The child checks every echo the same way and, in connect mode, prints ticks
 * of its own every 32 echoes. A record lost, repeated, reordered or damaged prints
 * FAIL; so does a forked child whose parent changed. End of stream (the other side
 * gone) ends a side without FAIL. A connection error (reset by the peer) prints
 *   connection error: <strerror>
 * and ends the side with status 3.
 */
#include "common.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <signal.h>
#include <sys/socket.h>

#define REC 64

static void seal(uint8_t *r, uint64_t seq)
{
	uint64_t csum = 0x9e3779b97f4a7c15ull;
	memcpy(r, &seq, 8);
	for (int i = 8; i < REC - 8; i++) {
		r[i] = (uint8_t)(seq * 131 + i);
		csum = (csum ^ r[i]) * 0x100000001b3ull;
	}
	csum ^= seq;
	memcpy(r + REC - 8, &csum, 8);
}

static int check(const uint8_t *r, uint64_t want)
{
	uint8_t good[REC];
	seal(good, want);
	return memcmp(r, good, REC) == 0;
}

static int read_full(int fd, uint8_t *buf, size_t n)
{
	size_t got = 0;
	while (got < n) {
		ssize_t k = read(fd, buf + got, n - got);
		if (k == 0)
			return 0;
		if (k < 0) {
			if (errno == EINTR)
				continue;
			return -1;
		}
		got += k;
	}
	return 1;
}

static void child(const char *ip, int port, pid_t parent)
{
	int s = socket(AF_INET, SOCK_STREAM, 0);
	struct sockaddr_in a = { .sin_family = AF_INET, .sin_port = htons(port) };
	inet_pton(AF_INET, ip, &a.sin_addr);
	struct ticker t = { 0, 0 };
	if (connect(s, (struct sockaddr *)&a, sizeof(a)) < 0) {
		FAIL("connect: %s", strerror(errno));
		_exit(1);
	}
	fcntl(s, F_SETFL, O_NONBLOCK);
	uint64_t sent = 0, echoed = 0;
	uint8_t out[REC], in[REC];
	size_t out_off = REC, in_off = 0;
	for (;;) {
		if (parent && getppid() != parent) {
			FAIL("parent changed from %d to %d", (int)parent, (int)getppid());
			_exit(1);
		}
		struct pollfd p = { .fd = s, .events = POLLIN };
		if (sent - echoed < 2048)
			p.events |= POLLOUT;
		if (poll(&p, 1, 1000) < 0 && errno != EINTR)
			_exit(1);
		if (p.revents & (POLLIN | POLLERR | POLLHUP)) {
			ssize_t k = read(s, in + in_off, REC - in_off);
			if (k == 0)
				_exit(0);
			if (k < 0 && errno != EAGAIN && errno != EINTR) {
				emit("connection error: %s", strerror(errno));
				_exit(3);
			}
			if (k > 0) {
				in_off += k;
				if (in_off == REC) {
					if (!check(in, echoed))
						FAIL("echo %llu damaged or out of order", (unsigned long long)echoed);
					echoed++;
					if (!parent && echoed % 32 == 0) {
						uint64_t n = ticker_next(&t);
						emit("tick %llu %016llx echoed %llu", (unsigned long long)n,
						     (unsigned long long)t.chain, (unsigned long long)echoed);
					}
					in_off = 0;
				}
			}
		}
		if ((p.revents & POLLOUT) && sent - echoed < 2048) {
			if (out_off == REC) {
				seal(out, sent);
				out_off = 0;
			}
			ssize_t k = write(s, out + out_off, REC - out_off);
			if (k < 0 && errno != EAGAIN && errno != EINTR) {
				emit("connection error: %s", strerror(errno));
				_exit(3);
			}
			if (k > 0) {
				out_off += k;
				if (out_off == REC)
					sent++;
			}
		}
	}
}

int main(int argc, char **argv)
{
	signal(SIGPIPE, SIG_IGN);
	if (argc >= 4 && strcmp(argv[1], "connect") == 0) {
		emit("tcp_pair connect pid %d to %s:%s", (int)getpid(), argv[2], argv[3]);
		child(argv[2], atoi(argv[3]), 0);
	}
	int serve = argc >= 3 && strcmp(argv[1], "serve") == 0;
	int l = socket(AF_INET, SOCK_STREAM, 0);
	int one = 1;
	setsockopt(l, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
	struct sockaddr_in a = { .sin_family = AF_INET };
	a.sin_addr.s_addr = htonl(serve ? INADDR_ANY : INADDR_LOOPBACK);
	if (serve)
		a.sin_port = htons(atoi(argv[2]));
	socklen_t alen = sizeof(a);
	if (bind(l, (struct sockaddr *)&a, sizeof(a)) < 0 || listen(l, 8) < 0 ||
	    getsockname(l, (struct sockaddr *)&a, &alen) < 0) {
		FAIL("listen: %s", strerror(errno));
		return 1;
	}
	int port = ntohs(a.sin_port);
	pid_t me = getpid();
	emit("tcp_pair pid %d port %d", (int)me, port);
	if (!serve) {
		pid_t c = fork();
		if (c == 0) {
			close(l);
			child("127.0.0.1", port, me);
		}
	}
	int s = accept(l, NULL, NULL);
	if (s < 0) {
		FAIL("accept: %s", strerror(errno));
		return 1;
	}
	struct ticker t = { 0, 0 };
	uint8_t r[REC];
	for (uint64_t seq = 0;; seq++) {
		int k = read_full(s, r, REC);
		if (k <= 0) {
			emit("end of stream at %llu", (unsigned long long)seq);
			return 0;
		}
		if (!check(r, seq)) {
			FAIL("record %llu damaged or out of order", (unsigned long long)seq);
			return 1;
		}
		write_all(s, r, REC);
		if (seq % 32 == 31) {
			uint64_t n = ticker_next(&t);
			emit("tick %llu %016llx seq %llu", (unsigned long long)n,
			     (unsigned long long)t.chain, (unsigned long long)seq);
			sleep_ms(2);
		}
	}
}
