/*
 * pairread: read two files over and over in several processes and check that each
 * process sees a live patch switch both of them consistently (per-task consistency).
 * Two modes: phase mode (the default) and generation mode (-G).
 *
 * Phase mode:
 *   pairread -p PROCS -s STOPFILE -P PHASEFILE -a FILE_A -b FILE_B OLD_A NEW_A OLD_B NEW_B
 *
 * Each of PROCS processes (1..64) loops until STOPFILE exists:
 *   read PHASEFILE (p1); open/read/close FILE_A; open/read/close FILE_B; read PHASEFILE (p2).
 * A read of FILE_A, without one trailing newline, is class 0 if it equals OLD_A, class 1 if
 * it equals NEW_A, else a bad read (likewise FILE_B with OLD_B/NEW_B).
 *
 * PHASEFILE holds a decimal number, optionally followed by the letter r ("7", "7r");
 * missing or empty is phase 0. "7r" is a phase of its own, distinct from "7".
 * Iterations with p1 != p2 are only counted (skipped). In the others, the classes one
 * process sees (A then B, iteration after iteration) may change value at most once within
 * a phase ("r" phases: at most twice, a reversed transition); each further change is a
 * violation. Seeing a new phase value starts the count afresh.
 *
 * At the end one line (totals over all processes; phases = phase values seen, summed):
 *   pairread: OK reads=N changes=C phases=P skipped=S                           exit 0
 *   pairread: FAIL reads=N bad=B violations=V first_bad="..." first_violation="..."  exit 1
 * FAIL also when no read was made. first_violation is "pid=PID phase=PHASE seq=CLASSES"
 * with the last (up to) 16 classes of that process in that phase, oldest first.
 *
 * Generation mode (no phase file; -P, if given, is ignored):
 *   pairread -G -p PROCS -s STOPFILE -a FILE_A -b FILE_B ORIG_A ORIG_B PREFIX_A PREFIX_B
 *
 * Each of PROCS processes (1..64) loops until STOPFILE exists:
 *   open/read/close FILE_A; open/read/close FILE_B.
 * A read of FILE_A, without one trailing newline, is generation 0 if it equals ORIG_A,
 * generation N if it is PREFIX_A followed by the decimal number N and nothing else
 * (1 <= N <= 1000000000, no sign, no leading zeros), else a bad read (likewise FILE_B with
 * ORIG_B/PREFIX_B). The generations one process sees, in read order (A, B, A, B, ...),
 * must never decrease: each decrease is a violation. Bad reads are not part of that order.
 *
 * At the end one line (totals over all processes; changes = increases of the generation,
 * max_gen = the highest generation any process saw):
 *   pairread: OK reads=N changes=C max_gen=M                                     exit 0
 *   pairread: FAIL reads=N bad=B violations=V first_bad="..." first_violation="..."  exit 1
 * FAIL also when no read was made. first_violation is "pid=PID seq=G1,G2,..." with the last
 * (up to) 8 generations of that process, oldest first, the last one the offending one.
 *
 * In both modes control characters in first_bad are shown as '.'. Usage errors: exit 2.
 */
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#define MAX_PROCS 64
#define SEQ_LEN 16
#define GEN_SEQ_LEN 8
#define MAX_GEN 1000000000UL

struct counts {
	unsigned long reads, bad, changes, violations, phases, skipped;
	unsigned long max_gen; /* generation mode */
	char first_bad[128];
	char first_violation[160];
};

struct phase {
	unsigned long num;
	int rev; /* 1: the "Nr" form, two changes allowed */
};

/* Fresh open/read/close of PATH into buf (NUL-terminated); returns the length, 0 if unreadable. */
static size_t read_file(const char *path, char *buf, size_t size)
{
	int fd = open(path, O_RDONLY);
	ssize_t n = fd < 0 ? -1 : read(fd, buf, size - 1);
	if (fd >= 0)
		close(fd);
	if (n < 0)
		n = 0;
	buf[n] = 0;
	return (size_t)n;
}

/* Leading decimal digits are the number, an 'r' right after them marks a reversed phase. */
static struct phase read_phase(const char *path)
{
	char buf[4096];
	struct phase ph = {0, 0};
	read_file(path, buf, sizeof(buf));
	const char *s = buf;
	while (*s >= '0' && *s <= '9')
		ph.num = ph.num * 10 + (unsigned long)(*s++ - '0');
	ph.rev = *s == 'r';
	return ph;
}

/* Count a bad read whose content was BUF, keeping the first one (control characters as '.'). */
static void note_bad(struct counts *c, const char *buf)
{
	if (c->bad++ == 0) {
		snprintf(c->first_bad, sizeof(c->first_bad), "%.120s", buf);
		for (char *s = c->first_bad; *s; s++)
			if ((unsigned char)*s < 0x20 || *s == 0x7f)
				*s = '.';
	}
}

