"""An independent model of docs/DATAPLANE.md, and the judge that holds the kernel to it.

The fuzzer (tests/bpf/test_fuzz.py, fuzz/run.py) feeds every frame to the real
XDP program and to this model, and counts each difference. The model is
written from the documented rules alone: it parses frame bytes with
``struct``, knows the VIPs only as the plain data the fuzzer configured, and
imports nothing from ``fastlb``. The reason names and numbers come from the
C header itself (``enum fl_reason``), read here by a few lines of regex.

Three parts:

- ``Oracle.predict(frame)``: the reason the rules give (hence the verdict),
  and for a forwarded frame the VIP and whether its flow is new.
- ``Oracle.judge(...)``: compares one observed run (verdict, output bytes,
  counter moves) with the prediction and returns the problems found. It also
  keeps the model's conntrack: the backend each recorded flow went to, and
  the TCP flows each backend should count as active.
- ``Campaign``: drives the real program (BPF_PROG_TEST_RUN, one call per
  frame) and reads the per-CPU counters after each frame with one batch
  lookup per map.

Every forwarding mode is modelled, with the bytes each rule writes:
DSR (the two MACs), tunnel (the outer header, its source drawn per flow
from tunnel_source(6) and the same for every packet of a flow, and the MTU
check: ICMP frag-needed / packet-too-big, or a drop), NAT (address and port
rewritten, checksums updated incrementally, judged by the sums they cover)
and its reverse path (a reply whose 5-tuple a forwarded flow wrote to the
reverse map; the source port toward the backend remapped when another
connection's translated tuple holds it, and restored on the reply), ARP
replies and neighbour advertisements for announce = "arp" VIPs, and ICMP to
VIP addresses (echo replies, and too-big errors about a flow sent to its
backend: its conntrack entry's, else, unrecorded, a weight > 0 backend of
its VIP, the ring slot of its hash). The frames arrive on a veth of the run
(``TestDevice``) whose MTU the tunnel's check measures against (the L3
length plus the outer header; a too-big first packet records no flow).
ICMP errors are rate-limited per CPU (icmp_rate / icmp_burst): the fuzzer
configures a budget its frames cannot spend, so the model never predicts
FL_DROP_ICMP_RATE_LIMITED (tests/bpf/test_packets_modes.py provokes it).

The model's conntrack is exact only while nothing is evicted: conntrack is
one LRU of 2 x conntrack_size entries for the box, so the campaign flushes
the kernel's table (and the model forgets its flows) well before the model
has recorded conntrack_size / 2 flows.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import ipaddress
import os
import re
import struct
import time
from collections import Counter
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# XDP actions (include/uapi/linux/bpf.h, enum xdp_action), by reason prefix.
XDP_DROP, XDP_PASS, XDP_TX = 1, 2, 3
PREFIX_VERDICT = (("FL_PASS_", XDP_PASS), ("FL_DROP_", XDP_DROP), ("FL_TX_", XDP_TX))

ETH_P_IP, ETH_P_IPV6, ETH_P_ARP, ETH_P_8021Q, ETH_P_8021AD = 0x0800, 0x86DD, 0x0806, 0x8100, 0x88A8
VLAN_TPIDS = (ETH_P_8021Q, ETH_P_8021AD)
MAX_VLAN_TAGS = 2
IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP, IPPROTO_ICMPV6 = 1, 6, 17, 58
ICMP_ECHO = {4: 8, 6: 128}               # echo request types
ICMP_TOO_BIG = {4: (3, 4), 6: (2, None)}  # (type, code) of frag-needed / packet-too-big; None: any code
ND_SOLICIT = 135
IPV6_EXT_HEADERS = frozenset({0, 43, 44, 50, 51, 60, 135, 139, 140})
TCP_FIN, TCP_SYN, TCP_RST, TCP_ACK = 0x01, 0x02, 0x04, 0x10
PROTO_NUMBERS = {"tcp": IPPROTO_TCP, "udp": IPPROTO_UDP}


def read_reasons(header: Path = ROOT / "bpf" / "fastlb_consts.h") -> dict[str, int]:
    """``enum fl_reason`` from the C header: name -> value, without FL_REASON_MAX."""
    text = re.sub(r"/\*.*?\*/|//[^\n]*", "", header.read_text(), flags=re.S)
    body = re.search(r"enum\s+fl_reason\s*\{(.*?)\}", text, re.S)
    if body is None:
        raise ValueError(f"{header}: no enum fl_reason")
    reasons, value = {}, 0
    for member in filter(None, (m.strip() for m in body.group(1).split(","))):
        name, _, explicit = (p.strip() for p in member.partition("="))
        value = int(explicit, 0) if explicit else value
        reasons[name] = value
        value += 1
    reasons.pop("FL_REASON_MAX", None)
    return reasons


def reason_verdict(reason: str) -> int:
    for prefix, verdict in PREFIX_VERDICT:
        if reason.startswith(prefix):
            return verdict
    raise ValueError(f"{reason}: no verdict prefix")


# ---- checksums (RFC 1071), independent of scapy and of the kernel -----------

def ones_sum(data: bytes) -> int:
    """The folded 16-bit ones' complement sum of ``data``, in native byte order.

    The ones' complement sum commutes with byte swapping, so summing native
    words gives the same validity answers (sum == 0xffff) as big-endian ones,
    and ``~sum`` written back in native order is the right checksum field.
    """
    if len(data) & 1:
        data = bytes(data) + b"\0"
    s = sum(memoryview(data).cast("H"))
    while s > 0xFFFF:
        s = (s & 0xFFFF) + (s >> 16)
    return s


def checksum(data: bytes) -> bytes:
    """The checksum field (2 bytes) that makes ``data`` (with that field zeroed) sum to 0xffff."""
    return struct.pack("=H", ~ones_sum(data) & 0xFFFF)


def pseudo_header(family: int, src: bytes, dst: bytes, proto: int, length: int) -> bytes:
    if family == 4:
        return src + dst + struct.pack("!BBH", 0, proto, length)
    return src + dst + struct.pack("!IxxxB", length, proto)


@dataclass(frozen=True)
class ChecksumState:
    """Whether each checksum of a well-formed IP/L4 frame holds: True, False, or None (absent)."""
    ip: bool | None
    l4: bool | None


def checksum_state(frame: bytes, parsed: "Parsed") -> ChecksumState:
    f = frame
    ip = None
    if parsed.family == 4:
        ip = ones_sum(f[parsed.l3:parsed.l3 + parsed.ip_header_len]) == 0xFFFF
    segment = f[parsed.l4:parsed.l4 + parsed.l4_len]
    if parsed.proto == IPPROTO_UDP:
        segment = f[parsed.l4:parsed.l4 + parsed.udp_len]
        if parsed.family == 4 and segment[6:8] == b"\0\0":
            return ChecksumState(ip, None)
    pseudo = pseudo_header(parsed.family, parsed.src, parsed.dst, parsed.proto, len(segment))
    return ChecksumState(ip, ones_sum(pseudo + segment) == 0xFFFF)


# ---- the configured services, as plain data ---------------------------------

@dataclass(frozen=True)
class Backend:
    address: str
    mac: bytes          # 6 bytes: what the program writes as destination MAC
    weight: int = 1
    port: int | None = None   # nat: the backend's port (None: the VIP's)

    @cached_property
    def packed(self) -> bytes:
        return ipaddress.ip_address(self.address).packed

    @cached_property
    def family(self) -> int:
        return ipaddress.ip_address(self.address).version


@dataclass(frozen=True)
class Vip:
    address: str
    port: int
    protocol: str       # "tcp" | "udp"
    backends: tuple[Backend, ...]
    algorithm: str = "maglev"
    forwarding: str = "dsr"   # "dsr" | "tunnel" | "nat"
    announce: str = "none"    # "none" | "arp" | "bgp"
    persistence: int = 0      # seconds (no clock in the model: a binding never expires under it)
    persistence_prefix: int | None = None   # None: /32 (IPv4), /128 (IPv6)

    @cached_property
    def key(self) -> tuple:
        ip = ipaddress.ip_address(self.address)
        return (ip.version, ip.packed, self.port, PROTO_NUMBERS[self.protocol])

    @property
    def name(self) -> str:
        return f"{self.address}:{self.port}/{self.protocol}"


@dataclass(frozen=True)
class Settings:
    """What the rules read beyond the VIPs: the interface's MAC and MTU, and the
    tunnel and ICMP sources of [settings] (strings as in the config, or None)."""
    lb_mac: bytes
    mtu: int = 1500
    tunnel_source: str | None = None
    tunnel_source6: str | None = None
    icmp_source: str | None = None
    icmp_source6: str | None = None


# ---- the model ----------------------------------------------------------------

@dataclass
class Parsed:
    """What the rules read from a frame that got as far as the L4 ports."""
    family: int = 0
    l3: int = 0
    ip_header_len: int = 0
    l3_len: int = 0        # IPv4 tot_len, IPv6 40 + payload_len
    df: bool = False
    tos: int = 0
    l4: int = 0
    l4_len: int = 0
    udp_len: int = 0
    proto: int = 0
    src: bytes = b""
    dst: bytes = b""
    sport: int = 0
    dport: int = 0
    tcp_flags: int = 0


@dataclass
class Prediction:
    reason: str
    rule: str                           # the rule of DATAPLANE.md that decided, for reports
    parsed: Parsed | None = None        # set once the ports were read
    vip: Vip | None = None              # forwarded: the VIP (a new flow) or the flow's VIP (established)
    established: bytes | None = None    # the backend MAC the model's conntrack holds, when it knows it
    flow: tuple | None = None
    kind: str = "forward"               # forward, too_big (rule 12); echo, icmp_error, nd (6); arp (2);
                                        # nat_reply (10); pass (a frame not sent)
    hit: bool = False                   # a conntrack hit (rule 9): no new flow
    mode: str = "other"                 # the mode the fuzzer's figures count it under
    rev: tuple | None = None            # nat_reply: (VIP address, VIP port, client MAC, client port)

    @property
    def verdict(self) -> int:
        return reason_verdict(self.reason)


@dataclass
class FlowState:
    mac: bytes | None    # None: recorded, but no packet of it has left yet (too big)
    vip: Vip
    counted: bool        # TCP, counted in the backend's active connections
    closing: bool        # a FIN or RST has been seen
    syn: bool = False    # TCP, recorded from its SYN: counts from its first ACK
    established: bool = False  # TCP, an ACK without SYN seen (or recorded mid-flow)


MODES = ("dsr", "tunnel", "nat", "nat-reply", "arp/nd", "icmp", "other")
TUNNEL_OUTER = {4: 20, 6: 40}      # outer header bytes by the backend's family


def sum16(data: bytes) -> int:
    """ones_sum with the two zeros of ones' complement made one (0 -> 0xffff)."""
    return ones_sum(data) or 0xFFFF


