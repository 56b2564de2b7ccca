/* SPDX-License-Identifier: Apache-2.0 */
/* fastlb_structs.h: map keys and values, shared with userspace.
 *
 * fastlb/structs.py holds the ctypes twins; tests/bpf/test_structs.py checks
 * them field by field against the layouts BCC generates from this file.
 * Addresses are in network byte order, IPv4 in addr[0] with the rest zero.
 */
#ifndef FASTLB_STRUCTS_H
#define FASTLB_STRUCTS_H

#include "fastlb_consts.h"

/* Key of the vips map: a VIP, or an address-only marker (port 0, proto 0)
 * whose value is FL_VIP_ID_ADDR_ONLY. */
struct vip_key {
	__u32 addr[4];
	__u16 port;                 /* network byte order */
	__u8 proto;                 /* IPPROTO_TCP / IPPROTO_UDP */
	__u8 family;                /* FL_AF_INET / FL_AF_INET6 */
};

/* The address-only key of `addr` (port 0, protocol 0): VIP addresses in the
 * balancer's vips map, local and VIP addresses in the decap program's. */
static __always_inline void fl_addr_key(struct vip_key *key, const __u32 *addr, __u8 family)
{
	if (family == FL_AF_INET)
		key->addr[0] = addr[0];
	else
		__builtin_memcpy(key->addr, addr, 16);
	key->port = FL_VIP_ADDR_PORT;
	key->proto = FL_VIP_ADDR_PROTO;
	key->family = family;
}

/* Value of the vip_table array, indexed by vip id (the vips map's value). */
struct vip_meta {
	__u32 gen;                  /* bumped when the slot takes a new VIP, so that
	                             * conntrack entries of the slot's old VIP miss */
	__u8 algorithm;             /* enum fl_algorithm */
	__u8 forwarding;            /* enum fl_forwarding */
	__u8 hash_mode;             /* enum fl_hash_mode */
	__u8 flags;                 /* enum fl_vip_flags */
	__u32 seq_len;              /* used slots of this VIP's smooth-WRR sequence */
	__u32 ring_size;            /* used slots of this VIP's ring (M) */
};

/* Value of the backends map, indexed by backend id. */
struct backend {
	__u32 addr[4];
	__u8 mac[6];                /* next hop: the backend itself under DSR */
	__u8 family;
	__u8 flags;                 /* enum fl_backend_flags */
	__u16 port;                 /* network byte order; 0: the client's (multi-port NAT VIPs) */
	__u16 weight;
	__u32 vip_id;               /* the VIP this backend serves */
	__u32 rtt_us;               /* lrt: response-time score in microseconds */
	__u32 egress_ifindex;       /* interface towards it; 0: the one the packet came in on */
	__u32 egress_slot;          /* that interface's slot in tx_ports and ifaces */
	__u32 gen;                  /* bumped when the slot takes a new backend or one comes
	                             * back up, so that conntrack entries of the slot's
	                             * earlier backend miss, and its count starts at 0 */
};

/* Value of the ifaces array: an interface of the attachment. Slot 0 is the
 * clients' side (the first interface given to fastlb attach). */
struct fl_iface {
	__u32 ifindex;
	__u8 mac[6];
	__u16 pad;
};

/* Key of the conntrack map: the packet's 5-tuple as it arrived. */
struct flow_key {
	__u32 src[4];
	__u32 dst[4];
	__u16 sport;                /* network byte order */
	__u16 dport;
	__u8 proto;
	__u8 family;
	__u16 pad;
};

/* Value of the conntrack map. */
struct ct_value {
	__u32 backend_id;
	__u32 vip_id;
	__u32 vip_gen;              /* vip_meta.gen when the flow was recorded */
	__u32 flags;                /* enum fl_ct_flags */
	__u64 last_seen_ns;         /* CLOCK_MONOTONIC_COARSE ns of its last packet, written
	                             * at most once per FL_CT_REFRESH_NS */
	__u32 backend_gen;          /* backend.gen when the flow was recorded */
	__u32 pad;
};

