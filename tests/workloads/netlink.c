/*
 * netlink: a ticker that holds a netlink socket, which the dumper does not support.
 *
 * usage: netlink [interval_ms=10]
 *
 * Prints "netlink fd <N>" first (the test expects the dump error to name fd N),
 * then ticks like counter. After the refused dump it must tick on undisturbed; it
 * also checks that the socket is still its own and still bound, and prints FAIL if
 * the dump attempt changed it.
 */
#include "common.h"

#include <linux/netlink.h>
#include <sys/socket.h>

int main(int argc, char **argv)
{
	long interval = arg_long(argc, argv, 1, 10);
	struct ticker t = { 0, 0 };

	int fd = socket(AF_NETLINK, SOCK_RAW | SOCK_CLOEXEC, NETLINK_ROUTE);
	if (fd < 0) {
		FAIL("socket(AF_NETLINK): %s", strerror(errno));
		return 1;
	}
	struct sockaddr_nl sa = { .nl_family = AF_NETLINK };
	if (bind(fd, (struct sockaddr *)&sa, sizeof sa) < 0) {
		FAIL("bind(netlink): %s", strerror(errno));
		return 1;
	}
	struct sockaddr_nl bound;
	socklen_t len = sizeof bound;
	if (getsockname(fd, (struct sockaddr *)&bound, &len) < 0) {
		FAIL("getsockname: %s", strerror(errno));
		return 1;
	}
	emit("netlink fd %d portid %u", fd, bound.nl_pid);

	for (;;) {
		uint64_t n = ticker_next(&t);
		struct sockaddr_nl now;
		socklen_t l = sizeof now;
		if (getsockname(fd, (struct sockaddr *)&now, &l) < 0)
			FAIL("getsockname on fd %d: %s", fd, strerror(errno));
		else if (now.nl_family != AF_NETLINK || now.nl_pid != bound.nl_pid)
			FAIL("netlink fd %d changed: family %d portid %u", fd, now.nl_family, now.nl_pid);
		emit("tick %llu %016llx", (unsigned long long)n, (unsigned long long)t.chain);
		sleep_ms(interval);
	}
}
