/* SPDX-License-Identifier: Apache-2.0 */
/* xdp_macswap.c: the floor of an XDP forwarder, for benchmarks.
 *
 * Swaps the Ethernet source and destination and sends the frame back out
 * (XDP_TX): the least any forwarding program does. bench/ measures fastlb
 * next to it and next to the empty program (xdp_pass.c).
 */
#include <uapi/linux/bpf.h>
#include <linux/if_ether.h>

int xdp_macswap(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	unsigned char tmp[ETH_ALEN];

	if ((void *)(eth + 1) > data_end)
		return XDP_DROP;
	__builtin_memcpy(tmp, eth->h_dest, ETH_ALEN);
	__builtin_memcpy(eth->h_dest, eth->h_source, ETH_ALEN);
	__builtin_memcpy(eth->h_source, tmp, ETH_ALEN);
	return XDP_TX;
}
