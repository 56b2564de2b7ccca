/* SPDX-License-Identifier: Apache-2.0 */
/* fastlb_decap.c: the backends' side of tunnel mode.
 *
 * An IP-in-IP packet (IPv4 or IPv6 outside, IPv4 or IPv6 inside) whose
 * outer destination is an address of this host, whose inner destination is
 * a configured VIP and whose outer source is in the balancers' prefixes
 * (decap --from) loses its outer header here, its ECN carried to the inner
 * header (RFC 6040), and the inner packet goes on to the stack, where the
 * VIP sits on lo. No ipip/ip6_tunnel module is needed. Everything else
 * passes untouched; a truncated tunnel packet for us, one from another
 * source, and outer CE on a Not-ECT inner packet are dropped. Every packet
 * moves one counter (enum fl_decap_reason).
 */
#include <uapi/linux/bpf.h>
#include <linux/in.h>
#include "parsing_helpers.h"
#include "fastlb_encap.h"
#include "fastlb_structs.h"
#include "fastlb_pinned.h"
#include "fastlb_csum.h"

/* Address (vip_key with port 0, proto 0) -> FL_DECAP_ADDR_LOCAL and/or
 * FL_DECAP_ADDR_VIP. Written by the loader. */
FL_MAP("hash", struct vip_key, __u32, addrs, FASTLB_DECAP_MAX_ADDRS, 0);

/* Outer source prefixes tunnels are accepted from -> 1. Written by the
 * loader: the --from prefixes, or 0.0.0.0/0 and ::/0 without --from. */
FL_MAP("lpm_trie", struct fl_src_key, __u32, sources, FASTLB_DECAP_MAX_SOURCES, BPF_F_NO_PREALLOC);

/* enum fl_decap_reason -> packets/bytes. Written by the program. */
FL_MAP("percpu_array", __u32, struct fl_counter, decap_stats, FL_DECAP_REASON_MAX, 0);

static __always_inline int addr_has(const __u32 *addr, __u8 family, __u32 flag)
{
	struct vip_key key = {};
	__u32 *v;

	fl_addr_key(&key, addr, family);
	v = addrs.lookup(&key);
	return v && (*v & flag);
}

static __always_inline int source_allowed(const __u32 *addr, __u8 family)
{
	struct fl_src_key key = {};

	key.prefixlen = 32 + (family == FL_AF_INET ? 32 : 128);
	key.family = family;
	key.addr[0] = addr[0];
	key.addr[1] = addr[1];
	key.addr[2] = addr[2];
	key.addr[3] = addr[3];
	return sources.lookup(&key) != NULL;
}

/* RFC 6040 (normal mode) decapsulation: the inner ECN field after, given
 * the outer's; -1: drop (outer CE, inner Not-ECT). */
static __always_inline int ecn_decap(__u8 outer, __u8 inner)
{
	if (inner == FL_ECN_NOT_ECT)
		return outer == FL_ECN_CE ? -1 : inner;
	if (inner == FL_ECN_CE || outer == FL_ECN_NOT_ECT || outer == FL_ECN_ECT0)
		return inner;
	return outer;  /* CE, or ECT(1) over ECT(0)/ECT(1) */
}

/* Carry the outer ECN field into the inner header (at `inner`, IPv4 when
 * `proto` is IPIP), IPv4's checksum updated. -1: drop. */
static __always_inline int ecn_propagate(void *inner, void *data_end, int proto, __u8 outer)
{
	struct iphdr *iph = inner;
	__u8 *tc = inner;  /* IPv6: the traffic class's ECN bits are bits 4-5 of byte 1 */
	__u16 old;
	int ecn;

	if (proto == FL_IPPROTO_IPIP) {
		if ((void *)(iph + 1) > data_end)
			return -1;
		ecn = ecn_decap(outer, iph->tos & 3);
		if (ecn < 0)
			return -1;
		old = *(__u16 *)iph;
		iph->tos = (iph->tos & ~3) | ecn;
		fl_csum_replace2(&iph->check, old, *(__u16 *)iph);
		return 0;
	}
	if ((void *)(tc + 2) > data_end)
		return -1;
	ecn = ecn_decap(outer, (tc[1] >> 4) & 3);
	if (ecn < 0)
		return -1;
	tc[1] = (tc[1] & ~0x30) | (ecn << 4);
	return 0;
}

