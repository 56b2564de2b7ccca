"""The backends' decap program (bpf/fastlb_decap.c) under packet tables.

Rule for a decapsulated row: the output is the input with the outer IP
header removed and the (innermost) ethertype set to the inner packet's; the
MACs, VLAN tags and the inner packet are unchanged; the verdict is XDP_PASS.
"""

from __future__ import annotations

import ctypes
import ipaddress
import uuid

import pytest
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import ARP, Dot1Q, Ether
from scapy.packet import Raw

from fastlb.kernel import cdefs, pins, structs
from fastlb.kernel.layout import DECAP_MAP_SPECS, Sizes
from fastlb.kernel.loader import Program
from fastlb.kernel.maps import PinnedMaps
from fastlb.testing import _testrun
from fastlb.testing.testbed import XDP_VERDICTS

pytestmark = pytest.mark.root

LOCAL4, LOCAL6 = "198.18.1.11", "2001:db8:1::11"
VIP4, VIP6 = "198.19.0.100", "2001:db8:ffff::100"
OUTER4, OUTER6 = "198.18.200.7", "2001:db8:200::7"


# The balancers' tunnel source prefixes (fastlb decap attach --from).
FROM4, FROM6 = "198.18.200.0/24", "2001:db8:200::/64"


@pytest.fixture(scope="module")
def decap():
    from fastlb.controller.decap import write_sources
    pin_dir = pins.ensure_bpffs() / f"scratch-decap-{uuid.uuid4().hex[:6]}"
    prog = Program(pin_dir, Sizes(), source="fastlb_decap.c", function="xdp_fastlb_decap",
                   specs=DECAP_MAP_SPECS).load()
    maps = PinnedMaps(pin_dir, DECAP_MAP_SPECS)
    try:
        for addr, flag in ((LOCAL4, cdefs.FL_DECAP_ADDR_LOCAL), (LOCAL6, cdefs.FL_DECAP_ADDR_LOCAL),
                           (VIP4, cdefs.FL_DECAP_ADDR_VIP), (VIP6, cdefs.FL_DECAP_ADDR_VIP)):
            maps.update("addrs", structs.addr_marker_key(ipaddress.ip_address(addr)), ctypes.c_uint32(flag))
        write_sources(maps, [FROM4, FROM6])
        yield prog, maps
    finally:
        maps.close()
        prog.close()
        pins.remove_dir(pin_dir)


def eth():
    return Ether(src="02:00:00:00:00:02", dst="02:00:00:00:00:0b")


INNER4 = IP(src="198.18.0.1", dst=VIP4) / TCP(sport=40000, dport=80, flags="S")
INNER6 = IPv6(src="2001:db8::1", dst=VIP6) / UDP(sport=40000, dport=53) / Raw(b"q")
INNER46 = IP(src="198.18.0.1", dst=VIP4) / UDP(sport=40000, dport=53) / Raw(b"q")

DECAP_ROWS = [
    ("IPv4 in IPv4", eth() / IP(src=OUTER4, dst=LOCAL4, proto=4) / INNER4, eth() / INNER4),
    ("IPv6 in IPv6", eth() / IPv6(src=OUTER6, dst=LOCAL6, nh=41) / INNER6, eth() / INNER6),
    ("IPv4 in IPv6", eth() / IPv6(src=OUTER6, dst=LOCAL6, nh=4) / INNER46, eth() / INNER46),
    ("VLAN-tagged IPv4 in IPv4", eth() / Dot1Q(vlan=5) / IP(src=OUTER4, dst=LOCAL4, proto=4) / INNER4,
     eth() / Dot1Q(vlan=5) / INNER4),
]

PASS_ROWS = [
    ("plain TCP to the VIP", eth() / INNER4, "FL_DECAP_NOT_TUNNEL"),
    ("ARP", Ether(dst="ff:ff:ff:ff:ff:ff") / ARP(pdst=LOCAL4), "FL_DECAP_NOT_TUNNEL"),
    ("IPIP to another host", eth() / IP(src=OUTER4, dst="198.18.1.99", proto=4) / INNER4, "FL_DECAP_NOT_LOCAL"),
    ("IPIP for an unconfigured VIP", eth() / IP(src=OUTER4, dst=LOCAL4, proto=4) /
     IP(src="198.18.0.1", dst="198.19.0.200") / TCP(dport=80), "FL_DECAP_NOT_VIP"),
    ("IPIP with outer options", eth() / IP(src=OUTER4, dst=LOCAL4, proto=4, options=[b"\x01\x01\x01\x00"]) / INNER4,
     "FL_DECAP_NOT_TUNNEL"),
]


def counts(maps):
    return {k: maps.counter("decap_stats", v).packets for k, v in cdefs.enum("fl_decap_reason").items()
            if k != "FL_DECAP_REASON_MAX"}


