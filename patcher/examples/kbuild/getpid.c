// SPDX-License-Identifier: GPL-2.0
/*
 * getpid(2) with the kernel's own body, as kernel code: the syscall the livepatch
 * selftests hammer while they patch it (tools/testing/selftests/livepatch,
 * test-syscall.sh). Every caller must still get its own pid, during every transition.
 *
 * Like the selftest's new function (test_klp_syscall.c, which records each pid that
 * ran it), this one says that it ran, to the caller that asks: a caller that passes
 * LPVMM_GETPID_MARK as getpid's first argument (which getpid otherwise ignores) and a
 * pointer as its second gets 1 written there, with the kernel's out-of-line
 * _copy_to_user. The old getpid writes nothing, so each call tells its caller which
 * version ran (`getpid-hammer -m`, guest-images/programs/getpid-hammer.c). Every other
 * caller is answered exactly as before.
 */
#include <linux/sched.h>
#include <linux/pid.h>
#include <linux/uaccess.h>
#include <asm/ptrace.h>
#include <lpvmm/patch.h>

/* "lpvmmpid": no caller passes it by chance. */
#define LPVMM_GETPID_MARK 0x6c70766d6d706964UL

static long lpvmm_getpid(const struct pt_regs *regs)
{
	if (unlikely(regs->di == LPVMM_GETPID_MARK)) {
		unsigned long ran = 1;

		if (_copy_to_user((void __user *)regs->si, &ran, sizeof(ran)))
			return -EFAULT;
	}
	return task_tgid_vnr(current);
}

LPVMM_PATCH("getpid");
LPVMM_REPLACE(__x64_sys_getpid, lpvmm_getpid);
