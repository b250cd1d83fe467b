// SPDX-License-Identifier: GPL-2.0
/*
 * Refused on purpose: WARN_ON() puts an entry in __bug_table (the kernel's trap handler
 * looks the ud2 up there), which lpvmm cannot give the guest for patch code.
 */
#include <linux/bug.h>
#include <linux/seq_file.h>
#include <lpvmm/patch.h>

static int lpvmm_warn_cmdline_proc_show(struct seq_file *m, void *v)
{
	WARN_ON(!m);
	seq_printf(m, "warned\n");
	return 0;
}

LPVMM_PATCH("bad-warn");
LPVMM_REPLACE(cmdline_proc_show, lpvmm_warn_cmdline_proc_show);
