/* SPDX-License-Identifier: Apache-2.0 */
/* fastlb_icmp.h: the ICMP, ARP and ND messages fastlb answers with.
 *
 * Each builder works in place on the frame it got (`frame_len` bytes, as
 * the caller measured it: the verifier forbids arithmetic on data_end),
 * re-reading ctx after it grows or shrinks the frame, and returns 0 or -1
 * (the caller then counts a drop or passes). Checksums are computed in full for messages built
 * here and updated incrementally for messages that are only edited.
 */
#ifndef FASTLB_ICMP_H
#define FASTLB_ICMP_H

#include <linux/icmp.h>
#include <linux/icmpv6.h>
#include <linux/if_arp.h>
#include "fastlb_csum.h"
#include "fastlb_encap.h"

#define FL_ICMP_ECHO_REQUEST 8
#define FL_ICMP_ECHO_REPLY 0
#define FL_ICMP_DEST_UNREACH 3
#define FL_ICMP_FRAG_NEEDED 4
#define FL_ICMP6_PKT_TOO_BIG 2
#define FL_ICMP6_ECHO_REQUEST 128
#define FL_ICMP6_ECHO_REPLY 129
#define FL_ICMP6_NS 135
#define FL_ICMP6_NA 136
#define FL_ND_OPT_TARGET_LLADDR 2
#define FL_ND_HOP_LIMIT 255
#define FL_ICMP_TTL 64
#define FL_ICMP_QUOTE 8             /* bytes of the offending payload quoted */

static __always_inline void swap_macs(struct ethhdr *eth)
{
	__u8 tmp[ETH_ALEN];

	__builtin_memcpy(tmp, eth->h_dest, ETH_ALEN);
	__builtin_memcpy(eth->h_dest, eth->h_source, ETH_ALEN);
	__builtin_memcpy(eth->h_source, tmp, ETH_ALEN);
}

/* Turn an ICMP echo request into its reply, in place. */
static __always_inline void icmp4_echo_reply(struct ethhdr *eth, struct iphdr *iph, struct icmphdr *icmp)
{
	__u32 addr = iph->saddr;
	__u16 old;

	iph->saddr = iph->daddr;
	iph->daddr = addr;
	old = *(__u16 *)&iph->ttl;
	iph->ttl = FL_ICMP_TTL;
	fl_csum_replace2(&iph->check, old, *(__u16 *)&iph->ttl);
	old = *(__u16 *)icmp;
	icmp->type = FL_ICMP_ECHO_REPLY;
	fl_csum_replace2(&icmp->checksum, old, *(__u16 *)icmp);
	swap_macs(eth);
}

/* Turn an ICMPv6 echo request into its reply, in place (the pseudo-header's
 * sum does not change when source and destination swap). */
static __always_inline void icmp6_echo_reply(struct ethhdr *eth, struct ipv6hdr *ip6h, struct icmp6hdr *icmp6)
{
	struct in6_addr addr = ip6h->saddr;
	__u16 old;

	ip6h->saddr = ip6h->daddr;
	ip6h->daddr = addr;
	ip6h->hop_limit = FL_ICMP_TTL;
	old = *(__u16 *)icmp6;
	icmp6->icmp6_type = FL_ICMP6_ECHO_REPLY;
	fl_csum_replace2(&icmp6->icmp6_cksum, old, *(__u16 *)icmp6);
	swap_macs(eth);
}

/* Make room for an ICMP error in place: keep the L2 header, the offending
 * IP header and FL_ICMP_QUOTE bytes of its payload (`keep` bytes in all),
 * and open `extra` bytes after the L2 header for the new IP and ICMP
 * headers, setting the L2 header's ethertype to `proto`. */
static __always_inline int icmp_make_room(struct xdp_md *ctx, __u32 frame_len, __u32 l2_len, __u32 keep,
					  __u32 extra, __u16 proto)
{
	void *data, *data_end;

	if (bpf_xdp_adjust_tail(ctx, (int)keep - (int)frame_len))
		return -1;
	if (bpf_xdp_adjust_head(ctx, -(int)extra))
		return -1;
	data = fl_data(ctx);
	data_end = fl_data_end(ctx);
	return l2_move_front(data, data_end, extra, l2_len, proto);
}

/* Replace a frame with an ICMP "fragmentation needed" for the client:
 * [L2][IPv4 from `src` to the client][ICMP 3/4 with `mtu`][the offending
 * IPv4 header, which has no options][its first 8 payload bytes]. */