class Oracle:
    """docs/DATAPLANE.md as a function of the frame, plus the conntrack it implies.

    The rule constants are class attributes so that the tests can build
    deliberately wrong oracles and check that the fuzzer notices.
    """

    max_vlan_tags = MAX_VLAN_TAGS
    ipv6_ext_headers = IPV6_EXT_HEADERS
    fragment_bits = 0x3FFF          # MF and the fragment offset (not DF)
    outer_ttl = 64                  # tunnel: outer TTL / hop limit
    tunnel_overhead = TUNNEL_OUTER  # bytes the MTU check adds for the outer header
    nat_remaps_port = True          # nat: the destination port becomes the backend's
    nat_reply_restores_port = True  # nat reply: the source port becomes the VIP's
    answers_unannounced = False     # ARP/ND for every VIP address, not only announce = "arp"
    persistence_prefix_cut = 0      # bits taken off each VIP's persistence_prefix

    def __init__(self, vips: list[Vip], settings: Settings | None = None):
        self.vips = list(vips)
        self.settings = settings or Settings(lb_mac=bytes(6))
        self.by_key = {v.key: v for v in self.vips}
        if len(self.by_key) != len(self.vips):
            raise ValueError("two VIPs with the same address, port and protocol")
        self.vip_addresses = {(k[0], k[1]) for k in self.by_key}
        self.announced = {(v.key[0], v.key[1]) for v in self.vips if v.announce == "arp" or self.answers_unannounced}
        self.eligible = {v.key: frozenset(b.mac for b in v.backends if b.weight > 0) for v in self.vips}
        self.members = {v.key: frozenset(b.mac for b in v.backends) for v in self.vips}
        self.backend_of = {b.mac: b for v in self.vips for b in v.backends}
        if len(self.backend_of) != sum(len(v.backends) for v in self.vips):
            raise ValueError("backends must have distinct MACs (the judge tells them apart by MAC)")
        for v in self.vips:
            if v.forwarding == "tunnel" and len({ipaddress.ip_address(b.address).version for b in v.backends}) > 1:
                raise ValueError(f"{v.name}: the model needs one backend family per tunnel VIP (the MTU "
                                 "check depends on it)")
        self.backend_family = {mac: b.family for mac, b in self.backend_of.items()}
        self.backend_packed = {mac: b.packed for mac, b in self.backend_of.items()}
        self.nat_vips = any(v.forwarding == "nat" for v in self.vips)
        s = self.settings
        self.tunnel_nets = {4: ipaddress.ip_network(s.tunnel_source) if s.tunnel_source else None,
                            6: ipaddress.ip_network(s.tunnel_source6) if s.tunnel_source6 else None}
        # IPv4: the prefix's bits; IPv6: those and every bit above the last 32 (CONFIG.md).
        self.tunnel_fixed = {f: (int(net.netmask) | (0 if f == 4 else ~0xFFFFFFFF & ((1 << 128) - 1)),
                                 int(net.network_address)) if net else (0, 1)
                             for f, net in self.tunnel_nets.items()}
        self.icmp_sources = {4: ipaddress.ip_address(s.icmp_source).packed if s.icmp_source else None,
                             6: ipaddress.ip_address(s.icmp_source6).packed if s.icmp_source6 else None}
        self.flows: dict[tuple, FlowState] = {}
        self.active: Counter = Counter()     # backend MAC (or ("?", VIP key)) -> TCP flows recorded, not closed
        self.vip_slot: dict[tuple, int] = {}  # learned from the first forward, then held to
        self.backend_slot: dict[bytes, int] = {}
        # backend's reply 5-tuple -> (VIP address, VIP port, client MAC, client port)
        self.nat_rev: dict[tuple, tuple] = {}
        self.nat_port: dict[tuple, int] = {}   # a client flow -> the source port it was remapped to
        self.outer_src: dict[tuple, bytes] = {}  # tunnel: the outer source each flow was given
        # persistence: (VIP key, masked client) -> the backend MAC its binding holds (None: no
        # packet has shown it yet). Bindings outlive conntrack (forget_flows keeps them).
        self.bound: dict[tuple, bytes | None] = {}
        self.known = None                     # set by judge(): a disagreement the issue tracker already has

    def forget_flows(self) -> None:
        """The kernel's conntrack and NAT reverse map were flushed: every flow is new
        again (active counts stay; a flow keeps its tunnel source, a function of the flow)."""
        self.flows.clear()
        self.nat_rev.clear()
        self.nat_port.clear()

    # -- rules 1..12 ----------------------------------------------------------
    def predict(self, frame: bytes) -> Prediction:
        f = frame
        n = len(f)
        # 1. Ethernet and up to two VLAN tags.
        if n < 14:
            return Prediction("FL_DROP_L2_TRUNCATED", "1: shorter than an Ethernet header", kind="pass")
        ethertype = (f[12] << 8) | f[13]
        off = 14
        tags = 0
        while ethertype in VLAN_TPIDS:
            if tags == self.max_vlan_tags:
                return Prediction("FL_PASS_VLAN_DEPTH", "1: a third VLAN tag", kind="pass")
            if n < off + 4:
                return Prediction("FL_DROP_L2_TRUNCATED", "1: ends inside a VLAN tag", kind="pass")
            ethertype = (f[off + 2] << 8) | f[off + 3]
            off += 4
            tags += 1
        left = n - off
        p = Parsed(l3=off)
        # 2, 3, 4, 5. IP.
        if ethertype == ETH_P_IP:
            if left < 20:
                return Prediction("FL_DROP_L3_MALFORMED", "3: IPv4 header cut", kind="pass")
            version, ihl = f[off] >> 4, f[off] & 15
            if version != 4 or ihl < 5:
                return Prediction("FL_DROP_L3_MALFORMED", "3: IPv4 version or IHL", kind="pass")
            hlen = 4 * ihl
            tot_len, frag = struct.unpack_from("!H2xH", f, off + 2)
            if hlen > left or tot_len < hlen or tot_len > left:
                return Prediction("FL_DROP_L3_MALFORMED", "3: IPv4 lengths", kind="pass")
            p.family, p.ip_header_len, p.proto = 4, hlen, f[off + 9]
            p.l3_len, p.df, p.tos = tot_len, bool(frag & 0x4000), f[off + 1]
            p.src, p.dst = f[off + 12:off + 16], f[off + 16:off + 20]
            p.l4, p.l4_len = off + hlen, tot_len - hlen
            to_vip = (4, p.dst) in self.vip_addresses
            if frag & self.fragment_bits:
                return self._miss(to_vip, "FL_DROP_FRAGMENT", "4: IPv4 fragment")
        elif ethertype == ETH_P_IPV6:
            if left < 40:
                return Prediction("FL_DROP_L3_MALFORMED", "3: IPv6 header cut", kind="pass")
            payload_len = (f[off + 4] << 8) | f[off + 5]
            if f[off] >> 4 != 6 or 40 + payload_len > left:
                return Prediction("FL_DROP_L3_MALFORMED", "3: IPv6 version or payload length", kind="pass")
            p.family, p.ip_header_len, p.proto = 6, 40, f[off + 6]
            p.l3_len = 40 + payload_len
            p.src, p.dst = f[off + 8:off + 24], f[off + 24:off + 40]
            p.l4, p.l4_len = off + 40, payload_len
            to_vip = (6, p.dst) in self.vip_addresses
            if p.proto in self.ipv6_ext_headers:
                return self._miss(to_vip, "FL_DROP_IPV6_EXTHDR", "5: IPv6 extension header")
        elif ethertype == ETH_P_ARP:
            return self._arp(f, off)
        else:
            return Prediction("FL_PASS_NOT_IP", "2: not IPv4 or IPv6", kind="pass")
        # 6. ICMP; 6b. neither TCP, UDP nor ICMP.
        if (p.family, p.proto) in ((4, IPPROTO_ICMP), (6, IPPROTO_ICMPV6)):
            return self._icmp(f, p, to_vip)
        if p.proto not in (IPPROTO_TCP, IPPROTO_UDP):
            return self._miss(to_vip, "FL_PASS_VIP_PORT", "6b: neither TCP, UDP nor ICMP")
        # 7. L4 header within the frame and the IP payload.
        in_frame = n - p.l4
        if p.proto == IPPROTO_TCP:
            bad = in_frame < 20 or p.l4_len < 20
            if not bad:
                hlen = 4 * (f[p.l4 + 12] >> 4)
                bad = hlen < 20 or hlen > in_frame or hlen > p.l4_len
        else:
            bad = in_frame < 8 or p.l4_len < 8
            if not bad:
                p.udp_len = (f[p.l4 + 4] << 8) | f[p.l4 + 5]
                bad = p.udp_len < 8 or p.udp_len > p.l4_len
        if bad:
            return self._miss(to_vip, "FL_DROP_L4_MALFORMED", "7: L4 header")
        p.sport, p.dport = struct.unpack_from("!HH", f, p.l4)
        if p.proto == IPPROTO_TCP:
            p.tcp_flags = f[p.l4 + 13]
        # 8. Broadcast or multicast.
        if f[0] & 1:
            return self._miss(to_vip, "FL_PASS_L2_NOT_UNICAST", "8: group destination MAC", p)
        flow = (p.family, p.src, p.dst, p.sport, p.dport, p.proto)
        # 9. Conntrack hit (the model's; the config never changes under the fuzzer).
        state = self.flows.get(flow)
        reopened = (state is not None and state.closing and p.proto == IPPROTO_TCP
                    and p.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN)
        if state is not None and not reopened:
            return self._forward(p, state.vip, flow, "9: conntrack hit", state.mac, hit=True)
        # 10. VIP lookup, else a NAT backend's reply.
        vip = self.by_key.get((p.family, p.dst, p.dport, p.proto))
        if vip is None:
            rev = self.nat_rev.get(flow) if self.nat_vips else None
            if rev is not None:
                return Prediction("FL_TX_NAT_REPLY", "10: a NAT backend's reply", p, flow=flow, kind="nat_reply",
                                  mode="nat-reply", rev=rev)
            return self._miss(to_vip, "FL_PASS_VIP_PORT", "10: no VIP on this port/protocol", p)
        # 11. New flow: its client's binding, else the algorithm's pick.
        if not self.eligible[vip.key]:
            return Prediction("FL_DROP_NO_BACKEND", "11: no backend of weight > 0", p, vip, kind="pass",
                              mode=vip.forwarding)
        bound = self.bound.get(self._client_key(vip, p.src))
        if bound is not None and bound in self.eligible[vip.key]:
            return self._forward(p, vip, flow, "11/12: new flow of a bound client", bound)
        return self._forward(p, vip, flow, "11/12: new flow", None)

    def _client_key(self, vip: Vip, src: bytes) -> tuple | None:
        """The binding key of a client of ``vip`` (its address masked to persistence_prefix), or None."""
        if not vip.persistence:
            return None
        bits = len(src) * 8
        prefix = bits if vip.persistence_prefix is None else vip.persistence_prefix
        prefix = max(0, prefix - self.persistence_prefix_cut)
        mask = ((1 << bits) - 1) ^ ((1 << (bits - prefix)) - 1)
        return vip.key, (int.from_bytes(src, "big") & mask).to_bytes(len(src), "big")

    def _forward(self, p: Parsed, vip: Vip, flow: tuple, rule: str, mac: bytes | None, hit: bool = False):
        """Rule 12 in the VIP's mode; a tunnel's MTU check included."""
        mode = vip.forwarding
        if mode == "tunnel":
            macs = [mac] if mac is not None else [min(self.eligible[vip.key])]
            family = self.backend_family[macs[0]]
            if p.l3_len + self.tunnel_overhead[family] > self.settings.mtu:
                source = self.icmp_sources[p.family]
                if source is not None and (p.family == 6 or (p.df and p.ip_header_len == 20)):
                    return Prediction("FL_TX_ICMP_TOO_BIG", rule + ", too big for the MTU once tunnelled", p, vip,
                                      mac, flow, "too_big", hit, mode)
                return Prediction("FL_DROP_TOO_BIG", rule + ", too big, no ICMP allowed", p, vip, mac, flow,
                                  "too_big", hit, mode)
            return Prediction("FL_TX_TUNNEL", rule, p, vip, mac, flow, "forward", hit, mode)
        reason = "FL_TX_NAT" if mode == "nat" else "FL_TX_DSR"
        return Prediction(reason, rule, p, vip, mac, flow, "forward", hit, mode)

    def _arp(self, f: bytes, off: int) -> Prediction:
        """Rule 2: an Ethernet/IPv4 ARP request for an announced VIP is answered."""
        if len(f) - off >= 28:
            htype, ptype, hlen, plen, oper = struct.unpack_from("!HHBBH", f, off)
            request = (htype, ptype, hlen, plen, oper) == (1, ETH_P_IP, 6, 4, 1)
            if request and (4, f[off + 24:off + 28]) in self.announced:
                return Prediction("FL_TX_ARP_REPLY", "2: ARP request for an announced VIP", Parsed(l3=off),
                                  kind="arp", mode="arp/nd")
        return Prediction("FL_PASS_NOT_IP", "2: ARP, not a request for an announced VIP", kind="pass", mode="arp/nd")

    def _icmp(self, f: bytes, p: Parsed, to_vip: bool) -> Prediction:
        """Rule 6."""
        whole = len(f) - p.l4 >= 8 and p.l4_len >= 8
        if p.family == 6 and whole and f[p.l4] == ND_SOLICIT:
            if len(f) >= p.l4 + 24 and f[p.l4 + 1] == 0 and f[p.l3 + 7] == 255 \
                    and (6, f[p.l4 + 8:p.l4 + 24]) in self.announced:
                return Prediction("FL_TX_ND_ADVERT", "6: neighbour solicitation for an announced VIP", p,
                                  kind="nd", mode="arp/nd")
            return Prediction("FL_PASS_NOT_VIP", "6: neighbour solicitation, not for an announced VIP", kind="pass",
                              mode="arp/nd")
        if not to_vip:
            return Prediction("FL_PASS_NOT_VIP", "6: ICMP, not to a VIP address", kind="pass")
        if f[0] & 1:
            return Prediction("FL_PASS_L2_NOT_UNICAST", "6: ICMP in a group frame", kind="pass", mode="icmp")
        if not whole:
            return Prediction("FL_PASS_VIP_PORT", "6: ICMP header cut", kind="pass", mode="icmp")
        icmp_type, code = f[p.l4], f[p.l4 + 1]
        if icmp_type == ICMP_ECHO[p.family] and code == 0:
            return Prediction("FL_TX_ICMP_ECHO", "6: echo request", p, kind="echo", mode="icmp")
        want_type, want_code = ICMP_TOO_BIG[p.family]
        if icmp_type == want_type and (want_code is None or code == want_code):
            flow = self._quoted_flow(f, p)
            state = self.flows.get(flow) if flow else None
            if state is not None and state.vip.forwarding != "nat":
                return Prediction("FL_TX_ICMP_TO_BACKEND", "6: too-big about a known flow", p, state.vip,
                                  state.mac, flow, kind="icmp_error", hit=True, mode="icmp")
            if state is not None:
                return Prediction("FL_PASS_VIP_PORT", "6: too-big about a NAT flow", kind="pass", mode="icmp")
            vip = self.by_key.get((flow[0], flow[2], flow[4], flow[5])) if flow else None
            if vip is not None and vip.forwarding != "nat" and self.eligible[vip.key]:
                # No entry: the ring slot of the flow's hash (a weight > 0 backend of the VIP).
                return Prediction("FL_TX_ICMP_TO_BACKEND", "6: too-big about an unrecorded flow", p, vip,
                                  None, flow, kind="icmp_error", hit=True, mode="icmp")
        return Prediction("FL_PASS_VIP_PORT", "6: other ICMP to a VIP address", kind="pass", mode="icmp")

    @staticmethod
    def _quoted_flow(f: bytes, p: Parsed) -> tuple | None:
        """The flow an ICMP error is about: the reverse of its quoted VIP-to-client header."""
        q = p.l4 + 8
        if p.family == 4:
            if len(f) < q + 20 + 4 or f[q] != 0x45:
                return None
            proto, src, dst, ports = f[q + 9], f[q + 12:q + 16], f[q + 16:q + 20], q + 20
        else:
            if len(f) < q + 40 + 4 or f[q] >> 4 != 6:
                return None
            proto, src, dst, ports = f[q + 6], f[q + 8:q + 24], f[q + 24:q + 40], q + 40
        if proto not in (IPPROTO_TCP, IPPROTO_UDP):
            return None
        sport, dport = struct.unpack_from("!HH", f, ports)
        return (p.family, dst, src, dport, sport, proto)

    @staticmethod
    def _miss(to_vip: bool, vip_reason: str, rule: str, parsed: Parsed | None = None) -> Prediction:
        if to_vip:
            return Prediction(vip_reason, rule, parsed, kind="pass")
        return Prediction("FL_PASS_NOT_VIP", rule + " (not a VIP address)", parsed, kind="pass")

    # -- expected bytes, from the rules ------------------------------------------
    def expect_tunnel(self, frame: bytes, p: Parsed, backend: Backend, outer_src: bytes) -> bytes:
        """Rule 12, tunnel: L2 to the backend (tags kept), the outer header, the inner packet unchanged."""
        family = self.backend_family[backend.mac]
        l2 = bytearray(frame[:p.l3])
        l2[0:6], l2[6:12] = backend.mac, frame[0:6]
        l2[-2:] = struct.pack("!H", ETH_P_IP if family == 4 else ETH_P_IPV6)
        proto = 4 if p.family == 4 else 41
        if family == 4:
            tos = p.tos if p.family == 4 else 0
            outer = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, tos, 20 + p.l3_len, 0, 0x4000, self.outer_ttl,
                                          proto, 0, outer_src, self.backend_packed[backend.mac]))
            outer[10:12] = checksum(bytes(outer))
        else:
            outer = struct.pack("!IHBB16s16s", 0x60000000, p.l3_len, proto, self.outer_ttl, outer_src,
                                self.backend_packed[backend.mac])
        return bytes(l2) + bytes(outer) + frame[p.l3:]

    def tunnel_source_problems(self, flow: tuple, family: int, src: bytes) -> list[str]:
        """The outer source: in tunnel_source(6), only its host bits (IPv6: of the last
        32 bits) drawn, and the same for every packet of the flow."""
        net = self.tunnel_nets[family]
        problems = []
        fixed = self.tunnel_fixed[family]    # (mask of the bits that must equal the prefix's, its value)
        if net is None or int.from_bytes(src, "big") & fixed[0] != fixed[1]:
            problems.append(f"outer source {ipaddress.ip_address(src)} outside tunnel_source"
                            f"{'' if family == 4 else '6'} {net}")
        known = self.outer_src.setdefault(flow, src)
        if known != src:
            problems.append(f"outer source {ipaddress.ip_address(src)} for a flow that had "
                            f"{ipaddress.ip_address(known)}")
        return problems

    def expect_too_big(self, frame: bytes, p: Parsed, outer: int) -> bytes:
        """Rule 12, tunnel, too big: the frame becomes an ICMP frag-needed / packet-too-big
        to the client (MACs swapped, tags kept) from icmp_source(6), TTL / hop limit 64,
        quoting the IP header and 8 bytes, reporting the MTU less the outer header."""
        l2 = bytearray(frame[:p.l3])
        l2[0:6], l2[6:12] = frame[6:12], frame[0:6]
        quote = frame[p.l3:p.l3 + p.ip_header_len + 8]
        mtu = self.settings.mtu - outer
        if p.family == 4:
            msg = bytearray(struct.pack("!BBHHH", 3, 4, 0, 0, mtu) + quote)
            msg[2:4] = checksum(bytes(msg))
            ip = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(msg), 0, 0, 64, IPPROTO_ICMP, 0,
                                       self.icmp_sources[4], p.src))
            ip[10:12] = checksum(bytes(ip))
        else:
            msg = bytearray(struct.pack("!BBHI", 2, 0, 0, mtu) + quote)
            src = self.icmp_sources[6]
            msg[2:4] = checksum(pseudo_header(6, src, p.src, IPPROTO_ICMPV6, len(msg)) + bytes(msg))
            ip = struct.pack("!IHBB16s16s", 0x60000000, len(msg), IPPROTO_ICMPV6, 64, src, p.src)
        return bytes(l2) + bytes(ip) + bytes(msg)

    def expect_arp_reply(self, frame: bytes, off: int) -> bytes:
        """RFC 826's reply, in place: "the VIP is at the interface's MAC"."""
        want = bytearray(frame)
        lb = self.settings.lb_mac
        want[0:6], want[6:12] = frame[6:12], lb
        want[off + 6:off + 8] = b"\x00\x02"
        want[off + 8:off + 14], want[off + 14:off + 18] = lb, frame[off + 24:off + 28]
        want[off + 18:off + 24], want[off + 24:off + 28] = frame[off + 8:off + 14], frame[off + 14:off + 18]
        return bytes(want)

    def expect_nd_advert(self, frame: bytes, p: Parsed) -> bytes:
        """RFC 4861 7.2.4: a solicited advertisement to the solicitation's source (to
        all nodes, unsolicited, when that is ::), override set, hop limit 255, the
        target link-layer address option holding the interface's MAC."""
        lb = self.settings.lb_mac
        target = frame[p.l4 + 8:p.l4 + 24]
        solicited = p.src != bytes(16)
        l2 = bytearray(frame[:p.l3])
        l2[0:6] = frame[6:12] if solicited else bytes.fromhex("333300000001")
        l2[6:12] = lb
        dst = p.src if solicited else ipaddress.ip_address("ff02::1").packed
        msg = bytearray(struct.pack("!BBHI16sBB6s", 136, 0, 0, 0x60000000 if solicited else 0x20000000, target,
                                    2, 1, lb))
        msg[2:4] = checksum(pseudo_header(6, target, dst, IPPROTO_ICMPV6, len(msg)) + bytes(msg))
        ip = frame[p.l3:p.l3 + 4] + struct.pack("!HBB16s16s", len(msg), IPPROTO_ICMPV6, 255, target, dst)
        return bytes(l2) + ip + bytes(msg)

    @staticmethod
    def rewrite_problems(frame: bytes, p: Parsed, out: bytes, destination: bool, addr: bytes, port: int,
                         macs: tuple[bytes, bytes], other_port: int | None = None) -> list[str]:
        """NAT (rule 10's reply, rule 12's forward): one end's address and port
        replaced (and the other end's port, when ``other_port`` is given), the MACs set, and the IPv4 header and TCP/UDP checksums updated
        incrementally: every checksummed sum stays what it was (so a bad checksum
        stays exactly as bad), an IPv4 UDP checksum of 0 stays 0, no other becomes 0."""
        if len(out) != len(frame):
            return [f"NAT rewrite of {len(frame)} bytes came out as {len(out)}"]
        want = bytearray(frame)
        want[0:6], want[6:12] = macs
        at = p.l3 + (16 if p.family == 4 else 24) if destination else p.l3 + (12 if p.family == 4 else 8)
        want[at:at + len(addr)] = addr
        want[p.l4 + (2 if destination else 0):p.l4 + (4 if destination else 2)] = struct.pack("!H", port)
        if other_port is not None:
            want[p.l4 + (0 if destination else 2):p.l4 + (2 if destination else 4)] = struct.pack("!H", other_port)
        ip_csum = p.l3 + 10 if p.family == 4 else None
        l4_csum = p.l4 + (16 if p.proto == IPPROTO_TCP else 6)
        for c in (ip_csum, l4_csum):
            if c is not None:
                want[c:c + 2] = out[c:c + 2]
        problems = []
        if bytes(want) != out:
            problems.append("NAT rewrite differs beyond its checksums: " + _diff(bytes(want), out))
            return problems
        if p.family == 4 and sum16(frame[p.l3:p.l3 + p.ip_header_len]) != sum16(out[p.l3:p.l3 + p.ip_header_len]):
            problems.append("IPv4 header checksum not updated incrementally")
        length = p.l4_len if p.proto == IPPROTO_TCP else p.udp_len
        was, now = frame[l4_csum:l4_csum + 2], out[l4_csum:l4_csum + 2]
        if p.proto == IPPROTO_UDP and p.family == 4 and was == b"\0\0":
            if now != b"\0\0":
                problems.append("an IPv4 UDP checksum of 0 (none) was filled in")
            return problems
        if p.proto == IPPROTO_UDP and now == b"\0\0":
            problems.append("a UDP checksum became 0")

        def l4_sum(fr: bytes) -> int:
            if p.family == 4:
                src, dst = fr[p.l3 + 12:p.l3 + 16], fr[p.l3 + 16:p.l3 + 20]
            else:
                src, dst = fr[p.l3 + 8:p.l3 + 24], fr[p.l3 + 24:p.l3 + 40]
            return sum16(pseudo_header(p.family, src, dst, p.proto, length) + fr[p.l4:p.l4 + length])
        if l4_sum(frame) != l4_sum(out):
            problems.append(f"{'TCP' if p.proto == IPPROTO_TCP else 'UDP'} checksum not updated incrementally")
        return problems

    # -- the judge --------------------------------------------------------------
    def judge(self, frame: bytes, pred: Prediction, verdict: int, out: bytes,
              reasons: dict[int, tuple], vips: dict[int, tuple], backends: dict[int, tuple],
              reason_ids: dict[str, int]) -> tuple[list[str], bool]:
        """Compare one run with ``pred``; returns (problems, mis-forwarded).

        ``reasons``/``vips``/``backends`` are the counter slots that moved, as
        slot -> (packets, bytes, new_flows) deltas. A mis-forward is a frame
        the kernel sent out that the rules do not send, or sent to the wrong
        backend, or changed otherwise than its rule says. ``self.known`` is set
        when the problems are a defect the issue tracker already has.
        """
        problems: list[str] = []
        self.known = None
        size = len(frame)
        if verdict != pred.verdict:
            problems.append(f"verdict {verdict}, expected {pred.verdict} ({pred.reason})")
        want = {reason_ids[pred.reason]: (1, size, 0)}
        if reasons != want:
            names = {v: k for k, v in reason_ids.items()}
            moved = {names.get(k, k): d for k, d in reasons.items()}
            problems.append(f"reason counters moved {moved}, expected {{{pred.reason}: (1, {size}, 0)}}")
        misforward = verdict == XDP_TX and pred.verdict != XDP_TX

        if pred.verdict == XDP_PASS and out != frame:
            problems.append("a passed frame was modified: " + _diff(frame, out))
        if pred.kind != "forward" or pred.verdict != XDP_TX or verdict != XDP_TX:
            if vips or backends:
                problems.append(f"vip/backend counters moved for a frame not forwarded: {vips} {backends}")
            if pred.kind == "forward" or (pred.kind == "too_big" and pred.hit):
                # rule 11 recorded it (rule 12's MTU check comes first: a too-big new flow is not
                # recorded); no packet shows the backend
                self._record(pred, pred.established)
            more = []
            if verdict == XDP_TX and pred.verdict == XDP_TX:
                more = self._judge_sent(frame, pred, out)
                problems += more
                misforward |= bool(more)
            return problems, misforward

        # Forwarded (rule 12): to an allowed backend of this VIP, bytes by its mode.
        vip, mac, p = pred.vip, out[0:6], pred.parsed
        if pred.established is not None:
            allowed, why = {pred.established}, "its conntrack backend"
        else:
            allowed, why = self.eligible[vip.key], "a weight > 0 backend of " + vip.name
        if mac not in allowed:
            member = "a backend of that VIP" if mac in self.members[vip.key] else "not a backend of that VIP"
            problems.append(f"forwarded to {_mac(mac)} ({member}), expected {why}: "
                            + ", ".join(sorted(_mac(m) for m in allowed)))
            misforward = True
        backend = self.backend_of.get(mac)
        if backend is not None:
            more = self._forward_bytes(frame, pred, backend, out)
            problems += more
            misforward |= bool(more)
        new = 0 if pred.hit else 1
        problems += self._check_slot(self.vip_slot, vip.key, vips, (1, size, new), "vip_stats", vip.name)
        problems += self._check_slot(self.backend_slot, mac, backends, (1, size, new), "backend_stats", _mac(mac))
        # Even a wrong backend: it is what the kernel's conntrack now holds (no backend at all: unknown).
        self._record(pred, mac if backend is not None else None)
        return problems, misforward

    def _forward_bytes(self, frame: bytes, pred: Prediction, backend: Backend, out: bytes) -> list[str]:
        p, vip = pred.parsed, pred.vip
        if vip.forwarding == "dsr":
            problems = []
            if len(out) != len(frame) or out[6:12] != frame[0:6] or out[12:] != frame[12:]:
                problems.append("forwarded frame changed beyond the two MACs: " + _diff(frame, out))
            if len(out) == len(frame) and checksum_state(frame, p) != checksum_state(out, p):
                problems.append(f"checksums changed validity: {checksum_state(frame, p)} -> "
                                f"{checksum_state(out, p)}")
            return problems
        if vip.forwarding == "tunnel":
            return self._tunnel_problems(frame, p, pred.flow, backend, out)
        port = backend.port if backend.port is not None and self.nat_remaps_port else vip.port
        packed = self.backend_packed[backend.mac]
        problems = []
        sport = self._nat_source_port(p, pred.flow, packed, backend.port or vip.port, out)
        if sport is None:
            problems.append(f"NAT source port toward the backend {struct.unpack_from('!H', out, p.l4)[0]} "
                            f"is held by another connection (client port {p.sport})")
            sport = p.sport
        problems += self.rewrite_problems(frame, p, out, True, packed, port, (backend.mac, frame[0:6]), sport)
        rkey = (p.family, packed, p.src, backend.port or vip.port, sport, p.proto)
        self.nat_rev.setdefault(rkey, (p.dst, p.dport, frame[6:12], p.sport))   # inserted once, kept
        return problems

    def _nat_source_port(self, p: Parsed, flow: tuple, backend: bytes, bport: int, out: bytes) -> int | None:
        """The source port toward the backend (rule 12, NAT): every translated tuple
        stays unique. The client's own port unless another connection's reverse
        entry holds it; then the port this flow was given before, if still its
        own, else any free port in 1024..65535 (which one is the kernel's hash:
        read from ``out``). None when the kernel's choice breaks the rule."""
        def owner(port: int):
            rev = self.nat_rev.get((p.family, backend, p.src, bport, port, p.proto))
            return None if rev is None else (rev[0], rev[1], rev[3])
        me = (p.dst, p.dport, p.sport)
        if owner(p.sport) == me:
            return p.sport
        mapped = self.nat_port.get(flow)
        if mapped is not None and owner(mapped) in (None, me):
            return mapped
        if mapped is None and owner(p.sport) is None:
            return p.sport
        got = struct.unpack_from("!H", out, p.l4)[0] if len(out) >= p.l4 + 2 else -1
        if not 1024 <= got <= 65535 or owner(got) not in (None, me):
            return None
        self.nat_port[flow] = got
        return got

    def _tunnel_problems(self, frame: bytes, p: Parsed, flow: tuple, backend: Backend, out: bytes) -> list[str]:
        family = self.backend_family[backend.mac]
        at = p.l3 + (12 if family == 4 else 8)
        src = out[at:at + (4 if family == 4 else 16)]
        if len(src) != (4 if family == 4 else 16):
            return [f"tunnelled frame of {len(out)} bytes has no outer header"]
        problems = self.tunnel_source_problems(flow, family, src)
        want = self.expect_tunnel(frame, p, backend, src)
        if want != out:
            problems.append("tunnelled frame differs from the rule: " + _diff(want, out))
        return problems

    def _judge_sent(self, frame: bytes, pred: Prediction, out: bytes) -> list[str]:
        """The frames rules 2, 6 and 10 send, and rule 12's ICMP too-big."""
        p = pred.parsed
        if pred.kind == "echo":
            return self._judge_echo(frame, p, out)
        if pred.kind == "arp":
            want = self.expect_arp_reply(frame, p.l3)
            return [] if out == want else ["ARP reply differs from RFC 826's: " + _diff(want, out)]
        if pred.kind == "nd":
            want = self.expect_nd_advert(frame, p)
            return [] if out == want else ["neighbour advertisement differs from the rule: " + _diff(want, out)]
        if pred.kind == "too_big":
            outer = self.tunnel_overhead[self.backend_family[pred.established or min(self.eligible[pred.vip.key])]]
            want = self.expect_too_big(frame, p, outer)
            return [] if out == want else ["ICMP too-big differs from the rule: " + _diff(want, out)]
        if pred.kind == "nat_reply":
            vip_addr, vip_port, client_mac, client_port = pred.rev
            port = vip_port if self.nat_reply_restores_port else p.sport
            return self.rewrite_problems(frame, p, out, False, vip_addr, port, (client_mac, frame[0:6]),
                                         client_port)
        if pred.kind == "icmp_error":
            mac = out[0:6]
            allowed = {pred.established} if pred.established else self.eligible[pred.vip.key]
            if mac not in allowed:
                return [f"ICMP error sent to {_mac(mac)}, not to its flow's backend"]
            if pred.vip.forwarding == "tunnel":
                problems = self._tunnel_problems(frame, p, pred.flow, self.backend_of[mac], out)
            elif len(out) != len(frame) or out[6:12] != frame[0:6] or out[12:] != frame[12:]:
                problems = ["ICMP error not sent to its flow's backend unchanged: " + _diff(frame, out)]
            else:
                problems = []
            if not problems and pred.established is None and pred.flow in self.flows:
                self._learn(pred.flow, mac)
            return problems
        return [f"sent a frame of kind {pred.kind}"]

    @staticmethod
    def _judge_echo(frame: bytes, p: Parsed, out: bytes) -> list[str]:
        """The echo reply: MACs and addresses swapped, TTL/hop limit 64, type 0/129,
        every checksum exactly as valid as in the request."""
        if len(out) != len(frame):
            return [f"echo reply of {len(out)} bytes for a request of {len(frame)}"]
        want = bytearray(frame)
        want[0:6], want[6:12] = frame[6:12], frame[0:6]
        a = p.l3
        if p.family == 4:
            want[a + 12:a + 16], want[a + 16:a + 20] = frame[a + 16:a + 20], frame[a + 12:a + 16]
            want[a + 8] = 64
            want[a + 10:a + 12] = out[a + 10:a + 12]  # checksums: judged by validity below
            want[p.l4] = 0
        else:
            want[a + 8:a + 24], want[a + 24:a + 40] = frame[a + 24:a + 40], frame[a + 8:a + 24]
            want[a + 7] = 64
            want[p.l4] = 129
        want[p.l4 + 2:p.l4 + 4] = out[p.l4 + 2:p.l4 + 4]
        problems = []
        if bytes(want) != out:
            problems.append("echo reply differs beyond its checksums: " + _diff(bytes(want), out))

        def valid(fr: bytes) -> tuple:
            msg = fr[p.l4:p.l4 + p.l4_len]
            if p.family == 4:
                return (ones_sum(fr[a:a + p.ip_header_len]) == 0xFFFF, ones_sum(msg) == 0xFFFF)
            src, dst = fr[a + 8:a + 24], fr[a + 24:a + 40]
            return (None, ones_sum(pseudo_header(6, src, dst, IPPROTO_ICMPV6, len(msg)) + msg) == 0xFFFF)
        if valid(frame) != valid(out):
            problems.append(f"echo checksums changed validity: {valid(frame)} -> {valid(out)}")
        return problems

    @staticmethod
    def _check_slot(slots: dict, owner, moved: dict[int, tuple], want: tuple, table: str, name: str) -> list[str]:
        """Exactly one slot moved by ``want``; the same slot as before for this owner, another owner's never."""
        if len(moved) != 1:
            return [f"{table}: {len(moved)} slots moved ({moved}), expected one, for {name}"]
        (slot, delta), = moved.items()
        problems = []
        if delta != want:
            problems.append(f"{table}[{slot}] moved by {delta}, expected {want} for {name}")
        known = slots.get(owner)
        if known is None:
            if slot in slots.values():
                problems.append(f"{table}[{slot}] counted {name}, but it counts another")
            else:
                slots[owner] = slot
        elif known != slot:
            problems.append(f"{table}[{slot}] counted {name}, whose slot is {known}")
        return problems

    def _record(self, pred: Prediction, mac: bytes | None) -> None:
        """The conntrack rules (9, 11, Counters: backend_active) once rule 11 or 12 ran.
        ``mac`` is None when no packet shows the backend (rule 12 sent none)."""
        fin_rst = bool(pred.parsed.tcp_flags & (TCP_FIN | TCP_RST)) if pred.parsed.proto == IPPROTO_TCP else False
        state = self.flows.get(pred.flow)
        tcp = pred.parsed.proto == IPPROTO_TCP
        syn_only = tcp and pred.parsed.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN
        ack_only = tcp and pred.parsed.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_ACK
        if state is None or not pred.hit:  # a new flow, or a SYN that reopened a closed flow's entry
            self.flows[pred.flow] = FlowState(mac, pred.vip, False, fin_rst, syn=syn_only and not fin_rst,
                                              established=tcp and not fin_rst and not syn_only)
            client = self._client_key(pred.vip, pred.parsed.src)
            if client is not None and self.bound.get(client) is None:
                self.bound[client] = mac      # a recorded new flow binds its client (or shows whom to)
            return
        if mac is not None:
            self._learn(pred.flow, mac)
        if fin_rst and not state.closing:
            state.closing = True
            if state.counted:
                self.active[self._active_key(state.mac, state.vip)] -= 1
        elif ack_only and not fin_rst and not state.established and not state.closing:
            state.established = True
            if state.syn:  # a flow seen from its SYN counts from its first ACK
                state.counted = True
                self.active[self._active_key(state.mac, state.vip)] += 1

    @staticmethod
    def _active_key(mac: bytes | None, vip: Vip):
        return mac if mac is not None else ("?", vip.key)

    def _learn(self, flow: tuple, mac: bytes) -> None:
        """A recorded flow whose backend no packet had shown yet has shown it."""
        state = self.flows[flow]
        if state.mac is None:
            if state.counted and not state.closing:
                self.active[("?", state.vip.key)] -= 1
                self.active[mac] += 1
            state.mac = mac


