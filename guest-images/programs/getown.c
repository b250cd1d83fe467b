/*
 * getown: what F_GETOWN and F_GETOWN_EX say once the owner task is gone
 * (upstream commit cc4a3f885e8f, "fcntl: make F_GETOWN(EX) return 0 on dead
 * owner task", in both guest series)
 *
 *   getown
 *
 * Makes a child the owner of a pipe's read end (F_SETOWN), kills and reaps it,
 * then asks for the owner again. Prints detail lines starting with "# " and
 * then exactly one of
 *
 *   FIXED   both say 0 (the kernel has the fix)
 *   BUGGY   either still names the dead child (the kernel lacks it)
 *   ERROR   the test could not run
 *
 * and exits 0, 1 or 2 accordingly. F_GETOWN is f_getown(); F_GETOWN_EX is
 * f_getown_ex(), which gcc inlines into do_fcntl() in the Debian builds: a diff
 * build of the fix carries do_fcntl.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

int main(void)
{
	int fds[2], ret, got;
	struct f_owner_ex ex;
	pid_t child;

	if (pipe(fds)) {
		printf("# pipe: %s\nERROR\n", strerror(errno));
		return 2;
	}
	child = fork();
	if (child < 0) {
		printf("# fork: %s\nERROR\n", strerror(errno));
		return 2;
	}
	if (child == 0) {
		for (;;)
			pause();
	}
	if (fcntl(fds[0], F_SETOWN, child) || fcntl(fds[0], F_GETOWN) != child) {
		printf("# F_SETOWN/F_GETOWN of live child %d failed\nERROR\n", (int)child);
		kill(child, SIGKILL);
		return 2;
	}
	kill(child, SIGKILL);
	if (waitpid(child, NULL, 0) != child) {
		printf("# waitpid: %s\nERROR\n", strerror(errno));
		return 2;
	}
	got = fcntl(fds[0], F_GETOWN);
	memset(&ex, 0xff, sizeof(ex));
	ret = fcntl(fds[0], F_GETOWN_EX, &ex);
	printf("# child %d reaped: F_GETOWN %d, F_GETOWN_EX %d (pid %d)\n", (int)child, got, ret,
	       (int)ex.pid);
	if (got == 0 && ret == 0 && ex.pid == 0) {
		printf("FIXED\n");
		return 0;
	}
	if (got == child || (ret == 0 && ex.pid == child)) {
		printf("BUGGY\n");
		return 1;
	}
	printf("ERROR\n");
	return 2;
}
