"""The packet tables' shared part: the config, frame builders, the rows and the expected backend.

Used by tests/bpf/test_packets.py and tests/bpf/test_packets_modes.py.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Callable

from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import IPv6, IPv6ExtHdrHopByHop
from scapy.layers.l2 import ARP, Dot1AD, Dot1Q, Ether
from scapy.packet import Raw

from fastlb import core
from fastlb.dataplane.tables import ring_positions
from fastlb.kernel import cdefs

LB_MAC = "02:00:00:00:00:02"
CLIENT_MAC = "02:00:00:00:00:01"
VIP4, VIP6 = "198.19.0.100", "2001:db8:ffff::100"
EMPTY_VIP4 = "198.19.0.101"
CLIENT4, CLIENT6 = "198.18.0.1", "2001:db8::1"

CONFIG = f"""
[settings]
ring_size = 65537
max_vips = 8
max_backends = 64
conntrack_size = 4096

[[vip]]
address = "{VIP4}"
port = 80
protocol = "tcp"
[[vip.backend]]
address = "198.18.0.11"
[[vip.backend]]
address = "198.18.0.12"
[[vip.backend]]
address = "198.18.0.13"

[[vip]]
address = "{VIP4}"
port = 53
protocol = "udp"
[[vip.backend]]
address = "198.18.0.11"
[[vip.backend]]
address = "198.18.0.12"

[[vip]]
address = "{VIP6}"
port = 80
protocol = "tcp"
[[vip.backend]]
address = "2001:db8::11"
[[vip.backend]]
address = "2001:db8::12"
[[vip.backend]]
address = "2001:db8::13"

[[vip]]
address = "{VIP6}"
port = 53
protocol = "udp"
[[vip.backend]]
address = "2001:db8::11"
[[vip.backend]]
address = "2001:db8::12"

[[vip]]
address = "{EMPTY_VIP4}"
port = 80
protocol = "tcp"
[[vip.backend]]
address = "198.18.0.21"
weight = 0

