// SPDX-License-Identifier: GPL-2.0
/*
 * Callbacks of a module object (the kernel livepatch's test-callbacks.sh, from outside):
 * tun's fdinfo replaced as in tun.c, and tun's object given the four callbacks. When
 * the guest loads tun after the patch, pre_patch and post_patch run in the loading
 * task (insmod) around lpvmm linking tun's part, before tun's init; when it unloads
 * it, pre_unpatch and post_unpatch run in rmmod. With tun loaded, enabling and
 * disabling run them in a kworker. Each says so in the kernel log, with the module it
 * was given and that module's state. Built with -DLPVMM_PRE_PATCH_RET=-19, its
 * pre_patch refuses tun's load (insmod: No such device). Built with -DLPVMM_BUSY, it is
 * tuncb-busy and also replaces tun_do_read (a read then fails with EIO), so that a task
 * asleep in tun's read holds its transition: test-callbacks.sh's "busy target module".
 *
 *   lpvmm kp build tuncb.c -o tuncb.kp --kernel "$(uname -r of the guest)"
 */
#include <linux/fs.h>
#include <linux/module.h>
#include <linux/printk.h>
#include <linux/sched.h>
#include <linux/seq_file.h>
#include <lpvmm/patch.h>

#ifndef LPVMM_PRE_PATCH_RET
#define LPVMM_PRE_PATCH_RET 0
#endif
#ifdef LPVMM_BUSY
#define LPVMM_NAME "tuncb-busy"
#else
#define LPVMM_NAME "tuncb"
#endif

static void said(const char *what, struct module *mod)
{
	pr_info("lpvmm-tuncb: %s ran in %s for %s (state %d)\n", what, current->comm,
		mod ? mod->name : "vmlinux", mod ? (int)mod->state : -1);
}

static int lpvmm_tuncb_pre_patch(struct module *mod)
{
	said("pre_patch", mod);
	return LPVMM_PRE_PATCH_RET;
}

static int lpvmm_tuncb_post_patch(struct module *mod)
{
	said("post_patch", mod);
	return 0;
}

static int lpvmm_tuncb_pre_unpatch(struct module *mod)
{
	said("pre_unpatch", mod);
	return 0;
}

static int lpvmm_tuncb_post_unpatch(struct module *mod)
{
	said("post_unpatch", mod);
	return 0;
}

static void lpvmm_tuncb_show_fdinfo(struct seq_file *m, struct file *file)
{
	seq_puts(m, "iff:\tlpvmm tuncb\n");
}

#ifdef LPVMM_BUSY
static ssize_t lpvmm_tuncb_do_read(void *tun, void *tfile, void *to, int noblock, void *ptr)
{
	return -EIO;
}
LPVMM_REPLACE_IN(tun, tun_do_read, lpvmm_tuncb_do_read);
#endif

LPVMM_PATCH(LPVMM_NAME);
LPVMM_REPLACE_IN(tun, tun_chr_show_fdinfo, lpvmm_tuncb_show_fdinfo);
LPVMM_PRE_PATCH_IN(tun, lpvmm_tuncb_pre_patch);
LPVMM_POST_PATCH_IN(tun, lpvmm_tuncb_post_patch);
LPVMM_PRE_UNPATCH_IN(tun, lpvmm_tuncb_pre_unpatch);
LPVMM_POST_UNPATCH_IN(tun, lpvmm_tuncb_post_unpatch);
