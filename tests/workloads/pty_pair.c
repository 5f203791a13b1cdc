/*
 * A parent holding a pty master, a child using its slave as its controlling
 * terminal, with data queued both ways most of the time.
 *
 * The parent opens /dev/ptmx and sets the slave to canonical mode without echo,
 * ONLCR on, VEOL '#' and a 101x33 window (none of them defaults). The child
 * makes a session of its own and opens the slave, which becomes its controlling
 * terminal. Every 50 ms the parent writes an input line in two parts
 * ("in N", then " end\n" on the next round, so an unfinished line is often
 * queued) and the child writes an output line "out N in I\n" (I: input lines it
 * has read); each side reads only once a second, so both queues hold bytes.
 *
 * Each side checks what it reads: the parent that output lines come in order and
 * with ONLCR's "\r\n"; the child that input lines come whole and in order, that
 * the settings and window size are still the parent's, and that the slave is its
 * controlling terminal with its group in the foreground. Any mismatch is a FAIL
 * line. Each parent read makes a tick: tick N CHAIN out O in I.
 */
#include "common.h"

#include <fcntl.h>
#include <sys/ioctl.h>
#include <sys/wait.h>
#include <termios.h>

#define EOL_CHAR '#'

static int settings_ok(int fd, const char *who)
{
	struct termios t;
	struct winsize ws;
	if (tcgetattr(fd, &t) < 0 || ioctl(fd, TIOCGWINSZ, &ws) < 0) {
		FAIL("%s: tcgetattr/TIOCGWINSZ: %s", who, strerror(errno));
		return 0;
	}
	if (!(t.c_lflag & ICANON) || (t.c_lflag & ECHO) || !(t.c_oflag & ONLCR) ||
	    t.c_cc[VEOL] != EOL_CHAR || ws.ws_col != 101 || ws.ws_row != 33) {
		FAIL("%s: settings changed: lflag %o oflag %o veol %d window %dx%d", who,
		     t.c_lflag, t.c_oflag, t.c_cc[VEOL], ws.ws_col, ws.ws_row);
		return 0;
	}
	return 1;
}

static void child(const char *name)
{
	if (setsid() < 0)
		_exit(20);
	int s = open(name, O_RDWR | O_NONBLOCK);
	if (s < 0)
		_exit(21);
	uint64_t out = 0, in = 0;
	char buf[4096], line[256];
	size_t have = 0;
	for (int round = 1;; round++) {
		sleep_ms(50);
		int n = snprintf(line, sizeof line, "out %llu in %llu\n", (unsigned long long)++out,
				 (unsigned long long)in);
		write_all(s, line, (size_t)n);
		if (round % 20)
			continue;
		/* Canonical mode: one line per read. */
		for (;;) {
			ssize_t r = read(s, buf, sizeof buf - 1);
			if (r <= 0)
				break;
			buf[r] = 0;
			char want[64];
			snprintf(want, sizeof want, "in %llu end\n", (unsigned long long)in + 1);
			if (strcmp(buf, want) != 0)
				FAIL("child read %s, expected %s", buf, want);
			in++;
		}
		(void)have;
		settings_ok(s, "child");
		if (tcgetsid(s) != getsid(0) || tcgetpgrp(s) != getpgrp())
			FAIL("child: the slave is not its controlling terminal (sid %d/%d, pgrp %d/%d)",
			     tcgetsid(s), getsid(0), tcgetpgrp(s), getpgrp());
	}
}

int main(void)
{
	int m = posix_openpt(O_RDWR | O_NOCTTY);
	if (m < 0 || grantpt(m) < 0 || unlockpt(m) < 0)
		return 2;
	char name[64];
	if (ptsname_r(m, name, sizeof name) != 0)
		return 3;
	struct termios t;
	if (tcgetattr(m, &t) < 0)
		return 4;
	t.c_lflag |= ICANON;
	t.c_lflag &= ~(tcflag_t)(ECHO | ECHOE | ECHOK | ECHONL);
	t.c_oflag |= OPOST | ONLCR;
	t.c_cc[VEOL] = EOL_CHAR;
	if (tcsetattr(m, TCSANOW, &t) < 0)
		return 5;
	struct winsize ws = { .ws_row = 33, .ws_col = 101 };
	if (ioctl(m, TIOCSWINSZ, &ws) < 0)
		return 6;
	pid_t c = fork();
	if (c == 0)
		child(name);
	emit("pty_pair pid %d child %d slave %s", getpid(), c, name);
	fcntl(m, F_SETFL, O_NONBLOCK);

	struct ticker tk = { 0, 0 };
	uint64_t sent = 0, out = 0, child_in = 0;
	char acc[65536];
	size_t have = 0;
	for (int round = 1;; round++) {
		sleep_ms(50);
		char line[64];
		int n = round % 2 ? snprintf(line, sizeof line, "in %llu", (unsigned long long)++sent)
				  : snprintf(line, sizeof line, " end\n");
		write_all(m, line, (size_t)n);
		if (round % 20)
			continue;
		for (;;) {
			ssize_t r = read(m, acc + have, sizeof acc - have);
			if (r <= 0)
				break;
			have += (size_t)r;
		}
		char *p = acc, *nl;
		while ((nl = memchr(p, '\n', (size_t)(acc + have - p))) != NULL) {
			unsigned long long o, i;
			if (nl == p || nl[-1] != '\r' || sscanf(p, "out %llu in %llu", &o, &i) != 2 ||
			    o != out + 1)
				FAIL("parent read %.*s after out %llu", (int)(nl - p), p,
				     (unsigned long long)out);
			else {
				out = o;
				child_in = i;
			}
			p = nl + 1;
		}
		have = (size_t)(acc + have - p);
		memmove(acc, p, have);
		settings_ok(m, "parent");
		int st;
		if (waitpid(c, &st, WNOHANG) == c)
			FAIL("child ended (status %d)", st);
		ticker_next(&tk);
		emit("tick %llu %016llx out %llu in %llu", (unsigned long long)tk.n,
		     (unsigned long long)tk.chain, (unsigned long long)out,
		     (unsigned long long)child_in);
	}
}
