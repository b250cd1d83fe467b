/*
 * A per-task patch with one function marked immediate: cmdline_proc_show() flips for
 * every task in the first tick (LPVMM_REPLACE_IMMEDIATE: its change cannot break a
 * caller half-way through it), while common_nsleep() switches task by task and waits
 * for any task asleep in it. Otherwise the same as nsleep-cmdline.c.
 */
#include <lpvmm/patch.h>

struct seq_file;
extern int seq_printf(struct seq_file *m, const char *fmt, ...);

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

static int lpvmm_cmdline_proc_show(struct seq_file *m, void *v)
{
	seq_printf(m, "%s\n", "this has been live patched");
	return 0;
}

LPVMM_PATCH("immediate-cmdline");
LPVMM_REPLACE(common_nsleep, lpvmm_common_nsleep);
LPVMM_REPLACE_IMMEDIATE(cmdline_proc_show, lpvmm_cmdline_proc_show);
