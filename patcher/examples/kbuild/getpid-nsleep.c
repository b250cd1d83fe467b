// SPDX-License-Identifier: GPL-2.0
/*
 * getpid(2) and common_nsleep with the kernel's own bodies, in one patch, for the
 * call-cost benchmark (tests/src/bin/bench.rs calls): a `sleep` inside the old
 * common_nsleep holds the per-task transition, and while it is held every getpid call
 * goes through lpvmm's dispatch (the trampoline that picks each task's version).
 */
#include <linux/compiler.h>
#include <linux/hrtimer.h>
#include <linux/pid.h>
#include <linux/sched.h>
#include <linux/time.h>
#include <asm/ptrace.h>
#include <lpvmm/patch.h>

static long lpvmm_getpid(const struct pt_regs *regs)
{
	return task_tgid_vnr(current);
}

static int lpvmm_common_nsleep(const clockid_t which_clock, int flags,
			       const struct timespec64 *rqtp)
{
	ktime_t texp = timespec64_to_ktime(*rqtp);
	long ret;

	ret = hrtimer_nanosleep(texp, flags & TIMER_ABSTIME ? HRTIMER_MODE_ABS : HRTIMER_MODE_REL,
				which_clock);
	barrier(); /* a call, never a tail jump: the sleeping task's stack holds this frame */
	return ret;
}

LPVMM_PATCH("getpid-nsleep");
LPVMM_REPLACE(__x64_sys_getpid, lpvmm_getpid);
LPVMM_REPLACE(common_nsleep, lpvmm_common_nsleep);
