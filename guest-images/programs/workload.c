/*
 * workload: a self-checking CPU + memory workload for lpvmm guests.
 *
 * Usage: workload [-t PROCS] [-s SECONDS] [-m MIB] [-f] [-v]
 *
 *   -t PROCS    worker processes to fork (default: online CPUs)
 *   -s SECONDS  how long to run (default 30; 0 = exactly one round per worker)
 *   -m MIB      size of each of the two buffers per worker (default 16)
 *   -f          inject one deliberate corruption (worker 0, round 0) to prove
 *               that the checks catch it: the run must then report FAIL
 *   -v          print per-worker round counts on stderr
 *
 * Every round, each worker:
 *   1. fills buffer A with a xorshift64* stream derived from (worker, round),
 *      computing a position-dependent checksum on the way;
 *   2. memcpy()s A to buffer B (glibc's vectorised copy: SIMD registers);
 *   3. regenerates the stream and compares A and B word by word with it
 *      (and memcmp(A, B)), and re-derives the checksum;
 *   4. does integer and floating-point arithmetic whose results are known
 *      in closed form (series sums, exact square roots, a telescoping sum);
 *   5. makes a system call and checks its result (kernel entry/exit path).
 * The inputs of step 4 go through volatile variables so the compiler cannot
 * fold the checks away.
 *
 * Output (one line on stdout, nothing else unless -v):
 *   workload: OK rounds=<total rounds over all workers>      exit 0
 *   workload: FAIL <what>                                    exit 1
 * A worker killed by a signal, an allocation failure or a bad option is a
 * FAIL too (exit 1 / 2 for usage errors).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <inttypes.h>
#include <math.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define MSG_LEN 240

/* One slot per worker, in memory shared with the parent. */
struct result {
	uint64_t rounds;
	int failed;
	char msg[MSG_LEN];
};

static struct result *g_res; /* this worker's slot */
static int g_worker;
static uint64_t g_round;

static void fail(const char *fmt, ...)
{
	va_list ap;
	int n = snprintf(g_res->msg, MSG_LEN, "worker %d round %" PRIu64 ": ",
			 g_worker, g_round);
	va_start(ap, fmt);
	if (n > 0 && n < MSG_LEN)
		vsnprintf(g_res->msg + n, MSG_LEN - (size_t)n, fmt, ap);
	va_end(ap);
	g_res->failed = 1;
	_exit(1);
}

static uint64_t splitmix64(uint64_t x)
{
	x += 0x9e3779b97f4a7c15ULL;
	x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
	x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
	return x ^ (x >> 31);
}

/* xorshift64* (Vigna); state must never be 0. */
static inline uint64_t xs_next(uint64_t *s)
{
	uint64_t x = *s;
	x ^= x >> 12;
	x ^= x << 25;
	x ^= x >> 27;
	*s = x;
	return x * 0x2545f4914f6cdd1dULL;
}

/* Position-dependent: catches swapped or shifted words, not just flips. */
static inline uint64_t csum_step(uint64_t h, uint64_t v)
{
	h ^= v;
	h = (h << 7) | (h >> 57);
	return h * 0x100000001b3ULL;
}