def _mac(b: bytes) -> str:
    return ":".join(f"{x:02x}" for x in b)


def _diff(a: bytes, b: bytes) -> str:
    if len(a) != len(b):
        return f"length {len(a)} -> {len(b)}"
    at = [i for i in range(len(a)) if a[i] != b[i]]
    return f"bytes changed at offsets {at[:16]}{' ...' if len(at) > 16 else ''}"


# ---- reading per-CPU counters fast ----------------------------------------------

_SYS_BPF = {"x86_64": 321, "aarch64": 280}.get(os.uname().machine, 321)
_BPF_MAP_LOOKUP_BATCH = 24
_ENOENT = 2


class _BatchAttr(ctypes.Structure):
    # union bpf_attr, the `batch` member (include/uapi/linux/bpf.h)
    _fields_ = [("in_batch", ctypes.c_uint64), ("out_batch", ctypes.c_uint64),
                ("keys", ctypes.c_uint64), ("values", ctypes.c_uint64), ("count", ctypes.c_uint32),
                ("map_fd", ctypes.c_uint32), ("elem_flags", ctypes.c_uint64), ("flags", ctypes.c_uint64)]


def possible_cpus() -> int:
    text = Path("/sys/devices/system/cpu/possible").read_text().strip()
    total = 0
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        total += int(hi or lo) - int(lo) + 1
    return total


