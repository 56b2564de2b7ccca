/* SPDX-License-Identifier: Apache-2.0 */
/* xdp_floor.c: the lab's floor, the least any balancer does here.
 *
 * An IPv4 packet to FLOOR_VIP (network order, -D) gets FLOOR_MAC (the one
 * backend's, -D as six bytes) as destination, the old destination as source,
 * and leaves by XDP_TX; everything else passes. bench/ times fastlb next to it.
 */
#include <uapi/linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/ip.h>

int xdp_floor(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data, *data_end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	struct iphdr *iph = (void *)(eth + 1);
	unsigned char mac[ETH_ALEN] = { FLOOR_MAC };

	if ((void *)(iph + 1) > data_end || eth->h_proto != bpf_htons(ETH_P_IP) || iph->daddr != FLOOR_VIP)
		return XDP_PASS;
	__builtin_memcpy(eth->h_source, eth->h_dest, ETH_ALEN);
	__builtin_memcpy(eth->h_dest, mac, ETH_ALEN);
	return XDP_TX;
}
