/*
 * spawn: create N sleeping processes, for measuring introspection cost per task.
 *
 * Usage: spawn N
 *
 * Forks N children that each block in pause(); prints "spawned N" once all exist, then
 * blocks itself. `pkill spawn` (or killing its process group) ends them all.
 */
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

int main(int argc, char **argv)
{
	long n = argc > 1 ? strtol(argv[1], NULL, 10) : 0;
	if (n <= 0 || n > 100000) {
		fprintf(stderr, "usage: spawn N (1..100000)\n");
		return 2;
	}
	for (long i = 0; i < n; i++) {
		pid_t pid = fork();
		if (pid < 0) {
			perror("fork");
			return 1;
		}
		if (pid == 0) {
			for (;;)
				pause();
		}
	}
	printf("spawned %ld\n", n);
	fflush(stdout);
	for (;;)
		pause();
}
