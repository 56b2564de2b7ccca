/* SPDX-License-Identifier: Apache-2.0 */
/* fastlb_consts.h: constants and enums shared with userspace.
 *
 * Userspace reads this file (fastlb/cdefs.py) rather than repeating the
 * numbers: the #defines and enum members below are the one source of truth.
 * Size limits are #ifndef so the loader can set them from the config with -D.
 */
#ifndef FASTLB_CONSTS_H
#define FASTLB_CONSTS_H

/* ---- Sizes (the loader passes -D values taken from the config) ---- */
#ifndef FASTLB_MAX_VIP_PORTS
#define FASTLB_MAX_VIP_PORTS 1024   /* vips map room for the ports of multi-port VIPs */
#endif
#ifndef FASTLB_MAX_VIPS
#define FASTLB_MAX_VIPS 16          /* VIP slots: ring and stats arrays are this many deep */
#endif
#ifndef FASTLB_MAX_BACKENDS
#define FASTLB_MAX_BACKENDS 1024    /* backend slots over all VIPs */
#endif
#ifndef FASTLB_RING_SIZE
#define FASTLB_RING_SIZE 65537      /* Maglev table size M per VIP (a prime) */
#endif
#ifndef FASTLB_CT_SIZE
#define FASTLB_CT_SIZE 65536        /* conntrack LRU entries */
#endif
#ifndef FASTLB_MAX_IFACES
#define FASTLB_MAX_IFACES 8         /* interfaces of one attachment (two-arm: clients, backends) */
#endif
#ifndef FASTLB_SEQ_SIZE
#define FASTLB_SEQ_SIZE 1024        /* smooth-WRR sequence slots per VIP */
#endif

/* ---- Fixed values ---- */
#define FL_RING_EMPTY 0xffffffff    /* ring/sequence slot with no backend */
#define FL_P2C_SALT 0x70326321      /* mixed into the seed for the 2nd P2C candidate */
#define FL_P2C_PROBES 8             /* ring slots tried to find a distinct 2nd candidate */
#define FL_MAX_VLAN_DEPTH 2         /* VLAN tags parsed (802.1Q / 802.1ad) */
#define FL_VIP_ADDR_PORT 0          /* key.port of an address-only VIP marker */
#define FL_VIP_ADDR_PROTO 0         /* key.proto of an address-only VIP marker */
#define FL_VIP_ID_ADDR_ONLY 0xffffffff /* vips value of an address-only marker */
#define FL_VIP_ID_ANNOUNCE 0xfffffffe  /* ... of one whose address fastlb answers ARP/ND for */
#define FL_NAT_PORT_MIN 1024        /* remapped NAT source ports: 1024 .. 65535 */
#define FL_NAT_PORT_SPAN 64512
#define FL_NAT_PORT_TRIES 8         /* remapped ports tried before a clash is dropped */
#define FL_NAT_SALT 0x6e617470      /* mixed into the seed for the remapped port */

/* IP protocol numbers fastlb writes or recognises. */
#define FL_IPPROTO_IPIP 4           /* IPv4 inside */
#define FL_IPPROTO_IPV6 41          /* IPv6 inside */
#define FL_IPPROTO_ICMPV6 58

/* TCP flag bits in byte 13 of the TCP header. */
#define FL_TCP_FIN 0x01
#define FL_TCP_SYN 0x02
#define FL_TCP_RST 0x04
#define FL_TCP_ACK 0x10

#define FL_NS_PER_SEC 1000000000ULL
#define FL_EEXIST 17                /* the kernel's EEXIST: a BPF_NOEXIST insert met an entry */
#define FL_CT_REFRESH_NS FL_NS_PER_SEC /* a conntrack entry's last_seen_ns is written at most this often */
#define FL_UNRECORDED_SLOTS 4096    /* per CPU: UDP flows left unrecorded by the guard, by flow hash */

/* Address families in keys (the kernel's AF_INET / AF_INET6). */
#define FL_AF_INET 2
#define FL_AF_INET6 10

