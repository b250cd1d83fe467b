/*
 * cmdline_proc_show() exactly as the kernel has it (fs/proc/cmdline.c, 6.1 and 6.12):
 * a patch that changes nothing, for measuring what the redirection itself costs.
 */
#include <lpvmm/patch.h>

struct seq_file;
extern char *saved_command_line;
extern void seq_puts(struct seq_file *m, const char *s);
extern void seq_putc(struct seq_file *m, char c);

static int lpvmm_cmdline_same(struct seq_file *m, void *v)
{
	seq_puts(m, saved_command_line);
	seq_putc(m, '\n');
	return 0;
}

LPVMM_PATCH("cmdline-same");
LPVMM_REPLACE(cmdline_proc_show, lpvmm_cmdline_same);
