/*
 * tunifindex: does tun refuse a negative interface index? (upstream commit
 * cbfbfe3aee71, "tun: prevent negative ifindex", in both guest series)
 *
 *   tunifindex
 *
 * Opens /dev/net/tun and asks for TUNSETIFINDEX with -1; no interface is ever
 * created (no TUNSETIFF), so the unfixed path only stores the number in the
 * file. Prints detail lines starting with "# " and then exactly one of
 *
 *   FIXED   the ioctl failed with EINVAL (the kernel has the fix)
 *   BUGGY   the ioctl succeeded (the kernel lacks it)
 *   ERROR   the test could not run
 *
 * and exits 0, 1 or 2 accordingly. The diff-build tests (tests/tests/diffbuild.rs)
 * apply the fix reverted as a live patch and read the change here. Needs the tun
 * module; makes /dev/net/tun (char 10:200) if devtmpfs did not.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <unistd.h>

#ifndef TUNSETIFINDEX
#define TUNSETIFINDEX _IOW('T', 218, unsigned int)
#endif

int main(void)
{
	int fd, ret, idx = -1;

	fd = open("/dev/net/tun", O_RDWR);
	if (fd < 0 && errno == ENOENT) {
		mkdir("/dev/net", 0755);
		mknod("/dev/net/tun", S_IFCHR | 0666, makedev(10, 200));
		fd = open("/dev/net/tun", O_RDWR);
	}
	if (fd < 0) {
		printf("# cannot open /dev/net/tun: %s\nERROR\n", strerror(errno));
		return 2;
	}
	errno = 0;
	ret = ioctl(fd, TUNSETIFINDEX, &idx);
	printf("# ioctl(TUNSETIFINDEX, -1) = %d, errno %d (%s)\n", ret, errno, strerror(errno));
	close(fd);
	if (ret == -1 && errno == EINVAL) {
		printf("FIXED\n");
		return 0;
	}
	if (ret == 0) {
		printf("BUGGY\n");
		return 1;
	}
	printf("ERROR\n");
	return 2;
}
