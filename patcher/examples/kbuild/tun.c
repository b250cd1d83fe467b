// SPDX-License-Identifier: GPL-2.0
/*
 * A fix of a module's functions: two functions of the tun driver (drivers/net/tun.c,
 * module tun), patched while tun is loaded, built with the guest kernel's kbuild:
 *
 *   lpvmm kp build tun.c -o tun.kp --kernel "$(uname -r of the guest)"
 *
 * - tun_chr_show_fdinfo: the "iff:" line of /proc/PID/fdinfo/FD of a tun file says
 *   "lpvmm" and names tun's own static tun_do_read, which this file uses: a symbol of
 *   the patched module, resolved in that module before vmlinux.
 * - tun_do_read: a read of a tun device fails with EIO (a function a reader sleeps in,
 *   for the per-task tests: the reader holds the transition until it leaves).
 */
#include <linux/errno.h>
#include <linux/fs.h>
#include <linux/seq_file.h>
#include <linux/types.h>
#include <lpvmm/patch.h>

/* tun's own static function: `tun_do_read` is in module tun, not in vmlinux. */
extern ssize_t tun_do_read(void);

static void lpvmm_tun_chr_show_fdinfo(struct seq_file *m, struct file *file)
{
	seq_printf(m, "iff:\tlpvmm %ps\n", tun_do_read);
}

static ssize_t lpvmm_tun_do_read(void *tun, void *tfile, void *to, int noblock,
				 void *ptr)
{
	return -EIO;
}

LPVMM_PATCH("tun");
LPVMM_REPLACE_IN(tun, tun_chr_show_fdinfo, lpvmm_tun_chr_show_fdinfo);
LPVMM_REPLACE_IN(tun, tun_do_read, lpvmm_tun_do_read);
