/*
 * Two functions in one per-task patch: common_nsleep() (every `sleep` sleeps inside it)
 * and cmdline_proc_show(). While a task sleeps in the old common_nsleep, that task
 * keeps the old versions of *both* functions, and every other task runs the new ones:
 * a `cat /proc/cmdline` started during the transition already prints the new text.
 * The new common_nsleep does what the old one does (see nsleep.c).
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

LPVMM_PATCH("nsleep-cmdline");
LPVMM_REPLACE(common_nsleep, lpvmm_common_nsleep);
LPVMM_REPLACE(cmdline_proc_show, lpvmm_cmdline_proc_show);