class CounterMoves:
    """Which slots of a per-CPU ``struct fl_counter`` array moved since the last read.

    One BPF_MAP_LOOKUP_BATCH of the whole array per read; slots are compared
    as raw bytes first, and only the ones that differ are summed.
    """

    def __init__(self, fd: int, slots: int, ncpus: int):
        self.slots, self.ncpus = slots, ncpus
        self.stride = 24 * ncpus                      # packets, bytes, new_flows (u64) per CPU
        self.keys = (ctypes.c_uint32 * slots)()
        self.values = ctypes.create_string_buffer(self.stride * slots)
        self.out_batch = ctypes.c_uint32()
        self.attr = _BatchAttr(out_batch=ctypes.addressof(self.out_batch), keys=ctypes.addressof(self.keys),
                               values=ctypes.addressof(self.values), map_fd=fd)
        self.attr_ref = ctypes.byref(self.attr)
        self.libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        self.libc.syscall.restype = ctypes.c_long
        self.last = self._read()

    def _read(self) -> bytes:
        self.attr.count = self.slots
        rc = self.libc.syscall(_SYS_BPF, _BPF_MAP_LOOKUP_BATCH, self.attr_ref, ctypes.sizeof(self.attr))
        if rc < 0:
            err = ctypes.get_errno()
            if err != _ENOENT or self.attr.count != self.slots:
                raise OSError(err, f"BPF_MAP_LOOKUP_BATCH: {os.strerror(err)} ({self.attr.count} slots)")
        return self.values.raw

    def totals(self, raw: bytes | None = None) -> list[tuple[int, int, int]]:
        raw = self.last if raw is None else raw
        return [self._sum(raw, i) for i in range(self.slots)]

    def _sum(self, raw: bytes, slot: int) -> tuple[int, int, int]:
        words = memoryview(raw)[slot * self.stride:(slot + 1) * self.stride].cast("Q")
        return sum(words[0::3]), sum(words[1::3]), sum(words[2::3])

    def moves(self) -> dict[int, tuple[int, int, int]]:
        raw = self._read()
        last, self.last = self.last, raw
        if raw == last:
            return {}
        out = {}
        s = self.stride
        for i in range(self.slots):
            if raw[i * s:(i + 1) * s] != last[i * s:(i + 1) * s]:
                a, b = self._sum(raw, i), self._sum(last, i)
                out[i] = (a[0] - b[0], a[1] - b[1], a[2] - b[2])
        return out


