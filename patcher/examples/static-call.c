/*
 * Calling a static, non-exported kernel function: /proc/version is replaced by a line
 * that ends with what the static uptime_proc_show() (fs/proc/uptime.c) prints. lpvmm
 * resolves static symbols from the guest's kallsyms like any other; a name the kernel
 * has more than once would need LPVMM_SYMBOL(local, name, position).
 */
#include <lpvmm/patch.h>

struct seq_file;
extern int seq_printf(struct seq_file *m, const char *fmt, ...);
/* static int uptime_proc_show(struct seq_file *m, void *v); in the kernel */
extern int uptime_proc_show(struct seq_file *m, void *v);

static int lpvmm_version_proc_show(struct seq_file *m, void *v)
{
	seq_printf(m, "lpvmm static call, uptime: ");
	return uptime_proc_show(m, v);
}

LPVMM_PATCH("static-call");
LPVMM_REPLACE(version_proc_show, lpvmm_version_proc_show);
