/*
 * tcp_rpc: request and response over TCP, a server rank and its callers.
 *
 * usage: tcp_rpc serve PORT N          (serve N callers on 0.0.0.0:PORT)
 *        tcp_rpc call IP PORT ID       (one caller, ID 1..255)
 *
 * A caller connects, says its ID (one byte), and then keeps 8 requests in flight:
 * each request is 64 bytes (the caller's sequence number, its ID, a payload from
 * both, a checksum), and each answer is the request transformed by the server
 * (every payload byte xor 0x5a, the sequence number plus 1,000,000,000, checksum
 * again). The caller checks every answer against what it asked, in order; the
 * server checks every request (in order per caller, intact). So each session has
 * state on both sides and bytes queued both ways whenever the job is frozen.
 * Every 64 answers a caller prints, and every 256 requests the server prints,
 *   tick <n> <chain> ...
 * A wrong, lost, repeated or reordered record, or a session that ends, prints FAIL.
 */
#include "common.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>

#define REC 64
#define DEPTH 8
#define MAXC 64

static void seal(uint8_t *r, uint64_t seq, uint8_t id, int answer)
{
	uint64_t csum = 0xcbf29ce484222325ull;
	uint64_t s = answer ? seq + 1000000000ull : seq;
	memcpy(r, &s, 8);
	r[8] = id;
	for (int i = 9; i < REC - 8; i++) {
		uint8_t b = (uint8_t)(seq * 31 + i * 7 + id);
		r[i] = answer ? b ^ 0x5a : b;
		csum = (csum ^ r[i]) * 0x100000001b3ull;
	}
	csum ^= s;
	memcpy(r + REC - 8, &csum, 8);
}

static int fill(int fd, uint8_t *buf, size_t *off)
{
	ssize_t k = read(fd, buf + *off, REC - *off);
	if (k == 0)
		return -1;
	if (k < 0)
		return (errno == EAGAIN || errno == EINTR) ? 0 : -1;
	*off += k;
	return *off == REC;
}

static void caller(const char *ip, int port, int id)
{
	struct sockaddr_in a = { .sin_family = AF_INET, .sin_port = htons(port) };
	inet_pton(AF_INET, ip, &a.sin_addr);
	int s = -1;
	for (int tries = 0; tries < 3000; tries++) {
		s = socket(AF_INET, SOCK_STREAM, 0);
		if (connect(s, (struct sockaddr *)&a, sizeof(a)) == 0)
			break;
		close(s);
		s = -1;
		sleep_ms(10);
	}
	if (s < 0) {
		FAIL("cannot connect to %s:%d", ip, port);
		_exit(1);
	}
	uint8_t me = (uint8_t)id;
	write_all(s, &me, 1);
	fcntl(s, F_SETFL, O_NONBLOCK);
	struct ticker t = { 0, 0 };
	uint64_t asked = 0, answered = 0;
	uint8_t out[REC], in[REC];
	size_t out_off = REC, in_off = 0;
	for (;;) {
		struct pollfd p = { .fd = s, .events = POLLIN };
		if (asked - answered < DEPTH || out_off < REC)
			p.events |= POLLOUT;
		if (poll(&p, 1, 1000) < 0 && errno != EINTR)
			_exit(1);
		if (p.revents & (POLLIN | POLLERR | POLLHUP)) {
			int r = fill(s, in, &in_off);
			if (r < 0) {
				FAIL("session ended: %s", strerror(errno));
				_exit(1);
			}
			if (r == 1) {
				uint8_t want[REC];
				seal(want, answered, me, 1);
				if (memcmp(want, in, REC) != 0) {
					FAIL("answer %llu is wrong", (unsigned long long)answered);
					_exit(1);
				}
				answered++;
				in_off = 0;
				if (answered % 64 == 0) {
					uint64_t n = ticker_next(&t);
					emit("tick %llu %016llx answered %llu", (unsigned long long)n,
					     (unsigned long long)t.chain, (unsigned long long)answered);
					sleep_ms(2);
				}
			}
		}
		if ((p.revents & POLLOUT) && (asked - answered < DEPTH || out_off < REC)) {
			if (out_off == REC) {
				seal(out, asked, me, 0);
				out_off = 0;
			}
			ssize_t k = write(s, out + out_off, REC - out_off);
			if (k < 0 && errno != EAGAIN && errno != EINTR) {
				FAIL("session ended: %s", strerror(errno));
				_exit(1);
			}
			if (k > 0) {
				out_off += k;
				if (out_off == REC)
					asked++;
			}
		}
	}
}

