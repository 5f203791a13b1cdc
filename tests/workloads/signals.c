/*
 * signals: handlers, pending and queued signals, an interval timer and an
 * alternate signal stack, all checked every tick.
 *
 * usage: signals
 *
 * Set-up:
 *   - SIGALRM: SA_SIGINFO | SA_RESTART | SA_ONSTACK handler, driven by an
 *     ITIMER_REAL interval timer of 2 ms. The handler counts and checks that it
 *     runs on the alternate stack.
 *   - SIGUSR1: SA_SIGINFO handler without SA_RESTART, with SIGTERM in sa_mask; the
 *     main loop sigqueue()s it to itself with the tick number as value every tick
 *     and checks the handler saw exactly that value.
 *   - SIGUSR2: blocked, raised once (thread-directed, tgkill) at start and left
 *     pending forever; every tick sigpending() must still show it.
 *   - SIGRTMIN+2: blocked, three instances queued to the process (shared queue)
 *     with consecutive values; every tick one is taken with sigtimedwait() and
 *     must carry the next value, from our own PID with SI_QUEUE, and a new one is
 *     queued: queued siginfo survives a checkpoint intact and in order.
 *   - SIGHUP: ignored.
 *   - SIGCONT: a handler that prints FAIL. Nobody continues this program, and a
 *     checkpoint must not show itself: the freeze's own SIGSTOP/SIGCONT (and the
 *     restore's) must not reach the handler.
 *   - sigaltstack: a 64 KiB malloc'd stack; every tick sigaltstack(NULL, &ss)
 *     must still report it.
 * Every tick it also reads back each sigaction and compares handler, flags and
 * mask with what it installed, checks the blocked mask, and checks that the timer
 * is armed with the same interval and that at least one SIGALRM arrived during
 * the ~10 ms sleep. It prints
 *   tick <n> <chain> alarms <count> usr1 <last value> rt <last rt value>
 */
#include "common.h"

#include <signal.h>
#include <sys/syscall.h>
#include <sys/time.h>

#define ALT_SIZE (64 * 1024)
#define RT_SIG (SIGRTMIN + 2)
#define RT_DEPTH 3

static char *alt_base;
static volatile sig_atomic_t alarms;
static volatile sig_atomic_t alarm_off_stack;
static volatile sig_atomic_t alarm_bad_info;
static volatile long usr1_value = -1;
static volatile sig_atomic_t usr1_count;

static void on_alarm(int sig, siginfo_t *si, void *uc)
{
	(void)uc;
	char here;
	if (&here < alt_base || &here >= alt_base + ALT_SIZE)
		alarm_off_stack++;
	if (sig != SIGALRM || si->si_signo != SIGALRM)
		alarm_bad_info++;
	alarms++;
}

static void on_usr1(int sig, siginfo_t *si, void *uc)
{
	(void)uc;
	(void)sig;
	usr1_value = si->si_value.sival_int;
	usr1_count++;
}

static void on_cont(int sig)
{
	static const char msg[] = "FAIL the SIGCONT handler ran\n";
	(void)sig;
	write_all(1, msg, sizeof msg - 1);
}

static int same_action(int sig, void (*fn)(int, siginfo_t *, void *), int flags,
		       const sigset_t *mask)
{
	struct sigaction now;
	if (sigaction(sig, NULL, &now) < 0)
		return 0;
	if (now.sa_sigaction != fn)
		return 0;
	int keep = SA_SIGINFO | SA_RESTART | SA_ONSTACK | SA_NODEFER | SA_RESETHAND;
	if ((now.sa_flags & keep) != (flags & keep))
		return 0;
	for (int s = 1; s < SIGRTMIN; s++)
		if (s != SIGKILL && s != SIGSTOP &&
		    sigismember(&now.sa_mask, s) != sigismember(mask, s))
			return 0;
	return 1;
}