/* The inner header's destination (at `inner`, of IP version per `proto`). */
static __always_inline int inner_dst(void *inner, void *data_end, int proto, __u32 *dst, __u8 *family)
{
	struct iphdr *iph = inner;
	struct ipv6hdr *ip6h = inner;

	if (proto == FL_IPPROTO_IPIP) {
		if ((void *)(iph + 1) > data_end || iph->version != 4)
			return -1;
		dst[0] = iph->daddr;
		*family = FL_AF_INET;
		return 0;
	}
	if ((void *)(ip6h + 1) > data_end || ip6h->version != 6)
		return -1;
	__builtin_memcpy(dst, &ip6h->daddr, 16);
	*family = FL_AF_INET6;
	return 0;
}

static __always_inline __u32 decap(struct xdp_md *ctx)
{
	void *data = fl_data(ctx);
	void *data_end = fl_data_end(ctx);
	struct hdr_cursor nh = { .pos = data };
	__u32 outer_dst[4], outer_src[4], dst[4], l2_len, outer_len;
	struct ethhdr *eth;
	struct iphdr *iph;
	struct ipv6hdr *ip6h;
	__u8 outer_family, family, outer_ecn;
	int eth_type, proto;

	eth_type = parse_ethhdr(&nh, data_end, &eth);
	if (eth_type < 0)
		return FL_DECAP_NOT_TUNNEL;
	l2_len = nh.pos - data;
	if (eth_type == bpf_htons(ETH_P_IP)) {
		iph = nh.pos;
		if ((void *)(iph + 1) > data_end)
			return FL_DECAP_NOT_TUNNEL;
		proto = iph->protocol;
		if (proto != FL_IPPROTO_IPIP && proto != FL_IPPROTO_IPV6)
			return FL_DECAP_NOT_TUNNEL;
		if (iph->ihl != 5 || (iph->frag_off & bpf_htons(IP_MF | IP_OFFSET)))
			return FL_DECAP_NOT_TUNNEL;  /* fastlb sends neither options nor fragments */
		outer_dst[0] = iph->daddr;
		outer_src[0] = iph->saddr;
		outer_src[1] = outer_src[2] = outer_src[3] = 0;
		outer_ecn = iph->tos & 3;
		outer_family = FL_AF_INET;
		outer_len = sizeof(*iph);
	} else if (eth_type == bpf_htons(ETH_P_IPV6)) {
		ip6h = nh.pos;
		if ((void *)(ip6h + 1) > data_end)
			return FL_DECAP_NOT_TUNNEL;
		proto = ip6h->nexthdr;
		if (proto != FL_IPPROTO_IPIP && proto != FL_IPPROTO_IPV6)
			return FL_DECAP_NOT_TUNNEL;
		__builtin_memcpy(outer_dst, &ip6h->daddr, 16);
		__builtin_memcpy(outer_src, &ip6h->saddr, 16);
		outer_ecn = (ip6h->flow_lbl[0] >> 4) & 3;
		outer_family = FL_AF_INET6;
		outer_len = sizeof(*ip6h);
	} else {
		return FL_DECAP_NOT_TUNNEL;
	}
	if (!addr_has(outer_dst, outer_family, FL_DECAP_ADDR_LOCAL))
		return FL_DECAP_NOT_LOCAL;
	if (inner_dst(nh.pos + outer_len, data_end, proto, dst, &family))
		return FL_DECAP_MALFORMED;
	if (!addr_has(dst, family, FL_DECAP_ADDR_VIP))
		return FL_DECAP_NOT_VIP;
	if (!source_allowed(outer_src, outer_family))
		return FL_DECAP_SOURCE_REFUSED;
	if (ecn_propagate(nh.pos + outer_len, data_end, proto, outer_ecn))
		return FL_DECAP_ECN_DROP;
	if (l2_move_back(data, data_end, outer_len, l2_len,
			 proto == FL_IPPROTO_IPIP ? bpf_htons(ETH_P_IP) : bpf_htons(ETH_P_IPV6)))
		return FL_DECAP_MALFORMED;
	if (bpf_xdp_adjust_head(ctx, outer_len))
		return FL_DECAP_MALFORMED;
	return FL_DECAP_OK;
}

int xdp_fastlb_decap(struct xdp_md *ctx)
{
	__u64 bytes = (long)fl_data_end(ctx) - (long)fl_data(ctx);
	__u32 reason = decap(ctx);
	struct fl_counter *c = decap_stats.lookup(&reason);

	if (c) {
		c->packets++;
		c->bytes += bytes;
	}
	if (reason == FL_DECAP_MALFORMED || reason == FL_DECAP_SOURCE_REFUSED || reason == FL_DECAP_ECN_DROP)
		return XDP_DROP;
	return XDP_PASS;
}