# ---- the campaign: the real program against the model ------------------------------

@dataclass
class Report:
    seed: int
    packets: int = 0
    disagreements: int = 0
    misforwards: int = 0
    seconds: float = 0.0
    reasons: Counter = field(default_factory=Counter)         # the oracle's reasons (= the kernel's when all agree)
    rules: Counter = field(default_factory=Counter)
    forwarded: Counter = field(default_factory=Counter)       # new / established, and the checksum states kept
    modes: Counter = field(default_factory=Counter)           # frames per mode (MODES)
    mode_disagreements: Counter = field(default_factory=Counter)
    mode_misforwards: Counter = field(default_factory=Counter)
    known: Counter = field(default_factory=Counter)           # disagreements the issue tracker already has
    tunnel_sources: set = field(default_factory=set)
    flushes: int = 0
    active_problems: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)         # the first few, in full

    @property
    def rate(self) -> float:
        return self.packets / self.seconds if self.seconds else 0.0

    def mode_table(self) -> list[str]:
        lines = [f"  {'mode':10} {'frames':>10} {'disagreements':>14} {'mis-forwards':>13}"]
        lines += [f"  {m:10} {self.modes[m]:>10,} {self.mode_disagreements[m]:>14} {self.mode_misforwards[m]:>13}"
                  for m in MODES]
        return lines

    def summary(self) -> str:
        lines = [f"seed {self.seed}: {self.packets:,} packets fuzzed in {self.seconds:.1f} s "
                 f"({self.rate:,.0f} packets/s)",
                 f"disagreements with the oracle: {self.disagreements}",
                 f"mis-forwards: {self.misforwards}",
                 f"backend_active mismatches: {len(self.active_problems)}",
                 f"conntrack flushes (to stay below eviction): {self.flushes}",
                 "per mode (the rule that decided: dsr/tunnel/nat = to a VIP of that mode, nat-reply = "
                 "rule 10's reverse path, arp/nd = ARP and neighbour solicitations, icmp = rule 6, "
                 "other = every other verdict):"]
        lines += self.mode_table()
        lines += [f"known disagreements (tracked elsewhere, not counted above): {sum(self.known.values())}"]
        lines += [f"  {n:>8,}  {k}" for k, n in self.known.items()]
        lines.append(f"distinct tunnel outer sources: {len(self.tunnel_sources)}")
        lines.append("per reason:")
        lines += [f"  {name:24} {count:>10,}" for name, count in sorted(self.reasons.items())]
        lines.append("forwarded frames:")
        lines += [f"  {name:24} {count:>10,}" for name, count in sorted(self.forwarded.items())]
        lines += self.active_problems[:5] + self.failures
        return "\n".join(lines)


