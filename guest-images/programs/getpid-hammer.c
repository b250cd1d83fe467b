/*
 * getpid-hammer: many processes call getpid(2) as fast as they can and check every
 * result (for live patching the syscall under load, after the kernel's
 * tools/testing/selftests/livepatch/test-syscall.sh).
 *
 * Usage: getpid-hammer -p PROCS -s STOPFILE [-n NICE] [-m [-f FIFO]]
 *
 * The parent forks PROCS children and hands each its pid as fork(2) returned it; a
 * child then calls syscall(SYS_getpid) in a loop, bypassing any libc cache, until
 * STOPFILE exists, and counts calls whose result is not its pid. With -n the children
 * run at that nice value (so that a shell on the same CPUs still answers). At the end
 * one line:
 *   getpid-hammer: OK procs=N calls=C min=M          exit 0
 *   getpid-hammer: FAIL procs=N calls=C bad=B first=got/want idle=I   exit 1
 * where M is the fewest calls any child made, and I the children that made none.
 *
 * With -m every call asks which getpid ran: it passes MARK and the address of a word
 * as getpid's first two arguments (which the kernel's getpid ignores); the new getpid
 * of patcher/examples/kbuild/getpid.c writes 1 there, the old one nothing. Each
 * SIGUSR1 then opens a *phase* (numbered 1, 2, ... in the order of the signals): the
 * parent waits until every child has made a call wholly inside the phase (the phase
 * number read the same before and after the call; a child yields the CPU after its
 * first such call, so that the others get it sooner), at most 30 s, closes it, and
 * prints
 *   getpid-hammer: phase K procs=N called=C new=W old=O idle=PID ms=T
 * where C counts the children that made such a call, W those that ran the new getpid
 * in one, O those that ran the old one, PID is the first child that made none (0 if
 * all did) and T how long the phase took; with -f, to FIFO as well (a shell reads it
 * there with its builtins, `kill -USR1 P; read -r l < FIFO`, without starting a
 * process among the hammers). Whoever sends the signal right after a transition ended,
 * and starts the next only after that line, learns whether every child then ran the
 * version the transition was for: the kernel's test-syscall.sh, which counts the pids
 * that ran the new function, made exact for each transition. The final line then ends
 * with newcalls=X, the calls that ran the new getpid.
 */
#include <errno.h>
#include <fcntl.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define MAX_PROCS 512
#define MAX_PHASES 256
/* patcher/examples/kbuild/getpid.c: "lpvmmpid" */
#define MARK 0x6c70766d6d706964UL

struct child {
	volatile long pid; /* written by the parent after fork */
	unsigned long calls, bad, newcalls;
	long first_got;
	/* calls made wholly inside each phase, with the new and with the old getpid */
	volatile unsigned int new_in[MAX_PHASES], old_in[MAX_PHASES];
};

/* What the parent tells the children: the open phase (0: none). */
struct shared {
	volatile int phase;
};

static volatile sig_atomic_t requested;

static void on_usr1(int sig)
{
	(void)sig;
	requested++;
}

static void hammer(struct child *c, struct shared *sh, int mark, const char *stop)
{
	while (c->pid == 0)
		;
	for (;;) {
		for (int i = 0; i < 4096; i++) {
			long got;
			if (mark) {
				volatile unsigned long ran = 0;
				int before = sh->phase;
				got = syscall(SYS_getpid, MARK, &ran, 0);
				int after = sh->phase;
				if (ran)
					c->newcalls++;
				if (before && before == after) {
					int first = c->new_in[before] + c->old_in[before] == 0;
					if (ran)
						c->new_in[before]++;
					else
						c->old_in[before]++;
					/* Counted: let the others run, so the phase ends sooner. */
					if (first)
						sched_yield();
				}
			} else {
				got = syscall(SYS_getpid);
			}
			c->calls++;
			if (got != c->pid && c->bad++ == 0)
				c->first_got = got;
		}
		if (access(stop, F_OK) == 0)
			_exit(0);
	}
}

static double now_ms(void)
{
	struct timespec t;
	clock_gettime(CLOCK_MONOTONIC, &t);
	return t.tv_sec * 1e3 + t.tv_nsec / 1e6;
}

/* Say `line` on stdout and, if given, to the reader of `fifo` (waiting for one for at
 * most 10 s). */
static void say(const char *line, const char *fifo)
{
	fputs(line, stdout);
	fflush(stdout);
	if (!fifo)
		return;
	struct timespec tick = {0, 1000000};
	for (int i = 0; i < 10000; i++) {
		/* Non-blocking: no reader yet is ENXIO, and the hammer never hangs on it. */
		int fd = open(fifo, O_WRONLY | O_NONBLOCK);
		if (fd >= 0) {
			ssize_t n = write(fd, line, strlen(line));
			(void)n;
			close(fd);
			return;
		}
		if (errno != ENXIO)
			break;
		nanosleep(&tick, NULL);
	}
	perror(fifo);
}

