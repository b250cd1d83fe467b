// SPDX-License-Identifier: GPL-2.0
/*
 * version_proc_show that spins a while before it prints: a reader of /proc/version
 * is then most of the time *interrupted* inside this patch's code, which lpvmm unwinds
 * with objtool's ORC table at any instruction (tests/tests/kbuild.rs).
 */
#include <linux/compiler.h>
#include <linux/seq_file.h>
#include <lpvmm/patch.h>

static int lpvmm_spin_version_proc_show(struct seq_file *m, void *v)
{
	unsigned long i;

	for (i = 0; i < 20000000UL; i++)
		barrier();
	seq_printf(m, "lpvmm spun\n");
	return 0;
}

LPVMM_PATCH("spin");
LPVMM_REPLACE(version_proc_show, lpvmm_spin_version_proc_show);
