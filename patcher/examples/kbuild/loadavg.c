// SPDX-License-Identifier: GPL-2.0
/*
 * A fix written the way kernel developers write one: the kernel's own
 * loadavg_proc_show (fs/proc/loadavg.c, the same in 6.1 and 6.12), copied and changed,
 * built with the guest kernel's kbuild and headers:
 *
 *   lpvmm kp build loadavg.c -o loadavg.kp --kernel "$(uname -r of the guest)"
 *
 * /proc/loadavg then shows the real numbers followed by " lpvmm".
 */
#include <linux/fs.h>
#include <linux/pid_namespace.h>
#include <linux/sched.h>
#include <linux/sched/loadavg.h>
#include <linux/sched/stat.h>
#include <linux/seq_file.h>
#include <lpvmm/patch.h>

static int lpvmm_loadavg_proc_show(struct seq_file *m, void *v)
{
	unsigned long avnrun[3];

	get_avenrun(avnrun, FIXED_1/200, 0);

	seq_printf(m, "%lu.%02lu %lu.%02lu %lu.%02lu %u/%d %d lpvmm\n",
		LOAD_INT(avnrun[0]), LOAD_FRAC(avnrun[0]),
		LOAD_INT(avnrun[1]), LOAD_FRAC(avnrun[1]),
		LOAD_INT(avnrun[2]), LOAD_FRAC(avnrun[2]),
		nr_running(), nr_threads,
		idr_get_cursor(&task_active_pid_ns(current)->idr) - 1);
	return 0;
}

LPVMM_PATCH("loadavg");
LPVMM_REPLACE(loadavg_proc_show, lpvmm_loadavg_proc_show);