int main(void)
{
	struct ticker t = { 0, 0 };
	pid_t pid = getpid();

	alt_base = malloc(ALT_SIZE);
	stack_t ss = { .ss_sp = alt_base, .ss_size = ALT_SIZE, .ss_flags = 0 };
	if (sigaltstack(&ss, NULL) < 0) {
		FAIL("sigaltstack: %s", strerror(errno));
		return 1;
	}

	sigset_t alrm_mask, usr1_mask;
	sigemptyset(&alrm_mask);
	sigemptyset(&usr1_mask);
	sigaddset(&usr1_mask, SIGTERM);

	struct sigaction sa;
	memset(&sa, 0, sizeof sa);
	sa.sa_sigaction = on_alarm;
	sa.sa_flags = SA_SIGINFO | SA_RESTART | SA_ONSTACK;
	sa.sa_mask = alrm_mask;
	sigaction(SIGALRM, &sa, NULL);

	memset(&sa, 0, sizeof sa);
	sa.sa_sigaction = on_usr1;
	sa.sa_flags = SA_SIGINFO;
	sa.sa_mask = usr1_mask;
	sigaction(SIGUSR1, &sa, NULL);

	signal(SIGHUP, SIG_IGN);
	signal(SIGCONT, on_cont);

	sigset_t blocked;
	sigemptyset(&blocked);
	sigaddset(&blocked, SIGUSR2);
	sigaddset(&blocked, RT_SIG);
	sigprocmask(SIG_BLOCK, &blocked, NULL);
	raise(SIGUSR2); /* tgkill: pending on this thread */
	sigset_t rt_only;
	sigemptyset(&rt_only);
	sigaddset(&rt_only, RT_SIG);

	long rt_next_send = 1, rt_next_take = 1;
	for (int i = 0; i < RT_DEPTH; i++) {
		union sigval v = { .sival_int = (int)rt_next_send++ };
		if (sigqueue(pid, RT_SIG, v) < 0) {
			FAIL("sigqueue: %s", strerror(errno));
			return 1;
		}
	}

	struct itimerval it = { .it_interval = { 0, 2000 }, .it_value = { 0, 2000 } };
	setitimer(ITIMER_REAL, &it, NULL);
	emit("signals pid %d altstack %p", (int)pid, (void *)alt_base);

	long last_alarms = 0;
	for (;;) {
		sleep_ms(10);
		uint64_t n = ticker_next(&t);

		/* the pending, blocked SIGUSR2 */
		sigset_t pend;
		sigpending(&pend);
		if (!sigismember(&pend, SIGUSR2))
			FAIL("tick %llu: SIGUSR2 is no longer pending", (unsigned long long)n);

		/* the blocked mask */
		sigset_t cur;
		sigprocmask(SIG_BLOCK, NULL, &cur);
		if (!sigismember(&cur, SIGUSR2) || !sigismember(&cur, RT_SIG) ||
		    sigismember(&cur, SIGALRM) || sigismember(&cur, SIGUSR1))
			FAIL("tick %llu: blocked signal mask changed", (unsigned long long)n);

		/* the queued realtime signals, in order, with their payload */
		siginfo_t si;
		struct timespec zero = { 0, 0 };
		int got = sigtimedwait(&rt_only, &si, &zero);
		if (got != RT_SIG) {
			FAIL("tick %llu: no queued RT signal (%d: %s)", (unsigned long long)n, got,
			     strerror(errno));
		} else {
			if (si.si_value.sival_int != rt_next_take || si.si_code != SI_QUEUE ||
			    si.si_pid != pid)
				FAIL("tick %llu: RT signal value %d code %d pid %d, expected %ld SI_QUEUE %d",
				     (unsigned long long)n, si.si_value.sival_int, si.si_code,
				     (int)si.si_pid, rt_next_take, (int)pid);
			rt_next_take = si.si_value.sival_int + 1;
			union sigval v = { .sival_int = (int)rt_next_send++ };
			sigqueue(pid, RT_SIG, v);
		}

		/* a synchronous SA_SIGINFO handler with a payload */
		long before = usr1_count;
		union sigval v1 = { .sival_int = (int)n };
		sigqueue(pid, SIGUSR1, v1);
		if (usr1_count != before + 1 || usr1_value != (long)n)
			FAIL("tick %llu: SIGUSR1 handler saw value %ld (count %ld -> %ld)",
			     (unsigned long long)n, (long)usr1_value, before, (long)usr1_count);

		/* the timer and its handler */
		long a = alarms;
		if (a <= last_alarms)
			FAIL("tick %llu: no SIGALRM during the last sleep (%ld alarms)",
			     (unsigned long long)n, a);
		last_alarms = a;
		if (alarm_off_stack)
			FAIL("tick %llu: %d SIGALRM handlers ran off the alternate stack",
			     (unsigned long long)n, (int)alarm_off_stack);
		if (alarm_bad_info)
			FAIL("tick %llu: %d SIGALRM with wrong siginfo", (unsigned long long)n,
			     (int)alarm_bad_info);
		alarm_off_stack = 0;
		alarm_bad_info = 0;
		struct itimerval now;
		getitimer(ITIMER_REAL, &now);
		if (now.it_interval.tv_sec != 0 || now.it_interval.tv_usec != 2000)
			FAIL("tick %llu: ITIMER_REAL interval is %ld.%06ld s",
			     (unsigned long long)n, (long)now.it_interval.tv_sec,
			     (long)now.it_interval.tv_usec);

		/* the alternate stack */
		stack_t cur_ss;
		if (sigaltstack(NULL, &cur_ss) < 0 || cur_ss.ss_sp != alt_base ||
		    cur_ss.ss_size != ALT_SIZE || cur_ss.ss_flags != 0)
			FAIL("tick %llu: sigaltstack is sp %p size %zu flags %d", (unsigned long long)n,
			     cur_ss.ss_sp, cur_ss.ss_size, cur_ss.ss_flags);

		/* the dispositions */
		if (!same_action(SIGALRM, on_alarm, SA_SIGINFO | SA_RESTART | SA_ONSTACK, &alrm_mask))
			FAIL("tick %llu: SIGALRM action changed", (unsigned long long)n);
		if (!same_action(SIGUSR1, on_usr1, SA_SIGINFO, &usr1_mask))
			FAIL("tick %llu: SIGUSR1 action changed", (unsigned long long)n);
		struct sigaction hup;
		sigaction(SIGHUP, NULL, &hup);
		if (hup.sa_handler != SIG_IGN)
			FAIL("tick %llu: SIGHUP is no longer ignored", (unsigned long long)n);
		struct sigaction cont;
		sigaction(SIGCONT, NULL, &cont);
		if (cont.sa_handler != on_cont)
			FAIL("tick %llu: SIGCONT lost its handler", (unsigned long long)n);

		emit("tick %llu %016llx alarms %ld usr1 %ld rt %ld", (unsigned long long)n,
		     (unsigned long long)t.chain, a, (long)usr1_value, rt_next_take - 1);
	}
}
