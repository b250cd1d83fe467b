/*
 * lpvmm/patch.h: declare a live patch for lpvmm.
 *
 * A patch is one C file compiled by `lpvmm kp build FILE.c -o FILE.kp`. It defines the
 * new versions of kernel functions and says, with the macros below, what they replace.
 * The macros only put short "key=value" strings into the object's `.lpvmm.manifest`
 * section, which lpvmm reads when it loads the patch (docs/kp-format.md).
 *
 *   #include <lpvmm/patch.h>
 *
 *   struct seq_file;
 *   extern int seq_printf(struct seq_file *m, const char *fmt, ...);
 *
 *   static int my_cmdline_proc_show(struct seq_file *m, void *v)
 *   {
 *           seq_printf(m, "%s\n", "this has been live patched");
 *           return 0;
 *   }
 *
 *   LPVMM_PATCH("cmdline");
 *   LPVMM_REPLACE(cmdline_proc_show, my_cmdline_proc_show);
 *
 * Kernel symbols a patch uses (functions and data, exported or not, static included)
 * are resolved against the running guest's kallsyms when the patch is loaded. A static
 * name the kernel has more than once needs LPVMM_SYMBOL with its position.
 */
#ifndef LPVMM_PATCH_H
#define LPVMM_PATCH_H

#define __LPVMM_CAT2(a, b) a##b
#define __LPVMM_CAT(a, b) __LPVMM_CAT2(a, b)
#define __LPVMM_STR2(x) #x
#define __LPVMM_STR(x) __LPVMM_STR2(x)

/* One manifest entry: a string in .lpvmm.manifest, kept even if unreferenced. */
#define __LPVMM_ENTRY(text)                                                          \
	static const char __LPVMM_CAT(__lpvmm_manifest_, __COUNTER__)[]              \
		__attribute__((section(".lpvmm.manifest"), used, aligned(1))) = text

/*
 * The patch's name (letters, digits, '_', '-', '.'; at most 64), and format version.
 * (The function is for lpvmm/shadow.h, which records who allocated a shadow variable.)
 */
#define LPVMM_PATCH(name)                                                            \
	static __attribute__((unused)) const char *__lpvmm_patch_name(void)          \
	{                                                                            \
		return name;                                                         \
	}                                                                            \
	__LPVMM_ENTRY("lpvmm=1");                                                    \
	__LPVMM_ENTRY("name=" name)

