/*
 * A patch for a function tasks sleep in: common_nsleep() (kernel/time/posix-timers.c,
 * static) is on the stack of every task in nanosleep/clock_nanosleep on CLOCK_REALTIME
 * or CLOCK_MONOTONIC, e.g. `sleep 100`. The new version sleeps as the old one does;
 * while such a task sleeps, the patch cannot switch (the consistency model), and it
 * does as soon as the sleep ends.
 *
 * The new version also counts the sleeps it served, and the patch's /proc/version says
 * how many: `lpvmm nsleep: N sleeps in the new common_nsleep`. So a user (and the
 * tests) can see that a sleep went through the new function, not merely that it ended.
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

struct seq_file;
extern long hrtimer_nanosleep(long long rqtp, int mode, int clockid);
extern int seq_printf(struct seq_file *m, const char *fmt, ...);

/* The sleeps the new common_nsleep served: the patch's own data. */
static unsigned long sleeps;

static int lpvmm_common_nsleep(const int which_clock, int flags, const struct timespec64 *rqtp)
{
	long long t = rqtp->tv_sec >= KTIME_SEC_MAX ? KTIME_MAX
						     : rqtp->tv_sec * NSEC_PER_SEC + rqtp->tv_nsec;

	__atomic_fetch_add(&sleeps, 1, __ATOMIC_RELAXED);
	return hrtimer_nanosleep(t, flags & TIMER_ABSTIME ? HRTIMER_MODE_ABS : HRTIMER_MODE_REL,
				 which_clock);
}

/* version_proc_show() (fs/proc/version.c, static): what the new function did. */
static int lpvmm_nsleep_version_proc_show(struct seq_file *m, void *v)
{
	seq_printf(m, "lpvmm nsleep: %lu sleeps in the new common_nsleep\n",
		   __atomic_load_n(&sleeps, __ATOMIC_RELAXED));
	return 0;
}

LPVMM_PATCH("nsleep");
LPVMM_REPLACE(common_nsleep, lpvmm_common_nsleep);
LPVMM_REPLACE(version_proc_show, lpvmm_nsleep_version_proc_show);
