/* SPDX-License-Identifier: GPL-2.0 */
/*
 * lpvmm: patch code built with `lpvmm kp build --kernel` tests static keys instead of
 * being patched when they flip (docs/patching.md, "Static keys and static calls").
 *
 * The kernel patches each static branch of a module (a `__jump_table` entry) when its
 * key flips; it would not know patch code's. So here, found before the kernel's own
 * <asm/jump_label.h>, arch_static_branch() and arch_static_branch_jump() read the key:
 * static_branch_likely() and static_branch_unlikely() are then true exactly while the
 * key is enabled, as the kernel's own jump-label-less build has them, and no
 * __jump_table entry is emitted. The kernel's functions are kept under other names and
 * never used.
 */
#ifndef _LPVMM_ASM_JUMP_LABEL_H
#define _LPVMM_ASM_JUMP_LABEL_H

#define arch_static_branch lpvmm_kernels_arch_static_branch
#define arch_static_branch_jump lpvmm_kernels_arch_static_branch_jump
#include_next <asm/jump_label.h>
#undef arch_static_branch
#undef arch_static_branch_jump

#ifndef __ASSEMBLY__

/* For both: `branch` is the key's state at which the compiled default is taken. */
static __always_inline bool arch_static_branch(struct static_key * const key, const bool branch)
{
	return (READ_ONCE(key->enabled.counter) > 0) != branch;
}

static __always_inline bool arch_static_branch_jump(struct static_key * const key, const bool branch)
{
	return (READ_ONCE(key->enabled.counter) > 0) != branch;
}

#endif /* __ASSEMBLY__ */
#endif /* _LPVMM_ASM_JUMP_LABEL_H */