#define FL_ICMP4_MSG_LEN (sizeof(struct icmphdr) + sizeof(struct iphdr) + FL_ICMP_QUOTE)
static __always_inline int icmp4_frag_needed(struct xdp_md *ctx, __u32 frame_len, __u32 l2_len,
					     __u32 src, __u16 mtu)
{
	void *data = fl_data(ctx);
	void *data_end = fl_data_end(ctx);
	__u32 ihl_len = sizeof(struct iphdr);
	__u32 keep = l2_len + ihl_len + FL_ICMP_QUOTE, client, extra;
	struct ethhdr *eth = data;
	struct iphdr *iph, *orig;
	struct icmphdr *icmp;

	if (l2_len > 22 || data + keep > data_end)
		return -1;
	orig = data + (l2_len == 14 ? 14 : l2_len == 18 ? 18 : 22);
	if ((void *)(orig + 1) > data_end || (void *)(eth + 1) > data_end)
		return -1;
	client = orig->saddr;
	swap_macs(eth);
	extra = sizeof(*iph) + sizeof(*icmp);
	if (icmp_make_room(ctx, frame_len, l2_len, keep, extra, bpf_htons(ETH_P_IP)))
		return -1;
	data = fl_data(ctx);
	data_end = fl_data_end(ctx);
	iph = data + (l2_len == 14 ? 14 : l2_len == 18 ? 18 : 22);
	icmp = (void *)(iph + 1);
	if ((void *)icmp + FL_ICMP4_MSG_LEN > data_end)
		return -1;
	iph->version = 4;
	iph->ihl = 5;
	iph->tos = 0;
	iph->tot_len = bpf_htons(extra + ihl_len + FL_ICMP_QUOTE);
	iph->id = 0;
	iph->frag_off = 0;
	iph->ttl = FL_ICMP_TTL;
	iph->protocol = IPPROTO_ICMP;
	iph->saddr = src;
	iph->daddr = client;
	fl_ipv4_csum(iph);
	icmp->type = FL_ICMP_DEST_UNREACH;
	icmp->code = FL_ICMP_FRAG_NEEDED;
	icmp->checksum = 0;
	icmp->un.frag.__unused = 0;
	icmp->un.frag.mtu = bpf_htons(mtu);
	icmp->checksum = fl_csum_fold(fl_csum_partial(icmp, FL_ICMP4_MSG_LEN));
	return 0;
}

/* Sum of an IPv6 pseudo-header for an ICMPv6 message of `len` bytes. */
static __always_inline __u64 icmp6_pseudo_sum(struct ipv6hdr *ip6h, __u32 len)
{
	return fl_csum_partial(&ip6h->saddr, 32) + bpf_htons(len) + bpf_htons(FL_IPPROTO_ICMPV6);
}

/* Replace a frame with an ICMPv6 "packet too big" for the client:
 * [L2][IPv6 from `src` to the client][ICMPv6 2/0 with `mtu`][the offending
 * IPv6 header][its first 8 payload bytes]. */
static __always_inline int icmp6_too_big(struct xdp_md *ctx, __u32 frame_len, __u32 l2_len,
					 const __u32 *src, __u32 mtu)
{
	void *data = fl_data(ctx);
	void *data_end = fl_data_end(ctx);
	__u32 keep = l2_len + sizeof(struct ipv6hdr) + FL_ICMP_QUOTE, extra, len;
	struct ethhdr *eth = data;
	struct ipv6hdr *ip6h, *orig;
	struct icmp6hdr *icmp6;
	struct in6_addr client;

	if (l2_len > 22 || data + keep > data_end)
		return -1;
	orig = data + (l2_len == 14 ? 14 : l2_len == 18 ? 18 : 22);
	if ((void *)(orig + 1) > data_end || (void *)(eth + 1) > data_end)
		return -1;
	client = orig->saddr;
	swap_macs(eth);
	extra = sizeof(*ip6h) + sizeof(*icmp6);
	if (icmp_make_room(ctx, frame_len, l2_len, keep, extra, bpf_htons(ETH_P_IPV6)))
		return -1;
	data = fl_data(ctx);
	data_end = fl_data_end(ctx);
	ip6h = data + (l2_len == 14 ? 14 : l2_len == 18 ? 18 : 22);
	icmp6 = (void *)(ip6h + 1);
	len = sizeof(*icmp6) + sizeof(*ip6h) + FL_ICMP_QUOTE;
	if ((void *)icmp6 + sizeof(*icmp6) + sizeof(*ip6h) + FL_ICMP_QUOTE > data_end)
		return -1;
	*(__u32 *)ip6h = bpf_htonl(0x60000000);
	ip6h->payload_len = bpf_htons(len);
	ip6h->nexthdr = FL_IPPROTO_ICMPV6;
	ip6h->hop_limit = FL_ICMP_TTL;
	__builtin_memcpy(&ip6h->saddr, src, 16);
	ip6h->daddr = client;
	icmp6->icmp6_type = FL_ICMP6_PKT_TOO_BIG;
	icmp6->icmp6_code = 0;
	icmp6->icmp6_cksum = 0;
	icmp6->icmp6_mtu = bpf_htonl(mtu);
	icmp6->icmp6_cksum = fl_csum_fold(icmp6_pseudo_sum(ip6h, len) +
					  fl_csum_partial(icmp6, sizeof(*icmp6) + sizeof(*ip6h) + FL_ICMP_QUOTE));
	return 0;
}

