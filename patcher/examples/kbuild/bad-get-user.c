// SPDX-License-Identifier: GPL-2.0
/*
 * Refused on purpose: the inline get_user (unsafe_get_user) puts an entry in __ex_table
 * (the kernel's fault handler must know where the user access is), which lpvmm cannot
 * give the guest for patch code. lpvmm names the section and the function. (get_user()
 * and __get_user() call the kernel's out-of-line helpers, which have their own exception
 * entries, and work.)
 */
#include <linux/uaccess.h>
#include <linux/seq_file.h>
#include <lpvmm/patch.h>

static int lpvmm_bad_cmdline_proc_show(struct seq_file *m, void *v)
{
	int __user *p = (int __user *)v;
	int x = 0;

	if (!user_read_access_begin(p, sizeof(*p)))
		return -EFAULT;
	unsafe_get_user(x, p, efault);
	user_read_access_end();
	seq_printf(m, "%d\n", x);
	return 0;
efault:
	user_read_access_end();
	return -EFAULT;
}

LPVMM_PATCH("bad-get-user");
LPVMM_REPLACE(cmdline_proc_show, lpvmm_bad_cmdline_proc_show);