def describe(frame: bytes) -> str:
    """A scapy dissection of ``frame``, for a failure report (scapy is imported only here)."""
    try:
        from scapy.layers.l2 import Ether
        return Ether(frame).show(dump=True)
    except Exception as exc:  # scapy's own dissection can fail on odd bytes; say so, keep the report
        return f"(scapy could not dissect it: {exc!r})"


class TestDevice:
    """A veth pair of this run, down, whose first end the fuzzed frames arrive on
    (BPF_PROG_TEST_RUN's ingress_ifindex), so that the tunnel's MTU check has
    a real MTU to measure against. Removed on exit, even after a failure."""

    __test__ = False   # not a pytest class

    def __init__(self, mtu: int, name: str | None = None):
        self.name = name or f"flfz{os.getpid() % 10_000_000}"
        self.mtu = mtu
        self.ifindex = 0

    def __enter__(self) -> "TestDevice":
        import socket
        import subprocess
        subprocess.run(["ip", "link", "add", self.name, "mtu", str(self.mtu), "type", "veth", "peer", "name",
                        self.name + "p"], check=True, capture_output=True)
        self.ifindex = socket.if_nametoindex(self.name)
        return self

    def __exit__(self, *exc) -> None:
        import subprocess
        subprocess.run(["ip", "link", "del", self.name], capture_output=True)


