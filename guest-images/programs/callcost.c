/*
 * callcost: what one call of getpid(2) costs, in nanoseconds, measured in the guest (for
 * comparing a patched __x64_sys_getpid with the unpatched one and with the guest's own
 * livepatch; tests/src/bin/bench.rs calls).
 *
 * Usage: callcost -n CALLS -b BATCHES
 *
 * Runs BATCHES batches of CALLS calls of syscall(SYS_getpid) (no libc cache), each timed
 * with CLOCK_MONOTONIC, and checks every result against getpid's first answer. One line:
 *   callcost: OK calls=N batches=B median_ns=M min_ns=L max_ns=H     exit 0
 *   callcost: FAIL bad=K first=got/want                              exit 1
 * where M, L and H are nanoseconds per call over the batches (the median resists the
 * batches a timer interrupt or another task happened to land in).
 */
#include <stdio.h>
#include <stdlib.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define MAX_BATCHES 1000

static double now_ns(void)
{
	struct timespec t;
	clock_gettime(CLOCK_MONOTONIC, &t);
	return (double)t.tv_sec * 1e9 + (double)t.tv_nsec;
}

static int by_value(const void *a, const void *b)
{
	double x = *(const double *)a, y = *(const double *)b;
	return (x > y) - (x < y);
}

int main(int argc, char **argv)
{
	long calls = 0;
	int batches = 0, opt;
	while ((opt = getopt(argc, argv, "n:b:")) != -1) {
		switch (opt) {
		case 'n': calls = atol(optarg); break;
		case 'b': batches = atoi(optarg); break;
		default: goto usage;
		}
	}
	if (calls < 1 || batches < 1 || batches > MAX_BATCHES || optind != argc)
		goto usage;
	static double per_call[MAX_BATCHES];
	long want = syscall(SYS_getpid), bad = 0, first_got = 0;
	for (int b = 0; b < batches; b++) {
		double t0 = now_ns();
		for (long i = 0; i < calls; i++) {
			long got = syscall(SYS_getpid);
			if (got != want && bad++ == 0)
				first_got = got;
		}
		per_call[b] = (now_ns() - t0) / (double)calls;
	}
	if (bad) {
		printf("callcost: FAIL bad=%ld first=%ld/%ld\n", bad, first_got, want);
		return 1;
	}
	qsort(per_call, batches, sizeof(per_call[0]), by_value);
	printf("callcost: OK calls=%ld batches=%d median_ns=%.1f min_ns=%.1f max_ns=%.1f\n", calls,
	       batches, per_call[batches / 2], per_call[0], per_call[batches - 1]);
	return 0;
usage:
	fprintf(stderr, "usage: callcost -n CALLS -b BATCHES\n");
	return 2;
}
