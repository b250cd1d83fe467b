/*
 * The classic: /proc/cmdline says "this has been live patched".
 *
 *   lpvmm kp build cmdline.c -o cmdline.kp && lpvmm patch VM cmdline.kp
 *
 * cmdline_proc_show() is static in fs/proc/cmdline.c; livepatch's sample does the same.
 */
#include <lpvmm/patch.h>

struct seq_file;
extern int seq_printf(struct seq_file *m, const char *fmt, ...);

static int lpvmm_cmdline_proc_show(struct seq_file *m, void *v)
{
	seq_printf(m, "%s\n", "this has been live patched");
	return 0;
}

LPVMM_PATCH("cmdline");
LPVMM_REPLACE(cmdline_proc_show, lpvmm_cmdline_proc_show);
