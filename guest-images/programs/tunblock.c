/*
 * tunblock: a task that sleeps inside a kernel module, for as long as it lives.
 *
 *   tunblock
 *
 * Opens /dev/net/tun, creates a tun interface named "lpvmm%d" (IFF_TUN |
 * IFF_NO_PI; the kernel picks the number), prints exactly one line
 *
 *   tunblock: <ifname> pid=<pid>
 *
 * then blocks in read() on the tun file descriptor until killed. The interface
 * is never brought up, so no packet ever arrives: the read sleeps in the tun
 * module (tun_chr_read_iter -> tun_do_read -> tun_ring_recv, which the Debian
 * 6.1 and 6.12 builds inline into tun_do_read), which gives lpvmm's tests a
 * task whose /proc/<pid>/stack has [tun] frames:
 * a sleeper in module code, for introspection and for patching a module's
 * function under a task that is inside it.
 *
 * Needs the tun module (guest-init loads it; lpvmm.modules=0 does not). If
 * devtmpfs did not create /dev/net/tun, it is made here (char 10:200, the
 * misc device number tun registers).
 *
 * Exit status: 1 with a "tunblock: ..." message on stderr on any failure
 * (including a read that returns, which should never happen); never 0.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/if.h>
#include <linux/if_tun.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <unistd.h>

#define TUN_PATH "/dev/net/tun"

static void die(const char *what)
{
	fprintf(stderr, "tunblock: %s: %s\n", what, strerror(errno));
	exit(1);
}

/* /dev/net/tun, created if devtmpfs has not (e.g. /dev is not devtmpfs). */
static int open_tun(void)
{
	int fd = open(TUN_PATH, O_RDWR | O_CLOEXEC);
	if (fd >= 0 || errno != ENOENT)
		return fd;
	if (mkdir("/dev/net", 0755) < 0 && errno != EEXIST)
		die("mkdir /dev/net");
	if (mknod(TUN_PATH, S_IFCHR | 0666, makedev(10, 200)) < 0 && errno != EEXIST)
		die("mknod " TUN_PATH " c 10 200");
	return open(TUN_PATH, O_RDWR | O_CLOEXEC);
}

int main(int argc, char **argv)
{
	struct ifreq ifr;
	char buf[2048];
	int fd;

	(void)argv;
	if (argc != 1) {
		fprintf(stderr, "usage: tunblock   (creates tun lpvmm%%d, then blocks in read() until killed)\n");
		return 1;
	}
	fd = open_tun();
	if (fd < 0) {
		/* ENODEV: the node exists but no driver answers it (tun not loaded) */
		fprintf(stderr, "tunblock: open %s: %s%s\n", TUN_PATH, strerror(errno),
			errno == ENODEV || errno == ENXIO ? " (is the tun module loaded?)" : "");
		return 1;
	}
	memset(&ifr, 0, sizeof(ifr));
	ifr.ifr_flags = IFF_TUN | IFF_NO_PI;
	strncpy(ifr.ifr_name, "lpvmm%d", IFNAMSIZ - 1);
	if (ioctl(fd, TUNSETIFF, &ifr) < 0)
		die("ioctl TUNSETIFF lpvmm%d");
	ifr.ifr_name[IFNAMSIZ - 1] = '\0';
	/* one line, flushed before blocking: a harness waits for it */
	printf("tunblock: %s pid=%d\n", ifr.ifr_name, (int)getpid());
	fflush(stdout);

	for (;;) {
		ssize_t n = read(fd, buf, sizeof(buf));
		if (n < 0 && errno == EINTR)
			continue; /* a stop/continue or a handled signal: sleep again */
		if (n < 0)
			die("read");
		/* the interface is down: nothing is ever queued, so no packet */
		fprintf(stderr, "tunblock: read returned %zd bytes, expected to block forever\n", n);
		return 1;
	}
}
