// SPDX-License-Identifier: GPL-2.0
/*
 * A fix for a module that is not loaded when the patch is: two functions of the tun
 * driver (drivers/net/tun.c), patched by lpvmm when the guest loads tun, before any of
 * tun's code runs, and again each time it is loaded:
 *
 *   lpvmm kp build tunlate.c -o tunlate.kp --kernel "$(uname -r of the guest)"
 *
 * - tun_device_event: tun's netdevice notifier, which tun's own init registers, and
 *   which the kernel then calls for every network device already there. The new one
 *   says so in the kernel log ("lpvmm: tun sees lo"), so the log shows that tun's init
 *   already ran the new code. (It leaves out what the original does for tun devices'
 *   queue-length and feature events: a test patch.)
 * - tun_chr_show_fdinfo: as in tun.c, the "iff:" line names tun's own static
 *   tun_do_read, a symbol of the module that is pending until tun loads.
 */
#include <linux/fs.h>
#include <linux/netdevice.h>
#include <linux/notifier.h>
#include <linux/printk.h>
#include <linux/seq_file.h>
#include <linux/types.h>
#include <lpvmm/patch.h>

extern ssize_t tun_do_read(void);

static int lpvmm_tun_device_event(struct notifier_block *unused, unsigned long event,
				  void *ptr)
{
	struct net_device *dev = netdev_notifier_info_to_dev(ptr);

	if (event == NETDEV_REGISTER)
		pr_info("lpvmm: tun sees %s\n", dev->name);
	return NOTIFY_DONE;
}

static void lpvmm_tun_chr_show_fdinfo(struct seq_file *m, struct file *file)
{
	seq_printf(m, "iff:\tlpvmm %ps\n", tun_do_read);
}

LPVMM_PATCH("tunlate");
LPVMM_REPLACE_IN(tun, tun_device_event, lpvmm_tun_device_event);
LPVMM_REPLACE_IN(tun, tun_chr_show_fdinfo, lpvmm_tun_chr_show_fdinfo);