[[vip]]
address = "{VIP4}"
port = 8080
protocol = "http"
[[vip.backend]]
address = "198.18.0.31"
port = 9000
"""


def eth() -> Ether:
    return Ether(src=CLIENT_MAC, dst=LB_MAC)


def v4(dst=VIP4, **kw) -> IP:
    return IP(src=CLIENT4, dst=dst, **kw)


def v6(dst=VIP6, **kw) -> IPv6:
    return IPv6(src=CLIENT6, dst=dst, **kw)


def tcp(dport=80, sport=40000, flags="S") -> TCP:
    return TCP(sport=sport, dport=dport, flags=flags)


def udp(dport=53, sport=40000) -> UDP:
    return UDP(sport=sport, dport=dport)


# ---- the model: which backend a new flow gets --------------------------------

def flow_of(pkt):
    ip = pkt[IP] if IP in pkt else pkt[IPv6]
    l4 = pkt[TCP] if TCP in pkt else pkt[UDP]
    addr = ipaddress.ip_address
    return (addr(ip.src).packed, addr(ip.dst).packed, l4.sport, l4.dport, 6 if TCP in pkt else 17)


def expected_backend(config, sizes, pkt) -> str:
    src, dst, sport, dport, proto = flow_of(pkt)
    for vip in config.vips:
        if vip.address.packed == dst and vip.serves(dport) and vip.proto_number == proto:
            mode = cdefs.FL_HASH_SRC if vip.hash == "src" else cdefs.FL_HASH_5TUPLE
            h = core.flow_hash(src, dst, sport, dport, proto, sizes.hash_seed, mode)
            pos = ring_positions(vip, sizes)[h % sizes.ring_size]
            return str(vip.backends[pos].address)
    raise AssertionError("packet is not for a configured VIP")


# ---- the rows -------------------------------------------------------------------

@dataclass
class Row:
    desc: str
    packet: Callable[[], object]
    reason: str
    # "same": output byte-identical; "dsr": the DSR rewrite rule; None: no output check (drops)
    expect: str | None


def truncated(pkt, length):
    return lambda: Raw(bytes(pkt)[:length])


BASE4 = eth() / v4() / tcp() / Raw(b"x" * 8)
BASE6 = eth() / v6() / tcp() / Raw(b"x" * 8)

ROWS = [
    Row("IPv4 TCP SYN to a VIP", lambda: eth() / v4() / tcp(), "FL_TX_DSR", "dsr"),
    Row("IPv4 TCP ACK with payload to a VIP", lambda: eth() / v4() / tcp(flags="A") / Raw(b"GET /"), "FL_TX_DSR", "dsr"),
    Row("IPv4 UDP to a VIP", lambda: eth() / v4() / udp() / Raw(b"q"), "FL_TX_DSR", "dsr"),
    Row("IPv6 TCP to a VIP", lambda: eth() / v6() / tcp(), "FL_TX_DSR", "dsr"),
    Row("IPv6 UDP to a VIP", lambda: eth() / v6() / udp() / Raw(b"q"), "FL_TX_DSR", "dsr"),
    Row("IPv4 with options (IHL 6) to a VIP",
        lambda: eth() / v4(options=[b"\x01\x01\x01\x00"]) / tcp(), "FL_TX_DSR", "dsr"),
    Row("802.1Q-tagged IPv4 TCP to a VIP", lambda: eth() / Dot1Q(vlan=10) / v4() / tcp(), "FL_TX_DSR", "dsr"),
    Row("QinQ (802.1ad + 802.1Q) IPv6 UDP to a VIP",
        lambda: eth() / Dot1AD(vlan=20) / Dot1Q(vlan=10) / v6() / udp(), "FL_TX_DSR", "dsr"),
    Row("three VLAN tags", lambda: eth() / Dot1AD(vlan=1) / Dot1Q(vlan=2) / Dot1Q(vlan=3) / v4() / tcp(),
        "FL_PASS_VLAN_DEPTH", "same"),
    Row("ARP request", lambda: Ether(src=CLIENT_MAC, dst="ff:ff:ff:ff:ff:ff") / ARP(pdst=VIP4, psrc=CLIENT4),
        "FL_PASS_NOT_IP", "same"),
    Row("IPv4 TCP to the LB's own SSH", lambda: eth() / v4(dst="198.18.0.2") / tcp(dport=22), "FL_PASS_NOT_VIP", "same"),
    Row("IPv6 TCP to another host", lambda: eth() / v6(dst="2001:db8::2") / tcp(dport=22), "FL_PASS_NOT_VIP", "same"),
    Row("IPv4 ICMP echo to a non-VIP", lambda: eth() / v4(dst="198.18.0.2") / ICMP(), "FL_PASS_NOT_VIP", "same"),
    Row("VIP address, TCP port with no VIP", lambda: eth() / v4() / tcp(dport=81), "FL_PASS_VIP_PORT", "same"),
    Row("VIP address, UDP on the TCP-only port", lambda: eth() / v4() / udp(dport=80), "FL_PASS_VIP_PORT", "same"),
    Row("VIP address, ICMP timestamp request", lambda: eth() / v4() / ICMP(type=13), "FL_PASS_VIP_PORT", "same"),
    Row("IPv6 VIP address, TCP port with no VIP", lambda: eth() / v6() / tcp(dport=443), "FL_PASS_VIP_PORT", "same"),
    Row("VIP packet in a broadcast frame",
        lambda: Ether(src=CLIENT_MAC, dst="ff:ff:ff:ff:ff:ff") / v4() / tcp(), "FL_PASS_L2_NOT_UNICAST", "same"),
    Row("frame cut inside the VLAN tag", lambda: Raw(bytes(eth() / Dot1Q(vlan=10) / v4() / tcp())[:16]),
        "FL_DROP_L2_TRUNCATED", None),
    Row("IPv4 frame cut after the Ethernet header", truncated(BASE4, 14), "FL_DROP_L3_MALFORMED", None),
    Row("IPv4 frame cut inside the IP header", truncated(BASE4, 14 + 10), "FL_DROP_L3_MALFORMED", None),
    Row("IPv4 frame cut after the IP header", truncated(BASE4, 14 + 20), "FL_DROP_L3_MALFORMED", None),
    Row("IPv4 frame cut inside the TCP header", truncated(BASE4, 14 + 20 + 10), "FL_DROP_L3_MALFORMED", None),
    Row("IPv6 frame cut inside the IPv6 header", truncated(BASE6, 14 + 20), "FL_DROP_L3_MALFORMED", None),
    Row("IPv6 frame cut inside the TCP header", truncated(BASE6, 14 + 40 + 10), "FL_DROP_L3_MALFORMED", None),
    Row("IPv4 total length ends inside the TCP header (consistent lengths)",
        lambda: eth() / v4(len=20 + 12, proto=6) / Raw(bytes(tcp())[:12]), "FL_DROP_L4_MALFORMED", None),
    Row("IPv4 payload ends inside the TCP header, frame padded to 60 bytes",
        lambda: eth() / v4(len=20 + 12, proto=6) / Raw(bytes(tcp())[:12] + b"\0" * 14), "FL_DROP_L4_MALFORMED", None),
    Row("UDP length beyond the IP payload", lambda: eth() / v4() / UDP(sport=1, dport=53, len=200),
        "FL_DROP_L4_MALFORMED", None),
    Row("IPv6 payload length ends inside the UDP header",
        lambda: eth() / v6(nh=17, plen=4) / Raw(bytes(udp())[:4]), "FL_DROP_L4_MALFORMED", None),
    Row("TCP data offset below 5", lambda: eth() / v4() / TCP(sport=1, dport=80, dataofs=4), "FL_DROP_L4_MALFORMED", None),
    Row("UDP length field below 8", lambda: eth() / v4() / UDP(sport=1, dport=53, len=7), "FL_DROP_L4_MALFORMED", None),
    Row("IPv4 IHL 4", lambda: eth() / v4(ihl=4) / tcp(), "FL_DROP_L3_MALFORMED", None),
    Row("IPv4 total length beyond the frame", lambda: eth() / v4(len=400) / tcp(), "FL_DROP_L3_MALFORMED", None),
    Row("IPv4 header claiming version 6", lambda: eth() / v4(version=6) / tcp(), "FL_DROP_L3_MALFORMED", None),
    Row("IPv4 first fragment (MF) to a VIP", lambda: eth() / v4(flags="MF") / tcp(), "FL_DROP_FRAGMENT", None),
    Row("IPv4 later fragment to a VIP", lambda: eth() / v4(frag=100) / Raw(b"y" * 16), "FL_DROP_FRAGMENT", None),
    Row("IPv4 fragment to a non-VIP", lambda: eth() / v4(dst="198.18.0.2", flags="MF") / tcp(),
        "FL_PASS_NOT_VIP", "same"),
    Row("IPv6 hop-by-hop header to a VIP", lambda: eth() / v6() / IPv6ExtHdrHopByHop() / tcp(),
        "FL_DROP_IPV6_EXTHDR", None),
    Row("IPv6 hop-by-hop header to a non-VIP", lambda: eth() / v6(dst="2001:db8::2") / IPv6ExtHdrHopByHop() / tcp(),
        "FL_PASS_NOT_VIP", "same"),
    Row("VIP whose only backend has weight 0", lambda: eth() / v4(dst=EMPTY_VIP4) / tcp(), "FL_DROP_NO_BACKEND", None),
    Row("SYN to an http VIP goes to the local HAProxy", lambda: eth() / v4() / tcp(dport=8080), "FL_PASS_L7", "same"),
    Row("mid-flow packet of an http VIP", lambda: eth() / v4() / tcp(dport=8080, flags="A"), "FL_PASS_L7", "same"),
    Row("http VIP address, other port", lambda: eth() / v4() / tcp(dport=8081), "FL_PASS_VIP_PORT", "same"),
]