struct session {
	int fd;
	uint8_t id;
	uint64_t served;
	uint8_t in[REC];
	size_t in_off;
};

static void server(int port, int n)
{
	int l = socket(AF_INET, SOCK_STREAM, 0);
	int one = 1;
	setsockopt(l, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
	struct sockaddr_in a = { .sin_family = AF_INET, .sin_port = htons(port) };
	a.sin_addr.s_addr = htonl(INADDR_ANY);
	if (bind(l, (struct sockaddr *)&a, sizeof(a)) < 0 || listen(l, MAXC) < 0) {
		FAIL("listen: %s", strerror(errno));
		_exit(1);
	}
	emit("tcp_rpc serving on port %d for %d callers", port, n);
	struct session ss[MAXC];
	for (int i = 0; i < n; i++) {
		int c = accept(l, NULL, NULL);
		if (c < 0 || read(c, &ss[i].id, 1) != 1) {
			FAIL("accept: %s", strerror(errno));
			_exit(1);
		}
		ss[i].fd = c;
		ss[i].served = 0;
		ss[i].in_off = 0;
	}
	emit("tcp_rpc all %d callers connected", n);
	struct ticker t = { 0, 0 };
	uint64_t total = 0;
	struct pollfd p[MAXC];
	for (;;) {
		for (int i = 0; i < n; i++)
			p[i] = (struct pollfd){ .fd = ss[i].fd, .events = POLLIN };
		if (poll(p, n, 1000) < 0 && errno != EINTR)
			_exit(1);
		for (int i = 0; i < n; i++) {
			if (!(p[i].revents & (POLLIN | POLLERR | POLLHUP)))
				continue;
			struct session *c = &ss[i];
			int r = fill(c->fd, c->in, &c->in_off);
			if (r < 0) {
				FAIL("session of caller %d ended: %s", c->id, strerror(errno));
				_exit(1);
			}
			if (r == 0)
				continue;
			uint8_t want[REC];
			seal(want, c->served, c->id, 0);
			if (memcmp(want, c->in, REC) != 0) {
				FAIL("request %llu of caller %d is wrong", (unsigned long long)c->served,
				     c->id);
				_exit(1);
			}
			uint8_t ans[REC];
			seal(ans, c->served, c->id, 1);
			write_all(c->fd, ans, REC);
			c->served++;
			c->in_off = 0;
			if (++total % 256 == 0) {
				uint64_t tn = ticker_next(&t);
				emit("tick %llu %016llx served %llu", (unsigned long long)tn,
				     (unsigned long long)t.chain, (unsigned long long)total);
			}
		}
	}
}

int main(int argc, char **argv)
{
	if (argc == 4 && strcmp(argv[1], "serve") == 0) {
		int n = atoi(argv[3]);
		if (n < 1 || n > MAXC)
			return 2;
		server(atoi(argv[2]), n);
	}
	if (argc == 5 && strcmp(argv[1], "call") == 0) {
		emit("tcp_rpc caller %s pid %d", argv[4], (int)getpid());
		caller(argv[2], atoi(argv[3]), atoi(argv[4]));
	}
	emit("usage: tcp_rpc serve PORT N | tcp_rpc call IP PORT ID");
	return 2;
}
