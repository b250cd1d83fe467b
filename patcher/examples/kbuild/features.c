// SPDX-License-Identifier: GPL-2.0
/*
 * Alternatives (.altinstructions): the kernel patches each one for the CPU it booted
 * on; lpvmm does the same when it links the patch, with the guest's own boot_cpu_data.
 * alt() returns 1 as compiled and 2 where the replacement was applied, so
 * /proc/cmdline then shows which ones were, and static_cpu_has() (an alternative with a
 * slow path in .altinstr_aux) what the guest's /proc/cpuinfo says:
 *
 *   always=2 hypervisor=2 la57=1 | hypervisor=1 avx2=0 xsave=1 la57=0
 */
#include <asm/alternative.h>
#include <asm/cpufeature.h>
#include <linux/seq_file.h>
#include <lpvmm/patch.h>

#define alt(feature)                                                                    \
	({                                                                              \
		int __v;                                                                \
		asm volatile(ALTERNATIVE("mov $1, %0", "mov $2, %0", feature) : "=r"(__v)); \
		__v;                                                                    \
	})

static int lpvmm_features_cmdline_proc_show(struct seq_file *m, void *v)
{
	seq_printf(m, "always=%d hypervisor=%d la57=%d | hypervisor=%d avx2=%d xsave=%d la57=%d\n",
		   alt(X86_FEATURE_ALWAYS), alt(X86_FEATURE_HYPERVISOR), alt(X86_FEATURE_LA57),
		   static_cpu_has(X86_FEATURE_HYPERVISOR) ? 1 : 0,
		   static_cpu_has(X86_FEATURE_AVX2) ? 1 : 0,
		   static_cpu_has(X86_FEATURE_XSAVE) ? 1 : 0,
		   static_cpu_has(X86_FEATURE_LA57) ? 1 : 0);
	return 0;
}

LPVMM_PATCH("features");
LPVMM_REPLACE(cmdline_proc_show, lpvmm_features_cmdline_proc_show);
