// SPDX-License-Identifier: GPL-2.0
/*
 * One patch with a vmlinux part and a module part, for a module that goes away while
 * the patch's transition runs: common_nsleep as nsleep.c has it (a `sleep` holds a
 * per-task transition for as long as it sleeps in it), and tun's tun_chr_show_fdinfo as
 * tun.c has it. An `rmmod tun` during that transition waits in lpvmm's module notifier
 * until the transition ends, then tun's part is let go.
 */
#include <linux/compiler.h>
#include <linux/fs.h>
#include <linux/hrtimer.h>
#include <linux/seq_file.h>
#include <linux/time.h>
#include <lpvmm/patch.h>

static int lpvmm_tunsleep_common_nsleep(const clockid_t which_clock, int flags,
					const struct timespec64 *rqtp)
{
	ktime_t texp = timespec64_to_ktime(*rqtp);
	long ret;

	ret = hrtimer_nanosleep(texp, flags & TIMER_ABSTIME ? HRTIMER_MODE_ABS : HRTIMER_MODE_REL,
				which_clock);
	barrier(); /* a call, never a tail jump: the sleeping task's stack holds this frame */
	return ret;
}

static void lpvmm_tunsleep_show_fdinfo(struct seq_file *m, struct file *file)
{
	seq_puts(m, "iff:\tlpvmm tunsleep\n");
}

LPVMM_PATCH("tunsleep");
LPVMM_REPLACE(common_nsleep, lpvmm_tunsleep_common_nsleep);
LPVMM_REPLACE_IN(tun, tun_chr_show_fdinfo, lpvmm_tunsleep_show_fdinfo);