/* Class of a read of PATH: 0 = OLD, 1 = NEW, -1 = bad (counted and, if first, kept). */
static int classify(const char *path, const char *old, const char *new, struct counts *c)
{
	char buf[4096];
	size_t n = read_file(path, buf, sizeof(buf));
	if (n > 0 && buf[n - 1] == '\n')
		buf[--n] = 0;
	c->reads++;
	if (strcmp(buf, old) == 0)
		return 0;
	if (strcmp(buf, new) == 0)
		return 1;
	note_bad(c, buf);
	return -1;
}

/* Per-process state of the consistency check, for the current phase. */
struct tracker {
	struct phase phase;
	int have_phase;
	int last;                /* last class seen in this phase, -1 none */
	int phase_changes;       /* class changes in this phase */
	char seq[SEQ_LEN];       /* last classes seen in this phase, a ring */
	unsigned long nseq;
};

static void observe(struct tracker *t, struct counts *c, int class)
{
	if (class < 0)
		return; /* a bad read is reported as such, not as a class */
	t->seq[t->nseq++ % SEQ_LEN] = (char)('0' + class);
	if (t->last >= 0 && class != t->last) {
		c->changes++;
		if (++t->phase_changes > (t->phase.rev ? 2 : 1) && c->violations++ == 0) {
			char seq[SEQ_LEN + 1];
			unsigned long k = t->nseq < SEQ_LEN ? t->nseq : SEQ_LEN, i;
			for (i = 0; i < k; i++)
				seq[i] = t->seq[(t->nseq - k + i) % SEQ_LEN];
			seq[k] = 0;
			snprintf(c->first_violation, sizeof(c->first_violation),
				 "pid=%d phase=%lu%s seq=%s", (int)getpid(), t->phase.num,
				 t->phase.rev ? "r" : "", seq);
		}
	}
	t->last = class;
}

static void child(struct counts *c, const char *stop, const char *phasefile,
		  const char *file_a, const char *file_b, char **texts)
{
	struct tracker t = {.last = -1};
	while (access(stop, F_OK) != 0) {
		struct phase p1 = read_phase(phasefile);
		int ca = classify(file_a, texts[0], texts[1], c);
		int cb = classify(file_b, texts[2], texts[3], c);
		struct phase p2 = read_phase(phasefile);
		if (p1.num != p2.num || p1.rev != p2.rev) {
			c->skipped++;
			continue;
		}
		if (!t.have_phase || p1.num != t.phase.num || p1.rev != t.phase.rev) {
			t.phase = p1;
			t.have_phase = 1;
			t.last = -1;
			t.phase_changes = 0;
			t.nseq = 0;
			c->phases++;
		}
		observe(&t, c, ca);
		observe(&t, c, cb);
	}
	_exit(0);
}

/* Generation mode: generation of a read of PATH, 0 = ORIG, N = PREFIX followed by N,
 * -1 = bad (counted and, if first, kept). */
static long classify_gen(const char *path, const char *orig, const char *prefix,
			 struct counts *c)
{
	char buf[4096];
	size_t n = read_file(path, buf, sizeof(buf));
	if (n > 0 && buf[n - 1] == '\n')
		buf[--n] = 0;
	c->reads++;
	if (strcmp(buf, orig) == 0)
		return 0;
	size_t plen = strlen(prefix);
	if (strncmp(buf, prefix, plen) == 0) {
		const char *d = buf + plen;
		size_t nd = strspn(d, "0123456789");
		if (nd >= 1 && nd <= 10 && d[nd] == 0 && d[0] != '0') {
			unsigned long g = strtoul(d, NULL, 10);
			if (g >= 1 && g <= MAX_GEN)
				return (long)g;
		}
	}
	note_bad(c, buf);
	return -1;
}

/* Generation mode: per-process state of the monotonicity check. */
struct gen_tracker {
	long last;                     /* last generation seen, -1 none */
	long seq[GEN_SEQ_LEN];         /* last generations seen, a ring */
	unsigned long nseq;
};

