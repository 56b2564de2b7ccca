/* SPDX-License-Identifier: Apache-2.0 */
/* fastlb_encap.h: IP-in-IP encapsulation (tunnel mode) and decapsulation.
 *
 * The outer header goes between the L2 header (Ethernet and up to two VLAN
 * tags: 14, 18 or 22 bytes) and the inner IP packet. Packet pointers die at
 * bpf_xdp_adjust_head(), so these helpers take offsets and re-read ctx.
 */
#ifndef FASTLB_ENCAP_H
#define FASTLB_ENCAP_H

#include <linux/if_ether.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include "fastlb_csum.h"

#define FL_OUTER_TTL 64
#define FL_IP_DF 0x4000

/* Copy `words` 16-bit words from src to dst, front to back: safe when the
 * two overlap with dst before src (encap). */
#define FL_COPY_FWD(dst, src, words)                    \
	do {                                            \
		int __i;                                \
		_Pragma("unroll")                       \
		for (__i = 0; __i < (words); __i++)     \
			(dst)[__i] = (src)[__i];        \
	} while (0)

/* The same, back to front: safe with dst after src (decap). */
#define FL_COPY_BACK(dst, src, words)                   \
	do {                                            \
		int __i;                                \
		_Pragma("unroll")                       \
		for (__i = (words) - 1; __i >= 0; __i--) \
			(dst)[__i] = (src)[__i];        \
	} while (0)

/* Move the L2 header (14, 18 or 22 bytes) `shift` bytes towards the front
 * (encap: after bpf_xdp_adjust_head() grew the frame) and set its innermost
 * ethertype. Constant sizes in each branch keep the verifier's bounds exact. */
static __always_inline int l2_move_front(void *data, void *data_end, __u32 shift, __u32 l2_len,
					 __u16 proto)
{
	__u16 *dst = data, *src = data + shift;

	if (data + shift + 22 > data_end)  /* every frame that gets here is longer */
		return -1;
	if (l2_len == 14) {
		FL_COPY_FWD(dst, src, 7);
		dst[6] = proto;
	} else if (l2_len == 18) {
		FL_COPY_FWD(dst, src, 9);
		dst[8] = proto;
	} else if (l2_len == 22) {
		FL_COPY_FWD(dst, src, 11);
		dst[10] = proto;
	} else {
		return -1;
	}
	return 0;
}

/* Move the L2 header `shift` bytes towards the back (decap, before
 * bpf_xdp_adjust_head() shrinks the frame) and set its innermost ethertype. */
static __always_inline int l2_move_back(void *data, void *data_end, __u32 shift, __u32 l2_len,
					__u16 proto)
{
	__u16 *src = data, *dst = data + shift;

	if (data + shift + 22 > data_end)
		return -1;
	if (l2_len == 14) {
		FL_COPY_BACK(dst, src, 7);
		dst[6] = proto;
	} else if (l2_len == 18) {
		FL_COPY_BACK(dst, src, 9);
		dst[8] = proto;
	} else if (l2_len == 22) {
		FL_COPY_BACK(dst, src, 11);
		dst[10] = proto;
	} else {
		return -1;
	}
	return 0;
}

/* Prepend an outer IPv4 header: saddr -> daddr, protocol `inner_proto`
 * (IPPROTO_IPIP). Returns 0, or -1 when the frame cannot grow. */
static __always_inline int encap_ipv4(struct xdp_md *ctx, __u32 l2_len, __u16 inner_len,
				      __u32 saddr, __u32 daddr, __u8 inner_proto, __u8 tos)
{
	void *data, *data_end;
	struct iphdr *iph;

	if (bpf_xdp_adjust_head(ctx, -(int)sizeof(struct iphdr)))
		return -1;
	data = fl_data(ctx);
	data_end = fl_data_end(ctx);
	if (l2_move_front(data, data_end, sizeof(struct iphdr), l2_len, bpf_htons(ETH_P_IP)))
		return -1;
	iph = data + (l2_len == 14 ? 14 : l2_len == 18 ? 18 : 22);
	if ((void *)(iph + 1) > data_end)
		return -1;
	iph->version = 4;
	iph->ihl = 5;
	iph->tos = tos;
	iph->tot_len = bpf_htons(inner_len + sizeof(struct iphdr));
	iph->id = 0;
	iph->frag_off = bpf_htons(FL_IP_DF);
	iph->ttl = FL_OUTER_TTL;
	iph->protocol = inner_proto;
	iph->saddr = saddr;
	iph->daddr = daddr;
	fl_ipv4_csum(iph);
	return 0;
}

/* Prepend an outer IPv6 header: saddr -> daddr, next header `inner_proto`
 * (IPPROTO_IPV6 or IPPROTO_IPIP). Returns 0, or -1. */
static __always_inline int encap_ipv6(struct xdp_md *ctx, __u32 l2_len, __u16 inner_len,
				      const __u32 *saddr, const __u32 *daddr, __u8 inner_proto)
{
	void *data, *data_end;
	struct ipv6hdr *ip6h;
	__u32 *w;

	if (bpf_xdp_adjust_head(ctx, -(int)sizeof(struct ipv6hdr)))
		return -1;
	data = fl_data(ctx);
	data_end = fl_data_end(ctx);
	if (l2_move_front(data, data_end, sizeof(struct ipv6hdr), l2_len, bpf_htons(ETH_P_IPV6)))
		return -1;
	ip6h = data + (l2_len == 14 ? 14 : l2_len == 18 ? 18 : 22);
	if ((void *)(ip6h + 1) > data_end)
		return -1;
	w = (__u32 *)ip6h;
	w[0] = bpf_htonl(0x60000000);  /* version 6, no traffic class, no flow label */
	ip6h->payload_len = bpf_htons(inner_len);
	ip6h->nexthdr = inner_proto;
	ip6h->hop_limit = FL_OUTER_TTL;
	__builtin_memcpy(&ip6h->saddr, saddr, 16);
	__builtin_memcpy(&ip6h->daddr, daddr, 16);
	return 0;
}

#endif /* FASTLB_ENCAP_H */
