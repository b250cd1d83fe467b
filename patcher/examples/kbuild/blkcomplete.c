// SPDX-License-Identifier: GPL-2.0
/*
 * A patch on the block path of vmlinux, for the Debian system test (issue 26): the
 * guest's virtio_blk completes each request through blk_mq_complete_request
 * (block/blk-mq.c, the same body in 6.1 and 6.12), in its interrupt handler. The
 * replacement does what the kernel's does and says, at most a few times every five
 * seconds, that a request went through it: the test sees from dmesg that the patched
 * path carried real I/O, and from its checksums that it carried it right.
 *
 *   lpvmm kp build blkcomplete.c -o blkcomplete.kp --kernel "$(uname -r of the guest)"
 */
#include <linux/blk-mq.h>
#include <linux/printk.h>
#include <lpvmm/patch.h>

static void lpvmm_blk_mq_complete_request(struct request *rq)
{
	printk_ratelimited(KERN_INFO "lpvmm-blk: a request completed on the patched path\n");
	if (!blk_mq_complete_request_remote(rq))
		rq->q->mq_ops->complete(rq);
}

LPVMM_PATCH("blkcomplete");
LPVMM_REPLACE(blk_mq_complete_request, lpvmm_blk_mq_complete_request);
