/* SPDX-License-Identifier: Apache-2.0 */
/* fastlb_kern.c: the XDP balancer.
 *
 * A packet for a VIP (address, port, protocol) goes to a backend: its
 * conntrack entry's backend if it has one, else the VIP's table's pick,
 * which is then recorded. Conntrack is looked up first, so an established
 * flow costs one hash lookup; the vips map is read only on a miss. The
 * frame then leaves in the VIP's forwarding mode: DSR (the backend's MAC as
 * destination), tunnel (an outer IP header to the backend) or NAT (the
 * backend's address and port, and the reverse for its replies), by XDP_TX,
 * or by XDP_REDIRECT when the backend sits behind another interface of a
 * two-arm attachment. Pings of VIPs, ICMP errors about VIP flows and ARP/ND
 * for announced VIPs are answered or forwarded too. Everything else passes
 * untouched, and malformed packets for a VIP address are dropped. Every
 * packet moves exactly one reason counter (enum fl_reason);
 * docs/DATAPLANE.md states the rules.
 *
 * Code that touches maps lives in this file: BCC rewrites map calls
 * (vips.lookup()) in the main source only, so headers hold pure helpers.
 */
#include <uapi/linux/bpf.h>
#include <linux/in.h>
#include "parsing_helpers.h"
#include "fastlb_csum.h"
#include "fastlb_encap.h"
#include "fastlb_icmp.h"
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

static __always_inline void count_event(__u32 event, __u64 bytes)
{
	fl_count(event_stats.lookup(&event), bytes, 0);
}

/* The new-flow guard (as Katran's): true when this CPU has recorded more
 * than new_flow_rate new flows in the current second. Such flows are
 * forwarded by the ring slot of their hash but not recorded, so a flood
 * cannot evict the established flows from conntrack. */
static __always_inline int over_new_flow_rate(const struct fl_settings *cfg, __u64 now)
{
	__u32 zero = 0;
	struct fl_flood *st;

	if (!cfg->new_flow_rate)
		return 0;
	st = flood.lookup(&zero);
	if (!st)
		return 0;
	if (now - st->window_start_ns >= FL_NS_PER_SEC) {
		st->window_start_ns = now;
		st->new_flows = 0;
	}
	return ++st->new_flows > cfg->new_flow_rate;
}

/* True when this CPU may generate one more ICMP error: GCRA, a token bucket
 * of icmp_burst tokens refilled at icmp_rate a second, kept as the time the
 * next error is due (RFC 1812 4.3.2.8, RFC 4443 2.4(f)). */