/* Replace kernel function `old` with `new` (a function of this file). */
#define LPVMM_REPLACE(old, new)                                                      \
	static void *__LPVMM_CAT(__lpvmm_keep_, new)                                 \
		__attribute__((section(".lpvmm.keep"), used)) = (void *)new;         \
	__LPVMM_ENTRY("replace=" #old ":" #new)

/* The same for the pos-th kernel function named `old` (1 = first, in kallsyms order). */
#define LPVMM_REPLACE_POS(old, pos, new)                                             \
	static void *__LPVMM_CAT(__lpvmm_keep_, new)                                 \
		__attribute__((section(".lpvmm.keep"), used)) = (void *)new;         \
	__LPVMM_ENTRY("replace=" #old "," #pos ":" #new)

/*
 * Replace `old` with `new` without per-task consistency: the function flips for every
 * task at once, even in a per-task patch (for a change that cannot break a caller that
 * is half-way through the old version, e.g. a changed constant).
 */
#define LPVMM_REPLACE_IMMEDIATE(old, new)                                            \
	static void *__LPVMM_CAT(__lpvmm_keep_, new)                                 \
		__attribute__((section(".lpvmm.keep"), used)) = (void *)new;         \
	__LPVMM_ENTRY("replace_immediate=" #old ":" #new)

/*
 * The same for a function of a loaded module (livepatch's klp_object): `mod` is the
 * module's name as /proc/modules spells it (virtio_net, not virtio-net). The symbols
 * this file uses resolve in the module first, then in vmlinux; `pos` counts within the
 * module.
 *
 *   LPVMM_REPLACE_IN(tun, tun_chr_show_fdinfo, my_tun_chr_show_fdinfo);
 */
#define LPVMM_REPLACE_IN(mod, old, new)                                              \
	static void *__LPVMM_CAT(__lpvmm_keep_, new)                                 \
		__attribute__((section(".lpvmm.keep"), used)) = (void *)new;         \
	__LPVMM_ENTRY("replace=" #mod ":" #old ":" #new)

#define LPVMM_REPLACE_POS_IN(mod, old, pos, new)                                     \
	static void *__LPVMM_CAT(__lpvmm_keep_, new)                                 \
		__attribute__((section(".lpvmm.keep"), used)) = (void *)new;         \
	__LPVMM_ENTRY("replace=" #mod ":" #old "," #pos ":" #new)

#define LPVMM_REPLACE_IMMEDIATE_IN(mod, old, new)                                    \
	static void *__LPVMM_CAT(__lpvmm_keep_, new)                                 \
		__attribute__((section(".lpvmm.keep"), used)) = (void *)new;         \
	__LPVMM_ENTRY("replace_immediate=" #mod ":" #old ":" #new)

/* Make `local`, an extern this file declares, mean the pos-th kernel symbol `kname`. */
#define LPVMM_SYMBOL(local, kname, pos)                                              \
	__LPVMM_ENTRY("symbol=" #local ":" #kname "," #pos)

/* The same for the pos-th symbol `kname` of module `mod`. */
#define LPVMM_SYMBOL_IN(local, mod, kname, pos)                                      \
	__LPVMM_ENTRY("symbol=" #local ":" #mod ":" #kname "," #pos)

/* This patch needs patch `name` to be enabled first (and keeps it from being disabled). */
#define LPVMM_DEPENDS(name) __LPVMM_ENTRY("depends=" name)

/*
 * A cumulative patch: once enabled it is the whole truth. In one transition every
 * function it names runs its version and every function another enabled patch changed
 * that it does not name runs the kernel's original again; the other patches become
 * "replaced" (never enabled again; unload them). See docs/patching.md.
 */
#define LPVMM_ATOMIC_REPLACE() __LPVMM_ENTRY("flags=replace")

/*
 * This patch establishes system state `id` (a number the patch authors agree on) at
 * `version` (the kernel livepatch's klp_state). A patch that would lower the version
 * of a state an enabled patch holds is refused, and so is a cumulative patch that does
 * not carry every state the enabled patches hold.
 */
#define LPVMM_STATE(id, version)                                                     \
	__LPVMM_ENTRY("state=" __LPVMM_STR(id) ":" __LPVMM_STR(version))

/*
 * Callbacks, as the kernel's livepatch has them (klp_callbacks), for vmlinux or, with
 * _IN, for a module the patch patches. Each is `int fn(struct module *mod)`, called in
 * a kworker of the guest (process context: it may sleep), `mod` NULL for vmlinux:
 *   - pre_patch: before the enable's transition; a non-zero return refuses the enable
 *     (nothing changes; post_unpatch runs for the objects whose pre_patch succeeded);
 *   - post_patch: once the enable's transition completed;
 *   - pre_unpatch: before the disable's transition;
 *   - post_unpatch: once the disable's transition completed, or after an enable that
 *     was refused or reversed.
 * Only the returns of pre_patch count. See docs/patching.md, "Callbacks".
 */
#define __LPVMM_CALLBACK(kind, fn)                                                   \
	static void *__LPVMM_CAT(__lpvmm_keep_, fn)                                  \
		__attribute__((section(".lpvmm.keep"), used)) = (void *)fn;          \
	__LPVMM_ENTRY("callback=" kind ":" #fn)
#define __LPVMM_CALLBACK_IN(mod, kind, fn)                                           \
	static void *__LPVMM_CAT(__lpvmm_keep_, fn)                                  \
		__attribute__((section(".lpvmm.keep"), used)) = (void *)fn;          \
	__LPVMM_ENTRY("callback=" #mod ":" kind ":" #fn)

#define LPVMM_PRE_PATCH(fn) __LPVMM_CALLBACK("pre_patch", fn)
#define LPVMM_POST_PATCH(fn) __LPVMM_CALLBACK("post_patch", fn)
#define LPVMM_PRE_UNPATCH(fn) __LPVMM_CALLBACK("pre_unpatch", fn)
#define LPVMM_POST_UNPATCH(fn) __LPVMM_CALLBACK("post_unpatch", fn)
#define LPVMM_PRE_PATCH_IN(mod, fn) __LPVMM_CALLBACK_IN(mod, "pre_patch", fn)
#define LPVMM_POST_PATCH_IN(mod, fn) __LPVMM_CALLBACK_IN(mod, "post_patch", fn)
#define LPVMM_PRE_UNPATCH_IN(mod, fn) __LPVMM_CALLBACK_IN(mod, "pre_unpatch", fn)
#define LPVMM_POST_UNPATCH_IN(mod, fn) __LPVMM_CALLBACK_IN(mod, "post_unpatch", fn)

/*
 * Callbacks of a state the patch declares with LPVMM_STATE(id, version), each
 * `int fn(unsigned long id)`, run once across any chain of (cumulative) patches that
 * hold the state: setup before the enable of the first enabled patch holding it (a
 * non-zero return refuses that enable), enable once that enable completed; disable
 * before the disable of the last enabled patch holding it, release once that disable
 * completed. A patch that takes the state over from another (a cumulative patch) runs
 * none of them.
 */
#define __LPVMM_STATE_CALLBACK(id, kind, fn)                                         \
	static void *__LPVMM_CAT(__lpvmm_keep_, fn)                                  \
		__attribute__((section(".lpvmm.keep"), used)) = (void *)fn;          \
	__LPVMM_ENTRY("state_callback=" __LPVMM_STR(id) ":" kind ":" #fn)
#define LPVMM_STATE_SETUP(id, fn) __LPVMM_STATE_CALLBACK(id, "setup", fn)
#define LPVMM_STATE_ENABLE(id, fn) __LPVMM_STATE_CALLBACK(id, "enable", fn)
#define LPVMM_STATE_DISABLE(id, fn) __LPVMM_STATE_CALLBACK(id, "disable", fn)
#define LPVMM_STATE_RELEASE(id, fn) __LPVMM_STATE_CALLBACK(id, "release", fn)

#endif /* LPVMM_PATCH_H */
