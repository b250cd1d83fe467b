// SPDX-License-Identifier: GPL-2.0
/*
 * A tracepoint in patch code: trace_console() is a static branch on the tracepoint's
 * key and a static call. Built with `lpvmm kp build --kernel`, the branch tests the key
 * (no __jump_table entry) and the call goes through the kernel's trampoline, so the
 * event appears in the guest's trace exactly while the guest has it enabled
 * (docs/patching.md, "Static keys and static calls").
 */
#include <linux/seq_file.h>
#include <trace/events/printk.h>
#include <lpvmm/patch.h>

static int lpvmm_tp_cmdline_proc_show(struct seq_file *m, void *v)
{
	static const char msg[] = "lpvmm-tp-event";

	trace_console(msg, sizeof(msg) - 1);
	seq_printf(m, "lpvmm-tp\n");
	return 0;
}

LPVMM_PATCH("kbuild-tp");
LPVMM_REPLACE(cmdline_proc_show, lpvmm_tp_cmdline_proc_show);