static __always_inline int icmp_allowed(const struct fl_settings *cfg)
{
	__u32 zero = 0;
	__u64 now, interval, *due;

	if (!cfg->icmp_rate)
		return 1;
	due = icmp_bucket.lookup(&zero);
	if (!due)
		return 0;
	now = bpf_ktime_get_ns();
	interval = FL_NS_PER_SEC / cfg->icmp_rate;
	if (*due < now)
		*due = now;
	if (*due - now > (__u64)(cfg->icmp_burst ? cfg->icmp_burst - 1 : 0) * interval)
		return 0;
	*due += interval;
	return 1;
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

/* A backend's active connections as P2C weighs them: the program's count
 * plus userspace's correction, never below 0. */
static __always_inline __u64 active_of(__u32 be_id)
{
	__s32 *count = backend_active.lookup(&be_id);
	__s32 *fix = backend_active_fix.lookup(&be_id);
	__s64 n = (count ? (__s64)*count : 0) + (fix ? (__s64)*fix : 0);

	return n > 0 ? (__u64)n : 0;
}

/* Power of two choices (lc, lrt): the ring slot of the flow hash and a
 * second, distinct backend from the ring slots after the rehash; the lower
 * score wins, ties to the first. Scores compare by cross-multiplication:
 * lc (active+1)/weight, lrt rtt*(active+1)/weight. */
static __always_inline __u32 p2c_pick(const struct vip_meta *vip, __u32 vip_id, __u32 hash)
{
	__u32 m = vip->ring_size;
	__u32 a, b, start, slot, idx, *c;
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
	if (!be_a || !be_b)
		return a;
	score_b = (active_of(b) + 1) * be_a->weight;
	score_a = (active_of(a) + 1) * be_b->weight;
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
	__s32 *active = backend_active.lookup(&be_id);

	if (active)
		__sync_fetch_and_add(active, delta);
}

/* ---- The packet path ---- */

/* What the parsers learnt about a packet. */
struct fl_pkt {
	struct flow_key flow;       /* as it arrived */
	void *l3;                   /* the IP header */
	void *l4;                   /* the TCP/UDP/ICMP header */
	__u64 bytes;                /* frame length, for the counters */
	__u32 l2_len;               /* Ethernet and VLAN tags: 14, 18 or 22 */
	__u32 l3_len;               /* IP header and payload */
	__u32 l4_len;               /* IP payload */
	__u32 payload_len;          /* TCP/UDP payload */
	__u32 redirect_slot;        /* FL_REDIRECT_ reasons: the tx_ports slot to send out of */
	__u8 tcp_flags;
	__u8 tos;                   /* IPv4 TOS, copied to an outer IPv4 header */
};

/* True when some VIP uses the flow's destination address. */
static __always_inline int is_vip_addr(struct flow_key *flow)
{
	struct vip_key key = {};

	fl_addr_key(&key, flow->dst, flow->family);
	return vips.lookup(&key) != NULL;
}

/* The reason for a packet that is not forwarded: "not for us" unless its
 * destination is a VIP address, in which case `vip_reason`. */
static __always_inline __u32 miss_reason(struct flow_key *flow, __u32 vip_reason)
{
	return is_vip_addr(flow) ? vip_reason : FL_PASS_NOT_VIP;
}

/* True when fastlb answers ARP/ND for this address (a VIP with announce = "arp"). */
static __always_inline int is_announced(const __u32 *addr, __u8 family)
{
	struct vip_key key = {};
	__u32 *v;

	fl_addr_key(&key, addr, family);
	v = vips.lookup(&key);
	return v && *v == FL_VIP_ID_ANNOUNCE;
}

/* The conntrack entry's VIP and backend, if both still stand: the VIP slot
 * is valid and holds the same VIP (generation), and the backend slot is
 * valid, serves that VIP and holds the same backend (generation). */
static __always_inline struct backend *ct_backend(struct ct_value *ct, struct vip_meta **vip)
{
	struct backend *be;

	*vip = vip_table.lookup(&ct->vip_id);
	if (!*vip || !((*vip)->flags & FL_VIP_F_VALID) || (*vip)->gen != ct->vip_gen)
		return NULL;
	be = backends.lookup(&ct->backend_id);
	if (!be || !(be->flags & FL_BE_F_VALID) || be->vip_id != ct->vip_id || be->gen != ct->backend_gen)
		return NULL;
	return be;
}

/* True when the entry is older than its timeout: by protocol, and for TCP
 * by state (IPVS's SYN_RECV, ESTABLISHED and FIN_WAIT/CLOSE). last_seen_ns
 * lags by up to FL_CT_REFRESH_NS, which the test allows for. */
static __always_inline int ct_stale(const struct fl_settings *cfg, const struct ct_value *ct, __u8 proto,
				    __u64 now)
{
	__u32 timeout_s;

	if (proto == IPPROTO_UDP)
		timeout_s = cfg->udp_timeout_s;
	else if (ct->flags & FL_CT_F_CLOSING)
		timeout_s = cfg->tcp_fin_timeout_s;
	else if (ct->flags & FL_CT_F_ESTABLISHED)
		timeout_s = cfg->tcp_timeout_s;
	else
		timeout_s = cfg->tcp_syn_timeout_s;
	return timeout_s && now - ct->last_seen_ns > (__u64)timeout_s * FL_NS_PER_SEC + FL_CT_REFRESH_NS;
}

/* A stale entry counts as absent: a counted flow whose backend still
 * stands stops counting (once: the entry is marked closing), and the new
 * pick overwrites it, or the LRU reclaims it. */
static __always_inline void ct_forget(struct ct_value *ct, __u64 bytes)
{
	struct vip_meta *vip;

	if ((ct->flags & (FL_CT_F_COUNTED | FL_CT_F_CLOSING)) == FL_CT_F_COUNTED && ct_backend(ct, &vip))
		active_add(ct->backend_id, -1);
	ct->flags |= FL_CT_F_CLOSING;
	count_event(FL_EV_CT_EXPIRED, bytes);
}

/* Conntrack bookkeeping for a packet of a known flow: its clock (written
 * only when it moved by FL_CT_REFRESH_NS), and TCP's state: the first ACK
 * of a flow recorded from its SYN makes it count as active, its first FIN
 * or RST ends that. */
static __always_inline void ct_touch(struct ct_value *ct, __u8 proto, __u8 tcp_flags, __u64 now)
{
	if (now - ct->last_seen_ns >= FL_CT_REFRESH_NS)
		ct->last_seen_ns = now;
	if (proto != IPPROTO_TCP)
		return;
	if (tcp_flags & (FL_TCP_FIN | FL_TCP_RST)) {
		if (!(ct->flags & FL_CT_F_CLOSING)) {
			ct->flags |= FL_CT_F_CLOSING;
			if (ct->flags & FL_CT_F_COUNTED)
				active_add(ct->backend_id, -1);
		}
	} else if ((tcp_flags & (FL_TCP_SYN | FL_TCP_ACK)) == FL_TCP_ACK &&
		   !(ct->flags & (FL_CT_F_ESTABLISHED | FL_CT_F_CLOSING))) {
		ct->flags |= FL_CT_F_ESTABLISHED;
		if (ct->flags & FL_CT_F_SYN) {
			ct->flags |= FL_CT_F_COUNTED;
			active_add(ct->backend_id, 1);
		}
	}
}

/* ---- Response time (lrt under NAT) ----
 *
 * A NAT connection's first response is timed from the client's first payload
 * (ct_value.req_us, written once, FL_CT_F_REQ) to the backend's first payload
 * (nat_in, once: FL_NAT_F_TIMED), and added to the backend's per-CPU sums in
 * backend_resp, which the controller turns into lrt's estimate. Other packets
 * pay one flag test on each path.
 */

static __always_inline __u32 now_us(void)
{
	return bpf_ktime_get_ns() / 1000;   /* wraps every 71 minutes: only differences are used */
}

/* The client's first payload of a NAT flow (`ct`): remember when. */
static __always_inline void time_request(struct fl_pkt *pkt, struct ct_value *ct, const struct vip_meta *vip)
{
	if (pkt->payload_len && !(ct->flags & FL_CT_F_REQ) && vip->forwarding == FL_FWD_NAT) {
		ct->req_us = now_us();
		ct->flags |= FL_CT_F_REQ;
	}
}

/* The backend's first payload of a NAT connection (`rev`): its response time, from the
 * connection's conntrack entry (the client's tuple, rebuilt from the reply and `rev`). */
static __always_inline void time_response(struct fl_pkt *pkt, struct nat_rev *rev)
{
	struct flow_key fkey = {};
	struct ct_value *ct;
	struct fl_resp *resp;

	rev->flags |= FL_NAT_F_TIMED;
	__builtin_memcpy(fkey.src, pkt->flow.dst, sizeof(fkey.src));
	__builtin_memcpy(fkey.dst, rev->vip, sizeof(fkey.dst));
	fkey.sport = rev->client_port;
	fkey.dport = rev->vip_port;
	fkey.proto = pkt->flow.proto;
	fkey.family = pkt->flow.family;
	ct = conntrack.lookup(&fkey);
	if (!ct || !(ct->flags & FL_CT_F_REQ))
		return;   /* the server spoke first (FTP, SMTP): nothing to time */
	resp = backend_resp.lookup(&ct->backend_id);
	if (!resp)
		return;
	resp->sum_us += (__u32)(now_us() - ct->req_us);
	resp->count += 1;
}

/* The conntrack entry of a packet, if it holds a live flow: not past its
 * timeout, not a closed flow's entry met by a new SYN (a client reusing
 * its port), and its VIP and backend still stand. Touches it. */
static __always_inline struct backend *ct_hit(struct fl_pkt *pkt, const struct fl_settings *cfg, __u64 now,
					      int syn, struct vip_meta **vip, __u32 *vip_id, __u32 *be_id)
{
	struct ct_value *ct = conntrack.lookup(&pkt->flow);
	struct backend *be;

	if (!ct)
		return NULL;
	if (ct_stale(cfg, ct, pkt->flow.proto, now)) {
		ct_forget(ct, pkt->bytes);
		return NULL;
	}
	if (syn && (ct->flags & FL_CT_F_CLOSING))
		return NULL;
	be = ct_backend(ct, vip);
	if (!be)
		return NULL;
	ct_touch(ct, pkt->flow.proto, pkt->tcp_flags, now);
	time_request(pkt, ct, *vip);
	*vip_id = ct->vip_id;
	*be_id = ct->backend_id;
	return be;
}

/* A UDP flow the guard left unrecorded on this CPU, met again within
 * udp_timeout: its packets keep their ring slot and are no new flows. */
static __always_inline int unrecorded_again(const struct fl_settings *cfg, __u32 hash, __u64 now)
{
	__u32 slot = hash % FL_UNRECORDED_SLOTS;
	struct fl_unrecorded *u = unrecorded.lookup(&slot);

	if (!u || u->hash != hash || !u->seen_ns ||
	    now - u->seen_ns > (__u64)cfg->udp_timeout_s * FL_NS_PER_SEC + FL_CT_REFRESH_NS)
		return 0;
	if (now - u->seen_ns >= FL_CT_REFRESH_NS)
		u->seen_ns = now;
	return 1;
}

static __always_inline void remember_unrecorded(__u32 hash, __u64 now)
{
	__u32 slot = hash % FL_UNRECORDED_SLOTS;
	struct fl_unrecorded *u = unrecorded.lookup(&slot);

	if (u) {
		u->hash = hash;
		u->seen_ns = now;
	}
}

static __always_inline void set_macs(struct ethhdr *eth, const __u8 *dst, const __u8 *src)
{
	__builtin_memcpy(eth->h_dest, dst, ETH_ALEN);
	__builtin_memcpy(eth->h_source, src, ETH_ALEN);
}

/* Send a forwarded frame out of `ifindex`: XDP_TX when that is the interface
 * it came in on (or 0), else XDP_REDIRECT through tx_ports, with that
 * interface's MAC as the source (two-arm). Returns the reason to count. */
static __always_inline __u32 egress(struct xdp_md *ctx, struct fl_pkt *pkt, __u32 ifindex, __u32 slot,
				    __u32 reason)
{
	void *data = fl_data(ctx);
	void *data_end = fl_data_end(ctx);
	struct ethhdr *eth = data;
	struct fl_iface *ifc;

	/* An answer to the sender (an ICMP error about a frame too big) leaves
	 * where the frame came in; so does everything when the egress is the ingress. */
	if (!ifindex || ifindex == ctx->ingress_ifindex || redirect_reason(reason) == reason)
		return reason;
	ifc = ifaces.lookup(&slot);
	if (!ifc || ifc->ifindex != ifindex || (void *)(eth + 1) > data_end)
		return FL_DROP_NO_EGRESS;
	__builtin_memcpy(eth->h_source, ifc->mac, ETH_ALEN);
	pkt->redirect_slot = slot;
	return redirect_reason(reason);
}

/* ---- Tunnel mode ---- */

/* A packet that would not fit the egress MTU once tunnelled: tell the
 * client (ICMP frag-needed from icmp_source, PTB from icmp_source6) so its
 * path MTU discovery shrinks the flow, or drop it when no source is set, or
 * an IPv4 packet lacks DF (routers fragment those; fastlb does not) or has
 * options. */
static __always_inline __u32 too_big(struct xdp_md *ctx, struct fl_pkt *pkt, struct fl_settings *cfg,
				     __u32 mtu)
{
	struct iphdr *iph = pkt->l3;
	void *data_end = fl_data_end(ctx);

	if (pkt->flow.family == FL_AF_INET) {
		if ((void *)(iph + 1) > data_end || !cfg->icmp_src4 || iph->ihl != 5 ||
		    !(iph->frag_off & bpf_htons(FL_IP_DF)))
			return FL_DROP_TOO_BIG;
		if (!icmp_allowed(cfg))
			return FL_DROP_ICMP_RATE_LIMITED;
		if (icmp4_frag_needed(ctx, pkt->bytes, pkt->l2_len, cfg->icmp_src4, mtu))
			return FL_DROP_TOO_BIG;
		return FL_TX_ICMP_TOO_BIG;
	}
	if (!(cfg->icmp_src6[0] | cfg->icmp_src6[1] | cfg->icmp_src6[2] | cfg->icmp_src6[3]))
		return FL_DROP_TOO_BIG;
	if (!icmp_allowed(cfg))
		return FL_DROP_ICMP_RATE_LIMITED;
	if (icmp6_too_big(ctx, pkt->bytes, pkt->l2_len, cfg->icmp_src6, mtu))
		return FL_DROP_TOO_BIG;
	return FL_TX_ICMP_TOO_BIG;
}

/* bpf_check_mtu of the packet once tunnelled towards `be`: 0 when it fits,
 * > 0 when it is too big (*mtu: the device's MTU less the outer header),
 * < 0 when there is no such device. The L3 length once tunnelled is measured
 * against the MTU of the device the frame leaves by (the backend's, in a
 * two-arm attachment): mtu_len = the L3 length, so VLAN tags, which are L2,
 * do not count. */
static __always_inline long tunnel_mtu_check(struct xdp_md *ctx, struct fl_pkt *pkt, struct backend *be,
					     __u32 *mtu)
{
	__u32 outer_len, mtu_len = pkt->l3_len;
	long ret;

	outer_len = be->family == FL_AF_INET ? sizeof(struct iphdr) : sizeof(struct ipv6hdr);
	ret = bpf_check_mtu(ctx, be->egress_ifindex, &mtu_len, outer_len, 0);
	*mtu = mtu_len - outer_len;
	return ret;
}

/* 0 when the packet fits the path to `be` once tunnelled; else the reason of
 * what was done instead (an ICMP error to the client, or a drop). */
static __always_inline __u32 tunnel_too_big(struct xdp_md *ctx, struct fl_pkt *pkt, struct fl_settings *cfg,
					    struct backend *be)
{
	__u32 mtu;
	long ret = tunnel_mtu_check(ctx, pkt, be, &mtu);

	if (ret < 0)
		return FL_DROP_NO_EGRESS;
	if (ret)
		return too_big(ctx, pkt, cfg, mtu);
	return 0;
}

/* Encapsulate towards the backend (IPv4-in-IPv4, IPv6-in-IPv6 or
 * IPv4-in-IPv6), from a source in the tunnel prefix chosen per flow so the
 * backend's RSS spreads flows, after checking the egress MTU. */
static __always_inline __u32 tunnel_out(struct xdp_md *ctx, struct fl_pkt *pkt, struct backend *be)
{
	__u32 zero = 0, src6[4], flowbits, inner_proto, reason;
	struct fl_settings *cfg = settings.lookup(&zero);
	__u8 lb_mac[ETH_ALEN];
	void *data, *data_end;
	struct ethhdr *eth;

	if (!cfg)
		return FL_DROP_ENCAP_FAILED;
	data = fl_data(ctx);
	data_end = fl_data_end(ctx);
	eth = data;
	if ((void *)(eth + 1) > data_end)
		return FL_DROP_ENCAP_FAILED;
	__builtin_memcpy(lb_mac, eth->h_dest, ETH_ALEN);

	reason = tunnel_too_big(ctx, pkt, cfg, be);
	if (reason)
		return reason;
	flowbits = fl_jhash_3words(pkt->flow.src[0] ^ pkt->flow.src[1] ^ pkt->flow.src[2] ^ pkt->flow.src[3],
				   ((__u32)pkt->flow.dport << 16) | pkt->flow.sport, pkt->flow.proto,
				   FASTLB_HASH_SEED);
	inner_proto = pkt->flow.family == FL_AF_INET ? FL_IPPROTO_IPIP : FL_IPPROTO_IPV6;
	if (be->family == FL_AF_INET) {
		if (encap_ipv4(ctx, pkt->l2_len, pkt->l3_len,
			       cfg->tunnel_src4 | (flowbits & cfg->tunnel_host4), be->addr[0],
			       inner_proto, pkt->tos))
			return FL_DROP_ENCAP_FAILED;
	} else {
		src6[0] = cfg->tunnel_src6[0];
		src6[1] = cfg->tunnel_src6[1];
		src6[2] = cfg->tunnel_src6[2];
		src6[3] = cfg->tunnel_src6[3] | (flowbits & cfg->tunnel_host6);
		if (encap_ipv6(ctx, pkt->l2_len, pkt->l3_len, src6, be->addr, inner_proto))
			return FL_DROP_ENCAP_FAILED;
	}
	data = fl_data(ctx);
	data_end = fl_data_end(ctx);
	eth = data;
	if ((void *)(eth + 1) > data_end)
		return FL_DROP_ENCAP_FAILED;
	set_macs(eth, be->mac, lb_mac);
	return FL_TX_TUNNEL;
}

/* ---- NAT mode ---- */

/* Rewrite one end of a NAT flow to `addr`:`port`, and the other end's port
 * to `other_port`: the destination of a client's packet (to the backend,
 * with the source port toward it), or the source of a backend's reply (back
 * to the VIP, with the client's own port). The IPv4 header and TCP/UDP
 * checksums are updated incrementally, the pseudo-header included; an IPv4
 * UDP checksum of 0 (none) stays 0. */
static __always_inline int nat_rewrite(struct fl_pkt *pkt, void *data_end, int destination,
				       const __u32 *addr, __u16 port, __u16 other_port)
{
	struct iphdr *iph = pkt->l3;
	struct ipv6hdr *ip6h = pkt->l3;
	struct tcphdr *tcph = pkt->l4;
	struct udphdr *udph = pkt->l4;
	__u16 *check = NULL, *portp, *otherp;
	__u32 *field;
	int i, nwords;

	if (pkt->flow.proto == IPPROTO_TCP) {
		if ((void *)(tcph + 1) > data_end)
			return -1;
		check = &tcph->check;
		portp = destination ? &tcph->dest : &tcph->source;
		otherp = destination ? &tcph->source : &tcph->dest;
	} else {
		if ((void *)(udph + 1) > data_end)
			return -1;
		if (udph->check || pkt->flow.family == FL_AF_INET6)
			check = &udph->check;
		portp = destination ? &udph->dest : &udph->source;
		otherp = destination ? &udph->source : &udph->dest;
	}
	if (pkt->flow.family == FL_AF_INET) {
		if ((void *)(iph + 1) > data_end)
			return -1;
		field = destination ? &iph->daddr : &iph->saddr;
		fl_csum_replace4(&iph->check, *field, addr[0]);
		nwords = 1;
	} else {
		if ((void *)(ip6h + 1) > data_end)
			return -1;
		field = destination ? (__u32 *)&ip6h->daddr : (__u32 *)&ip6h->saddr;
		nwords = 4;
	}
#pragma unroll
	for (i = 0; i < 4; i++) {
		if (i >= nwords)
			break;
		if (check)
			fl_csum_replace4(check, field[i], addr[i]);
		field[i] = addr[i];
	}
	if (check) {
		fl_csum_replace2(check, *portp, port);
		if (*otherp != other_port)
			fl_csum_replace2(check, *otherp, other_port);
		if (pkt->flow.proto == IPPROTO_UDP && *check == 0)
			*check = 0xffff;
	}
	*portp = port;
	*otherp = other_port;
	return 0;
}

/* The port a NAT flow goes to on its backend: the backend's, or the one the
 * client used when it is 0 (the backends of a multi-port VIP). */
static __always_inline __u16 fl_backend_port(const struct backend *be, const struct flow_key *flow)
{
	return be->port ? be->port : flow->dport;
}

/* The reverse entry of a NAT flow: the backend's reply 5-tuple, to the
 * client's own port (nat_source_port() moves it on a clash). */
static __always_inline void nat_rev_key(struct flow_key *rkey, struct flow_key *flow, struct backend *be)
{
	__builtin_memcpy(rkey->src, be->addr, sizeof(rkey->src));
	__builtin_memcpy(rkey->dst, flow->src, sizeof(rkey->dst));
	rkey->sport = fl_backend_port(be, flow);
	rkey->dport = flow->sport;
	rkey->proto = flow->proto;
	rkey->family = flow->family;
	rkey->pad = 0;
}

/* True when a reverse entry belongs to this client flow: same VIP address
 * and port, same client port (the client address and protocol are in the key). */
static __always_inline int nat_rev_is(const struct nat_rev *rev, const struct flow_key *flow)
{
	return rev->vip_port == flow->dport && rev->client_port == flow->sport &&
	       rev->vip[0] == flow->dst[0] && rev->vip[1] == flow->dst[1] &&
	       rev->vip[2] == flow->dst[2] && rev->vip[3] == flow->dst[3];
}

/* Hold the translated tuple with source port `port` for this flow: true when
 * it is this flow's already, or was free and is now (an insert, so two CPUs
 * cannot both take it). */
static __always_inline int nat_claim(struct flow_key *rkey, __u16 port, struct nat_rev *rev_new,
				     const struct flow_key *flow)
{
	struct nat_rev *rev;

	rkey->dport = port;
	rev = nat_rev.lookup(rkey);
	if (rev)
		return nat_rev_is(rev, flow);
	return nat_rev.insert(rkey, rev_new) == 0;
}

/* The source port toward the backend, as netfilter's NAT chooses it: every
 * translated tuple stays unique. The client's own port, unless another
 * connection's translated tuple holds it (two NAT VIPs sharing a backend,
 * one client port to both); then the port this flow was remapped to before
 * (nat_port), or a free one in 1024..65535 from the flow's hash. Written to
 * `*sport` (network order; the client's own port may be 0, so the return value
 * says whether one was found: 0, or -1 when none is free). Leaves `rkey` as
 * the reverse entry's key. */
static __always_inline int nat_source_port(struct flow_key *rkey, struct nat_rev *rev_new,
					   struct flow_key *flow, __u16 *sport)
{
	struct nat_rev *rev;
	__u16 *mapped, port;
	__u32 hash;
	int i;

	rev = nat_rev.lookup(rkey);  /* marks it used: it ages no faster than conntrack's */
	*sport = flow->sport;
	if (rev && nat_rev_is(rev, flow))
		return 0;
	mapped = nat_port.lookup(flow);
	if (mapped) {
		*sport = *mapped;
		if (nat_claim(rkey, *mapped, rev_new, flow))
			return 0;
	} else if (!rev && nat_rev.insert(rkey, rev_new) == 0) {
		return 0;
	}
	hash = flow_hash(flow, FL_HASH_5TUPLE, FASTLB_HASH_SEED ^ FL_NAT_SALT);
	for (i = 0; i < FL_NAT_PORT_TRIES; i++) {
		port = bpf_htons(FL_NAT_PORT_MIN + (hash + i) % FL_NAT_PORT_SPAN);
		if (nat_claim(rkey, port, rev_new, flow)) {
			nat_port.update(flow, &port);
			*sport = port;
			return 0;
		}
	}
	return -1;
}

/* Send a VIP packet on to its backend under NAT, keeping the connection's
 * reverse entry (its translated tuple). */
static __always_inline __u32 nat_out(struct ethhdr *eth, void *data_end, struct fl_pkt *pkt,
				     struct backend *be, __u32 vip_id)
{
	struct flow_key rkey = {};
	struct nat_rev rev = {};
	__u8 lb_mac[ETH_ALEN];
	__u16 sport;

	nat_rev_key(&rkey, &pkt->flow, be);
	__builtin_memcpy(rev.vip, pkt->flow.dst, sizeof(rev.vip));
	rev.vip_port = pkt->flow.dport;
	rev.client_port = pkt->flow.sport;
	__builtin_memcpy(rev.client_mac, eth->h_source, ETH_ALEN);
	rev.vip_id = vip_id;
	if (nat_source_port(&rkey, &rev, &pkt->flow, &sport))
		return FL_DROP_NAT_NO_PORT;
	if (nat_rewrite(pkt, data_end, 1, be->addr, fl_backend_port(be, &pkt->flow), sport))
		return FL_DROP_L4_MALFORMED;
	__builtin_memcpy(lb_mac, eth->h_dest, ETH_ALEN);
	set_macs(eth, be->mac, lb_mac);
	return FL_TX_NAT;
}

/* A NAT backend's reply: restore the VIP as its source and the client's own
 * port as its destination. 0 when the packet is not the reply of a recorded
 * connection (no reverse entry for its exact tuple): never translated. */
static __always_inline __u32 nat_in(struct xdp_md *ctx, struct ethhdr *eth, void *data_end,
				    struct fl_pkt *pkt)
{
	__u32 zero = 0;
	struct fl_settings *cfg = settings.lookup(&zero);
	struct fl_iface *clients;
	struct nat_rev *rev;
	__u8 lb_mac[ETH_ALEN];

	if (!cfg || !cfg->nat_vips)
		return 0;
	rev = nat_rev.lookup(&pkt->flow);
	if (!rev)
		return 0;
	if (pkt->payload_len && !(rev->flags & FL_NAT_F_TIMED))
		time_response(pkt, rev);
	if (nat_rewrite(pkt, data_end, 0, rev->vip, rev->vip_port, rev->client_port))
		return 0;
	__builtin_memcpy(lb_mac, eth->h_dest, ETH_ALEN);
	set_macs(eth, rev->client_mac, lb_mac);
	clients = ifaces.lookup(&zero);  /* slot 0: the clients' side */
	return egress(ctx, pkt, clients ? clients->ifindex : 0, 0, FL_TX_NAT_REPLY);
}

/* ---- Forwarding ---- */

/* Send a packet of a VIP flow to its backend in the VIP's forwarding mode. */
static __always_inline __u32 to_backend(struct xdp_md *ctx, struct ethhdr *eth, struct fl_pkt *pkt,
					struct vip_meta *vip, __u32 vip_id, struct backend *be)
{
	void *data_end = fl_data_end(ctx);
	__u8 lb_mac[ETH_ALEN];

	if (vip->forwarding == FL_FWD_TUNNEL)
		return tunnel_out(ctx, pkt, be);
	if (vip->forwarding == FL_FWD_NAT)
		return nat_out(eth, data_end, pkt, be, vip_id);
	__builtin_memcpy(lb_mac, eth->h_dest, ETH_ALEN);
	set_macs(eth, be->mac, lb_mac);
	return FL_TX_DSR;
}

/* ---- Persistence ----
 *
 * A VIP with FL_VIP_F_PERSIST looks its new flows' client (address masked
 * to persistence_prefix) up in `persist` before its algorithm picks: a
 * binding younger than the VIP's timeout, to the backend it was made with
 * (same slot generation) that still serves the VIP with weight > 0,
 * decides. A recorded new flow that was not bound binds its client; every
 * packet of a bound client's flows keeps the binding alive (written at most
 * once a second). A binding has its own clock: a conntrack
 * entry that expires (udp_timeout, the TCP timeouts) leaves it standing, so
 * the client's next flow finds its backend again. Here, not in a header: BCC
 * rewrites map calls only in the main file.
 */

#define FL_PERSIST_REFRESH_NS 1000000000ULL  /* last_seen is written at most this often */

/* The binding key of `flow`'s client for `vip_id`; the VIP's settings, or NULL without persistence. */
static __always_inline struct vip_persist *persist_key_of(const struct vip_meta *vip, __u32 vip_id,
							  const struct flow_key *flow, struct persist_key *key)
{
	struct vip_persist *conf;

	if (!(vip->flags & FL_VIP_F_PERSIST))
		return NULL;
	conf = vip_persist.lookup(&vip_id);
	if (!conf || !conf->timeout_ns)
		return NULL;
	key->addr[0] = flow->src[0] & conf->mask[0];
	key->addr[1] = flow->src[1] & conf->mask[1];
	key->addr[2] = flow->src[2] & conf->mask[2];
	key->addr[3] = flow->src[3] & conf->mask[3];
	key->vip_id = vip_id;
	key->family = flow->family;
	return conf;
}

/* The backend `flow`'s client is bound to, or FL_RING_EMPTY; refreshes the binding. */
static __always_inline __u32 persist_lookup(const struct vip_meta *vip, __u32 vip_id,
					    const struct flow_key *flow, __u64 now)
{
	struct persist_key key = {};
	struct vip_persist *conf = persist_key_of(vip, vip_id, flow, &key);
	struct persist_value *bound;
	struct backend *be;

	if (!conf)
		return FL_RING_EMPTY;
	bound = persist.lookup(&key);
	if (!bound || bound->vip_gen != vip->gen || now - bound->last_seen_ns > conf->timeout_ns)
		return FL_RING_EMPTY;
	be = backends.lookup(&bound->backend_id);
	if (!be || !(be->flags & FL_BE_F_VALID) || be->vip_id != vip_id || be->gen != bound->backend_gen ||
	    !be->weight)
		return FL_RING_EMPTY;
	if (now - bound->last_seen_ns > FL_PERSIST_REFRESH_NS)
		bound->last_seen_ns = now;
	return bound->backend_id;
}

/* Bind `flow`'s client to backend `be` in slot `be_id` (a recorded new flow of a VIP with persistence). */
static __always_inline void persist_bind(const struct vip_meta *vip, __u32 vip_id,
					 const struct flow_key *flow, __u32 be_id, const struct backend *be,
					 __u64 now)
{
	struct persist_key key = {};
	struct persist_value value = {};

	if (!persist_key_of(vip, vip_id, flow, &key))
		return;
	value.backend_id = be_id;
	value.vip_gen = vip->gen;
	value.backend_gen = be->gen;
	value.last_seen_ns = now;
	persist.update(&key, &value);
}

/* A packet of a known flow keeps its client's binding alive. */
static __always_inline void persist_touch(const struct vip_meta *vip, __u32 vip_id,
					  const struct flow_key *flow, __u64 now)
{
	struct persist_key key = {};
	struct persist_value *bound;

	if (!persist_key_of(vip, vip_id, flow, &key))
		return;
	bound = persist.lookup(&key);
	if (bound && now - bound->last_seen_ns > FL_PERSIST_REFRESH_NS)
		bound->last_seen_ns = now;
}

/* The vip id of the flow's VIP (address, port, protocol), or NULL. */
static __always_inline __u32 *vip_of(struct flow_key *flow)
{
	struct vip_key vkey = {};

	__builtin_memcpy(vkey.addr, flow->dst, sizeof(vkey.addr));
	vkey.port = flow->dport;
	vkey.proto = flow->proto;
	vkey.family = flow->family;
	return vips.lookup(&vkey);
}

/* The entry that records a new flow on backend `be`. Only a flow seen from
 * its SYN may count as active (from its first ACK): a mid-flow one
 * (re-picked, evicted, or moved here) may be reset by its new backend behind
 * our back (DSR replies bypass us), and would never be uncounted. */
static __always_inline void ct_new(struct ct_value *ct, struct fl_pkt *pkt, const struct vip_meta *vip,
				   __u32 vip_id, __u32 be_id, const struct backend *be, __u64 now)
{
	ct->backend_id = be_id;
	ct->vip_id = vip_id;
	ct->vip_gen = vip->gen;
	ct->backend_gen = be->gen;
	ct->last_seen_ns = now;
	if (pkt->flow.proto != IPPROTO_TCP)
		ct->flags = 0;
	else if (pkt->tcp_flags & (FL_TCP_FIN | FL_TCP_RST))
		ct->flags = FL_CT_F_CLOSING;
	else if ((pkt->tcp_flags & (FL_TCP_SYN | FL_TCP_ACK)) == FL_TCP_SYN)
		ct->flags = FL_CT_F_SYN;
	else
		ct->flags = FL_CT_F_ESTABLISHED;
	time_request(pkt, ct, vip);   /* UDP: the first datagram is the request */
}

/* A packet to a VIP address, or a NAT reply: find its flow's backend in
 * conntrack (one lookup on the hot path), or look the VIP up and pick one
 * from its table (the client's persistence binding first); then send it on
 * and count. A SYN to a maglev VIP skips the lookup: its pick (the binding,
 * else the ring slot of its hash) is recorded only if no entry holds the
 * flow (a retransmitted SYN then takes the entry's path). */
static __always_inline __u32 forward(struct xdp_md *ctx, struct ethhdr *eth, struct fl_pkt *pkt)
{
	void *data_end = fl_data_end(ctx);
	struct flow_key *flow = &pkt->flow;
	struct vip_meta *vip = NULL, *ct_vip;
	struct ct_value new_ct = {};
	struct fl_settings *cfg;
	struct backend *be, *ct_be;
	__u32 *vip_id_p, vip_id, be_id, hash, reason, bound, mtu, zero = 0;
	int new_flow = 0, record = 0, guarded, unfit, syn, rc = 0;
	__u64 now;

	if (eth->h_dest[0] & 1)
		return miss_reason(flow, FL_PASS_L2_NOT_UNICAST);
	cfg = settings.lookup(&zero);
	if (!cfg)
		return FL_PASS_NOT_VIP;
	now = bpf_ktime_get_coarse_ns();
	syn = flow->proto == IPPROTO_TCP && (pkt->tcp_flags & (FL_TCP_SYN | FL_TCP_ACK)) == FL_TCP_SYN;

	/* The hot path: a packet of a known flow costs one lookup (and, on a
	 * VIP with persistence, keeps its client's binding alive). */
	if (!syn) {
		be = ct_hit(pkt, cfg, now, syn, &ct_vip, &vip_id, &be_id);
		if (be) {
			vip = ct_vip;
			persist_touch(vip, vip_id, flow, now);
			goto send;
		}
	}
	vip_id_p = vip_of(flow);
	if (!vip_id_p)
		goto not_vip;
	vip_id = *vip_id_p;
	vip = vip_table.lookup(&vip_id);
	if (!vip || !(vip->flags & FL_VIP_F_VALID))
		return FL_DROP_NO_BACKEND;
	if (vip->flags & FL_VIP_F_L7) {
		/* HAProxy terminates it here: no conntrack entry, no backend. */
		count_vip(vip_id, pkt->bytes, syn);
		return FL_PASS_L7;
	}
	hash = flow_hash(flow, vip->hash_mode, FASTLB_HASH_SEED);
	/* Persistence: the client's backend, on any port, whatever the algorithm says. */
	bound = persist_lookup(vip, vip_id, flow, now);

	if (syn && vip->algorithm == FL_ALG_MAGLEV) {
		/* The SYN fast path (Katran's): the binding or the ring slot is the
		 * pick, recorded with no lookup before the insert. */
		be_id = bound != FL_RING_EMPTY ? bound : ring_pick(vip, vip_id, hash);
		be = backends.lookup(&be_id);   /* FL_RING_EMPTY: out of range, NULL */
		if (!be || !(be->flags & FL_BE_F_VALID))
			return FL_DROP_NO_BACKEND;
		new_flow = 1;
		/* Over the new-flow guard nothing is inserted, so no insert tells a
		 * known flow apart: its entry is read (only under a flood). The MTU
		 * check comes before the record: a too-big first packet records no
		 * flow. But a too-big SYN may be a known flow's (retransmitted, or
		 * with FIN or RST): it reads the entry first, as rule 9 does, and
		 * rule 12 checks the MTU towards that entry's backend (only a too-big
		 * SYN pays this lookup). */
		guarded = over_new_flow_rate(cfg, now);
		unfit = !guarded && vip->forwarding == FL_FWD_TUNNEL && tunnel_mtu_check(ctx, pkt, be, &mtu);
		if (!guarded && !unfit) {
			ct_new(&new_ct, pkt, vip, vip_id, be_id, be, now);
			rc = conntrack.insert(flow, &new_ct);
		}
		if (guarded || unfit || rc == -FL_EEXIST) {
			/* A known flow: a retransmitted SYN keeps its backend, even if the ring moved ... */
			ct_be = ct_hit(pkt, cfg, now, syn, &ct_vip, &vip_id, &be_id);
			if (ct_be) {
				be = ct_be;
				vip = ct_vip;
				new_flow = 0;
				goto send;
			}
			/* ... unless it is stale, closed, or its backend gone: a new
			 * connection. Over the guard it stays unrecorded (the ring slot,
			 * or the binding, as stable; nothing new is bound); too big, it
			 * is answered and recorded nowhere. */
			if (guarded) {
				count_event(FL_EV_GUARD_UNRECORDED, pkt->bytes);
				goto send;
			}
			if (unfit)
				return tunnel_too_big(ctx, pkt, cfg, be);
			rc = conntrack.update(flow, &new_ct);
		}
		if (rc) {
			count_event(FL_EV_CT_FULL, pkt->bytes);
			goto send;
		}
		if (bound == FL_RING_EMPTY)
			persist_bind(vip, vip_id, flow, be_id, be, now);
		goto send;
	}
	if (syn) {
		/* rr, wrr, lc, lrt: a retransmitted SYN must not pick again. */
		be = ct_hit(pkt, cfg, now, syn, &ct_vip, &vip_id, &be_id);
		if (be) {
			vip = ct_vip;
			goto send;
		}
	}

	/* A new flow, or one whose entry is stale or whose VIP or backend is gone:
	 * the binding, or a pick from the table. */
	if (flow->proto == IPPROTO_UDP && unrecorded_again(cfg, hash, now)) {
		/* Left unrecorded by the guard: every packet keeps the ring slot (or its binding). */
		be_id = bound != FL_RING_EMPTY ? bound : ring_pick(vip, vip_id, hash);
	} else {
		new_flow = 1;
		if (bound != FL_RING_EMPTY) {
			be_id = bound;
		} else if (syn || flow->proto != IPPROTO_TCP) {
			be_id = select_backend(vip, vip_id, hash);
		} else {
			/* Mid-flow with no entry (evicted, not recorded, or moved here from
			 * another box by ECMP): the ring slot is the pick every box and
			 * every packet agrees on. */
			be_id = ring_pick(vip, vip_id, hash);
			count_event(FL_EV_MIDFLOW_RING, pkt->bytes);
		}
		/* Not recorded (over the guard's rate, or conntrack refused): every
		 * packet of the flow must then reach the same backend, which only the
		 * ring slot of its hash gives (a binding is as stable; nothing new is
		 * bound); a UDP flow's later packets are then known as its own
		 * (unrecorded_again). */
		if (over_new_flow_rate(cfg, now)) {
			if (bound == FL_RING_EMPTY)
				be_id = ring_pick(vip, vip_id, hash);
			count_event(FL_EV_GUARD_UNRECORDED, pkt->bytes);
			if (flow->proto == IPPROTO_UDP)
				remember_unrecorded(hash, now);
		} else {
			record = 1;
		}
	}
	be = backends.lookup(&be_id);
	if (!be || !(be->flags & FL_BE_F_VALID))
		return FL_DROP_NO_BACKEND;
	if (record) {
		/* The MTU check comes before the record: a too-big first packet records no flow. */
		if (vip->forwarding == FL_FWD_TUNNEL) {
			reason = tunnel_too_big(ctx, pkt, cfg, be);
			if (reason)
				return reason;
		}
		ct_new(&new_ct, pkt, vip, vip_id, be_id, be, now);
		if (conntrack.update(flow, &new_ct) == 0) {
			if (bound == FL_RING_EMPTY)
				persist_bind(vip, vip_id, flow, be_id, be, now);
		} else if (bound == FL_RING_EMPTY) {
			be_id = ring_pick(vip, vip_id, hash);
			count_event(FL_EV_CT_FULL, pkt->bytes);
			be = backends.lookup(&be_id);
			if (!be || !(be->flags & FL_BE_F_VALID))
				return FL_DROP_NO_BACKEND;
		} else {
			count_event(FL_EV_CT_FULL, pkt->bytes);
		}
	}

send:
	reason = to_backend(ctx, eth, pkt, vip, vip_id, be);
	if (reason_verdict(reason) == XDP_TX)
		reason = egress(ctx, pkt, be->egress_ifindex, be->egress_slot, reason);
	/* Only a packet sent on to its backend counts for the VIP and backend: an
	 * ICMP too-big sent back to the client instead moves its reason alone. */
	if (reason != FL_TX_ICMP_TOO_BIG &&
	    (reason_verdict(reason) == XDP_TX || reason_verdict(reason) == XDP_REDIRECT)) {
		count_vip(vip_id, pkt->bytes, new_flow);
		count_backend(be_id, pkt->bytes, new_flow);
	}
	return reason;

not_vip:
	reason = nat_in(ctx, eth, data_end, pkt);
	return reason ? reason : miss_reason(flow, FL_PASS_VIP_PORT);
}

/* ---- ICMP, ARP and ND ---- */

/* The backend of a flow with no conntrack entry (behind ECMP the router's
 * ICMP lands on any box; the guard leaves flows unrecorded): the ring slot of
 * its hash, the pick its mid-flow packets get on every box (Katran's rule).
 * NULL when the flow is for no VIP, or the slot has no valid backend. */
static __always_inline struct backend *icmp_ring_backend(struct flow_key *flow, struct vip_meta **vip)
{
	struct vip_key vkey = {};
	struct backend *be;
	__u32 *vip_id, be_id;

	__builtin_memcpy(vkey.addr, flow->dst, sizeof(vkey.addr));
	vkey.port = flow->dport;
	vkey.proto = flow->proto;
	vkey.family = flow->family;
	vip_id = vips.lookup(&vkey);
	if (!vip_id)
		return NULL;
	*vip = vip_table.lookup(vip_id);
	if (!*vip || !((*vip)->flags & FL_VIP_F_VALID))
		return NULL;
	be_id = ring_pick(*vip, *vip_id, flow_hash(flow, (*vip)->hash_mode, FASTLB_HASH_SEED));
	be = backends.lookup(&be_id);
	if (!be || !(be->flags & FL_BE_F_VALID))
		return NULL;
	return be;
}

/* An ICMP error about a VIP flow (too big): the quoted header was sent from
 * the VIP to the client, so the flow is its reverse; send the error to that
 * flow's backend, which owns the connection: its conntrack entry's, else its
 * ring slot's (DSR and tunnel; under NAT the quote holds the VIP, which the
 * backend does not know: passed). */
static __always_inline __u32 icmp_to_backend(struct xdp_md *ctx, struct ethhdr *eth, struct fl_pkt *pkt,
					     void *quote, void *data_end)
{
	struct iphdr *iph = quote;
	struct ipv6hdr *ip6h = quote;
	struct flow_key flow = {};
	struct vip_meta *vip;
	struct ct_value *ct;
	struct backend *be;
	__u16 *ports;
	__u8 proto;

	if (pkt->flow.family == FL_AF_INET) {
		if ((void *)(iph + 1) > data_end || iph->version != 4 || iph->ihl != 5)
			return FL_PASS_VIP_PORT;
		ports = (void *)(iph + 1);
		proto = iph->protocol;
		flow.src[0] = iph->daddr;
		flow.dst[0] = iph->saddr;
	} else {
		if ((void *)(ip6h + 1) > data_end || ip6h->version != 6)
			return FL_PASS_VIP_PORT;
		ports = (void *)(ip6h + 1);
		proto = ip6h->nexthdr;
		__builtin_memcpy(flow.src, &ip6h->daddr, 16);
		__builtin_memcpy(flow.dst, &ip6h->saddr, 16);
	}
	if ((void *)(ports + 2) > data_end || (proto != IPPROTO_TCP && proto != IPPROTO_UDP))
		return FL_PASS_VIP_PORT;
	flow.sport = ports[1];
	flow.dport = ports[0];
	flow.proto = proto;
	flow.family = pkt->flow.family;
	ct = conntrack.lookup(&flow);
	be = ct ? ct_backend(ct, &vip) : NULL;
	if (!be)
		be = icmp_ring_backend(&flow, &vip);
	if (!be || vip->forwarding == FL_FWD_NAT)
		return FL_PASS_VIP_PORT;
	if (vip->forwarding == FL_FWD_TUNNEL) {
		pkt->flow = flow;  /* the outer source follows the flow, like its packets */
		if (tunnel_out(ctx, pkt, be) != FL_TX_TUNNEL)
			return FL_DROP_ENCAP_FAILED;
	} else {
		__builtin_memcpy(eth->h_source, eth->h_dest, ETH_ALEN);
		__builtin_memcpy(eth->h_dest, be->mac, ETH_ALEN);
	}
	return egress(ctx, pkt, be->egress_ifindex, be->egress_slot, FL_TX_ICMP_TO_BACKEND);
}

/* FL_PASS_NOT_VIP or FL_PASS_L2_NOT_UNICAST for ICMP that fastlb does not
 * answer, else 0. */
static __always_inline __u32 icmp_not_ours(struct ethhdr *eth, struct fl_pkt *pkt)
{
	if (!is_vip_addr(&pkt->flow))
		return FL_PASS_NOT_VIP;
	if (eth->h_dest[0] & 1)
		return FL_PASS_L2_NOT_UNICAST;
	return 0;
}

static __always_inline __u32 process_icmp4(struct xdp_md *ctx, struct hdr_cursor *nh, void *data_end,
					   struct ethhdr *eth, struct fl_pkt *pkt)
{
	struct icmphdr *icmp = nh->pos;
	__u32 reason = icmp_not_ours(eth, pkt);

	if (reason)
		return reason;
	if ((void *)(icmp + 1) > data_end || pkt->l4_len < sizeof(*icmp))
		return FL_PASS_VIP_PORT;
	if (icmp->type == FL_ICMP_ECHO_REQUEST && icmp->code == 0) {
		icmp4_echo_reply(eth, pkt->l3, icmp);
		return FL_TX_ICMP_ECHO;
	}
	if (icmp->type == FL_ICMP_DEST_UNREACH && icmp->code == FL_ICMP_FRAG_NEEDED)
		return icmp_to_backend(ctx, eth, pkt, icmp + 1, data_end);
	return FL_PASS_VIP_PORT;
}

/* The header check is a branch taken before anything else, not a flag kept
 * for later: the compiler folded such a flag into one bitwise test with the
 * multicast bit, and the 6.1 verifier then lost the packet range it proved
 * ("invalid access to packet" at the ICMPv6 type). */
static __always_inline __u32 process_icmp6(struct xdp_md *ctx, struct hdr_cursor *nh, void *data_end,
					   struct ethhdr *eth, struct fl_pkt *pkt)
{
	struct icmp6hdr *icmp6 = nh->pos;
	struct ipv6hdr *ip6h = pkt->l3;
	struct fl_nd *nd = nh->pos;
	__u32 zero = 0, reason;
	struct fl_settings *cfg;

	if ((void *)(icmp6 + 1) > data_end || pkt->l4_len < sizeof(*icmp6)) {
		reason = icmp_not_ours(eth, pkt);
		return reason ? reason : FL_PASS_VIP_PORT;
	}
	if (icmp6->icmp6_type == FL_ICMP6_NS) {
		/* To a solicited-node group, about the target: not to the VIP. */
		if ((void *)&nd->opt_type > data_end || icmp6->icmp6_code != 0 ||
		    ip6h->hop_limit != FL_ND_HOP_LIMIT || !is_announced(nd->target.s6_addr32, FL_AF_INET6))
			return FL_PASS_NOT_VIP;
		cfg = settings.lookup(&zero);
		if (!cfg || nd_advert(ctx, pkt->bytes, pkt->l2_len, cfg->lb_mac))
			return FL_PASS_NOT_VIP;
		return FL_TX_ND_ADVERT;
	}
	reason = icmp_not_ours(eth, pkt);
	if (reason)
		return reason;
	if (icmp6->icmp6_type == FL_ICMP6_ECHO_REQUEST && icmp6->icmp6_code == 0) {
		icmp6_echo_reply(eth, ip6h, icmp6);
		return FL_TX_ICMP_ECHO;
	}
	if (icmp6->icmp6_type == FL_ICMP6_PKT_TOO_BIG)
		return icmp_to_backend(ctx, eth, pkt, icmp6 + 1, data_end);
	return FL_PASS_VIP_PORT;
}

/* An ARP request for an announced VIP gets the LB's MAC. */
static __always_inline __u32 process_arp(struct hdr_cursor *nh, void *data_end, struct ethhdr *eth)
{
	struct fl_arp *arp = nh->pos;
	__u32 zero = 0, tpa;
	struct fl_settings *cfg;

	if ((void *)(arp + 1) > data_end)
		return FL_PASS_NOT_IP;
	if (arp->htype != bpf_htons(ARPHRD_ETHER) || arp->ptype != bpf_htons(ETH_P_IP) ||
	    arp->hlen != ETH_ALEN || arp->plen != 4 || arp->oper != bpf_htons(ARPOP_REQUEST))
		return FL_PASS_NOT_IP;
	__builtin_memcpy(&tpa, arp->tpa, 4);
	if (!is_announced(&tpa, FL_AF_INET))
		return FL_PASS_NOT_IP;
	cfg = settings.lookup(&zero);
	if (!cfg)
		return FL_PASS_NOT_IP;
	arp_reply(eth, arp, cfg->lb_mac);
	return FL_TX_ARP_REPLY;
}

/* TCP/UDP header (within the IP payload) -> ports and TCP flags, then forward. */
static __always_inline __u32 process_l4(struct xdp_md *ctx, struct hdr_cursor *nh, void *data_end,
					struct ethhdr *eth, struct fl_pkt *pkt, int l4proto)
{
	struct flow_key *flow = &pkt->flow;
	struct tcphdr *tcph;
	struct udphdr *udph;

	pkt->l4 = nh->pos;
	if (l4proto == IPPROTO_TCP) {
		if (parse_tcphdr(nh, data_end, pkt->l4_len, &tcph) < 0)
			return miss_reason(flow, FL_DROP_L4_MALFORMED);
		flow->sport = tcph->source;
		flow->dport = tcph->dest;
		pkt->tcp_flags = ((__u8 *)tcph)[13];
		pkt->payload_len = pkt->l4_len - tcph->doff * 4;
	} else if (l4proto == IPPROTO_UDP) {
		if (parse_udphdr(nh, data_end, pkt->l4_len, &udph) < 0)
			return miss_reason(flow, FL_DROP_L4_MALFORMED);
		flow->sport = udph->source;
		flow->dport = udph->dest;
		pkt->payload_len = pkt->l4_len - sizeof(*udph);
	} else {
		return miss_reason(flow, FL_PASS_VIP_PORT);
	}
	flow->proto = l4proto;
	return forward(ctx, eth, pkt);
}

static __always_inline __u32 process_ipv4(struct xdp_md *ctx, struct hdr_cursor *nh, void *data_end,
					  struct ethhdr *eth, struct fl_pkt *pkt)
{
	struct iphdr *iph;
	int l4proto;

	l4proto = parse_iphdr(nh, data_end, &iph);
	if (l4proto < 0)
		return FL_DROP_L3_MALFORMED;
	pkt->l3 = iph;
	pkt->flow.family = FL_AF_INET;
	pkt->flow.src[0] = iph->saddr;
	pkt->flow.dst[0] = iph->daddr;
	pkt->l3_len = fl_ntohs(iph->tot_len);
	pkt->l4_len = pkt->l3_len - iph->ihl * 4;
	pkt->tos = iph->tos;
	if (iph->frag_off & bpf_htons(IP_MF | IP_OFFSET))
		return miss_reason(&pkt->flow, FL_DROP_FRAGMENT);
	if (l4proto == IPPROTO_ICMP)
		return process_icmp4(ctx, nh, data_end, eth, pkt);
	return process_l4(ctx, nh, data_end, eth, pkt, l4proto);
}

static __always_inline __u32 process_ipv6(struct xdp_md *ctx, struct hdr_cursor *nh, void *data_end,
					  struct ethhdr *eth, struct fl_pkt *pkt)
{
	struct ipv6hdr *ip6h;
	int l4proto;

	l4proto = parse_ip6hdr(nh, data_end, &ip6h);
	if (l4proto < 0)
		return FL_DROP_L3_MALFORMED;
	pkt->l3 = ip6h;
	pkt->flow.family = FL_AF_INET6;
	__builtin_memcpy(pkt->flow.src, &ip6h->saddr, sizeof(pkt->flow.src));
	__builtin_memcpy(pkt->flow.dst, &ip6h->daddr, sizeof(pkt->flow.dst));
	pkt->l4_len = fl_ntohs(ip6h->payload_len);
	pkt->l3_len = pkt->l4_len + sizeof(*ip6h);
	if (ipv6_is_exthdr(l4proto))
		return miss_reason(&pkt->flow, FL_DROP_IPV6_EXTHDR);
	if (l4proto == FL_IPPROTO_ICMPV6)
		return process_icmp6(ctx, nh, data_end, eth, pkt);
	return process_l4(ctx, nh, data_end, eth, pkt, l4proto);
}

int xdp_fastlb(struct xdp_md *ctx)
{
	void *data = fl_data(ctx);
	void *data_end = fl_data_end(ctx);
	struct hdr_cursor nh = { .pos = data };
	struct fl_pkt pkt = {};
	struct ethhdr *eth;
	__u32 reason;
	int eth_type;

	pkt.bytes = data_end - data;
	eth_type = parse_ethhdr(&nh, data_end, &eth);
	pkt.l2_len = nh.pos - data;
	if (eth_type == PARSE_TRUNCATED)
		reason = FL_DROP_L2_TRUNCATED;
	else if (eth_type == PARSE_TOO_DEEP)
		reason = FL_PASS_VLAN_DEPTH;
	else if (eth_type == bpf_htons(ETH_P_IP))
		reason = process_ipv4(ctx, &nh, data_end, eth, &pkt);
	else if (eth_type == bpf_htons(ETH_P_IPV6))
		reason = process_ipv6(ctx, &nh, data_end, eth, &pkt);
	else if (eth_type == bpf_htons(ETH_P_ARP))
		reason = process_arp(&nh, data_end, eth);
	else
		reason = FL_PASS_NOT_IP;

	count_reason(reason, pkt.bytes);
	if (reason_verdict(reason) == XDP_REDIRECT)
		return tx_ports.redirect_map(pkt.redirect_slot, 0);
	return reason_verdict(reason);
}
