/*
 * readcheck: read a file over and over in several processes and check every read is
 * one of the expected texts (for live patching under load).
 *
 * Usage: readcheck -p PROCS -f FILE -s STOPFILE TEXT...
 *
 * Each process opens, reads and closes FILE in a loop until STOPFILE exists. A read is
 * good if its content, without one trailing newline, equals one of the TEXTs. At the end
 * one line:
 *   readcheck: OK reads=N matches=N1,N2,... switches=S min=L max=H   exit 0
 *   readcheck: FAIL reads=N bad=M first="..."                        exit 1
 * where Nt counts the reads of TEXT t, and S the times a process read a different text
 * than its good read before (summed over the processes; L and H are the fewest and the
 * most one process saw): a process that reads through K changes of the file sees at
 * most K switches, and at least one for each change it outlasts by a whole read.
 */
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#define MAX_TEXTS 8
#define MAX_PROCS 64

struct counts {
	unsigned long reads, bad, switches, match[MAX_TEXTS];
	char first_bad[128];
};

int main(int argc, char **argv)
{
	int procs = 1, opt;
	const char *file = NULL, *stop = NULL;
	while ((opt = getopt(argc, argv, "p:f:s:")) != -1) {
		switch (opt) {
		case 'p': procs = atoi(optarg); break;
		case 'f': file = optarg; break;
		case 's': stop = optarg; break;
		default: goto usage;
		}
	}
	int ntexts = argc - optind;
	if (!file || !stop || ntexts < 1 || ntexts > MAX_TEXTS || procs < 1 || procs > MAX_PROCS)
		goto usage;
	char **texts = argv + optind;
	struct counts *c = mmap(NULL, sizeof(*c) * procs, PROT_READ | PROT_WRITE,
				MAP_SHARED | MAP_ANONYMOUS, -1, 0);
	if (c == MAP_FAILED) {
		perror("mmap");
		return 1;
	}
	memset(c, 0, sizeof(*c) * procs);
	for (int p = 0; p < procs; p++) {
		if (fork() == 0) {
			char buf[4096];
			int last = -1;
			while (access(stop, F_OK) != 0) {
				int fd = open(file, O_RDONLY);
				ssize_t n = fd < 0 ? -1 : read(fd, buf, sizeof(buf) - 1);
				if (fd >= 0)
					close(fd);
				if (n < 0)
					n = 0;
				buf[n] = 0;
				if (n > 0 && buf[n - 1] == '\n')
					buf[n - 1] = 0;
				c[p].reads++;
				int t;
				for (t = 0; t < ntexts; t++)
					if (strcmp(buf, texts[t]) == 0)
						break;
				if (t < ntexts) {
					c[p].match[t]++;
					if (last >= 0 && t != last)
						c[p].switches++;
					last = t;
				} else if (c[p].bad++ == 0) {
					snprintf(c[p].first_bad, sizeof(c[p].first_bad), "%s", buf);
				}
			}
			_exit(0);
		}
	}
	while (wait(NULL) > 0)
		;
	unsigned long reads = 0, bad = 0, switches = 0, min = (unsigned long)-1, max = 0;
	unsigned long match[MAX_TEXTS] = {0};
	const char *first = "";
	for (int p = 0; p < procs; p++) {
		reads += c[p].reads;
		switches += c[p].switches;
		if (c[p].switches < min)
			min = c[p].switches;
		if (c[p].switches > max)
			max = c[p].switches;
		if (c[p].bad && !bad)
			first = c[p].first_bad;
		bad += c[p].bad;
		for (int t = 0; t < ntexts; t++)
			match[t] += c[p].match[t];
	}
	if (bad) {
		printf("readcheck: FAIL reads=%lu bad=%lu first=\"%s\"\n", reads, bad, first);
		return 1;
	}
	printf("readcheck: OK reads=%lu matches=", reads);
	for (int t = 0; t < ntexts; t++)
		printf("%s%lu", t ? "," : "", match[t]);
	printf(" switches=%lu min=%lu max=%lu\n", switches, min, max);
	return 0;
usage:
	fprintf(stderr, "usage: readcheck -p PROCS -f FILE -s STOPFILE TEXT...\n");
	return 2;
}
