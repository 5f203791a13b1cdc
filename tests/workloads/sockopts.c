/*
 * sockopts: sockets with options set, the way Open MPI's tcp BTL holds them, that
 * the program reads back itself.
 *
 * usage: sockopts
 *
 * It listens on 0.0.0.0:P and on [::]:P with IPV6_V6ONLY (the same port P), binds
 * UDP 0.0.0.0:Q and [::]:Q with IPV6_V6ONLY, connects to 127.0.0.1:P and accepts
 * the connection. Options set:
 *   IPv4 listener: SO_REUSEADDR, SO_KEEPALIVE, TCP_KEEPIDLE 77, SO_RCVBUF 100000
 *   IPv6 listener: SO_REUSEADDR, IPV6_V6ONLY, TCP_NODELAY
 *   client end:    TCP_NODELAY, SO_KEEPALIVE, TCP_KEEPIDLE 33, TCP_KEEPINTVL 7,
 *                  TCP_KEEPCNT 4, SO_LINGER on 5 s
 *   accepted end:  SO_KEEPALIVE
 * Every 20 ms the client sends an 8-byte counter, the accepted end echoes it and
 * the client checks it; then it prints
 *   tick <n> <chain> <options as read back by getsockopt>
 * and a FAIL line when an option reads other than what was set, or an echo is
 * wrong. At the start it prints "port P".
 */
#include "common.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>

static int geti(int fd, int level, int opt)
{
	int v = -1;
	socklen_t len = sizeof v;
	if (getsockopt(fd, level, opt, &v, &len) < 0)
		return -1;
	return v;
}

static void seti(int fd, int level, int opt, int v)
{
	if (setsockopt(fd, level, opt, &v, sizeof v) < 0) {
		FAIL("setsockopt %d/%d: %s", level, opt, strerror(errno));
		_exit(2);
	}
}

static int bind_any(int family, int type, int port, int v6only)
{
	int fd = socket(family, type, 0);
	if (fd < 0)
		_exit(2);
	if (type == SOCK_STREAM)
		seti(fd, SOL_SOCKET, SO_REUSEADDR, 1);
	if (family == AF_INET6)
		seti(fd, IPPROTO_IPV6, IPV6_V6ONLY, v6only);
	struct sockaddr_storage ss = { 0 };
	socklen_t len;
	if (family == AF_INET) {
		struct sockaddr_in *a = (struct sockaddr_in *)&ss;
		a->sin_family = AF_INET;
		a->sin_port = htons((uint16_t)port);
		len = sizeof *a;
	} else {
		struct sockaddr_in6 *a = (struct sockaddr_in6 *)&ss;
		a->sin6_family = AF_INET6;
		a->sin6_port = htons((uint16_t)port);
		len = sizeof *a;
	}
	if (bind(fd, (struct sockaddr *)&ss, len) < 0) {
		FAIL("bind family %d port %d: %s", family, port, strerror(errno));
		_exit(2);
	}
	return fd;
}

static int port_of(int fd)
{
	struct sockaddr_in a;
	socklen_t len = sizeof a;
	getsockname(fd, (struct sockaddr *)&a, &len);
	return ntohs(a.sin_port);
}

/* The options of the five sockets, as getsockopt reads them now. */
static void describe(char *out, size_t n, int l4, int l6, int c, int a, int u6)
{
	struct linger lg = { 0 };
	socklen_t len = sizeof lg;
	getsockopt(c, SOL_SOCKET, SO_LINGER, &lg, &len);
	snprintf(out, n,
		 "l4:reuseaddr=%d,keepalive=%d,keepidle=%d,rcvbuf=%d "
		 "l6:v6only=%d,reuseaddr=%d,nodelay=%d "
		 "c:nodelay=%d,keepalive=%d,keepidle=%d,keepintvl=%d,keepcnt=%d,linger=%d/%d "
		 "a:keepalive=%d u6:v6only=%d",
		 geti(l4, SOL_SOCKET, SO_REUSEADDR), geti(l4, SOL_SOCKET, SO_KEEPALIVE),
		 geti(l4, IPPROTO_TCP, TCP_KEEPIDLE), geti(l4, SOL_SOCKET, SO_RCVBUF),
		 geti(l6, IPPROTO_IPV6, IPV6_V6ONLY), geti(l6, SOL_SOCKET, SO_REUSEADDR),
		 geti(l6, IPPROTO_TCP, TCP_NODELAY), geti(c, IPPROTO_TCP, TCP_NODELAY),
		 geti(c, SOL_SOCKET, SO_KEEPALIVE), geti(c, IPPROTO_TCP, TCP_KEEPIDLE),
		 geti(c, IPPROTO_TCP, TCP_KEEPINTVL), geti(c, IPPROTO_TCP, TCP_KEEPCNT),
		 lg.l_onoff, lg.l_linger, geti(a, SOL_SOCKET, SO_KEEPALIVE),
		 geti(u6, IPPROTO_IPV6, IPV6_V6ONLY));
}

