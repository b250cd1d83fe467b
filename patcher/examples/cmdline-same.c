/*
 * cmdline_proc_show() as the kernel has it (fs/proc/cmdline.c: seq_puts of the saved
 * command line, then a newline): a patch that changes nothing, for measuring what the
 * redirection itself costs. seq_puts() is spelled out as what it does (strlen, then
 * seq_write), because 6.12 made it an inline wrapper with no symbol of that name.
 */
#include <lpvmm/patch.h>

struct seq_file;
extern char *saved_command_line;
extern unsigned long strlen(const char *s);
extern int seq_write(struct seq_file *m, const void *data, unsigned long len);
extern void seq_putc(struct seq_file *m, char c);

static int lpvmm_cmdline_same(struct seq_file *m, void *v)
{
	seq_write(m, saved_command_line, strlen(saved_command_line));
	seq_putc(m, '\n');
	return 0;
}

LPVMM_PATCH("cmdline-same");
LPVMM_REPLACE(cmdline_proc_show, lpvmm_cmdline_same);
