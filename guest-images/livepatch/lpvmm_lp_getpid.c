// SPDX-License-Identifier: GPL-2.0
/*
 * The guest's own livepatch of getpid(2): __x64_sys_getpid with the kernel's own body,
 * the same change as patcher/examples/kbuild/getpid.c, as a kernel livepatch module, so
 * that the call-cost benchmark (tests/src/bin/bench.rs calls) can compare lpvmm's
 * redirection with livepatch's ftrace handler on the same function. Built against the
 * guest's Debian linux-headers package by ../livepatch-module.sh, loaded with insmod.
 */
#include <linux/livepatch.h>
#include <linux/module.h>
#include <linux/sched.h>
#include <linux/pid.h>
#include <asm/ptrace.h>

static long lpvmm_lp_getpid(const struct pt_regs *regs)
{
	return task_tgid_vnr(current);
}

static struct klp_func funcs[] = {
	{
		.old_name = "__x64_sys_getpid",
		.new_func = lpvmm_lp_getpid,
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
MODULE_DESCRIPTION("lpvmm benchmark: livepatch of __x64_sys_getpid");
MODULE_LICENSE("GPL");
MODULE_INFO(livepatch, "Y");
