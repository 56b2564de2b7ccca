/* SPDX-License-Identifier: Apache-2.0 */
/* fastlb_kern.c: the XDP balancer.
 *
 * A packet for a VIP (address, port, protocol) goes to a backend: its
 * conntrack entry's backend if it has one, else the VIP's table's pick,
 * which is then recorded. Conntrack is looked up first, so an established
 * flow costs one hash lookup; the vips map is read only on a miss. Under DSR the frame leaves by XDP_TX with the
 * backend's MAC as destination. Everything else passes untouched, and
 * malformed packets for a VIP address are dropped. Every packet moves
 * exactly one reason counter (enum fl_reason).
 *
 * Code that touches maps lives in this file: BCC rewrites map calls
 * (vips.lookup()) in the main source only, so headers hold pure helpers.
 */
#include <uapi/linux/bpf.h>
#include <linux/in.h>
#include "parsing_helpers.h"
#include "fastlb_hash.h"
#include "fastlb_maps.h"
#include "fastlb_verdict.h"

#ifndef FASTLB_HASH_SEED
#define FASTLB_HASH_SEED 0
#endif

/* ---- Counters ---- */

static __always_inline void fl_count(struct fl_counter *c, __u64 bytes, int new_flow)
{
	if (!c)
		return;
	c->packets++;
	c->bytes += bytes;
	if (new_flow)
		c->new_flows++;
}

static __always_inline void count_reason(__u32 reason, __u64 bytes)
{
	fl_count(reason_stats.lookup(&reason), bytes, 0);
}

static __always_inline void count_vip(__u32 vip_id, __u64 bytes, int new_flow)
{
	fl_count(vip_stats.lookup(&vip_id), bytes, new_flow);
}

static __always_inline void count_backend(__u32 backend_id, __u64 bytes, int new_flow)
{
	fl_count(backend_stats.lookup(&backend_id), bytes, new_flow);
}

/* The backend id in ring slot `hash % M` of a VIP, or FL_RING_EMPTY. */
static __always_inline __u32 ring_pick(const struct vip_meta *vip, __u32 vip_id, __u32 hash)
{
	__u32 m = vip->ring_size;
	__u32 idx, *be;

	if (m == 0 || m > FASTLB_RING_SIZE)
		return FL_RING_EMPTY;
	idx = vip_id * FASTLB_RING_SIZE + hash % m;
	be = ring.lookup(&idx);
	return be ? *be : FL_RING_EMPTY;
}

/* Next backend of the VIP's smooth-WRR sequence, by this CPU's cursor (rr, wrr). */
static __always_inline __u32 seq_pick(const struct vip_meta *vip, __u32 vip_id)
{
	__u32 len = vip->seq_len;
	__u32 *cursor, slot, idx, *be;

	cursor = seq_cursor.lookup(&vip_id);
	if (!cursor || len == 0 || len > FASTLB_SEQ_SIZE)
		return FL_RING_EMPTY;
	slot = *cursor % len;
	*cursor = slot + 1;
	idx = vip_id * FASTLB_SEQ_SIZE + slot;
	be = seq.lookup(&idx);
	return be ? *be : FL_RING_EMPTY;
}

/* Power of two choices (lc, lrt): the ring slot of the flow hash and a
 * second, distinct backend from the ring slots after the rehash; the lower
 * score wins, ties to the first. Scores compare by cross-multiplication:
 * lc (active+1)/weight, lrt rtt*(active+1)/weight. */
static __always_inline __u32 p2c_pick(const struct vip_meta *vip, __u32 vip_id, __u32 hash)
{
	__u32 m = vip->ring_size;
	__u32 a, b, start, slot, idx, *c, *act_a, *act_b;
	struct backend *be_a, *be_b;
	__u64 score_a, score_b;
	int i;

	a = ring_pick(vip, vip_id, hash);
	if (a == FL_RING_EMPTY)
		return a;
	b = a;
	start = fl_p2c_rehash(hash, FASTLB_HASH_SEED) % m;
#pragma unroll
	for (i = 0; i < FL_P2C_PROBES; i++) {
		slot = start + i;
		if (slot >= m)
			slot -= m;
		idx = vip_id * FASTLB_RING_SIZE + slot;
		c = ring.lookup(&idx);
		if (c && *c != a && *c != FL_RING_EMPTY) {
			b = *c;
			break;
		}
	}
	if (b == a)
		return a;
	be_a = backends.lookup(&a);
	be_b = backends.lookup(&b);
	act_a = backend_active.lookup(&a);
	act_b = backend_active.lookup(&b);
	if (!be_a || !be_b || !act_a || !act_b)
		return a;
	score_b = ((__u64)*act_b + 1) * be_a->weight;
	score_a = ((__u64)*act_a + 1) * be_b->weight;
	if (vip->algorithm == FL_ALG_LRT) {
		score_b *= be_b->rtt_us;
		score_a *= be_a->rtt_us;
	}
	return score_b < score_a ? b : a;
}

