// SPDX-License-Identifier: GPL-2.0
/*
 * The guest's own livepatch, for comparing with lpvmm side by side: the same fix as
 * patcher/examples/cmdline.c, as a kernel livepatch module (like the kernel's
 * samples/livepatch/livepatch-sample.c). Built against the guest's Debian
 * linux-headers package by ../livepatch-module.sh, loaded in the guest with insmod.
 */
#include <linux/kernel.h>
#include <linux/livepatch.h>
#include <linux/module.h>
#include <linux/seq_file.h>

static int lpvmm_lp_cmdline_proc_show(struct seq_file *m, void *v)
{
	seq_printf(m, "%s\n", "this has been live patched");
	return 0;
}

static struct klp_func funcs[] = {
	{
		.old_name = "cmdline_proc_show",
		.new_func = lpvmm_lp_cmdline_proc_show,
	},
	{}
};

static struct klp_object objs[] = {
	{
		/* name NULL: vmlinux */
		.funcs = funcs,
	},
	{}
};

static struct klp_patch patch = {
	.mod = THIS_MODULE,
	.objs = objs,
};

static int lpvmm_lp_init(void)
{
	return klp_enable_patch(&patch);
}

static void lpvmm_lp_exit(void)
{
}

module_init(lpvmm_lp_init);
module_exit(lpvmm_lp_exit);
MODULE_DESCRIPTION("lpvmm benchmark: livepatch of cmdline_proc_show");
MODULE_LICENSE("GPL");
MODULE_INFO(livepatch, "Y");
