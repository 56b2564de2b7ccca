/* SPDX-License-Identifier: Apache-2.0 */
/* parsing_helpers.h: bounds-checked header parsers.
 *
 * Contract (as in xdp-tools): each parse_*() takes a cursor and data_end,
 * checks that the whole header lies before data_end, stores a pointer to
 * it, advances the cursor past it and returns the next protocol (or a
 * non-negative length), or a negative PARSE_* code. Nothing is read before
 * its bounds check, and every loop has a constant bound.
 */
#ifndef FASTLB_PARSING_HELPERS_H
#define FASTLB_PARSING_HELPERS_H

#include <linux/if_ether.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/tcp.h>
#include <linux/udp.h>
#include "fastlb_consts.h"

#define PARSE_TRUNCATED -1      /* header runs past data_end */
#define PARSE_MALFORMED -2      /* header present but its fields are invalid */
#define PARSE_TOO_DEEP -3       /* more VLAN tags than FL_MAX_VLAN_DEPTH */

#ifndef IP_MF
#define IP_MF 0x2000
#endif
#ifndef IP_OFFSET
#define IP_OFFSET 0x1fff
#endif

struct hdr_cursor {
	void *pos;
};

/* A 16-bit big-endian field in host order, with bounds the verifier can see.
 * The 6.1 verifier (Debian 12's kernel) keeps no bounds for a byte swap's
 * result (BPF_END leaves the register unknown), so pkt + bpf_ntohs(field) is
 * refused: "math between pkt pointer and register with unbounded min value".
 * The mask gives it [0, 0xffff]; it changes no value, and the empty asm stops
 * the compiler from dropping it as redundant. Newer verifiers track the swap
 * themselves, so only a load in a 6.1 guest (make vm-test) catches a bare
 * bpf_ntohs() in pointer arithmetic; tests/unit/test_bpf_source.py flags it. */
static __always_inline __u32 fl_ntohs(__be16 field)
{
	__u32 value = bpf_ntohs(field);

	asm volatile("" : "+r"(value));
	return value & 0xffff;
}

/* The frame's bounds. Each is loaded from ctx itself by a single instruction:
 * left to the compiler, a program that re-reads them after every head
 * adjustment may keep &ctx->data_end in a spilled register, and the verifier
 * refuses a load through a modified ctx pointer ("dereference of modified ctx
 * ptr"). */
static __always_inline void *fl_data(struct xdp_md *ctx)
{
	void *data;

	asm volatile("%0 = *(u32 *)(%1 + %2)" : "=r"(data)
		     : "r"(ctx), "i"(__builtin_offsetof(struct xdp_md, data)));
	return data;
}

static __always_inline void *fl_data_end(struct xdp_md *ctx)
{
	void *data_end;

	asm volatile("%0 = *(u32 *)(%1 + %2)" : "=r"(data_end)
		     : "r"(ctx), "i"(__builtin_offsetof(struct xdp_md, data_end)));
	return data_end;
}

struct vlan_hdr {
	__be16 h_vlan_TCI;
	__be16 h_vlan_encapsulated_proto;
};

static __always_inline int proto_is_vlan(__u16 h_proto)
{
	return h_proto == bpf_htons(ETH_P_8021Q) || h_proto == bpf_htons(ETH_P_8021AD);
}

/* Ethernet plus up to FL_MAX_VLAN_DEPTH VLAN tags. Returns the inner
 * ethertype in network byte order, or PARSE_TRUNCATED / PARSE_TOO_DEEP. */
static __always_inline int parse_ethhdr(struct hdr_cursor *nh, void *data_end,
					struct ethhdr **ethhdr)
{
	struct ethhdr *eth = nh->pos;
	struct vlan_hdr *vlh;
	__u16 h_proto;
	int i;

	if ((void *)(eth + 1) > data_end)
		return PARSE_TRUNCATED;
	nh->pos = eth + 1;
	*ethhdr = eth;
	h_proto = eth->h_proto;

#pragma unroll
	for (i = 0; i < FL_MAX_VLAN_DEPTH; i++) {
		if (!proto_is_vlan(h_proto))
			break;
		vlh = nh->pos;
		if ((void *)(vlh + 1) > data_end)
			return PARSE_TRUNCATED;
		h_proto = vlh->h_vlan_encapsulated_proto;
		nh->pos = vlh + 1;
	}
	if (proto_is_vlan(h_proto))
		return PARSE_TOO_DEEP;
	return h_proto;
}

