// SPDX-License-Identifier: GPL-2.0
/*
 * The dependency case: a fix that changes a vmlinux function's signature and a module
 * function that calls it, in one patch (the rule the livepatch maintainers settled on:
 * such changes are one patch with an object per module, never two patches).
 *
 *   lpvmm kp build ethmtu.c -o ethmtu.kp --kernel "$(uname -r of the guest)"
 *
 * - vmlinux: ether_setup (net/ethernet/eth.c) takes the device's MTU as a second
 *   argument, where the kernel's sets ETH_DATA_LEN.
 * - module dummy: dummy_setup (drivers/net/dummy.c, here without the offload features
 *   the test does not look at) calls it the new way, with 1400. dummy's init calls
 *   dummy_setup for dummy0, so when the guest loads dummy after the patch, dummy0
 *   comes up with MTU 1400: its init ran the new caller of the new function.
 *
 * Built with -DLPVMM_VMLINUX_ONLY it is the negative control: the vmlinux part alone.
 * dummy's own dummy_setup then calls the new ether_setup the old way, with whatever
 * its second argument register holds, and dummy0 gets that as its MTU: the failure the
 * one-patch rule prevents.
 */
#include <linux/etherdevice.h>
#include <linux/if_arp.h>
#include <linux/netdevice.h>
#include <linux/printk.h>
#include <linux/version.h>
#include <lpvmm/patch.h>

#define LPVMM_DUMMY_MTU 1400
#ifndef DEFAULT_TX_QUEUE_LEN
#define DEFAULT_TX_QUEUE_LEN 1000	/* include/uapi/linux/if_ether.h's in 6.12, eth.c's before */
#endif

extern const struct header_ops eth_header_ops;

/* The new convention: the caller says the MTU. */
static void lpvmm_ether_setup(struct net_device *dev, unsigned long mtu)
{
	pr_info("lpvmm: ether_setup with mtu %lu\n", mtu);
	dev->header_ops		= &eth_header_ops;
	dev->type		= ARPHRD_ETHER;
	dev->hard_header_len	= ETH_HLEN;
	dev->min_header_len	= ETH_HLEN;
	dev->mtu		= mtu;
	dev->min_mtu		= ETH_MIN_MTU;
	dev->max_mtu		= ETH_DATA_LEN;
	dev->addr_len		= ETH_ALEN;
	dev->tx_queue_len	= DEFAULT_TX_QUEUE_LEN;
	dev->flags		= IFF_BROADCAST|IFF_MULTICAST;
#if LINUX_VERSION_CODE < KERNEL_VERSION(6, 10, 0)
	dev->priv_flags		|= IFF_TX_SKB_SHARING;
#endif
	eth_broadcast_addr(dev->broadcast);
}

LPVMM_PATCH("ethmtu");
LPVMM_REPLACE(ether_setup, lpvmm_ether_setup);

#ifndef LPVMM_VMLINUX_ONLY
/* dummy's own statics: symbols of module dummy, resolved when it loads. */
extern const struct net_device_ops dummy_netdev_ops;
extern const struct ethtool_ops dummy_ethtool_ops;

/* The kernel's ether_setup, called the new way (through its site, as any caller). */
typedef void (*lpvmm_ether_setup_t)(struct net_device *dev, unsigned long mtu);

static void lpvmm_dummy_setup(struct net_device *dev)
{
	((lpvmm_ether_setup_t)ether_setup)(dev, LPVMM_DUMMY_MTU);

	dev->netdev_ops = &dummy_netdev_ops;
	dev->ethtool_ops = &dummy_ethtool_ops;
	dev->needs_free_netdev = true;

	dev->flags |= IFF_NOARP;
	dev->flags &= ~IFF_MULTICAST;
	dev->priv_flags |= IFF_LIVE_ADDR_CHANGE | IFF_NO_QUEUE;
#if LINUX_VERSION_CODE >= KERNEL_VERSION(6, 12, 0)
	dev->lltx = true;
	dev->pcpu_stat_type = NETDEV_PCPU_STAT_LSTATS;
#endif
	eth_hw_addr_random(dev);

	dev->min_mtu = 0;
	dev->max_mtu = 0;
}

LPVMM_REPLACE_IN(dummy, dummy_setup, lpvmm_dummy_setup);
#endif
