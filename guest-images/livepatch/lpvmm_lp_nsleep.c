// SPDX-License-Identifier: GPL-2.0
/*
 * The guest's own livepatch of common_nsleep() and cmdline_proc_show() in one patch: the
 * same fix as patcher/examples/nsleep-cmdline.c, as a kernel livepatch module, for
 * comparing with lpvmm side by side. While a task sleeps in the old common_nsleep, the
 * kernel's transition keeps that task on the old versions of both functions. Built
 * against the guest's Debian linux-headers package by ../livepatch-module.sh, loaded in
 * the guest with insmod.
 *
 * The new common_nsleep does what the old one does (kernel/time/posix-timers.c, the
 * same in 6.1 and 6.12). hrtimer_nanosleep() is not exported to modules: its address
 * comes from a kprobe at init, and the new function calls it through a pointer.
 */
#include <linux/hrtimer.h>
#include <linux/kernel.h>
#include <linux/kprobes.h>
#include <linux/ktime.h>
#include <linux/livepatch.h>
#include <linux/module.h>
#include <linux/seq_file.h>
#include <linux/time.h>
#ifdef CONFIG_X86_KERNEL_IBT
#include <asm/cpufeature.h>
#include <asm/ibt.h>
#endif

static long (*lpvmm_hrtimer_nanosleep)(ktime_t rqtp, const enum hrtimer_mode mode,
				       const clockid_t clockid);

static int lpvmm_lp_common_nsleep(const clockid_t which_clock, int flags,
				  const struct timespec64 *rqtp)
{
	ktime_t texp = timespec64_to_ktime(*rqtp);

	return lpvmm_hrtimer_nanosleep(texp, flags & TIMER_ABSTIME ?
				       HRTIMER_MODE_ABS : HRTIMER_MODE_REL,
				       which_clock);
}

static int lpvmm_lp_cmdline_proc_show(struct seq_file *m, void *v)
{
	seq_printf(m, "%s\n", "this has been live patched");
	return 0;
}

static struct klp_func funcs[] = {
	{
		.old_name = "common_nsleep",
		.new_func = lpvmm_lp_common_nsleep,
	},
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

static int lpvmm_lp_resolve(void)
{
	struct kprobe kp = { .symbol_name = "hrtimer_nanosleep" };
	unsigned long addr;
	int ret = register_kprobe(&kp);

	if (ret)
		return ret;
	addr = (unsigned long)kp.addr;
	unregister_kprobe(&kp);
#ifdef CONFIG_X86_KERNEL_IBT
	/* The probe sits after the function's ENDBR (or the NOP that sealed it). */
	if (is_endbr(*(u32 *)(addr - ENDBR_INSN_SIZE)))
		addr -= ENDBR_INSN_SIZE;
	/* Only called directly in vmlinux, it may be sealed: an indirect call would fault. */
	if (cpu_feature_enabled(X86_FEATURE_IBT) && *(u32 *)addr != gen_endbr()) {
		pr_err("lpvmm_lp_nsleep: hrtimer_nanosleep is sealed (IBT): boot with ibt=off\n");
		return -EOPNOTSUPP;
	}
#endif
	lpvmm_hrtimer_nanosleep = (void *)addr;
	return 0;
}

static int lpvmm_lp_init(void)
{
	int ret = lpvmm_lp_resolve();

	return ret ? ret : klp_enable_patch(&patch);
}

static void lpvmm_lp_exit(void)
{
}

module_init(lpvmm_lp_init);
module_exit(lpvmm_lp_exit);
MODULE_DESCRIPTION("lpvmm benchmark: livepatch of common_nsleep and cmdline_proc_show");
MODULE_LICENSE("GPL");
MODULE_INFO(livepatch, "Y");
