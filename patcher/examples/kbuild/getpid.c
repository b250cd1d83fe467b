// SPDX-License-Identifier: GPL-2.0
/*
 * getpid(2) with the kernel's own body, as kernel code: the syscall the livepatch
 * selftests hammer while they patch it (tools/testing/selftests/livepatch,
 * test-syscall.sh). Every caller must still get its own pid, during every transition.
 */
#include <linux/sched.h>
#include <linux/pid.h>
#include <asm/ptrace.h>
#include <lpvmm/patch.h>

static long lpvmm_getpid(const struct pt_regs *regs)
{
	return task_tgid_vnr(current);
}

LPVMM_PATCH("getpid");
LPVMM_REPLACE(__x64_sys_getpid, lpvmm_getpid);