static void observe_gen(struct gen_tracker *t, struct counts *c, long gen)
{
	if (gen < 0)
		return; /* a bad read is reported as such, not as a generation */
	t->seq[t->nseq++ % GEN_SEQ_LEN] = gen;
	if ((unsigned long)gen > c->max_gen)
		c->max_gen = (unsigned long)gen;
	if (t->last >= 0 && gen > t->last)
		c->changes++;
	if (t->last >= 0 && gen < t->last && c->violations++ == 0) {
		char seq[GEN_SEQ_LEN * 12 + 1];
		size_t len = 0;
		unsigned long k = t->nseq < GEN_SEQ_LEN ? t->nseq : GEN_SEQ_LEN, i;
		seq[0] = 0;
		for (i = 0; i < k; i++)
			len += (size_t)snprintf(seq + len, sizeof(seq) - len, "%s%ld", i ? "," : "",
						t->seq[(t->nseq - k + i) % GEN_SEQ_LEN]);
		snprintf(c->first_violation, sizeof(c->first_violation), "pid=%d seq=%s",
			 (int)getpid(), seq);
	}
	t->last = gen;
}

static void child_gen(struct counts *c, const char *stop, const char *file_a,
		      const char *file_b, char **texts)
{
	struct gen_tracker t = {.last = -1};
	while (access(stop, F_OK) != 0) {
		long ga = classify_gen(file_a, texts[0], texts[2], c);
		long gb = classify_gen(file_b, texts[1], texts[3], c);
		observe_gen(&t, c, ga);
		observe_gen(&t, c, gb);
	}
	_exit(0);
}

int main(int argc, char **argv)
{
	int procs = 1, opt, gen_mode = 0;
	const char *stop = NULL, *phasefile = NULL, *file_a = NULL, *file_b = NULL;
	while ((opt = getopt(argc, argv, "Gp:s:P:a:b:")) != -1) {
		switch (opt) {
		case 'G': gen_mode = 1; break;
		case 'p': procs = atoi(optarg); break;
		case 's': stop = optarg; break;
		case 'P': phasefile = optarg; break;
		case 'a': file_a = optarg; break;
		case 'b': file_b = optarg; break;
		default: goto usage;
		}
	}
	if (!stop || (!phasefile && !gen_mode) || !file_a || !file_b || argc - optind != 4 ||
	    procs < 1 || procs > MAX_PROCS)
		goto usage;
	/* OLD_A NEW_A OLD_B NEW_B; -G: ORIG_A ORIG_B PREFIX_A PREFIX_B */
	char **texts = argv + optind;
	struct counts *c = mmap(NULL, sizeof(*c) * (size_t)procs, PROT_READ | PROT_WRITE,
				MAP_SHARED | MAP_ANONYMOUS, -1, 0);
	if (c == MAP_FAILED) {
		perror("mmap");
		return 1;
	}
	memset(c, 0, sizeof(*c) * (size_t)procs);
	pid_t pids[MAX_PROCS];
	for (int p = 0; p < procs; p++) {
		pids[p] = fork();
		if (pids[p] < 0) {
			perror("fork");
			for (int q = 0; q < p; q++)
				kill(pids[q], SIGKILL);
			while (wait(NULL) > 0)
				;
			return 1;
		}
		if (pids[p] == 0) {
			if (gen_mode)
				child_gen(&c[p], stop, file_a, file_b, texts);
			child(&c[p], stop, phasefile, file_a, file_b, texts);
		}
	}
	while (wait(NULL) > 0)
		;
	unsigned long reads = 0, bad = 0, changes = 0, violations = 0, phases = 0, skipped = 0;
	unsigned long max_gen = 0;
	const char *first_bad = "", *first_violation = "";
	for (int p = 0; p < procs; p++) {
		reads += c[p].reads;
		if (c[p].bad && !bad)
			first_bad = c[p].first_bad;
		if (c[p].violations && !violations)
			first_violation = c[p].first_violation;
		bad += c[p].bad;
		violations += c[p].violations;
		changes += c[p].changes;
		phases += c[p].phases;
		skipped += c[p].skipped;
		if (c[p].max_gen > max_gen)
			max_gen = c[p].max_gen;
	}
	if (bad || violations || !reads) {
		printf("pairread: FAIL reads=%lu bad=%lu violations=%lu first_bad=\"%s\" "
		       "first_violation=\"%s\"\n",
		       reads, bad, violations, first_bad, first_violation);
		return 1;
	}
	if (gen_mode)
		printf("pairread: OK reads=%lu changes=%lu max_gen=%lu\n", reads, changes, max_gen);
	else
		printf("pairread: OK reads=%lu changes=%lu phases=%lu skipped=%lu\n", reads,
		       changes, phases, skipped);
	return 0;
usage:
	fprintf(stderr, "usage: pairread -p PROCS -s STOPFILE -P PHASEFILE -a FILE_A -b FILE_B "
			"OLD_A NEW_A OLD_B NEW_B\n"
			"       pairread -G -p PROCS -s STOPFILE -a FILE_A -b FILE_B "
			"ORIG_A ORIG_B PREFIX_A PREFIX_B\n");
	return 2;
}
