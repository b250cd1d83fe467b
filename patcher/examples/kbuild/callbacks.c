// SPDX-License-Identifier: GPL-2.0
/*
 * Callbacks around a patch's transitions (the kernel livepatch's pre/post patch and
 * unpatch callbacks), run by lpvmm in a kworker of the guest:
 *
 *   lpvmm kp build callbacks.c -o callbacks.kp --kernel "$(uname -r of the guest)"
 *
 * It replaces cmdline_proc_show (/proc/cmdline says "lpvmm callbacks"), and each
 * callback says in the kernel log that it ran, in which task, and that it could sleep
 * there. Built with -DLPVMM_PRE_PATCH_RET=-19, its pre_patch refuses the enable; with
 * -DLPVMM_PRE_PATCH_SLEEP_MS=N, it sleeps N ms first (a slow callback).
 */
#include <linux/delay.h>
#include <linux/module.h>
#include <linux/printk.h>
#include <linux/sched.h>
#include <linux/seq_file.h>
#include <lpvmm/patch.h>

#ifndef LPVMM_PRE_PATCH_RET
#define LPVMM_PRE_PATCH_RET 0
#endif

static void said(const char *what)
{
	msleep(1);	/* process context: a callback may sleep */
	pr_info("lpvmm-callbacks: %s ran in %s\n", what, current->comm);
}

static int lpvmm_cb_pre_patch(struct module *mod)
{
#ifdef LPVMM_PRE_PATCH_SLEEP_MS
	msleep(LPVMM_PRE_PATCH_SLEEP_MS);
#endif
	said("pre_patch");
	return LPVMM_PRE_PATCH_RET;
}

static int lpvmm_cb_post_patch(struct module *mod)
{
	said("post_patch");
	return 0;
}

static int lpvmm_cb_pre_unpatch(struct module *mod)
{
	said("pre_unpatch");
	return 0;
}

static int lpvmm_cb_post_unpatch(struct module *mod)
{
	said("post_unpatch");
	return 0;
}

static int lpvmm_cb_cmdline_proc_show(struct seq_file *m, void *v)
{
	seq_puts(m, "lpvmm callbacks\n");
	return 0;
}

LPVMM_PATCH("callbacks");
LPVMM_REPLACE(cmdline_proc_show, lpvmm_cb_cmdline_proc_show);
LPVMM_PRE_PATCH(lpvmm_cb_pre_patch);
LPVMM_POST_PATCH(lpvmm_cb_post_patch);
LPVMM_PRE_UNPATCH(lpvmm_cb_pre_unpatch);
LPVMM_POST_UNPATCH(lpvmm_cb_post_unpatch);
