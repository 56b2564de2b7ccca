"""The data-plane fuzzer: the real XDP program against an independent model.

tests/helpers/oracle.py models docs/DATAPLANE.md from the documented rules alone;
tests/helpers/fuzz_gen.py makes seeded random and mutated frames. The root tests
feed over 100,000 frames (plus every truncation of well-formed frames) to
the program through BPF_PROG_TEST_RUN and require no disagreement: same
reason counter (exactly one, by one packet and the frame's bytes), same
verdict, passed frames unchanged, forwarded frames changed only in the two
MACs, to a backend of that VIP (weight > 0 for a new flow, the same backend
for an established one), with checksums exactly as valid as they came, and
the VIP's and backend's counters moved by that one packet; tunnelled, NAT'd,
NAT-reply, ARP, ND and ICMP frames byte for byte as their rules build them.
Every mode has VIPs (DSR, tunnel, NAT with its replies, announce = "arp"),
and the frames arrive on a veth of the run whose MTU the tunnel's check
measures. Then deliberately wrong oracles (at least one per mode) must be
caught, so a silent fuzzer cannot pass. No disagreement is excused.

The other tests check the model and the generator without the kernel:
hand-made frames against the documented rules, the checksum code against
scapy's, the judge against forged observations. ``make fuzz`` runs the
same campaign for a million frames (fuzz/run.py).

The seed is fixed (reproducible); set FASTLB_FUZZ_SEED to try another.
The figures go to the terminal summary and to /tmp/fastlb-fuzz-report.txt.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import random
from pathlib import Path

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import ICMPv6ND_NS, IPv6, IPv6ExtHdrFragment, IPv6ExtHdrHopByHop
from scapy.layers.l2 import ARP, Dot1AD, Dot1Q, Ether
from scapy.packet import Raw

from helpers import fuzz_gen, oracle
from helpers.fuzz_gen import A4, A6, ARP4, ARP6, B4, N4, N6, T4, T6, T46, Generator

SEED = int(os.environ.get("FASTLB_FUZZ_SEED", "20260826"))
PACKETS = 100_000
REPORT = Path("/tmp/fastlb-fuzz-report.txt")
CLIENT4, CLIENT6 = "198.18.200.1", "2001:db8:1::1"


def mac_of(address) -> str:
    """The testbed's documented backend MAC rule (fastlb.testing.testbed.fake_mac)."""
    return f"02:00:00:00:00:{ipaddress.ip_address(str(address)).packed[-1]:02x}"


LB_MAC = "02:00:00:00:00:02"   # the testbed's interface MAC (fastlb.testing.testbed.LB_MAC), which ARP/ND answer with


def new_oracle(cls=oracle.Oracle, services=fuzz_gen.SERVICES) -> oracle.Oracle:
    return cls(fuzz_gen.oracle_vips(mac_of, services), fuzz_gen.oracle_settings(LB_MAC))


def eth(dst="02:00:00:00:00:02"):
    return Ether(src="02:00:00:00:00:01", dst=dst)


# ---- the model against the documented rules (no kernel) -----------------------------