/* The ARP payload for IPv4 over Ethernet. */
struct fl_arp {
	__be16 htype;
	__be16 ptype;
	__u8 hlen;
	__u8 plen;
	__be16 oper;
	__u8 sha[ETH_ALEN];
	__u8 spa[4];
	__u8 tha[ETH_ALEN];
	__u8 tpa[4];
} __attribute__((packed));

/* Turn an ARP request for `arp->tpa` into the reply "tpa is at lb_mac". */
static __always_inline void arp_reply(struct ethhdr *eth, struct fl_arp *arp, const __u8 *lb_mac)
{
	__u8 ip[4];

	arp->oper = bpf_htons(ARPOP_REPLY);
	__builtin_memcpy(ip, arp->tpa, 4);
	__builtin_memcpy(arp->tha, arp->sha, ETH_ALEN);
	__builtin_memcpy(arp->tpa, arp->spa, 4);
	__builtin_memcpy(arp->sha, lb_mac, ETH_ALEN);
	__builtin_memcpy(arp->spa, ip, 4);
	__builtin_memcpy(eth->h_dest, eth->h_source, ETH_ALEN);
	__builtin_memcpy(eth->h_source, lb_mac, ETH_ALEN);
}

/* A neighbour solicitation / advertisement with one link-layer option. */
struct fl_nd {
	struct icmp6hdr hdr;
	struct in6_addr target;
	__u8 opt_type;
	__u8 opt_len;               /* in units of 8 bytes */
	__u8 opt_mac[ETH_ALEN];
};

/* Turn a neighbour solicitation for `target` into the advertisement
 * "target is at lb_mac" (solicited, override), resizing the frame to one
 * target link-layer option. */
static __always_inline int nd_advert(struct xdp_md *ctx, __u32 frame_len, __u32 l2_len,
				     const __u8 *lb_mac)
{
	void *data = fl_data(ctx);
	void *data_end = fl_data_end(ctx);
	__u32 want = l2_len + sizeof(struct ipv6hdr) + sizeof(struct fl_nd);
	struct ethhdr *eth;
	struct ipv6hdr *ip6h;
	struct fl_nd *nd;
	struct in6_addr from;
	int solicited;

	if (l2_len > 22)
		return -1;
	if (bpf_xdp_adjust_tail(ctx, (int)want - (int)frame_len))
		return -1;
	data = fl_data(ctx);
	data_end = fl_data_end(ctx);
	eth = data;
	ip6h = data + (l2_len == 14 ? 14 : l2_len == 18 ? 18 : 22);
	nd = (void *)(ip6h + 1);
	if ((void *)(nd + 1) > data_end || (void *)(eth + 1) > data_end)
		return -1;
	from = ip6h->saddr;
	solicited = from.s6_addr32[0] | from.s6_addr32[1] | from.s6_addr32[2] | from.s6_addr32[3];
	ip6h->saddr = nd->target;
	if (solicited) {
		ip6h->daddr = from;
	} else {  /* duplicate address detection: answer all nodes, ff02::1 */
		ip6h->daddr.s6_addr32[0] = bpf_htonl(0xff020000);
		ip6h->daddr.s6_addr32[1] = 0;
		ip6h->daddr.s6_addr32[2] = 0;
		ip6h->daddr.s6_addr32[3] = bpf_htonl(1);
	}
	ip6h->payload_len = bpf_htons(sizeof(*nd));
	ip6h->hop_limit = FL_ND_HOP_LIMIT;
	nd->hdr.icmp6_type = FL_ICMP6_NA;
	nd->hdr.icmp6_code = 0;
	nd->hdr.icmp6_cksum = 0;
	nd->hdr.icmp6_dataun.un_data32[0] = bpf_htonl(solicited ? 0x60000000 : 0x20000000);
	nd->opt_type = FL_ND_OPT_TARGET_LLADDR;
	nd->opt_len = 1;
	__builtin_memcpy(nd->opt_mac, lb_mac, ETH_ALEN);
	nd->hdr.icmp6_cksum = fl_csum_fold(icmp6_pseudo_sum(ip6h, sizeof(*nd)) +
					   fl_csum_partial(nd, sizeof(*nd)));
	if (solicited) {
		__builtin_memcpy(eth->h_dest, eth->h_source, ETH_ALEN);
	} else {  /* 33:33:00:00:00:01, the all-nodes group's MAC */
		eth->h_dest[0] = 0x33;
		eth->h_dest[1] = 0x33;
		eth->h_dest[2] = 0;
		eth->h_dest[3] = 0;
		eth->h_dest[4] = 0;
		eth->h_dest[5] = 1;
	}
	__builtin_memcpy(eth->h_source, lb_mac, ETH_ALEN);
	return 0;
}

#endif /* FASTLB_ICMP_H */