/* ---- Per-VIP settings (struct vip_meta) ---- */
enum fl_algorithm {
	FL_ALG_MAGLEV = 0,
	FL_ALG_RR = 1,
	FL_ALG_WRR = 2,
	FL_ALG_LC = 3,
	FL_ALG_LRT = 4,
};

enum fl_forwarding {
	FL_FWD_DSR = 0,
	FL_FWD_TUNNEL = 1,
	FL_FWD_NAT = 2,
};

enum fl_hash_mode {
	FL_HASH_5TUPLE = 0,         /* src, dst, ports, protocol */
	FL_HASH_SRC = 1,            /* source address only: client affinity */
};

enum fl_vip_flags {
	FL_VIP_F_VALID = 1,         /* slot in use */
	FL_VIP_F_L7 = 2,            /* http/https: passed to the local stack, where HAProxy listens */
	FL_VIP_F_PERSIST = 4,       /* persistence on: see vip_persist and persist */
};

enum fl_backend_flags {
	FL_BE_F_VALID = 1,          /* slot in use */
	FL_BE_F_DRAINING = 2,       /* no new flows (established ones stay) */
};

/* ---- Conntrack state (struct ct_value.flags) ---- */
enum fl_ct_flags {
	FL_CT_F_CLOSING = 1,        /* FIN or RST seen (or expired): no longer counted */
	FL_CT_F_COUNTED = 2,        /* counted in the backend's active connections */
	FL_CT_F_SYN = 4,            /* TCP, recorded from its SYN: counts once established */
	FL_CT_F_ESTABLISHED = 8,    /* TCP, an ACK without SYN seen (or recorded mid-flow) */
};

/* ---- Verdict reasons: one per-CPU counter each.
 * The prefix names the XDP verdict (FL_PASS_ -> XDP_PASS, FL_DROP_ ->
 * XDP_DROP, FL_TX_ -> XDP_TX, FL_REDIRECT_ -> XDP_REDIRECT); userspace
 * derives verdict totals from it. The FL_TX_ reasons come first, then the
 * FL_REDIRECT_ ones (fastlb_verdict.h relies on it).
 */
enum fl_reason {
	FL_TX_DSR = 0,              /* forwarded to a backend by MAC rewrite */
	FL_TX_TUNNEL,               /* forwarded to a backend in an IP-in-IP header */
	FL_TX_NAT,                  /* forwarded to a backend with its address and port */
	FL_TX_NAT_REPLY,            /* a NAT backend's reply, sent on as the VIP's */
	FL_TX_ICMP_ECHO,            /* echo reply to a ping of a VIP address */
	FL_TX_ICMP_TO_BACKEND,      /* ICMP too-big about a VIP flow, sent to its backend */
	FL_TX_ICMP_TOO_BIG,         /* too big once tunnelled: ICMP frag-needed/PTB to the client */
	FL_TX_ARP_REPLY,            /* ARP reply for an announced VIP */
	FL_TX_ND_ADVERT,            /* neighbour advertisement for an announced VIP */
	FL_REDIRECT_DSR,            /* as FL_TX_DSR, out of another interface (two-arm) */
	FL_REDIRECT_TUNNEL,         /* as FL_TX_TUNNEL, out of another interface */
	FL_REDIRECT_NAT,            /* as FL_TX_NAT, out of another interface */
	FL_REDIRECT_NAT_REPLY,      /* as FL_TX_NAT_REPLY, out of the clients' interface */
	FL_REDIRECT_ICMP_TO_BACKEND, /* as FL_TX_ICMP_TO_BACKEND, out of another interface */
	FL_PASS_NOT_IP,             /* ARP and other non-IP frames */
	FL_PASS_NOT_VIP,            /* IP packet whose destination is no VIP address */
	FL_PASS_VIP_PORT,           /* VIP address, but no VIP on this port/protocol */
	FL_PASS_VLAN_DEPTH,         /* more VLAN tags than FL_MAX_VLAN_DEPTH */
	FL_PASS_L2_NOT_UNICAST,     /* to a VIP address, in a broadcast/multicast frame */
	FL_PASS_L7,                 /* to an http/https VIP: HAProxy on this host serves it */
	FL_DROP_L2_TRUNCATED,       /* frame ends inside the Ethernet or VLAN header */
	FL_DROP_L3_MALFORMED,       /* truncated IP header, IHL < 5, bad lengths */
	FL_DROP_FRAGMENT,           /* IPv4 fragment to a VIP address */
	FL_DROP_IPV6_EXTHDR,        /* IPv6 extension header to a VIP address */
	FL_DROP_L4_MALFORMED,       /* truncated TCP/UDP header, TCP data offset < 5 */
	FL_DROP_NO_BACKEND,         /* VIP with no usable backend */
	FL_DROP_TOO_BIG,            /* too big once tunnelled, and no ICMP error sent (no
	                             * icmp_source; IPv4 without DF, or with options) */
	FL_DROP_ENCAP_FAILED,       /* the frame could not grow for the outer header */
	FL_DROP_NO_EGRESS,          /* the backend's interface is not one of the attachment's */
	FL_DROP_ICMP_RATE_LIMITED,  /* too big once tunnelled, and this CPU's ICMP error budget
	                             * (icmp_rate, icmp_burst) is spent: dropped, no error sent */
	FL_DROP_NAT_NO_PORT,        /* NAT: the tuple toward the backend is another connection's,
	                             * and no remapped source port was free */
	FL_REASON_MAX,
};