ROWS = [
    ("IPv4 TCP to a VIP", eth() / IP(src=CLIENT4, dst=A4) / TCP(dport=80), "FL_TX_DSR"),
    ("IPv6 UDP to a VIP", eth() / IPv6(src=CLIENT6, dst=A6) / UDP(dport=53), "FL_TX_DSR"),
    ("QinQ (802.1ad, 802.1Q) to a VIP", eth() / Dot1AD(vlan=1) / Dot1Q(vlan=2) / IP(src=CLIENT4, dst=A4) / TCP(dport=80),
     "FL_TX_DSR"),
    ("802.1Q then 802.1ad", eth() / Dot1Q(vlan=1) / Dot1AD(vlan=2) / IP(src=CLIENT4, dst=A4) / TCP(dport=80),
     "FL_TX_DSR"),
    ("three tags", eth() / Dot1Q() / Dot1Q() / Dot1AD() / IP(src=CLIENT4, dst=A4) / TCP(dport=80),
     "FL_PASS_VLAN_DEPTH"),
    ("third tag's TPID is the frame's last bytes", Raw(bytes(eth() / Dot1Q() / Dot1Q() / Dot1Q())[:22]),
     "FL_PASS_VLAN_DEPTH"),
    ("ends inside the second tag", Raw(bytes(eth() / Dot1Q() / Dot1Q() / IP())[:20]), "FL_DROP_L2_TRUNCATED"),
    ("ARP", eth("ff:ff:ff:ff:ff:ff") / ARP(pdst=A4), "FL_PASS_NOT_IP"),
    ("ethertype 0x9100 (an old QinQ TPID, not one the rules skip)",
     Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02", type=0x9100) / Raw(b"\0" * 46), "FL_PASS_NOT_IP"),
    ("IPv4 header cut", Raw(bytes(eth() / IP(src=CLIENT4, dst=A4) / TCP(dport=80))[:14 + 19]), "FL_DROP_L3_MALFORMED"),
    ("IPv4 IHL 4", eth() / IP(src=CLIENT4, dst=A4, ihl=4) / TCP(dport=80), "FL_DROP_L3_MALFORMED"),
    ("IPv4 tot_len below the header", eth() / IP(src=CLIENT4, dst=A4, len=19) / TCP(dport=80), "FL_DROP_L3_MALFORMED"),
    ("IPv4 tot_len beyond the frame", eth() / IP(src=CLIENT4, dst="10.0.0.1", len=100) / TCP(), "FL_DROP_L3_MALFORMED"),
    ("IPv6 payload beyond the frame", eth() / IPv6(src=CLIENT6, dst=A6, plen=100) / UDP(), "FL_DROP_L3_MALFORMED"),
    ("IPv6 version 4", eth() / IPv6(src=CLIENT6, dst=A6, version=4) / UDP(dport=53), "FL_DROP_L3_MALFORMED"),
    ("DF alone is no fragment", eth() / IP(src=CLIENT4, dst=A4, flags="DF") / TCP(dport=80), "FL_TX_DSR"),
    ("MF to a VIP address", eth() / IP(src=CLIENT4, dst=B4, flags="MF") / UDP(dport=9), "FL_DROP_FRAGMENT"),
    ("offset to another address", eth() / IP(src=CLIENT4, dst="10.0.0.1", frag=3) / Raw(b"x" * 20),
     "FL_PASS_NOT_VIP"),
    ("fragment header to a VIP", eth() / IPv6(src=CLIENT6, dst=A6) / IPv6ExtHdrFragment() / UDP(dport=53),
     "FL_DROP_IPV6_EXTHDR"),
    ("hop-by-hop to another address", eth() / IPv6(src=CLIENT6, dst="2001:db8::2") / IPv6ExtHdrHopByHop() / TCP(),
     "FL_PASS_NOT_VIP"),
    ("ICMP echo request to a VIP address", eth() / IP(src=CLIENT4, dst=A4) / ICMP(), "FL_TX_ICMP_ECHO"),
    ("ICMP timestamp request to a VIP address", eth() / IP(src=CLIENT4, dst=A4) / ICMP(type=13), "FL_PASS_VIP_PORT"),
    ("ICMP to a VIP address in a broadcast frame (rule 6)",
     eth("ff:ff:ff:ff:ff:ff") / IP(src=CLIENT4, dst=A4) / ICMP(), "FL_PASS_L2_NOT_UNICAST"),
    ("UDP length 7 to a VIP address", eth() / IP(src=CLIENT4, dst=A4) / UDP(dport=53, len=7), "FL_DROP_L4_MALFORMED"),
    ("UDP length beyond the IP payload, frame padded",
     eth() / IP(src=CLIENT4, dst=A4, len=28) / UDP(dport=53, len=12) / Raw(b"abcd"), "FL_DROP_L4_MALFORMED"),
    ("UDP shorter than the IP payload", eth() / IP(src=CLIENT4, dst=A4) / UDP(dport=53, len=8) / Raw(b"pad!"),
     "FL_TX_DSR"),
    ("TCP data offset 4", eth() / IP(src=CLIENT4, dst=A4) / TCP(dport=80, dataofs=4), "FL_DROP_L4_MALFORMED"),
    ("TCP header beyond the IP payload, inside the frame",
     eth() / IP(src=CLIENT4, dst=A4, len=20 + 20) / TCP(dport=80, dataofs=6) / Raw(b"\0" * 4), "FL_DROP_L4_MALFORMED"),
    ("TCP data offset 4 to another address", eth() / IP(src=CLIENT4, dst="10.0.0.1") / TCP(dataofs=4),
     "FL_PASS_NOT_VIP"),
    ("multicast frame to a VIP", eth("01:00:5e:00:00:01") / IP(src=CLIENT4, dst=A4) / TCP(dport=80),
     "FL_PASS_L2_NOT_UNICAST"),
    ("broadcast frame to another address", eth("ff:ff:ff:ff:ff:ff") / IP(src=CLIENT4, dst="10.0.0.1") / TCP(),
     "FL_PASS_NOT_VIP"),
    ("VIP address, UDP on a TCP-only port", eth() / IP(src=CLIENT4, dst=A4) / UDP(dport=80), "FL_PASS_VIP_PORT"),
    ("IPv4-mapped IPv6 of a VIP is not the VIP", eth() / IPv6(src=CLIENT6, dst="::ffff:198.19.0.100") / TCP(dport=80),
     "FL_PASS_NOT_VIP"),
    ("VIP whose backends all have weight 0", eth() / IP(src=CLIENT4, dst=B4) / TCP(dport=80), "FL_DROP_NO_BACKEND"),
    ("IPv4 to a tunnel VIP", eth() / IP(src=CLIENT4, dst=T4) / TCP(dport=80, flags="S"), "FL_TX_TUNNEL"),
    ("IPv4 to a tunnel VIP with IPv6 backends", eth() / IP(src=CLIENT4, dst=T46) / TCP(dport=80), "FL_TX_TUNNEL"),
    ("IPv4 with DF, too big once tunnelled (L3 1381 + 20 > MTU 1400)",
     eth() / IP(src=CLIENT4, dst=T4, flags="DF") / TCP(dport=80) / Raw(b"x" * 1341), "FL_TX_ICMP_TOO_BIG"),
    ("the same, exactly the MTU once tunnelled", eth() / IP(src=CLIENT4, dst=T4, flags="DF") / TCP(dport=80)
     / Raw(b"x" * 1340), "FL_TX_TUNNEL"),
    ("IPv4 without DF, too big once tunnelled", eth() / IP(src=CLIENT4, dst=T4) / TCP(dport=80) / Raw(b"x" * 1341),
     "FL_DROP_TOO_BIG"),
    ("IPv4 in IPv6, too big (L3 1361 + 40 > 1400)", eth() / IP(src=CLIENT4, dst=T46, flags="DF") / TCP(dport=80)
     / Raw(b"x" * 1321), "FL_TX_ICMP_TOO_BIG"),
    ("IPv6 too big once tunnelled", eth() / IPv6(src=CLIENT6, dst=T6) / UDP(dport=53) / Raw(b"x" * 1313),
     "FL_TX_ICMP_TOO_BIG"),
    ("IPv4 TCP to a NAT VIP", eth() / IP(src=CLIENT4, dst=N4) / TCP(dport=80, flags="S"), "FL_TX_NAT"),
    ("IPv6 UDP to a NAT VIP", eth() / IPv6(src=CLIENT6, dst=N6) / UDP(dport=53), "FL_TX_NAT"),
    ("a backend's reply with no NAT state", eth() / IP(src="198.18.0.101", dst=CLIENT4) / TCP(sport=8080, dport=4000),
     "FL_PASS_NOT_VIP"),
    ("ARP request for an announced VIP", eth("ff:ff:ff:ff:ff:ff") / ARP(pdst=ARP4, psrc=CLIENT4), "FL_TX_ARP_REPLY"),
    ("VLAN-tagged ARP request for an announced VIP", eth("ff:ff:ff:ff:ff:ff") / Dot1Q(vlan=5) / ARP(pdst=ARP4),
     "FL_TX_ARP_REPLY"),
    ("ARP reply about an announced VIP", eth() / ARP(op=2, pdst=ARP4), "FL_PASS_NOT_IP"),
    ("ARP request for a VIP that is not announced", eth("ff:ff:ff:ff:ff:ff") / ARP(pdst=A4), "FL_PASS_NOT_IP"),
    ("neighbour solicitation for an announced VIP",
     eth("33:33:ff:00:01:30") / IPv6(src=CLIENT6, dst="ff02::1:ff00:130", hlim=255) / ICMPv6ND_NS(tgt=ARP6),
     "FL_TX_ND_ADVERT"),
    ("duplicate address detection for an announced VIP",
     eth("33:33:ff:00:01:30") / IPv6(src="::", dst="ff02::1:ff00:130", hlim=255) / ICMPv6ND_NS(tgt=ARP6),
     "FL_TX_ND_ADVERT"),
    ("neighbour solicitation with hop limit 64",
     eth("33:33:ff:00:01:30") / IPv6(src=CLIENT6, dst="ff02::1:ff00:130", hlim=64) / ICMPv6ND_NS(tgt=ARP6),
     "FL_PASS_NOT_VIP"),
    ("neighbour solicitation for a VIP that is not announced",
     eth("33:33:ff:00:01:00") / IPv6(src=CLIENT6, dst="ff02::1:ff00:100", hlim=255) / ICMPv6ND_NS(tgt=A6),
     "FL_PASS_NOT_VIP"),
]


@pytest.mark.parametrize("frame,reason", [(r[1], r[2]) for r in ROWS], ids=[r[0] for r in ROWS])
def test_the_oracle_follows_the_documented_rules(frame, reason):
    assert new_oracle().predict(bytes(frame)).reason == reason


def test_reason_names_and_numbers_come_from_the_header():
    from fastlb.kernel import cdefs
    want = {k: v for k, v in cdefs.enum("fl_reason").items() if k != "FL_REASON_MAX"}
    assert oracle.read_reasons() == want


def test_checksum_states_match_scapys_checksums():
    """For generated well-formed frames, the oracle's checksum verdicts equal
    'the field equals what scapy's checksum code computes' (UDP over IPv4 with 0: absent)."""
    from scapy.layers.inet import in4_chksum
    from scapy.layers.inet6 import in6_chksum
    from scapy.utils import checksum as scapy_checksum

    gen, model, seen, rnd = Generator(5), new_oracle(), set(), random.Random(5)
    checked = 0
    while checked < 400:
        spec = gen.base()
        if spec.kind not in ("tcp", "udp"):
            continue
        spec.tags, spec.dst_mac = None, fuzz_gen.LB_MAC
        spec.ip_csum, spec.l4_csum = rnd.choice([("good", "good"), ("bad", "bad"), ("good", "zero"), ("bad", "good")])
        frame = gen.build(spec)
        p = model.predict(frame).parsed
        assert p is not None and (p.sport, p.dport) == (spec.sport, spec.dport)
        state = oracle.checksum_state(frame, p)
        pkt = Ether(frame)
        at = 16 if spec.kind == "tcp" else 6
        seg = bytearray(frame[p.l4:p.l4 + (p.l4_len if spec.kind == "tcp" else p.udp_len)])
        field = int.from_bytes(seg[at:at + 2], "big")
        seg[at:at + 2] = b"\0\0"
        if spec.family == 4:
            head = bytearray(frame[p.l3:p.l3 + 20])
            ip_field = int.from_bytes(head[10:12], "big")
            head[10:12] = b"\0\0"
            assert state.ip == (ip_field == scapy_checksum(bytes(head)))
            want = in4_chksum(p.proto, pkt[IP], bytes(seg))
        else:
            want = in6_chksum(p.proto, pkt[IPv6], bytes(seg))
        if spec.kind == "udp" and want == 0:
            want = 0xFFFF
        if spec.kind == "udp" and spec.family == 4 and field == 0:
            assert state.l4 is None
        else:
            assert state.l4 == (field == want), (spec, frame.hex())
        seen.add((state.ip, state.l4))
        checked += 1
    assert {(True, True), (False, False), (True, None), (None, True), (None, False)} <= seen


def test_generated_frames_say_what_scapy_reads():
    gen = Generator(11)
    for _ in range(300):
        spec = gen.base()
        if spec.kind not in ("tcp", "udp"):
            continue
        pkt = Ether(gen.build(spec))
        ip = pkt[IP] if spec.family == 4 else pkt[IPv6]
        l4 = pkt[TCP] if spec.kind == "tcp" else pkt[UDP]
        assert ipaddress.ip_address(ip.dst).packed == spec.dst
        assert (l4.sport, l4.dport) == (spec.sport, spec.dport)
        assert len([layer for layer in (Dot1Q, Dot1AD) if layer in pkt]) <= len(spec.tags or [])


def test_the_generator_is_reproducible():
    a, b, c = Generator(3), Generator(3), Generator(4)
    first = [a.frame() for _ in range(500)]
    assert first == [b.frame() for _ in range(500)]
    assert first != [c.frame() for _ in range(500)]


def _forwarded(model, frame, out, vip_slot=0, be_slot=5, reasons=None):
    pred = model.predict(frame)
    ids = oracle.read_reasons()
    size = len(frame)
    moved = reasons if reasons is not None else {ids[pred.reason]: (1, size, 0)}
    return model.judge(frame, pred, oracle.XDP_TX, out, moved, {vip_slot: (1, size, 1)},
                       {be_slot: (1, size, 1)}, ids)


def test_the_judge_accepts_a_right_forward_and_catches_wrong_ones():
    model = new_oracle()
    frame = bytes(eth() / IP(src=CLIENT4, dst=A4) / TCP(sport=1234, dport=80) / Raw(b"hi"))
    good = bytes.fromhex("02000000000b") + frame[0:6] + frame[12:]           # 198.18.0.11: A4:80's backend
    assert _forwarded(model, frame, good) == ([], False)

    fresh = new_oracle
    other_vip = bytes.fromhex("020000000015") + frame[0:6] + frame[12:]      # .21 serves A4:53/udp
    problems, mis = _forwarded(fresh(), frame, other_vip)
    assert mis and "not a backend of that VIP" in problems[0]
    weight0 = bytes.fromhex("020000000033") + frame[0:6] + frame[12:]        # A4:443's weight-0 backend
    frame443 = frame[:36] + b"\x01\xbb" + frame[38:]
    problems, mis = _forwarded(fresh(), frame443, weight0[:36] + b"\x01\xbb" + weight0[38:])
    assert mis and "a backend of that VIP" in problems[0]
    ttl = bytearray(good)
    ttl[22] -= 1
    problems, mis = _forwarded(fresh(), frame, bytes(ttl))
    assert mis and any("beyond the two MACs" in p for p in problems)
    assert any("checksums changed validity" in p for p in problems)
    ids = oracle.read_reasons()
    problems, mis = _forwarded(fresh(), frame, good, reasons={ids["FL_TX_DSR"]: (1, len(frame), 0),
                                                              ids["FL_PASS_NOT_VIP"]: (1, len(frame), 0)})
    assert problems and not mis

    # Established: the same flow must reach the same backend, and count as no new flow.
    model = new_oracle()
    assert _forwarded(model, frame, good) == ([], False)
    again = bytes.fromhex("02000000000c") + frame[0:6] + frame[12:]
    problems, mis = _forwarded(model, frame, again)
    assert mis and "its conntrack backend" in problems[0]
    assert any(f"expected (1, {len(frame)}, 0)" in p for p in problems)   # no new flow this time
    # Counters: another VIP's slot may not count this one.
    model = new_oracle()
    assert _forwarded(model, frame, good, vip_slot=2)[0] == []
    udp = bytes(eth() / IP(src=CLIENT4, dst=A4) / UDP(sport=9, dport=53))
    out = bytes.fromhex("020000000015") + udp[0:6] + udp[12:]
    problems, _ = _forwarded(model, udp, out, vip_slot=2, be_slot=6)
    assert any("counts another" in p for p in problems)


def test_the_judge_catches_a_changed_passed_frame_and_a_wrong_verdict():
    model, ids = new_oracle(), oracle.read_reasons()
    frame = bytes(eth() / IP(src=CLIENT4, dst="10.0.0.1") / TCP())
    pred = model.predict(frame)
    moved = {ids["FL_PASS_NOT_VIP"]: (1, len(frame), 0)}
    assert model.judge(frame, pred, oracle.XDP_PASS, frame, moved, {}, {}, ids) == ([], False)
    changed = frame[:-1] + b"\xff"
    assert model.judge(frame, pred, oracle.XDP_PASS, changed, moved, {}, {}, ids)[0]
    problems, mis = model.judge(frame, pred, oracle.XDP_TX, frame, moved, {}, {}, ids)
    assert problems and mis
    assert model.judge(frame, pred, oracle.XDP_PASS, frame, {ids["FL_PASS_NOT_VIP"]: (2, 2 * len(frame), 0)},
                       {}, {}, ids)[0]


# ---- the real program -----------------------------------------------------------------

class _Figures:
    """A pytest plugin that prints the campaign's figures in the terminal summary."""

    def __init__(self):
        self.sections: list[str] = []

    def pytest_terminal_summary(self, terminalreporter):
        if self.sections:
            terminalreporter.write_sep("-", "data-plane fuzzer (tests/bpf/test_fuzz.py)")
            for text in self.sections:
                terminalreporter.write_line(text)


@pytest.fixture(scope="module")
def figures(request):
    plugin = _Figures()
    request.config.pluginmanager.register(plugin, f"fastlb-fuzz-figures-{id(plugin)}")
    return plugin


@pytest.fixture(scope="module")
def bed():
    from fastlb.kernel.layout import Sizes
    from fastlb.testing.testbed import LB_MAC as TESTBED_LB_MAC
    from fastlb.testing.testbed import Testbed, fake_mac
    s = fuzz_gen.CONFIG_SETTINGS
    sizes = Sizes(max_vips=s["max_vips"], max_backends=s["max_backends"], ring_size=s["ring_size"],
                  conntrack_size=s["conntrack_size"])
    with Testbed(sizes, name=f"fuzz-{os.getpid()}") as tb:
        tb.apply(fuzz_gen.config_text())
        backend = fuzz_gen.SERVICES[0].backends[0][0]
        assert fake_mac(backend) == mac_of(backend), "the testbed's MAC rule changed: update mac_of"
        assert TESTBED_LB_MAC == LB_MAC, "the testbed's interface MAC changed: update LB_MAC"
        yield tb


@pytest.fixture(scope="module")
def device():
    with oracle.TestDevice(fuzz_gen.MTU) as dev:
        yield dev


@pytest.fixture
def campaign(bed, device):
    def make(model, seed=SEED):
        bed.flush_conntrack()
        for table in ("nat_rev", "nat_port", "persist"):
            for key in list(bed.maps.keys(table)):
                bed.maps.delete(table, key)
        return oracle.Campaign(bed, model, seed, ifindex=device.ifindex)
    return make


@pytest.mark.root
def test_100000_frames_agree_with_the_oracle(campaign, figures):
    run = campaign(new_oracle())
    run.feed(fuzz_gen.truncation_sweep())
    rep = run.feed(Generator(SEED).frames(PACKETS))
    run.check_active()
    text = rep.summary()
    figures.sections.append(text)
    REPORT.write_text(text + "\n")
    assert rep.packets >= PACKETS
    assert (rep.disagreements, rep.misforwards, rep.active_problems) == (0, 0, []), text
    assert not rep.known, text
    # The generator must reach every rule and every mode, or a silent gap would pass.
    for reason in ("FL_TX_DSR", "FL_PASS_NOT_IP", "FL_PASS_NOT_VIP", "FL_PASS_VIP_PORT", "FL_PASS_VLAN_DEPTH",
                   "FL_PASS_L2_NOT_UNICAST", "FL_DROP_L2_TRUNCATED", "FL_DROP_L3_MALFORMED", "FL_DROP_FRAGMENT",
                   "FL_DROP_IPV6_EXTHDR", "FL_DROP_L4_MALFORMED", "FL_DROP_NO_BACKEND", "FL_TX_TUNNEL", "FL_TX_NAT",
                   "FL_TX_NAT_REPLY", "FL_TX_ARP_REPLY", "FL_TX_ND_ADVERT", "FL_TX_ICMP_ECHO", "FL_TX_ICMP_TO_BACKEND",
                   "FL_TX_ICMP_TOO_BIG", "FL_DROP_TOO_BIG"):
        assert rep.reasons[reason] >= 100, f"{reason}: {rep.reasons[reason]} frames\n{text}"
    assert all(rep.modes[m] >= 1_000 for m in oracle.MODES), text
    assert rep.forwarded["established"] >= 5_000 and rep.forwarded["new flow"] >= 5_000
    assert sum(n for k, n in rep.forwarded.items() if "bad" in k) >= 1_000, "no frame with a bad checksum forwarded"
    assert len(rep.tunnel_sources) >= 100, "tunnel outer sources do not vary across flows"
    assert rep.rules["11/12: new flow of a bound client"] >= 500, "persistence bindings not exercised\n" + text


def _one(bed, device, frame: bytes):
    """(verdict, output, reason/vip/backend counter moves) of one frame arriving on the test device."""
    from fastlb.testing import _testrun
    ncpus, fds, ids = oracle.possible_cpus(), bed.maps.fds, oracle.read_reasons()
    counters = [oracle.CounterMoves(fds["reason_stats"], len(ids), ncpus),
                oracle.CounterMoves(fds["vip_stats"], bed.sizes.max_vips, ncpus),
                oracle.CounterMoves(fds["backend_stats"], bed.sizes.max_backends, ncpus)]
    verdict, out, _ = _testrun.run(bed.fd, frame, ingress_ifindex=device.ifindex)
    names = {v: k for k, v in ids.items()}
    reasons, vips, backends = (c.moves() for c in counters)
    return verdict, out, {names[k]: v for k, v in reasons.items()}, vips, backends


@pytest.mark.root
def test_a_too_big_frame_moves_only_its_reason_counter(bed, device):
    """A new flow's too-big first packet (recorded nowhere, rule 11), then an
    established flow's too-big packet: each moves FL_TX_ICMP_TOO_BIG alone."""
    big = Raw(b"x" * 1341)   # L3 1381 + 20 > the MTU
    frame = bytes(eth() / IP(src=CLIENT4, dst=T4, flags="DF") / TCP(sport=4242, dport=80, flags="S") / big)
    verdict, out, reasons, vips, backends = _one(bed, device, frame)
    assert reasons == {"FL_TX_ICMP_TOO_BIG": (1, len(frame), 0)}
    assert (vips, backends) == ({}, {})
    syn = bytes(eth() / IP(src=CLIENT4, dst=T4, flags="DF") / TCP(sport=4244, dport=80, flags="S"))
    assert _one(bed, device, syn)[2] == {"FL_TX_TUNNEL": (1, len(syn), 0)}
    frame = bytes(eth() / IP(src=CLIENT4, dst=T4, flags="DF") / TCP(sport=4244, dport=80, flags="A") / big)
    verdict, out, reasons, vips, backends = _one(bed, device, frame)
    assert reasons == {"FL_TX_ICMP_TOO_BIG": (1, len(frame), 0)}
    assert (vips, backends) == ({}, {})


@pytest.mark.root
def test_a_nat_client_with_source_port_0_is_translated(bed, device):
    """Found by the fuzzer: the client's own port is the tuple toward the backend
    when it is free, 0 included (DATAPLANE.md), not 'no free port'."""
    frame = bytes(eth() / IP(src=CLIENT4, dst=N4) / TCP(sport=0, dport=80, flags="S"))
    verdict, out, reasons, vips, backends = _one(bed, device, frame)
    assert reasons == {"FL_TX_NAT": (1, len(frame), 0)}
    assert IP(out[14:])[TCP].sport == 0


@pytest.mark.root
def test_a_vlan_tagged_frame_that_fits_the_mtu_once_tunnelled_is_tunnelled(bed, device):
    frame = bytes(eth() / Dot1Q(vlan=7) / IP(src=CLIENT4, dst=T4, flags="DF") / TCP(sport=4243, dport=80, flags="S")
                  / Raw(b"x" * 1340))   # L3 1380 + 20 = the MTU
    verdict, out, reasons, vips, backends = _one(bed, device, frame)
    assert reasons == {"FL_TX_TUNNEL": (1, len(frame), 0)}


class _TwoTags(oracle.Oracle):
    max_vlan_tags = 1


class _DfIsAFragment(oracle.Oracle):
    fragment_bits = 0x7FFF


class _FewerExtensionHeaders(oracle.Oracle):
    ipv6_ext_headers = oracle.IPV6_EXT_HEADERS - {135, 139, 140}


class _TunnelForgetsItsHeader(oracle.Oracle):
    tunnel_overhead = {4: 0, 6: 0}      # the MTU check without the outer header


class _NatKeepsThePort(oracle.Oracle):
    nat_remaps_port = False


class _NatReplyKeepsTheBackendsPort(oracle.Oracle):
    nat_reply_restores_port = False


class _AnswersEveryVip(oracle.Oracle):
    answers_unannounced = True          # ARP/ND for VIPs without announce = "arp"


class _BindsWiderPrefixes(oracle.Oracle):
    persistence_prefix_cut = 8          # a /24 binds a /16: clients the kernel keeps apart share a backend


def _swapped_backends():
    s = list(fuzz_gen.SERVICES)
    s[0], s[5] = dataclasses.replace(s[0], backends=s[5].backends), dataclasses.replace(s[5], backends=s[0].backends)
    return tuple(s)


@pytest.mark.root
@pytest.mark.parametrize("model,misforwards", [
    (lambda: new_oracle(_TwoTags), True),             # the kernel forwards what it would pass
    (lambda: new_oracle(_DfIsAFragment), True),
    (lambda: new_oracle(_FewerExtensionHeaders), False),  # the kernel drops what it would pass
    (lambda: new_oracle(services=_swapped_backends()), True),
    (lambda: new_oracle(_TunnelForgetsItsHeader), True),  # the kernel answers frag-needed where the model tunnels
    (lambda: new_oracle(_NatKeepsThePort), True),
    (lambda: new_oracle(_NatReplyKeepsTheBackendsPort), True),
    (lambda: new_oracle(_AnswersEveryVip), False),        # the kernel passes what the model would answer
    (lambda: new_oracle(_BindsWiderPrefixes), True),      # the kernel sends a client elsewhere than "its" binding
], ids=["one VLAN tag", "DF counts as a fragment", "no mobility/HIP/shim6", "backends of two VIPs swapped",
        "tunnel: MTU check without the outer header", "nat: no port remap", "nat reply: backend's port kept",
        "arp/nd: every VIP address answered", "persistence: prefixes 8 bits too short"])
def test_a_wrong_oracle_is_caught(campaign, model, misforwards):
    """The campaign must notice a model that is wrong in one rule (20,000 frames); a
    mis-forward is the kernel sending a frame the model would not, or elsewhere."""
    rep = campaign(model()).feed(Generator(SEED + 1).frames(20_000))
    assert rep.disagreements > 0, rep.summary()
    assert (rep.misforwards > 0) == misforwards, rep.summary()
    assert rep.failures and "frame (" in rep.failures[0] and "###[ Ethernet ]###" in rep.failures[0]


@pytest.mark.root
def test_make_fuzz_stopped_by_sigterm_leaves_no_veth_and_no_pins():
    """A make fuzz that a timeout or ^C ends removes its veth and its scratch pins
    (a SIGTERM used to kill it before either was removed)."""
    import signal
    import subprocess
    import sys
    import time

    from fastlb.kernel import pins

    run = Path(__file__).resolve().parents[2] / "fuzz" / "run.py"
    proc = subprocess.Popen([sys.executable, str(run), "--packets", "100000000", "--quiet"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    device, scratch = f"flfz{proc.pid % 10_000_000}", pins.ensure_bpffs() / f"scratch-fuzz-run-{proc.pid}"
    try:
        assert proc.stdout.readline().startswith("fuzz: seed")
        deadline = time.monotonic() + 60
        while not (Path("/sys/class/net", device).exists() and scratch.exists()):
            assert time.monotonic() < deadline and proc.poll() is None, "the fuzz run never made its veth and pins"
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 128 + signal.SIGTERM
        left = [p for p in (Path("/sys/class/net", device), scratch) if p.exists()]
        assert not left, f"left behind: {left}"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        subprocess.run(["ip", "link", "del", device], capture_output=True)
        subprocess.run(["rm", "-rf", str(scratch)], capture_output=True)
