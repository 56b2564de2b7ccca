/* SPDX-License-Identifier: Apache-2.0 */
/* fastlb_maps.h: every map of the balancer, pinned under FASTLB_PIN_DIR.
 *
 * Pinned maps outlive the controller, so a restart adopts them. BCC reuses a
 * pinned map without checking its layout; the loader checks each pin's type,
 * key size, value size and entries before it compiles (fastlb/pins.py).
 */
#ifndef FASTLB_MAPS_H
#define FASTLB_MAPS_H

#include "fastlb_structs.h"
#include "fastlb_pinned.h"

/* A pinned devmap with BCC's redirect_map() method (BPF_DEVMAP, pinned). */
#define FL_DEVMAP(name, entries)                                              \
	struct name##_table_t {                                               \
		u32 key;                                                      \
		int leaf;                                                     \
		u64 (*redirect_map)(int, int);                                \
		u32 max_entries;                                              \
	};                                                                    \
	__attribute__((section("maps/devmap:" FASTLB_PIN_DIR "/" #name)))     \
	struct name##_table_t name = { .max_entries = (entries) }

/* VIPs -> vip id; VIP addresses (port 0, proto 0) -> FL_VIP_ID_ADDR_ONLY.
 * A multi-port VIP has one key per port, all with its vip id (one O(1)
 * lookup per packet, no range walk). Written by the loader. Read for
 * packets with no conntrack entry. */
FL_MAP("hash", struct vip_key, __u32, vips, FASTLB_MAX_VIPS * 2 + FASTLB_MAX_VIP_PORTS, 0);

/* vip id -> per-VIP settings. Written by the loader. */
FL_MAP("array", __u32, struct vip_meta, vip_table, FASTLB_MAX_VIPS, 0);

/* vip id -> persistence timeout and client mask. Written by the loader. */
FL_MAP("array", __u32, struct vip_persist, vip_persist, FASTLB_MAX_VIPS, 0);

/* (VIP, masked client) -> backend: persistence bindings. Written by the
 * program (a recorded new flow binds; packets refresh), the controller
 * (a removed or failed backend's bindings are deleted). One hash table that
 * every CPU reads (a client's connections arrive on any RX queue), with
 * per-CPU LRU lists: a new client's binding takes no global lock (its
 * entries are rounded to a multiple of the possible CPUs: layout.kernel_max_entries). */
FL_MAP("lru_hash", struct persist_key, struct persist_value, persist, FASTLB_CT_SIZE,
       BPF_F_NO_COMMON_LRU);

/* Backend id -> address, MAC, weight. Written by the loader/controller. */
FL_MAP("array", __u32, struct backend, backends, FASTLB_MAX_BACKENDS, 0);

/* vip_id * FASTLB_RING_SIZE + slot -> backend id (Maglev ring). Written by the loader. */
FL_MAP("array", __u32, __u32, ring, FASTLB_MAX_VIPS * FASTLB_RING_SIZE, 0);

/* vip_id * FASTLB_SEQ_SIZE + slot -> backend id (smooth-WRR sequence for
 * rr/wrr). Written by the loader. */
FL_MAP("array", __u32, __u32, seq, FASTLB_MAX_VIPS * FASTLB_SEQ_SIZE, 0);

/* vip_id -> this CPU's position in the VIP's sequence. Written by the program. */
FL_MAP("percpu_array", __u32, __u32, seq_cursor, FASTLB_MAX_VIPS, 0);

/* backend id -> active TCP connections (lc/lrt). Written by the program
 * only: +1 when a flow recorded from its SYN shows its first ACK, -1 when
 * a counted flow first shows FIN or RST or is met past its timeout. The
 * loader zeroes it only together with a new backend.gen, when no entry
 * can reach the slot's count any more. Signed: a race can leave it at -1
 * for a moment, never at 4294967295. */
FL_MAP("array", __u32, __s32, backend_active, FASTLB_MAX_BACKENDS, 0);

/* backend id -> correction added to backend_active when the program reads
 * it (the result clamped at 0). Written by userspace only, so a correction
 * never races the program's own updates. */
FL_MAP("array", __u32, __s32, backend_active_fix, FASTLB_MAX_BACKENDS, 0);

/* flow hash % FL_UNRECORDED_SLOTS -> a UDP flow the guard left unrecorded
 * on this CPU. Written by the program. */
FL_MAP("percpu_array", __u32, struct fl_unrecorded, unrecorded, FL_UNRECORDED_SLOTS, 0);

/* 5-tuple -> backend and state. Written by the program (new flows) and the
 * controller (flush). One LRU for the box, not per-CPU lists: a per-CPU LRU
 * splits its entries over the possible CPUs, and CPUs without an RX queue
 * would hold capacity no flow can use. conntrack_size established flows,
 * plus as many again for the new flows the default guard admits in a second
 * (docs/CONFIG.md). */
FL_MAP("lru_hash", struct flow_key, struct ct_value, conntrack, FASTLB_CT_SIZE * 2, 0);

/* NAT: a connection's translated tuple, reversed (the backend's reply
 * 5-tuple) -> the VIP and client to restore. Written by the program with
 * each NAT flow, and refreshed by every packet of it, so it lives at least
 * as long as the conntrack entry (same size, same LRU flavour). */
FL_MAP("lru_hash", struct flow_key, struct nat_rev, nat_rev, FASTLB_CT_SIZE * 2, 0);

/* NAT: a client's 5-tuple (as it arrived) -> the source port it was remapped
 * to toward the backend (network order), for the few flows whose own tuple
 * toward the backend was held by another connection (netfilter's clash rule).
 * Written by the program. */
FL_MAP("lru_hash", struct flow_key, __u16, nat_port, FASTLB_CT_SIZE, 0);

/* 0 -> global settings (ICMP source, tunnel source prefixes, the LB's MAC).
 * Written by the loader. */
FL_MAP("array", __u32, struct fl_settings, settings, 1, 0);

/* 0 -> this CPU's new-flow guard window. Written by the program. */
FL_MAP("percpu_array", __u32, struct fl_flood, flood, 1, 0);

/* 0 -> this CPU's generated-ICMP budget: the theoretical arrival time (ns) of
 * the next error (GCRA, a token bucket in one word). Written by the program. */
FL_MAP("percpu_array", __u32, __u64, icmp_bucket, 1, 0);

/* enum fl_event -> packets/bytes. Written by the program. */
FL_MAP("percpu_array", __u32, struct fl_counter, event_stats, FL_EVENT_MAX, 0);

/* Interface slot -> ifindex, for XDP_REDIRECT out of another interface of
 * the attachment (two-arm). Written by the loader. */
FL_DEVMAP(tx_ports, FASTLB_MAX_IFACES);

/* Interface slot -> ifindex and MAC (the source MAC of frames sent out of it).
 * Written by the loader. */
FL_MAP("array", __u32, struct fl_iface, ifaces, FASTLB_MAX_IFACES, 0);

/* enum fl_reason -> packets/bytes. Written by the program. */
FL_MAP("percpu_array", __u32, struct fl_counter, reason_stats, FL_REASON_MAX, 0);

/* vip_id -> packets/bytes/new flows. Written by the program. */
FL_MAP("percpu_array", __u32, struct fl_counter, vip_stats, FASTLB_MAX_VIPS, 0);

/* backend id -> packets/bytes/new flows. Written by the program. */
FL_MAP("percpu_array", __u32, struct fl_counter, backend_stats, FASTLB_MAX_BACKENDS, 0);

#endif /* FASTLB_MAPS_H */