/* IPv4 with options (IHL 5..15). Returns the L4 protocol, PARSE_TRUNCATED
 * or PARSE_MALFORMED (version != 4, IHL < 5, total length shorter than the
 * header or longer than the frame). */
static __always_inline int parse_iphdr(struct hdr_cursor *nh, void *data_end,
				       struct iphdr **iphdr)
{
	struct iphdr *iph = nh->pos;
	int hdrsize;
	__u32 tot_len;

	if ((void *)(iph + 1) > data_end)
		return PARSE_TRUNCATED;
	if (iph->version != 4 || iph->ihl < 5)
		return PARSE_MALFORMED;
	hdrsize = iph->ihl * 4;
	if (nh->pos + hdrsize > data_end)
		return PARSE_TRUNCATED;
	tot_len = fl_ntohs(iph->tot_len);
	if (tot_len < hdrsize || nh->pos + tot_len > data_end)
		return PARSE_MALFORMED;
	nh->pos += hdrsize;
	*iphdr = iph;
	return iph->protocol;
}

/* IPv6 fixed header. Returns the next header, PARSE_TRUNCATED or
 * PARSE_MALFORMED (version != 6, payload longer than the frame). */
static __always_inline int parse_ip6hdr(struct hdr_cursor *nh, void *data_end,
					struct ipv6hdr **ip6hdr)
{
	struct ipv6hdr *ip6h = nh->pos;

	if ((void *)(ip6h + 1) > data_end)
		return PARSE_TRUNCATED;
	if (ip6h->version != 6)
		return PARSE_MALFORMED;
	if ((void *)(ip6h + 1) + fl_ntohs(ip6h->payload_len) > data_end)
		return PARSE_MALFORMED;
	nh->pos = ip6h + 1;
	*ip6hdr = ip6h;
	return ip6h->nexthdr;
}

/* True for the IPv6 extension headers of RFC 8200 and IANA's registry
 * (if-chains, not a switch: a jump table would be an indirect call). */
static __always_inline int ipv6_is_exthdr(int nexthdr)
{
	return nexthdr == 0 ||   /* hop-by-hop options */
	       nexthdr == 43 ||  /* routing */
	       nexthdr == 44 ||  /* fragment */
	       nexthdr == 50 ||  /* ESP */
	       nexthdr == 51 ||  /* AH */
	       nexthdr == 60 ||  /* destination options */
	       nexthdr == 135 || /* mobility */
	       nexthdr == 139 || /* HIP */
	       nexthdr == 140;   /* shim6 */
}

/* TCP within an IP payload of l4_len bytes (a frame may be padded past
 * it). Returns the header length, PARSE_TRUNCATED (the header runs past the
 * frame or the IP payload) or PARSE_MALFORMED (data offset < 5). */
static __always_inline int parse_tcphdr(struct hdr_cursor *nh, void *data_end,
					__u32 l4_len, struct tcphdr **tcphdr)
{
	struct tcphdr *h = nh->pos;
	int len;

	if ((void *)(h + 1) > data_end || l4_len < sizeof(*h))
		return PARSE_TRUNCATED;
	len = h->doff * 4;
	if (len < (int)sizeof(*h))
		return PARSE_MALFORMED;
	if (nh->pos + len > data_end || len > l4_len)
		return PARSE_TRUNCATED;
	nh->pos += len;
	*tcphdr = h;
	return len;
}

/* UDP within an IP payload of l4_len bytes. Returns the header length,
 * PARSE_TRUNCATED or PARSE_MALFORMED (length field shorter than the header
 * or longer than the IP payload). */
static __always_inline int parse_udphdr(struct hdr_cursor *nh, void *data_end,
					__u32 l4_len, struct udphdr **udphdr)
{
	struct udphdr *h = nh->pos;
	__u32 len;

	if ((void *)(h + 1) > data_end || l4_len < sizeof(*h))
		return PARSE_TRUNCATED;
	len = fl_ntohs(h->len);
	if (len < sizeof(*h) || len > l4_len)
		return PARSE_MALFORMED;
	nh->pos = h + 1;
	*udphdr = h;
	return sizeof(*h);
}

#endif /* FASTLB_PARSING_HELPERS_H */