static double now(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* First differing byte between the expected word and the word found. */
static void report_word(const char *buf, size_t word, uint64_t want, uint64_t got)
{
	size_t off = word * 8;
	for (int b = 0; b < 8; b++) {
		unsigned w = (unsigned)(want >> (8 * b)) & 0xff;
		unsigned g = (unsigned)(got >> (8 * b)) & 0xff;
		if (w != g)
			fail("buffer %s differs at byte offset 0x%zx: expected 0x%02x, got 0x%02x",
			     buf, off + (size_t)b, w, g);
	}
	fail("buffer %s word %zu differs (no byte differs?!)", buf, word);
}

static void memory_round(uint64_t *a, uint64_t *b, size_t words, uint64_t seed, int inject)
{
	uint64_t s = seed, h_fill = 0xcbf29ce484222325ULL;

	for (size_t i = 0; i < words; i++) {
		uint64_t v = xs_next(&s);
		a[i] = v;
		h_fill = csum_step(h_fill, v);
	}

	memcpy(b, a, words * 8);
	if (inject)
		((volatile unsigned char *)b)[words * 4 + 3] ^= 0x10;

	s = seed;
	uint64_t h_check = 0xcbf29ce484222325ULL;
	for (size_t i = 0; i < words; i++) {
		uint64_t want = xs_next(&s);
		uint64_t va = ((volatile uint64_t *)a)[i];
		uint64_t vb = ((volatile uint64_t *)b)[i];
		if (va != want)
			report_word("A", i, want, va);
		if (vb != want)
			report_word("B", i, want, vb);
		h_check = csum_step(h_check, va);
	}
	if (h_check != h_fill)
		fail("checksum mismatch: fill 0x%016" PRIx64 ", verify 0x%016" PRIx64,
		     h_fill, h_check);
	if (memcmp(a, b, words * 8) != 0)
		fail("memcmp(A, B) != 0 after word-by-word equality");
}

static void arith_round(uint64_t round)
{
	/* volatile: the compiler must not know n, or it folds every check. */
	volatile uint64_t vn = 1000 + (round * 7919 + (uint64_t)g_worker * 104729) % 5000;
	uint64_t n = vn;

	uint64_t s1 = 0, s2 = 0, s3 = 0;
	for (uint64_t i = 1; i <= n; i++) {
		s1 += i;
		s2 += i * i;
		s3 += i * i * i;
	}
	if (s1 != n * (n + 1) / 2)
		fail("sum i (n=%" PRIu64 ") = %" PRIu64, n, s1);
	if (s2 != n * (n + 1) * (2 * n + 1) / 6)
		fail("sum i^2 (n=%" PRIu64 ") = %" PRIu64, n, s2);
	if (s3 != (n * (n + 1) / 2) * (n * (n + 1) / 2))
		fail("sum i^3 (n=%" PRIu64 ") = %" PRIu64, n, s3);

	/* Floating point: these sums are exact in IEEE double for n < 2^26. */
	double f1 = 0.0, fq = 0.0, tele = 0.0;
	for (uint64_t i = 1; i <= n; i++) {
		double d = (double)i;
		f1 += d;
		fq += d * 0.25;
		if (sqrt(d * d) != d) /* correctly rounded sqrt is exact here */
			fail("sqrt(%" PRIu64 "^2) = %.17g", i, sqrt(d * d));
		tele += 1.0 / (d * (d + 1.0)); /* telescopes to 1 - 1/(n+1) */
	}
	double exact = (double)(n * (n + 1) / 2);
	if (f1 != exact)
		fail("float sum i (n=%" PRIu64 ") = %.17g, want %.17g", n, f1, exact);
	if (fq != exact * 0.25)
		fail("float sum i/4 (n=%" PRIu64 ") = %.17g, want %.17g", n, fq, exact * 0.25);
	double want_tele = 1.0 - 1.0 / ((double)n + 1.0);
	if (fabs(tele - want_tele) > 1e-12)
		fail("telescoping sum (n=%" PRIu64 ") = %.17g, want %.17g", n, tele, want_tele);

	/* sum_{k=0}^{52} 2^-k == 2 - 2^-52 exactly. */
	volatile double half = 0.5;
	double g = 0.0, p = 1.0;
	for (int k = 0; k <= 52; k++) {
		g += p;
		p *= half;
	}
	if (g != 2.0 - ldexp(1.0, -52))
		fail("geometric sum = %.17g", g);

	/* Integer division round trip. */
	volatile uint64_t vd = n | 1;
	for (uint64_t i = 0; i < 1000; i++) {
		uint64_t x = i * vd + (i % vd);
		if (x / vd != i || x % vd != i % vd)
			fail("division %" PRIu64 " / %" PRIu64, x, (uint64_t)vd);
	}
}

static void worker(int id, size_t bytes, double seconds, int inject, pid_t mypid)
{
	size_t words = bytes / 8;
	uint64_t *a = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	uint64_t *b = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (a == MAP_FAILED || b == MAP_FAILED)
		fail("cannot allocate 2 x %zu bytes: %s", bytes, strerror(errno));

	double deadline = now() + seconds;
	do {
		uint64_t seed = splitmix64(((uint64_t)id << 40) ^ g_round) | 1;
		memory_round(a, b, words, seed, inject && id == 0 && g_round == 0);
		arith_round(g_round);
		long pid = syscall(SYS_getpid);
		if (pid != (long)mypid)
			fail("getpid() = %ld, expected %ld", pid, (long)mypid);
		g_round++;
		g_res->rounds = g_round;
	} while (now() < deadline);
	_exit(0);
}

static void usage(void)
{
	fprintf(stderr, "usage: workload [-t PROCS] [-s SECONDS] [-m MIB] [-f] [-v]\n");
	exit(2);
}

static long parse_num(const char *s, long min, long max)
{
	char *end;
	errno = 0;
	long v = strtol(s, &end, 10);
	if (errno || *s == '\0' || *end != '\0' || v < min || v > max)
		usage();
	return v;
}

int main(int argc, char **argv)
{
	long nproc = sysconf(_SC_NPROCESSORS_ONLN);
	long seconds = 30, mib = 16;
	int inject = 0, verbose = 0, opt;

	if (nproc < 1)
		nproc = 1;
	while ((opt = getopt(argc, argv, "t:s:m:fvh")) != -1) {
		switch (opt) {
		case 't': nproc = parse_num(optarg, 1, 4096); break;
		case 's': seconds = parse_num(optarg, 0, 86400 * 365); break;
		case 'm': mib = parse_num(optarg, 1, 1 << 20); break;
		case 'f': inject = 1; break;
		case 'v': verbose = 1; break;
		default: usage();
		}
	}
	if (optind != argc)
		usage();

	struct result *res = mmap(NULL, sizeof(*res) * (size_t)nproc, PROT_READ | PROT_WRITE,
				  MAP_SHARED | MAP_ANONYMOUS, -1, 0);
	if (res == MAP_FAILED) {
		printf("workload: FAIL cannot allocate result area: %s\n", strerror(errno));
		return 1;
	}
	pid_t *pids = calloc((size_t)nproc, sizeof(*pids));
	if (!pids) {
		printf("workload: FAIL out of memory\n");
		return 1;
	}
	fflush(stdout);

	for (long i = 0; i < nproc; i++) {
		pid_t pid = fork();
		if (pid < 0) {
			printf("workload: FAIL fork: %s\n", strerror(errno));
			for (long j = 0; j < i; j++)
				kill(pids[j], SIGKILL);
			return 1;
		}
		if (pid == 0) {
			g_worker = (int)i;
			g_res = &res[i];
			worker((int)i, (size_t)mib << 20, (double)seconds, inject, getpid());
		}
		pids[i] = pid;
	}

	/* Collect every worker; remember the first failure (by worker index). */
	char failmsg[MSG_LEN + 64] = "";
	uint64_t total = 0;
	for (long i = 0; i < nproc; i++) {
		int st;
		while (waitpid(pids[i], &st, 0) < 0) {
			if (errno != EINTR) {
				snprintf(failmsg, sizeof(failmsg), "waitpid: %s", strerror(errno));
				st = 0;
				break;
			}
		}
		total += res[i].rounds;
		if (verbose)
			fprintf(stderr, "workload: worker %ld rounds=%" PRIu64 "\n", i, res[i].rounds);
		if (failmsg[0])
			continue;
		if (res[i].failed)
			snprintf(failmsg, sizeof(failmsg), "%s", res[i].msg);
		else if (WIFSIGNALED(st))
			snprintf(failmsg, sizeof(failmsg), "worker %ld killed by signal %d (%s)",
				 i, WTERMSIG(st), strsignal(WTERMSIG(st)));
		else if (!WIFEXITED(st) || WEXITSTATUS(st) != 0)
			snprintf(failmsg, sizeof(failmsg), "worker %ld exited with status %d",
				 i, WIFEXITED(st) ? WEXITSTATUS(st) : -1);
		else if (res[i].rounds == 0)
			snprintf(failmsg, sizeof(failmsg), "worker %ld did no round", i);
	}

	if (failmsg[0]) {
		printf("workload: FAIL %s\n", failmsg);
		return 1;
	}
	printf("workload: OK rounds=%" PRIu64 "\n", total);
	return 0;
}
