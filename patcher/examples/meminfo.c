/*
 * /proc/meminfo with one label changed: "MemTotal" becomes "MemTotalLP". Built from the
 * kernel's own helpers: si_meminfo() fills the UAPI struct sysinfo, and each line is
 * printed as the kernel's (inlined) show_val_kb() does. Only the first lines of the real
 * file are reproduced: enough to see the change.
 */
#include <lpvmm/patch.h>

struct seq_file;
/* include/uapi/linux/sysinfo.h (a stable ABI) */
struct sysinfo {
	long uptime;
	unsigned long loads[3];
	unsigned long totalram, freeram, sharedram, bufferram, totalswap, freeswap;
	unsigned short procs, pad;
	unsigned long totalhigh, freehigh;
	unsigned int mem_unit;
	char _f[20 - 2 * sizeof(unsigned long) - sizeof(unsigned int)];
};

extern void si_meminfo(struct sysinfo *val);
extern void seq_put_decimal_ull_width(struct seq_file *m, const char *delimiter,
				      unsigned long long num, unsigned int width);
extern int seq_write(struct seq_file *seq, const void *data, unsigned long len);

#define PAGE_SHIFT 12

static void show_val_kb(struct seq_file *m, const char *s, unsigned long pages)
{
	seq_put_decimal_ull_width(m, s, pages << (PAGE_SHIFT - 10), 8);
	seq_write(m, " kB\n", 4);
}

static int lpvmm_meminfo_proc_show(struct seq_file *m, void *v)
{
	struct sysinfo i;

	si_meminfo(&i);
	show_val_kb(m, "MemTotalLP:     ", i.totalram);
	show_val_kb(m, "MemFree:        ", i.freeram);
	show_val_kb(m, "Buffers:        ", i.bufferram);
	show_val_kb(m, "Shmem:          ", i.sharedram);
	return 0;
}

LPVMM_PATCH("meminfo");
LPVMM_REPLACE(meminfo_proc_show, lpvmm_meminfo_proc_show);
