// SPDX-License-Identifier: GPL-2.0
/*
 * A field added to a live structure with a shadow variable: each task counts the times
 * it read /proc/cmdline, in shadow variable 1 of its task_struct, and the file says so
 * ("shadow-1 reads=3"). Each build (-DLPVMM_N=2 makes shadow-2) is a cumulative patch
 * holding state 9, to which variable 1 is tied: shadow-2 takes over the counts shadow-1
 * kept (they go on from where they were), and once the last patch holding state 9 is
 * disabled lpvmm frees every variable 1, whose destructor says so in the kernel log.
 *
 *   lpvmm kp build shadow.c -o shadow.kp --kernel "$(uname -r of the guest)"
 *   lpvmm shadow VM        # the variables, from outside
 */
#include <linux/printk.h>
#include <linux/sched.h>
#include <linux/seq_file.h>
#include <linux/slab.h>
#include <lpvmm/patch.h>
#include <lpvmm/shadow.h>

#ifndef LPVMM_N
#define LPVMM_N 1
#endif
#define LPVMM_NAME "shadow-" __LPVMM_STR(LPVMM_N)
#define READS 1

static int lpvmm_sh_zero(void *obj, void *data, void *arg)
{
	*(unsigned long *)data = 0;
	return 0;
}

static void lpvmm_sh_freed(void *obj, void *data)
{
	pr_info("lpvmm-shadow: freed reads=%lu\n", *(unsigned long *)data);
}

static int lpvmm_sh_cmdline_proc_show(struct seq_file *m, void *v)
{
	unsigned long *reads = lpvmm_shadow_get_or_alloc(current, READS, sizeof(*reads),
							 GFP_KERNEL, lpvmm_sh_zero, NULL);

	if (!reads)
		return -ENOMEM;
	seq_printf(m, "%s reads=%lu\n", LPVMM_NAME, ++*reads);
	return 0;
}

LPVMM_PATCH(LPVMM_NAME);
LPVMM_ATOMIC_REPLACE();
LPVMM_STATE(9, 1);
LPVMM_SHADOW_DTOR(READS, 9, lpvmm_sh_freed);
LPVMM_REPLACE(cmdline_proc_show, lpvmm_sh_cmdline_proc_show);