/* Open phase k, wait until every child made a call in it (at most 30 s), close it,
 * and say what the children ran. */
static void phase(struct child *c, struct shared *sh, int procs, int k, const char *fifo)
{
	char line[256];
	struct timespec tick = {0, 1000000};
	double t0 = now_ms();
	int called = 0, fresh = 0, stale = 0;
	long idle = 0;
	if (k >= MAX_PHASES) {
		snprintf(line, sizeof(line),
			 "getpid-hammer: phase %d procs=%d too many phases (at most %d)\n", k, procs,
			 MAX_PHASES - 1);
		say(line, fifo);
		return;
	}
	sh->phase = k;
	for (;;) {
		called = 0;
		for (int p = 0; p < procs; p++)
			if (c[p].new_in[k] + c[p].old_in[k] > 0)
				called++;
		if (called == procs || now_ms() - t0 > 30000)
			break;
		nanosleep(&tick, NULL);
	}
	sh->phase = 0;
	called = 0;
	for (int p = 0; p < procs; p++) {
		if (c[p].new_in[k] + c[p].old_in[k] > 0)
			called++;
		else if (!idle)
			idle = c[p].pid;
		if (c[p].new_in[k])
			fresh++;
		if (c[p].old_in[k])
			stale++;
	}
	snprintf(line, sizeof(line),
		 "getpid-hammer: phase %d procs=%d called=%d new=%d old=%d idle=%ld ms=%.0f\n", k,
		 procs, called, fresh, stale, idle, now_ms() - t0);
	say(line, fifo);
}

int main(int argc, char **argv)
{
	int procs = 0, niceness = 0, mark = 0, opt;
	const char *stop = NULL, *fifo = NULL;
	while ((opt = getopt(argc, argv, "p:s:n:mf:")) != -1) {
		switch (opt) {
		case 'p': procs = atoi(optarg); break;
		case 's': stop = optarg; break;
		case 'n': niceness = atoi(optarg); break;
		case 'm': mark = 1; break;
		case 'f': fifo = optarg; break;
		default: goto usage;
		}
	}
	if (!stop || procs < 1 || procs > MAX_PROCS || optind != argc || (fifo && !mark))
		goto usage;
	struct child *c = mmap(NULL, sizeof(*c) * procs, PROT_READ | PROT_WRITE,
			       MAP_SHARED | MAP_ANONYMOUS, -1, 0);
	struct shared *sh = mmap(NULL, sizeof(*sh), PROT_READ | PROT_WRITE,
				 MAP_SHARED | MAP_ANONYMOUS, -1, 0);
	if (c == MAP_FAILED || sh == MAP_FAILED) {
		perror("mmap");
		return 1;
	}
	memset(c, 0, sizeof(*c) * procs);
	sh->phase = 0;
	/* Before the forks, so that an early signal cannot end the parent. */
	struct sigaction sa;
	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = on_usr1;
	sigemptyset(&sa.sa_mask);
	if (sigaction(SIGUSR1, &sa, NULL) != 0) {
		perror("sigaction");
		return 1;
	}
	for (int p = 0; p < procs; p++) {
		pid_t pid = fork();
		if (pid < 0) {
			perror("fork");
			return 1;
		}
		if (pid == 0) {
			if (niceness && nice(niceness) == -1)
				perror("nice");
			hammer(&c[p], sh, mark, stop);
		}
		c[p].pid = pid;
	}
	/* Reap the children as they stop; open each phase asked for meanwhile. */
	int reaped = 0, served = 0;
	struct timespec poll = {0, 2000000};
	while (reaped < procs) {
		while (served < requested)
			phase(c, sh, procs, ++served, fifo);
		pid_t w = waitpid(-1, NULL, WNOHANG);
		if (w > 0) {
			reaped++;
			continue;
		}
		if (w < 0 && errno != EINTR)
			break;
		nanosleep(&poll, NULL);
	}
	unsigned long calls = 0, bad = 0, min = (unsigned long)-1, idle = 0, newcalls = 0;
	long first_got = 0, first_want = 0;
	for (int p = 0; p < procs; p++) {
		calls += c[p].calls;
		newcalls += c[p].newcalls;
		if (c[p].bad && !bad) {
			first_got = c[p].first_got;
			first_want = c[p].pid;
		}
		bad += c[p].bad;
		if (c[p].calls < min)
			min = c[p].calls;
		if (c[p].calls == 0)
			idle++;
	}
	if (bad || idle) {
		printf("getpid-hammer: FAIL procs=%d calls=%lu bad=%lu first=%ld/%ld idle=%lu\n",
		       procs, calls, bad, first_got, first_want, idle);
		return 1;
	}
	printf("getpid-hammer: OK procs=%d calls=%lu min=%lu", procs, calls, min);
	if (mark)
		printf(" newcalls=%lu", newcalls);
	printf("\n");
	return 0;
usage:
	fprintf(stderr, "usage: getpid-hammer -p PROCS -s STOPFILE [-n NICE] [-m [-f FIFO]]\n");
	return 2;
}