/* The backend a new flow gets under the VIP's algorithm. */
static __always_inline __u32 select_backend(const struct vip_meta *vip, __u32 vip_id, __u32 hash)
{
	if (vip->algorithm == FL_ALG_RR || vip->algorithm == FL_ALG_WRR)
		return seq_pick(vip, vip_id);
	if (vip->algorithm == FL_ALG_LC || vip->algorithm == FL_ALG_LRT)
		return p2c_pick(vip, vip_id, hash);
	return ring_pick(vip, vip_id, hash);
}

static __always_inline void active_add(__u32 be_id, int delta)
{
	__u32 *active = backend_active.lookup(&be_id);

	if (active)
		__sync_fetch_and_add(active, delta);
}

/* ---- The packet path ---- */

/* True when some VIP uses the flow's destination address. */
static __always_inline int is_vip_addr(struct flow_key *flow)
{
	struct vip_key key = {};

	__builtin_memcpy(key.addr, flow->dst, sizeof(key.addr));
	key.family = flow->family;
	key.port = FL_VIP_ADDR_PORT;
	key.proto = FL_VIP_ADDR_PROTO;
	return vips.lookup(&key) != NULL;
}

/* The reason for a packet that is not forwarded: "not for us" unless its
 * destination is a VIP address, in which case `vip_reason`. */
static __always_inline __u32 miss_reason(struct flow_key *flow, __u32 vip_reason)
{
	return is_vip_addr(flow) ? vip_reason : FL_PASS_NOT_VIP;
}

/* Conntrack bookkeeping for a packet of a known flow: UDP's idle clock, and
 * TCP's first FIN or RST, which ends its count as an active connection. */
static __always_inline void ct_touch(struct ct_value *ct, struct flow_key *flow,
				     __u8 tcp_flags)
{
	if (flow->proto == IPPROTO_UDP) {
		ct->last_seen_ns = bpf_ktime_get_coarse_ns();
	} else if ((tcp_flags & (FL_TCP_FIN | FL_TCP_RST)) && !(ct->flags & FL_CT_F_CLOSING)) {
		ct->flags |= FL_CT_F_CLOSING;
		if (ct->flags & FL_CT_F_COUNTED)
			active_add(ct->backend_id, -1);
	}
}

/* The conntrack entry's VIP and backend, if both still stand: the VIP slot
 * is valid and holds the same VIP (generation), and the backend slot is
 * valid and serves that VIP. */
static __always_inline struct backend *ct_backend(struct ct_value *ct, struct vip_meta **vip)
{
	struct backend *be;

	*vip = vip_table.lookup(&ct->vip_id);
	if (!*vip || !((*vip)->flags & FL_VIP_F_VALID) || (*vip)->gen != ct->vip_gen)
		return NULL;
	be = backends.lookup(&ct->backend_id);
	if (!be || !(be->flags & FL_BE_F_VALID) || be->vip_id != ct->vip_id)
		return NULL;
	return be;
}

/* Forward a packet to a VIP address: find its flow's backend in conntrack
 * (one lookup on the hot path), or look the VIP up and pick one from its
 * table; then rewrite and count. */
static __always_inline __u32 forward(struct ethhdr *eth, struct flow_key *flow,
				     __u8 tcp_flags, __u64 bytes)
{
	struct vip_key vkey = {};
	struct vip_meta *vip;
	struct ct_value *ct, new_ct = {};
	struct backend *be;
	__u32 *vip_id_p, vip_id, be_id, hash;
	int new_flow = 0;

	if (eth->h_dest[0] & 1)
		return miss_reason(flow, FL_PASS_L2_NOT_UNICAST);

	ct = conntrack.lookup(flow);
	if (ct) {
		be = ct_backend(ct, &vip);
		if (be) {
			ct_touch(ct, flow, tcp_flags);
			vip_id = ct->vip_id;
			be_id = ct->backend_id;
			goto rewrite;
		}
	}

	/* A new flow, or one whose VIP or backend is gone: pick from the table. */
	__builtin_memcpy(vkey.addr, flow->dst, sizeof(vkey.addr));
	vkey.port = flow->dport;
	vkey.proto = flow->proto;
	vkey.family = flow->family;
	vip_id_p = vips.lookup(&vkey);
	if (!vip_id_p)
		return miss_reason(flow, FL_PASS_VIP_PORT);
	vip_id = *vip_id_p;
	vip = vip_table.lookup(&vip_id);
	if (!vip || !(vip->flags & FL_VIP_F_VALID))
		return FL_DROP_NO_BACKEND;
	hash = flow_hash(flow, vip->hash_mode, FASTLB_HASH_SEED);
	be_id = select_backend(vip, vip_id, hash);
	if (be_id == FL_RING_EMPTY)
		return FL_DROP_NO_BACKEND;
	new_ct.backend_id = be_id;
	new_ct.vip_id = vip_id;
	new_ct.vip_gen = vip->gen;
	new_ct.last_seen_ns = bpf_ktime_get_coarse_ns();
	if (tcp_flags & (FL_TCP_FIN | FL_TCP_RST))
		new_ct.flags = FL_CT_F_CLOSING;
	else if (flow->proto == IPPROTO_TCP)
		new_ct.flags = FL_CT_F_COUNTED;
	if (conntrack.update(flow, &new_ct) == 0) {
		if (new_ct.flags & FL_CT_F_COUNTED)
			active_add(be_id, 1);
	} else {
		/* Not recorded: every packet of the flow must then reach the
		 * same backend, which only the ring slot of its hash gives. */
		be_id = ring_pick(vip, vip_id, hash);
	}
	be = backends.lookup(&be_id);
	if (!be || !(be->flags & FL_BE_F_VALID))
		return FL_DROP_NO_BACKEND;
	new_flow = 1;

rewrite:
	__builtin_memcpy(eth->h_source, eth->h_dest, ETH_ALEN);
	__builtin_memcpy(eth->h_dest, be->mac, ETH_ALEN);
	count_vip(vip_id, bytes, new_flow);
	count_backend(be_id, bytes, new_flow);
	return FL_TX_DSR;
}

