// SPDX-License-Identifier: GPL-2.0
/*
 * Patch code the guest's kernel knows as a module (docs/patching.md, "Patch code the
 * guest knows as a module"): a WARN_ON that fires, reads through a bad user pointer
 * with the kernel's out-of-line get_user and inline (unsafe_get_user, whose exception
 * table entry is the patch's own), and a sleep, for /proc/PID/stack to go through.
 *
 * A task named gmwarn warns, one named gmsleep sleeps 20 s (a signal ends it early);
 * every reader gets both reads' results.
 */
#include <linux/bug.h>
#include <linux/delay.h>
#include <linux/sched.h>
#include <linux/seq_file.h>
#include <linux/string.h>
#include <linux/uaccess.h>
#include <lpvmm/patch.h>

static noinline int lpvmm_gm_inline_read(const int __user *p, int *x)
{
	if (!user_read_access_begin(p, sizeof(*p)))
		return -EFAULT;
	unsafe_get_user(*x, p, efault);
	user_read_access_end();
	return 0;
efault:
	user_read_access_end();
	return -EFAULT;
}

static int lpvmm_gm_cmdline_proc_show(struct seq_file *m, void *v)
{
	const int __user *bad = (const int __user *)16;
	int x = 0;
	int out_of_line = get_user(x, bad);
	int inline_read = lpvmm_gm_inline_read(bad, &x);

	if (!strcmp(current->comm, "gmsleep"))
		msleep_interruptible(20000);
	WARN_ON(!strcmp(current->comm, "gmwarn"));
	seq_printf(m, "lpvmm-gm get_user=%d unsafe_get_user=%d\n", out_of_line, inline_read);
	return 0;
}

LPVMM_PATCH("kbuild-gm");
LPVMM_REPLACE(cmdline_proc_show, lpvmm_gm_cmdline_proc_show);
