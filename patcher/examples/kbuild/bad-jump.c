// SPDX-License-Identifier: GPL-2.0
/*
 * Refused on purpose: a static branch puts an entry in __jump_table, which the kernel
 * patches when its key flips; lpvmm does not yet register patch code's jump entries
 * with the guest's keys. lpvmm names the section and the function.
 */
#include <linux/jump_label.h>
#include <linux/seq_file.h>
#include <lpvmm/patch.h>

static DEFINE_STATIC_KEY_FALSE(lpvmm_bad_key);

static int lpvmm_jump_cmdline_proc_show(struct seq_file *m, void *v)
{
	if (static_branch_unlikely(&lpvmm_bad_key))
		seq_printf(m, "keyed\n");
	seq_printf(m, "unkeyed\n");
	return 0;
}

LPVMM_PATCH("bad-jump");
LPVMM_REPLACE(cmdline_proc_show, lpvmm_jump_cmdline_proc_show);
