// SPDX-License-Identifier: GPL-2.0
/*
 * Kernel code through the real headers: `current`, fields of struct task_struct, and
 * nr_processes(), which the kernel does not export to modules (lpvmm resolves it from
 * kallsyms). /proc/cmdline then says who reads it:
 *
 *   comm=cat pid=123 tgid=123 processes=45
 */
#include <linux/sched.h>
#include <linux/sched/stat.h>
#include <linux/seq_file.h>
#include <lpvmm/patch.h>

static int lpvmm_current_cmdline_proc_show(struct seq_file *m, void *v)
{
	struct task_struct *t = current;

	seq_printf(m, "comm=%s pid=%d tgid=%d processes=%d\n", t->comm, t->pid, t->tgid,
		   nr_processes());
	return 0;
}

LPVMM_PATCH("current");
LPVMM_REPLACE(cmdline_proc_show, lpvmm_current_cmdline_proc_show);