/* ---- Flow events: counted per CPU, beside the verdict reasons ---- */
enum fl_event {
	FL_EV_GUARD_UNRECORDED = 0, /* a new flow over new_flow_rate: forwarded by its ring slot, not recorded */
	FL_EV_CT_FULL,              /* conntrack refused a new flow: forwarded by its ring slot */
	FL_EV_MIDFLOW_RING,         /* a TCP packet without SYN and without conntrack entry: its ring slot */
	FL_EV_CT_EXPIRED,           /* a conntrack entry met past its timeout: counted as absent */
	FL_EVENT_MAX,
};

/* ---- The backends' decap program (fastlb_decap.c): one counter each ---- */
#ifndef FASTLB_DECAP_MAX_ADDRS
#define FASTLB_DECAP_MAX_ADDRS 256  /* VIPs plus local addresses */
#endif
#define FASTLB_DECAP_MAX_SOURCES 64 /* outer source prefixes (decap --from) */

/* ECN codepoints (the low 2 bits of the TOS / traffic class). */
#define FL_ECN_NOT_ECT 0
#define FL_ECN_ECT1 1
#define FL_ECN_ECT0 2
#define FL_ECN_CE 3

enum fl_decap_reason {
	FL_DECAP_OK = 0,            /* outer header stripped, inner packet passed to the stack */
	FL_DECAP_NOT_TUNNEL,        /* not IP-in-IP: passed untouched */
	FL_DECAP_NOT_LOCAL,         /* tunnelled to another host: passed untouched */
	FL_DECAP_NOT_VIP,           /* tunnelled here, but not for a configured VIP: passed untouched */
	FL_DECAP_MALFORMED,         /* truncated outer or inner header: dropped */
	FL_DECAP_SOURCE_REFUSED,    /* tunnelled here for a VIP from an outer source outside
	                             * the balancers' prefixes (decap --from): dropped */
	FL_DECAP_ECN_DROP,          /* outer CE on a Not-ECT inner packet (RFC 6040): dropped */
	FL_DECAP_REASON_MAX,
};

/* Values of the decap program's addrs map. */
#define FL_DECAP_ADDR_LOCAL 1       /* an address of this host: outer destinations */
#define FL_DECAP_ADDR_VIP 2         /* a VIP served here: inner destinations */

#endif /* FASTLB_CONSTS_H */
