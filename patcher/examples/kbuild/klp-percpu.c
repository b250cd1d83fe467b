// SPDX-License-Identifier: GPL-2.0
/*
 * A kernel livepatch module lpvmm refuses: its new function counts calls in a per-CPU
 * variable, which needs the kernel's per-CPU allocator (section .data..percpu). lpvmm
 * names the section and the function that needs it, and changes nothing.
 *
 *   lpvmm kp build klp-percpu.c -o klp-percpu.ko --kernel "$(uname -r of the guest)"
 */
#include <linux/kernel.h>
#include <linux/livepatch.h>
#include <linux/module.h>
#include <linux/percpu.h>
#include <linux/seq_file.h>

static DEFINE_PER_CPU(unsigned long, klp_percpu_reads);

static int klp_percpu_cmdline_proc_show(struct seq_file *m, void *v)
{
	this_cpu_inc(klp_percpu_reads);
	seq_printf(m, "%s\n", "per-CPU reads counted");
	return 0;
}

static struct klp_func funcs[] = {
	{
		.old_name = "cmdline_proc_show",
		.new_func = klp_percpu_cmdline_proc_show,
	}, { }
};

static struct klp_object objs[] = {
	{
		.funcs = funcs,
	}, { }
};

static struct klp_patch patch = {
	.mod = THIS_MODULE,
	.objs = objs,
};

static int klp_percpu_init(void)
{
	return klp_enable_patch(&patch);
}

static void klp_percpu_exit(void)
{
}

module_init(klp_percpu_init);
module_exit(klp_percpu_exit);
MODULE_LICENSE("GPL");
MODULE_INFO(livepatch, "Y");
