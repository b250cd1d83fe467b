// SPDX-License-Identifier: GPL-2.0
/*
 * A state's callbacks across a chain of cumulative patches: each build of this file
 * (-DLPVMM_N=2 makes patch states-2, and so on) is a cumulative patch holding state 7, whose
 * setup, enable, disable and release callbacks say in the kernel log which patch ran
 * them. Enabled one after the other, then the last disabled: setup and enable run once
 * (the first patch's), disable and release once (the last's).
 *
 *   lpvmm kp build states.c -o states.kp --kernel "$(uname -r of the guest)"
 */
#include <linux/printk.h>
#include <linux/seq_file.h>
#include <lpvmm/patch.h>

#ifndef LPVMM_N
#define LPVMM_N 1
#endif
#define LPVMM_NAME "states-" __LPVMM_STR(LPVMM_N)

static int said(const char *what, unsigned long id)
{
	pr_info("lpvmm-states: %s of state %lu by %s\n", what, id, LPVMM_NAME);
	return 0;
}

static int lpvmm_st_setup(unsigned long id) { return said("setup", id); }
static int lpvmm_st_enable(unsigned long id) { return said("enable", id); }
static int lpvmm_st_disable(unsigned long id) { return said("disable", id); }
static int lpvmm_st_release(unsigned long id) { return said("release", id); }

static int lpvmm_st_cmdline_proc_show(struct seq_file *m, void *v)
{
	seq_printf(m, "%s\n", LPVMM_NAME);
	return 0;
}

LPVMM_PATCH(LPVMM_NAME);
LPVMM_ATOMIC_REPLACE();
LPVMM_STATE(7, 1);
LPVMM_REPLACE(cmdline_proc_show, lpvmm_st_cmdline_proc_show);
LPVMM_STATE_SETUP(7, lpvmm_st_setup);
LPVMM_STATE_ENABLE(7, lpvmm_st_enable);
LPVMM_STATE_DISABLE(7, lpvmm_st_disable);
LPVMM_STATE_RELEASE(7, lpvmm_st_release);
