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
 * -DLPVMM_PRE_PATCH_SLEEP_MS=N, it sleeps N ms first (a slow callback). -DLPVMM_N=2 names
 * it callbacks-2 (a second patch), and -DLPVMM_CUMULATIVE makes it a cumulative patch
 * (atomic replace): test-callbacks.sh's "multiple livepatches" and "atomic replace".
 * -DLPVMM_PRE_PATCH_HANG makes its pre_patch wait until the guest's hostname is
 * lpvmm-release (a hung callback, released by hand); -DLPVMM_PRE_PATCH_OOPS makes it
 * write through a NULL pointer (an oops in the kworker).
 */
#include <linux/delay.h>
#include <linux/module.h>
#include <linux/printk.h>
#include <linux/sched.h>
#include <linux/seq_file.h>
#include <linux/string.h>
#include <linux/utsname.h>
#include <lpvmm/patch.h>

#ifndef LPVMM_PRE_PATCH_RET
#define LPVMM_PRE_PATCH_RET 0
#endif
#ifdef LPVMM_N
#define LPVMM_NAME "callbacks-" __LPVMM_STR(LPVMM_N)
#else
#define LPVMM_NAME "callbacks"
#endif

static void said(const char *what)
{
	msleep(1);	/* process context: a callback may sleep */
	pr_info("lpvmm-callbacks: %s ran in %s for %s\n", what, current->comm, LPVMM_NAME);
}

#ifdef LPVMM_PRE_PATCH_OOPS
static int *volatile lpvmm_cb_nowhere;
#endif

static int lpvmm_cb_pre_patch(struct module *mod)
{
#ifdef LPVMM_PRE_PATCH_SLEEP_MS
	msleep(LPVMM_PRE_PATCH_SLEEP_MS);
#endif
#ifdef LPVMM_PRE_PATCH_HANG
	while (strcmp(init_utsname()->nodename, "lpvmm-release"))
		msleep(100);
#endif
	said("pre_patch");
#ifdef LPVMM_PRE_PATCH_OOPS
	*lpvmm_cb_nowhere = 1;
#endif
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
	seq_printf(m, "lpvmm %s\n", LPVMM_NAME);
	return 0;
}

LPVMM_PATCH(LPVMM_NAME);
#ifdef LPVMM_CUMULATIVE
LPVMM_ATOMIC_REPLACE();
#endif
LPVMM_REPLACE(cmdline_proc_show, lpvmm_cb_cmdline_proc_show);
LPVMM_PRE_PATCH(lpvmm_cb_pre_patch);
LPVMM_POST_PATCH(lpvmm_cb_post_patch);
LPVMM_PRE_UNPATCH(lpvmm_cb_pre_unpatch);
LPVMM_POST_UNPATCH(lpvmm_cb_post_unpatch);
