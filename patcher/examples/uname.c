/*
 * A patched system call: uname(2) reports version "lpvmm-live-patched", so `uname -a`
 * (and `uname -v`) print it. Replaces the syscall entry __x64_sys_newuname, which copies
 * the init UTS namespace's names (struct new_utsname, UAPI) to user space with the
 * kernel's out-of-line _copy_to_user (inline user copies would need an exception table,
 * which lpvmm refuses).
 */
#include <lpvmm/patch.h>

/* include/uapi/linux/utsname.h */
struct new_utsname {
	char sysname[65], nodename[65], release[65], version[65], machine[65], domainname[65];
};
/* The first member of struct uts_namespace is its struct new_utsname. */
extern struct new_utsname init_uts_ns;
extern unsigned long _copy_to_user(void *to, const void *from, unsigned long n);
extern void *memcpy(void *dst, const void *src, unsigned long n);

/* arch/x86/include/asm/ptrace.h: the syscall's first argument is in di. */
struct pt_regs {
	unsigned long r15, r14, r13, r12, bp, bx, r11, r10, r9, r8, ax, cx, dx, si, di;
};

static long lpvmm_sys_newuname(const struct pt_regs *regs)
{
	static const char version[] = "lpvmm-live-patched";
	struct new_utsname tmp;

	memcpy(&tmp, &init_uts_ns, sizeof(tmp));
	memcpy(tmp.version, version, sizeof(version));
	if (_copy_to_user((void *)regs->di, &tmp, sizeof(tmp)))
		return -14; /* -EFAULT */
	return 0;
}

LPVMM_PATCH("uname");
LPVMM_REPLACE(__x64_sys_newuname, lpvmm_sys_newuname);