static void read_full(int fd, void *buf, size_t n)
{
	size_t got = 0;
	while (got < n) {
		ssize_t k = read(fd, (char *)buf + got, n - got);
		if (k < 0 && errno == EINTR)
			continue;
		if (k <= 0) {
			emit("connection error: %s", k == 0 ? "end of stream" : strerror(errno));
			_exit(3);
		}
		got += (size_t)k;
	}
}

int main(void)
{
	int l4 = bind_any(AF_INET, SOCK_STREAM, 0, 0);
	int port = port_of(l4);
	int l6 = bind_any(AF_INET6, SOCK_STREAM, port, 1);
	seti(l4, SOL_SOCKET, SO_KEEPALIVE, 1);
	seti(l4, IPPROTO_TCP, TCP_KEEPIDLE, 77);
	seti(l4, SOL_SOCKET, SO_RCVBUF, 100000);
	seti(l6, IPPROTO_TCP, TCP_NODELAY, 1);
	if (listen(l4, 8) < 0 || listen(l6, 8) < 0) {
		FAIL("listen: %s", strerror(errno));
		return 2;
	}
	int u4 = bind_any(AF_INET, SOCK_DGRAM, 0, 0);
	int u6 = bind_any(AF_INET6, SOCK_DGRAM, port_of(u4), 1);
	(void)u4;

	int c = socket(AF_INET, SOCK_STREAM, 0);
	struct sockaddr_in to = { .sin_family = AF_INET, .sin_port = htons((uint16_t)port) };
	to.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	if (connect(c, (struct sockaddr *)&to, sizeof to) < 0) {
		FAIL("connect: %s", strerror(errno));
		return 2;
	}
	int a = accept(l4, NULL, NULL);
	seti(c, IPPROTO_TCP, TCP_NODELAY, 1);
	seti(c, SOL_SOCKET, SO_KEEPALIVE, 1);
	seti(c, IPPROTO_TCP, TCP_KEEPIDLE, 33);
	seti(c, IPPROTO_TCP, TCP_KEEPINTVL, 7);
	seti(c, IPPROTO_TCP, TCP_KEEPCNT, 4);
	struct linger lg = { .l_onoff = 1, .l_linger = 5 };
	setsockopt(c, SOL_SOCKET, SO_LINGER, &lg, sizeof lg);
	seti(a, SOL_SOCKET, SO_KEEPALIVE, 1);

	char want[512], now[512];
	describe(want, sizeof want, l4, l6, c, a, u6);
	emit("port %d", port);
	struct ticker t = { 0 };
	for (uint64_t seq = 1;; seq++) {
		uint64_t got;
		write_all(c, &seq, sizeof seq);
		read_full(a, &got, sizeof got);
		write_all(a, &got, sizeof got);
		read_full(c, &got, sizeof got);
		if (got != seq)
			FAIL("echo %llu, sent %llu", (unsigned long long)got, (unsigned long long)seq);
		describe(now, sizeof now, l4, l6, c, a, u6);
		if (strcmp(now, want) != 0)
			FAIL("options changed: %s, were %s", now, want);
		ticker_next(&t);
		emit("tick %llu %016llx %s", (unsigned long long)t.n, (unsigned long long)t.chain, now);
		sleep_ms(20);
	}
}