/* Value of the unrecorded array (per CPU, by flow hash): a UDP flow the
 * new-flow guard left unrecorded, so that its later packets keep its ring
 * slot and do not count as new flows. */
struct fl_unrecorded {
	__u64 seen_ns;              /* its last packet */
	__u32 hash;                 /* its flow hash */
	__u32 pad;
};

/* Value of nat_rev: how to turn a backend's reply back into the VIP's. Its
 * key (the translated tuple, reversed) and this value together are the whole
 * NAT connection: client address (key.dst) and port, VIP address and port,
 * backend address and port (key.src, key.sport). */
struct nat_rev {
	__u32 vip[4];               /* the VIP address the client sent to */
	__u16 vip_port;             /* network byte order */
	__u8 client_mac[6];         /* next hop towards the client */
	__u32 vip_id;
	__u16 client_port;          /* the client's own source port (network order); key.dport
	                             * differs from it when the source port was remapped */
	__u16 pad;
};

/* Key of the decap program's sources LPM trie: an outer source prefix.
 * prefixlen counts the family word too (32 + the prefix's length). */
struct fl_src_key {
	__u32 prefixlen;
	__u32 family;               /* FL_AF_INET / FL_AF_INET6 */
	__u32 addr[4];
};

/* The one entry of the settings array. Written by the loader. */
struct fl_settings {
	__u32 icmp_src4;            /* source of the ICMP errors fastlb sends */
	__u32 icmp_src6[4];
	__u32 tunnel_src4;          /* tunnel mode's outer source prefix ... */
	__u32 tunnel_host4;         /* ... and its host bits, varied per flow */
	__u32 tunnel_src6[4];
	__u32 tunnel_host6;         /* host bits of the last word */
	__u32 nat_vips;             /* NAT VIPs configured: replies are looked up only if > 0 */
	__u8 lb_mac[6];             /* the attach interface's MAC (ARP/ND answers) */
	__u16 pad;
	__u32 new_flow_rate;        /* new flows per CPU per second recorded; 0: no limit */
	__u32 udp_timeout_s;        /* conntrack entries idle longer than these (plus the */
	__u32 tcp_syn_timeout_s;    /* 1 s refresh step) count as absent, by protocol and */
	__u32 tcp_timeout_s;        /* TCP state: SYN seen, established, FIN or RST seen; */
	__u32 tcp_fin_timeout_s;    /* 0: never */
	__u32 icmp_rate;            /* ICMP errors generated per CPU per second; 0: no limit */
	__u32 icmp_burst;           /* ... and at most this many at once */
	__u32 pad2;
};

/* Per-CPU state of the new-flow guard: flows started in the current second. */
struct fl_flood {
	__u64 window_start_ns;
	__u64 new_flows;
};

/* Persistence (a VIP's `persistence`): a client, its address masked to the
 * VIP's persistence_prefix, bound to a backend of that VIP. */
struct persist_key {
	__u32 addr[4];              /* the client's address & the VIP's mask */
	__u32 vip_id;
	__u8 family;
	__u8 pad[3];
};

struct persist_value {
	__u32 backend_id;
	__u32 vip_gen;              /* vip_meta.gen when bound: a slot's new VIP misses */
	__u64 last_seen_ns;         /* CLOCK_MONOTONIC_COARSE ns of the client's last packet (1 s steps) */
	__u32 backend_gen;          /* backend.gen when bound: the slot's next backend (a
	                             * replacement, or this one back up) misses, as conntrack does */
	__u32 pad;
};

/* Value of the vip_persist array, indexed by vip id. Written by the loader. */
struct vip_persist {
	__u64 timeout_ns;           /* 0: no persistence */
	__u32 mask[4];              /* the client address mask (persistence_prefix), network order */
};

/* A packet and byte counter (per CPU). */
struct fl_counter {
	__u64 packets;
	__u64 bytes;
	__u64 new_flows;            /* flows recorded or picked (vip/backend counters) */
};

#endif /* FASTLB_STRUCTS_H */
