/*
 * unix_echo: an epoll echo server and its client (a forked child) over a named
 * UNIX stream socket, with data queued both ways most of the time.
 *
 * usage: unix_echo PATH
 *
 * The server listens at PATH and accepts the client; both sides are non-blocking
 * and driven by epoll. The client writes a byte stream in which byte k is
 * byte_at(k) as fast as the socket takes it; the server checks every byte it
 * reads and writes it back, reading only while it holds less than 256 KiB of
 * echoes not written yet; the client checks every echoed byte, reading at most
 * 4 KiB every 2 ms. So the client's receive queue is full of echoes, the server's
 * echo buffer is full, and the server's receive queue is full of what the client
 * wrote: data queued both ways at any moment. After every 16 KiB of echo checked
 * the client prints
 *   tick <n> <chain> echoed <bytes>
 * A wrong byte on either side prints FAIL; so does an error or the end of the
 * stream.
 */
#include "common.h"

#include <fcntl.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/un.h>

#define AHEAD (8 << 20)
#define CAP (256 << 10)
#define TICK (16 << 10)

static uint8_t byte_at(uint64_t k)
{
	return (uint8_t)(k * 131 + (k >> 9) * 7 + (k >> 17));
}

static void nonblock(int fd)
{
	fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
}

static int wait_ready(int ep, int ms)
{
	struct epoll_event ev[2];
	int n = epoll_wait(ep, ev, 2, ms);
	if (n < 0 && errno != EINTR) {
		FAIL("epoll_wait: %s", strerror(errno));
		_exit(2);
	}
	return n;
}

static int epoll_on(int fd)
{
	int ep = epoll_create1(0);
	struct epoll_event ev = { .events = EPOLLIN | EPOLLOUT, .data.fd = fd };
	epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev);
	return ep;
}

/* What the server waits for: input while its echo buffer has room, output while
 * it holds echoes. */
static void want(int ep, int fd, size_t len)
{
	struct epoll_event ev = { .events = (len < CAP ? EPOLLIN : 0) | (len > 0 ? EPOLLOUT : 0),
				  .data.fd = fd };
	epoll_ctl(ep, EPOLL_CTL_MOD, fd, &ev);
}

static ssize_t io_check(ssize_t n, const char *what)
{
	if (n == 0) {
		FAIL("%s: end of stream", what);
		_exit(3);
	}
	if (n < 0 && errno != EAGAIN && errno != EINTR) {
		FAIL("%s: %s", what, strerror(errno));
		_exit(3);
	}
	return n < 0 ? 0 : n;
}

static void serve(int c)
{
	static uint8_t buf[CAP];
	size_t head = 0, len = 0;
	uint64_t got = 0;
	int ep = epoll_on(c);
	for (;;) {
		want(ep, c, len);
		wait_ready(ep, 100);
		if (len < CAP) {
			if (head > 0) {
				memmove(buf, buf + head, len);
				head = 0;
			}
			ssize_t n = io_check(read(c, buf + len, CAP - len), "server read");
			for (ssize_t i = 0; i < n; i++)
				if (buf[len + i] != byte_at(got + i)) {
					FAIL("server: byte %llu is %u, not %u", (unsigned long long)(got + i),
					     buf[len + i], byte_at(got + i));
					_exit(4);
				}
			got += n;
			len += n;
		}
		if (len > 0) {
			ssize_t n = io_check(write(c, buf + head, len), "server write");
			head += n;
			len -= n;
		}
	}
}

static void client(int c)
{
	static uint8_t buf[1 << 16];
	uint64_t sent = 0, echoed = 0, next_tick = TICK;
	struct ticker t = { 0 };
	int ep = epoll_on(c);
	for (;;) {
		wait_ready(ep, 100);
		sleep_ms(2);
		if (sent - echoed < AHEAD) {
			size_t n = sizeof buf;
			if (n > AHEAD - (sent - echoed))
				n = AHEAD - (sent - echoed);
			for (size_t i = 0; i < n; i++)
				buf[i] = byte_at(sent + i);
			sent += io_check(write(c, buf, n), "client write");
		}
		ssize_t n = io_check(read(c, buf, 4096), "client read");
		for (ssize_t i = 0; i < n; i++)
			if (buf[i] != byte_at(echoed + i)) {
				FAIL("client: echo byte %llu is %u, not %u",
				     (unsigned long long)(echoed + i), buf[i], byte_at(echoed + i));
				_exit(4);
			}
		echoed += n;
		while (echoed >= next_tick) {
			ticker_next(&t);
			emit("tick %llu %016llx echoed %llu", (unsigned long long)t.n,
			     (unsigned long long)t.chain, (unsigned long long)next_tick);
			next_tick += TICK;
		}
	}
}

int main(int argc, char **argv)
{
	if (argc < 2) {
		emit("usage: unix_echo PATH");
		return 2;
	}
	struct sockaddr_un a = { .sun_family = AF_UNIX };
	snprintf(a.sun_path, sizeof a.sun_path, "%s", argv[1]);
	unlink(argv[1]);
	int l = socket(AF_UNIX, SOCK_STREAM, 0);
	if (bind(l, (struct sockaddr *)&a, sizeof a) < 0 || listen(l, 4) < 0) {
		FAIL("bind/listen %s: %s", argv[1], strerror(errno));
		return 2;
	}
	pid_t kid = fork();
	if (kid == 0) {
		close(l);
		int c = socket(AF_UNIX, SOCK_STREAM, 0);
		if (connect(c, (struct sockaddr *)&a, sizeof a) < 0) {
			FAIL("connect: %s", strerror(errno));
			_exit(2);
		}
		nonblock(c);
		client(c);
	}
	int c = accept(l, NULL, NULL);
	nonblock(c);
	emit("serving %s", argv[1]);
	serve(c);
}
