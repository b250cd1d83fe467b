/*
 * A patch for a function tasks sleep in: common_nsleep() (kernel/time/posix-timers.c,
 * static) is on the stack of every task in nanosleep/clock_nanosleep on CLOCK_REALTIME
 * or CLOCK_MONOTONIC, e.g. `sleep 100`. The new version does the same as the old one;
 * while such a task sleeps, the patch cannot switch (the consistency model), and it
 * does as soon as the sleep ends.
 */
#include <lpvmm/patch.h>

/* include/linux/time64.h, include/linux/ktime.h */
struct timespec64 {
	long long tv_sec;
	long tv_nsec;
};
#define NSEC_PER_SEC 1000000000LL
#define KTIME_SEC_MAX (9223372036854775807LL / NSEC_PER_SEC)
#define KTIME_MAX 9223372036854775807LL
#define TIMER_ABSTIME 1
enum { HRTIMER_MODE_ABS = 0, HRTIMER_MODE_REL = 1 };

extern long hrtimer_nanosleep(long long rqtp, int mode, int clockid);

static int lpvmm_common_nsleep(const int which_clock, int flags, const struct timespec64 *rqtp)
{
	long long t = rqtp->tv_sec >= KTIME_SEC_MAX ? KTIME_MAX
						     : rqtp->tv_sec * NSEC_PER_SEC + rqtp->tv_nsec;

	return hrtimer_nanosleep(t, flags & TIMER_ABSTIME ? HRTIMER_MODE_ABS : HRTIMER_MODE_REL,
				 which_clock);
}

LPVMM_PATCH("nsleep");
LPVMM_REPLACE(common_nsleep, lpvmm_common_nsleep);
