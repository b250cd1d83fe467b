// SPDX-License-Identifier: GPL-2.0
/*
 * common_nsleep (kernel/time/posix-timers.c) as the kernel has it, rebuilt with kbuild:
 * a `sleep` then sleeps inside this patch's code, and lpvmm unwinds through it with the
 * ORC table objtool made for it (the guest's kernels keep no frame pointers).
 */
#include <linux/compiler.h>
#include <linux/hrtimer.h>
#include <linux/time.h>
#include <lpvmm/patch.h>

static int lpvmm_kbuild_common_nsleep(const clockid_t which_clock, int flags,
				      const struct timespec64 *rqtp)
{
	ktime_t texp = timespec64_to_ktime(*rqtp);
	long ret;

	ret = hrtimer_nanosleep(texp, flags & TIMER_ABSTIME ? HRTIMER_MODE_ABS : HRTIMER_MODE_REL,
				which_clock);
	barrier(); /* a call, never a tail jump: the sleeping task's stack holds this frame */
	return ret;
}

LPVMM_PATCH("kbuild-nsleep");
LPVMM_REPLACE(common_nsleep, lpvmm_kbuild_common_nsleep);
