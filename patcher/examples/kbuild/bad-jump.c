// SPDX-License-Identifier: GPL-2.0
/*
 * Refused on purpose: a static branch with its __jump_table entry, as an object built
 * by another tool has one (lpvmm's own kbuild builds static branches as tests of their
 * key, docs/patching.md "Static keys and static calls", so the entry is written here by
 * hand). The kernel patches such a site when the key flips; it would not know patch
 * code's. lpvmm names the section and the function.
 */
#include <linux/jump_label.h>
#include <linux/seq_file.h>
#include <lpvmm/patch.h>

static DEFINE_STATIC_KEY_FALSE(lpvmm_bad_key);

static int lpvmm_jump_cmdline_proc_show(struct seq_file *m, void *v)
{
	asm goto("1: .byte 0x0f, 0x1f, 0x44, 0x00, 0x00\n\t"
		 ".pushsection __jump_table, \"aw\"\n\t"
		 ".balign 8\n\t"
		 ".long 1b - .\n\t"
		 ".long %l[keyed] - .\n\t"
		 ".quad %c0 - .\n\t"
		 ".popsection\n\t"
		 : : "i" (&lpvmm_bad_key) : : keyed);
	seq_printf(m, "unkeyed\n");
	return 0;
keyed:
	seq_printf(m, "keyed\n");
	return 0;
}

LPVMM_PATCH("bad-jump");
LPVMM_REPLACE(cmdline_proc_show, lpvmm_jump_cmdline_proc_show);