def run(decap, pkt):
    prog, maps = decap
    before = counts(maps)
    verdict, out, _ = _testrun.run(prog.fd, bytes(pkt))
    after = counts(maps)
    return verdict, out, {k: after[k] - before[k] for k in after if after[k] != before[k]}


@pytest.mark.parametrize("desc,pkt,inner", DECAP_ROWS, ids=[r[0] for r in DECAP_ROWS])
def test_decapsulates(decap, desc, pkt, inner):
    verdict, out, moved = run(decap, pkt)
    assert verdict == XDP_VERDICTS["pass"] and moved == {"FL_DECAP_OK": 1}
    assert out == bytes(inner)


@pytest.mark.parametrize("desc,pkt,reason", PASS_ROWS, ids=[r[0] for r in PASS_ROWS])
def test_passes_untouched(decap, desc, pkt, reason):
    verdict, out, moved = run(decap, pkt)
    assert verdict == XDP_VERDICTS["pass"] and moved == {reason: 1}
    assert out == bytes(pkt)


def test_truncated_inner_header_is_dropped(decap):
    pkt = bytes(eth() / IP(src=OUTER4, dst=LOCAL4, proto=4, len=20 + 10) / Raw(bytes(INNER4)[:10]))
    verdict, _, moved = run(decap, pkt)
    assert verdict == XDP_VERDICTS["drop"] and moved == {"FL_DECAP_MALFORMED": 1}


@pytest.mark.parametrize("outer", [
    eth() / IP(src="198.18.9.9", dst=LOCAL4, proto=4) / INNER4,
    eth() / IPv6(src="2001:db8:9::9", dst=LOCAL6, nh=41) / INNER6,
], ids=["IPv4 outer source outside --from", "IPv6 outer source outside --from"])
def test_a_tunnel_packet_from_outside_the_balancers_prefixes_is_dropped(decap, outer):
    """Only the balancers may tunnel to a VIP: anyone else reaching a backend would
    bypass the balancer and its guard. Dropped, not passed, so that no tunnel
    device of the host decapsulates it instead."""
    verdict, _, moved = run(decap, outer)
    assert verdict == XDP_VERDICTS["drop"] and moved == {"FL_DECAP_SOURCE_REFUSED": 1}


def test_no_from_accepts_every_source(decap):
    from fastlb.controller.decap import write_sources
    _, maps = decap
    write_sources(maps, [])
    try:
        verdict, out, moved = run(decap, eth() / IP(src="198.18.9.9", dst=LOCAL4, proto=4) / INNER4)
        assert moved == {"FL_DECAP_OK": 1} and out == bytes(eth() / INNER4)
    finally:
        write_sources(maps, [FROM4, FROM6])


NOT_ECT, ECT1, ECT0, CE = 0, 1, 2, 3


def _ecn4(tos_dscp, ecn):
    return IP(src="198.18.0.1", dst=VIP4, tos=tos_dscp | ecn) / TCP(sport=40001, dport=80, flags="A") / Raw(b"e")


def _ecn6(ecn):
    return IPv6(src="2001:db8::1", dst=VIP6, tc=0x28 | ecn) / UDP(sport=40001, dport=53) / Raw(b"e")


# RFC 6040 section 4.2 (normal mode), decapsulation: (outer, inner) -> inner after, or "drop".
ECN_TABLE = [(NOT_ECT, NOT_ECT, NOT_ECT), (CE, NOT_ECT, "drop"), (ECT0, NOT_ECT, NOT_ECT),
             (CE, ECT0, CE), (CE, ECT1, CE), (ECT1, ECT0, ECT1), (ECT0, ECT1, ECT1), (NOT_ECT, ECT0, ECT0),
             (NOT_ECT, CE, CE), (ECT0, CE, CE)]


@pytest.mark.parametrize("family", [4, 6])
@pytest.mark.parametrize("outer_ecn,inner_ecn,want", ECN_TABLE,
                         ids=[f"outer {o} inner {i}" for o, i, _ in ECN_TABLE])
def test_ecn_is_propagated_on_decapsulation_as_rfc_6040_says(decap, family, outer_ecn, inner_ecn, want):
    if family == 4:
        inner, outer = _ecn4(0x28, inner_ecn), IP(src=OUTER4, dst=LOCAL4, proto=4, tos=0x28 | outer_ecn)
    else:
        inner, outer = _ecn6(inner_ecn), IPv6(src=OUTER6, dst=LOCAL6, nh=41, tc=0x28 | outer_ecn)
    verdict, out, moved = run(decap, eth() / outer / inner)
    if want == "drop":
        assert verdict == XDP_VERDICTS["drop"] and moved == {"FL_DECAP_ECN_DROP": 1}
        return
    assert verdict == XDP_VERDICTS["pass"] and moved == {"FL_DECAP_OK": 1}
    expect = _ecn4(0x28, want) if family == 4 else _ecn6(want)  # scapy recomputes the checksum
    assert out == bytes(eth() / expect)