class Campaign:
    """Feeds frames to a loaded program (fastlb.testing.testbed.Testbed) and judges each one.

    ``bed`` must already hold the config the oracle models, with an empty
    conntrack. Counters are read through their own file descriptors. Frames
    arrive on ``ifindex`` (a TestDevice) when given, else on lo.
    """

    def __init__(self, bed, oracle: Oracle, seed: int, keep_failures: int = 5, ifindex: int = 0):
        from fastlb.testing import _testrun  # the compiled BPF_PROG_TEST_RUN call: only the kernel side
        self.run_frame = _testrun.run
        self.ifindex = ifindex
        self.bed, self.oracle = bed, oracle
        self.fd = bed.fd
        self.reason_ids = read_reasons()
        ncpus = possible_cpus()
        fds = bed.maps.fds
        self.reasons = CounterMoves(fds["reason_stats"], len(self.reason_ids), ncpus)
        self.vip_counters = CounterMoves(fds["vip_stats"], bed.sizes.max_vips, ncpus)
        self.backend_counters = CounterMoves(fds["backend_stats"], bed.sizes.max_backends, ncpus)
        # Conntrack is one LRU of 2 x conntrack_size entries for the box: flush at a quarter of it.
        self.flow_limit = bed.sizes.conntrack_size // 2
        self.active_base = self._active()
        self.report = Report(seed)
        self.keep_failures = keep_failures

    def _active(self) -> list[int]:
        return self.bed.maps.read_u32_slice("backend_active", 0, self.bed.sizes.max_backends)

    def feed(self, frames) -> Report:
        rep, oracle, run, fd, ifindex = self.report, self.oracle, self.run_frame, self.fd, self.ifindex
        start = time.perf_counter()
        for frame in frames:
            if len(oracle.flows) >= self.flow_limit:
                self.flush()
            pred = oracle.predict(frame)
            verdict, out, _ = run(fd, frame, ingress_ifindex=ifindex)
            problems, misforward = oracle.judge(frame, pred, verdict, out, self.reasons.moves(),
                                                self.vip_counters.moves(), self.backend_counters.moves(),
                                                self.reason_ids)
            rep.packets += 1
            rep.reasons[pred.reason] += 1
            rep.rules[pred.rule] += 1
            rep.modes[pred.mode] += 1
            if pred.kind == "forward" and not problems:
                state = checksum_state(frame, pred.parsed)
                rep.forwarded["established" if pred.hit else "new flow"] += 1
                rep.forwarded[f"ip csum {'-' if state.ip is None else 'ok' if state.ip else 'bad'}, "
                              f"l4 csum {'none' if state.l4 is None else 'ok' if state.l4 else 'bad'}"] += 1
                if pred.reason == "FL_TX_TUNNEL":
                    rep.tunnel_sources.add(oracle.outer_src.get(pred.flow))
            if problems and oracle.known:
                rep.known[oracle.known] += 1
            elif problems:
                rep.disagreements += 1
                rep.misforwards += misforward
                rep.mode_disagreements[pred.mode] += 1
                rep.mode_misforwards[pred.mode] += misforward
                if len(rep.failures) < self.keep_failures:
                    rep.failures.append(self._failure(rep.packets - 1, frame, pred, verdict, out, problems))
        rep.seconds += time.perf_counter() - start
        return rep

    def flush(self) -> None:
        self.check_active()
        self.bed.flush_conntrack()
        for table in ("nat_rev", "nat_port"):
            for key in list(self.bed.maps.keys(table)):
                self.bed.maps.delete(table, key)
        self.oracle.forget_flows()
        self.report.flushes += 1

    def check_active(self) -> list[str]:
        """backend_active per backend == the model's open TCP flows (Counters in DATAPLANE.md).
        Flows recorded without a packet showing their backend (a tunnel's too-big SYN)
        are checked as a sum over their VIP's backends."""
        now = self._active()
        oracle = self.oracle
        slot_of = oracle.backend_slot
        want = {slot: self.active_base[slot] + sum(oracle.active[m] for m, s in slot_of.items() if s == slot)
                for slot in range(len(now))}
        loose: set[int] = set()
        problems = []
        for vip in oracle.vips:
            unknown = oracle.active[("?", vip.key)]
            if unknown:
                slots = {slot_of[b.mac] for b in vip.backends if b.mac in slot_of}
                unseen = [b for b in vip.backends if b.mac not in slot_of]
                loose |= slots
                if unseen:
                    continue   # a backend no frame was seen to reach: its slot is unknown
                got, expect = sum(now[s] for s in slots), sum(want[s] for s in slots) + unknown
                if got != expect:
                    problems.append(f"backend_active of {vip.name}'s backends sum to {got}, the model says {expect}")
        for slot in range(len(now)):
            if slot in loose:
                continue
            macs = [m for m, s in slot_of.items() if s == slot]
            if now[slot] != want[slot] and (macs or now[slot] != self.active_base[slot]):
                problems.append(f"backend_active[{slot}] ({', '.join(_mac(m) for m in macs) or 'unused'}) "
                                f"is {now[slot]}, the model says {want[slot]}")
        self.report.active_problems += problems
        return problems

    def _failure(self, index, frame, pred, verdict, out, problems) -> str:
        return "\n".join([
            f"--- disagreement: seed {self.report.seed}, packet #{index} (in feed order), mode {pred.mode}",
            f"oracle: {pred.reason} by rule {pred.rule}; kernel verdict {verdict}",
            *("  " + p for p in problems),
            f"frame ({len(frame)} bytes): {frame.hex()}",
            f"output: {out.hex()}" if out != frame else "output: unchanged",
            describe(frame)])
