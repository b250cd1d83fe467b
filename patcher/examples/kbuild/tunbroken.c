// SPDX-License-Identifier: GPL-2.0
/*
 * A module part that cannot be linked: its new tun_chr_show_fdinfo uses a symbol that
 * neither vmlinux nor tun has. Loaded while tun is not, the patch is accepted (the
 * symbol is pending on tun); when the guest loads tun, lpvmm refuses the load: insmod
 * fails, the guest's kernel log says why, and nothing else changes.
 */
#include <linux/fs.h>
#include <linux/seq_file.h>
#include <lpvmm/patch.h>

extern int lpvmm_no_such_symbol;

static void lpvmm_bad_show_fdinfo(struct seq_file *m, struct file *file)
{
	seq_printf(m, "iff:\t%d\n", lpvmm_no_such_symbol);
}

LPVMM_PATCH("tunbroken");
LPVMM_REPLACE_IN(tun, tun_chr_show_fdinfo, lpvmm_bad_show_fdinfo);