/* TCP/UDP header (within l4_len bytes of IP payload) -> ports and TCP
 * flags, then forward. */
static __always_inline __u32 process_l4(struct hdr_cursor *nh, void *data_end,
					struct ethhdr *eth, struct flow_key *flow,
					int l4proto, __u32 l4_len, __u64 bytes)
{
	struct tcphdr *tcph;
	struct udphdr *udph;
	__u8 tcp_flags = 0;

	if (l4proto == IPPROTO_TCP) {
		if (parse_tcphdr(nh, data_end, l4_len, &tcph) < 0)
			return miss_reason(flow, FL_DROP_L4_MALFORMED);
		flow->sport = tcph->source;
		flow->dport = tcph->dest;
		tcp_flags = ((__u8 *)tcph)[13];
	} else if (l4proto == IPPROTO_UDP) {
		if (parse_udphdr(nh, data_end, l4_len, &udph) < 0)
			return miss_reason(flow, FL_DROP_L4_MALFORMED);
		flow->sport = udph->source;
		flow->dport = udph->dest;
	} else {
		return miss_reason(flow, FL_PASS_VIP_PORT);
	}
	flow->proto = l4proto;
	return forward(eth, flow, tcp_flags, bytes);
}

static __always_inline __u32 process_ipv4(struct hdr_cursor *nh, void *data_end,
					  struct ethhdr *eth, __u64 bytes)
{
	struct flow_key flow = {};
	struct iphdr *iph;
	int l4proto;

	l4proto = parse_iphdr(nh, data_end, &iph);
	if (l4proto < 0)
		return FL_DROP_L3_MALFORMED;
	flow.family = FL_AF_INET;
	flow.src[0] = iph->saddr;
	flow.dst[0] = iph->daddr;
	if (iph->frag_off & bpf_htons(IP_MF | IP_OFFSET))
		return miss_reason(&flow, FL_DROP_FRAGMENT);
	return process_l4(nh, data_end, eth, &flow, l4proto,
			  bpf_ntohs(iph->tot_len) - iph->ihl * 4, bytes);
}

static __always_inline __u32 process_ipv6(struct hdr_cursor *nh, void *data_end,
					  struct ethhdr *eth, __u64 bytes)
{
	struct flow_key flow = {};
	struct ipv6hdr *ip6h;
	int l4proto;

	l4proto = parse_ip6hdr(nh, data_end, &ip6h);
	if (l4proto < 0)
		return FL_DROP_L3_MALFORMED;
	flow.family = FL_AF_INET6;
	__builtin_memcpy(flow.src, &ip6h->saddr, sizeof(flow.src));
	__builtin_memcpy(flow.dst, &ip6h->daddr, sizeof(flow.dst));
	if (ipv6_is_exthdr(l4proto))
		return miss_reason(&flow, FL_DROP_IPV6_EXTHDR);
	return process_l4(nh, data_end, eth, &flow, l4proto, bpf_ntohs(ip6h->payload_len), bytes);
}

int xdp_fastlb(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct hdr_cursor nh = { .pos = data };
	__u64 bytes = data_end - data;
	struct ethhdr *eth;
	__u32 reason;
	int eth_type;

	eth_type = parse_ethhdr(&nh, data_end, &eth);
	if (eth_type == PARSE_TRUNCATED)
		reason = FL_DROP_L2_TRUNCATED;
	else if (eth_type == PARSE_TOO_DEEP)
		reason = FL_PASS_VLAN_DEPTH;
	else if (eth_type == bpf_htons(ETH_P_IP))
		reason = process_ipv4(&nh, data_end, eth, bytes);
	else if (eth_type == bpf_htons(ETH_P_IPV6))
		reason = process_ipv6(&nh, data_end, eth, bytes);
	else
		reason = FL_PASS_NOT_IP;

	count_reason(reason, bytes);
	return reason_verdict(reason);
}
