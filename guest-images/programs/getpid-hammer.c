/*
 * getpid-hammer: many processes call getpid(2) as fast as they can and check every
 * result (for live patching the syscall under load, after the kernel's
 * tools/testing/selftests/livepatch/test-syscall.sh).
 *
 * Usage: getpid-hammer -p PROCS -s STOPFILE [-n NICE]
 *
 * The parent forks PROCS children and hands each its pid as fork(2) returned it; a
 * child then calls syscall(SYS_getpid) in a loop, bypassing any libc cache, until
 * STOPFILE exists, and counts calls whose result is not its pid. With -n the children
 * run at that nice value (so that a shell on the same CPUs still answers). At the end
 * one line:
 *   getpid-hammer: OK procs=N calls=C min=M          exit 0
 *   getpid-hammer: FAIL procs=N calls=C bad=B first=got/want idle=I   exit 1
 * where M is the fewest calls any child made, and I the children that made none.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#define MAX_PROCS 512

struct child {
	volatile long pid; /* written by the parent after fork */
	unsigned long calls, bad;
	long first_got;
};

static void hammer(struct child *c, const char *stop)
{
	while (c->pid == 0)
		;
	for (;;) {
		for (int i = 0; i < 4096; i++) {
			long got = syscall(SYS_getpid);
			c->calls++;
			if (got != c->pid && c->bad++ == 0)
				c->first_got = got;
		}
		if (access(stop, F_OK) == 0)
			_exit(0);
	}
}

int main(int argc, char **argv)
{
	int procs = 0, niceness = 0, opt;
	const char *stop = NULL;
	while ((opt = getopt(argc, argv, "p:s:n:")) != -1) {
		switch (opt) {
		case 'p': procs = atoi(optarg); break;
		case 's': stop = optarg; break;
		case 'n': niceness = atoi(optarg); break;
		default: goto usage;
		}
	}
	if (!stop || procs < 1 || procs > MAX_PROCS || optind != argc)
		goto usage;
	struct child *c = mmap(NULL, sizeof(*c) * procs, PROT_READ | PROT_WRITE,
			       MAP_SHARED | MAP_ANONYMOUS, -1, 0);
	if (c == MAP_FAILED) {
		perror("mmap");
		return 1;
	}
	memset(c, 0, sizeof(*c) * procs);
	for (int p = 0; p < procs; p++) {
		pid_t pid = fork();
		if (pid < 0) {
			perror("fork");
			return 1;
		}
		if (pid == 0) {
			if (niceness && nice(niceness) == -1)
				perror("nice");
			hammer(&c[p], stop);
		}
		c[p].pid = pid;
	}
	while (wait(NULL) > 0)
		;
	unsigned long calls = 0, bad = 0, min = (unsigned long)-1, idle = 0;
	long first_got = 0, first_want = 0;
	for (int p = 0; p < procs; p++) {
		calls += c[p].calls;
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
	printf("getpid-hammer: OK procs=%d calls=%lu min=%lu\n", procs, calls, min);
	return 0;
usage:
	fprintf(stderr, "usage: getpid-hammer -p PROCS -s STOPFILE [-n NICE]\n");
	return 2;
}
