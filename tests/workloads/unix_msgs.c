/*
 * unix_msgs: a process and its forked child joined by a datagram or seqpacket
 * UNIX socketpair, each with messages queued for it most of the time.
 *
 * usage: unix_msgs dgram|seqpacket
 *
 * Each side sends numbered messages as fast as the socket takes them (message s
 * is 1 + (s * 37) % 3000 bytes: its number, then bytes from the number) and reads
 * one message every 3 ms, checking its length and bytes: so the queue of each end
 * stays full, with message boundaries that a restore must keep. The parent's end
 * has SO_PASSCRED on. The parent prints, after every 20 messages read,
 *   tick <n> <chain> got <messages> passcred <0|1>
 * A wrong, lost, repeated or merged message prints FAIL; so does SO_PASSCRED read
 * back off.
 */
#include "common.h"

#include <sys/socket.h>

#define MAXMSG 3100

static size_t len_of(uint64_t s)
{
	return 1 + (size_t)((s * 37) % 3000);
}

static void fill(uint8_t *m, uint64_t s)
{
	size_t n = len_of(s);
	for (size_t i = 0; i < n; i++)
		m[i] = (uint8_t)(s + i * 7);
	if (n >= 8)
		memcpy(m, &s, 8);
}

static void side(int fd, int parent)
{
	uint8_t out[MAXMSG], in[MAXMSG], want[MAXMSG];
	uint64_t sent = 1, got = 1;
	struct ticker t = { 0 };
	for (;;) {
		for (;;) {
			fill(out, sent);
			ssize_t n = send(fd, out, len_of(sent), MSG_DONTWAIT);
			if (n < 0) {
				if (errno == EAGAIN || errno == ENOBUFS)
					break;
				FAIL("send: %s", strerror(errno));
				_exit(3);
			}
			sent++;
		}
		ssize_t n = recv(fd, in, sizeof in, MSG_DONTWAIT);
		if (n < 0 && errno != EAGAIN) {
			FAIL("recv: %s", strerror(errno));
			_exit(3);
		}
		if (n == 0) {
			FAIL("recv: end of stream");
			_exit(3);
		}
		if (n > 0) {
			fill(want, got);
			if ((size_t)n != len_of(got) || memcmp(in, want, (size_t)n) != 0) {
				FAIL("message %llu: %zd bytes, want %zu", (unsigned long long)got, n,
				     len_of(got));
				_exit(4);
			}
			got++;
			if (parent && got % 20 == 0) {
				int pc = 0;
				socklen_t len = sizeof pc;
				getsockopt(fd, SOL_SOCKET, SO_PASSCRED, &pc, &len);
				if (!pc)
					FAIL("SO_PASSCRED is off");
				ticker_next(&t);
				emit("tick %llu %016llx got %llu passcred %d", (unsigned long long)t.n,
				     (unsigned long long)t.chain, (unsigned long long)got, pc);
			}
		}
		sleep_ms(3);
	}
}

int main(int argc, char **argv)
{
	int ty = (argc > 1 && strcmp(argv[1], "seqpacket") == 0) ? SOCK_SEQPACKET : SOCK_DGRAM;
	int sv[2];
	if (socketpair(AF_UNIX, ty, 0, sv) < 0) {
		FAIL("socketpair: %s", strerror(errno));
		return 2;
	}
	int one = 1;
	setsockopt(sv[0], SOL_SOCKET, SO_PASSCRED, &one, sizeof one);
	if (fork() == 0) {
		close(sv[0]);
		side(sv[1], 0);
	}
	close(sv[1]);
	side(sv[0], 1);
}
