"""Packet tables for the forwarding modes beyond DSR: tunnel and NAT.

Same method as tests/bpf/test_packets.py: each row states the rule that turns
the input into the expected output, scapy builds the expected bytes from
the input by that rule (recomputing every checksum itself), and the real
program's output must match byte for byte. The backend comes from the
userspace model (tests/helpers/packets.expected_backend).
"""

from __future__ import annotations

import ctypes
import ipaddress

import pytest
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import Dot1Q, Ether
from scapy.packet import Raw

from fastlb.dataplane import flows, response
from fastlb.kernel import cdefs
from fastlb.testing.testbed import LB_MAC, fake_mac
from fastlb.testing.testbed import XDP_VERDICTS as VERDICT_CODES
from helpers.packets import CLIENT4, CLIENT6, CLIENT_MAC, expected_backend
from helpers.packets import ROWS as DSR_ROWS

pytestmark = pytest.mark.root

TUN4, TUN6, TUN46 = "198.19.1.1", "2001:db8:ffff::1:1", "198.19.1.2"
NAT4, NAT6 = "198.19.2.1", "2001:db8:ffff::2:1"
# Two NAT VIPs per family that share one backend address and port.
SHARED4, SHARED6 = ("198.19.2.3", "198.19.2.4"), ("2001:db8:ffff::2:3", "2001:db8:ffff::2:4")
SHARED_BACKEND4, SHARED_BACKEND6 = "198.18.2.21", "2001:db8:2::21"
TUNNEL_NET4 = ipaddress.ip_network("198.18.200.0/24")
TUNNEL_NET6 = ipaddress.ip_network("2001:db8:200::/64")

BASE_CONFIG = f"""
[settings]
max_vips = 16
max_backends = 64
conntrack_size = 4096
tunnel_source = "{TUNNEL_NET4}"
tunnel_source6 = "{TUNNEL_NET6}"
icmp_source = "198.18.0.2"
icmp_source6 = "2001:db8::2"
""" + "".join(
    f'\n[[vip]]\naddress = "{vip}"\nport = {port}\nprotocol = "{proto}"\nforwarding = "{mode}"\n'
    + "".join(f'[[vip.backend]]\naddress = "{b}"\n' + (f"port = {bport}\n" if bport else "") for b in backends)
    for vip, port, proto, mode, backends, bport in [
        (TUN4, 80, "tcp", "tunnel", ["198.18.1.11", "198.18.1.12"], None),
        (TUN4, 53, "udp", "tunnel", ["198.18.1.11", "198.18.1.12"], None),
        (TUN6, 80, "tcp", "tunnel", ["2001:db8:1::11", "2001:db8:1::12"], None),
        (TUN46, 80, "tcp", "tunnel", ["2001:db8:1::21", "2001:db8:1::22"], None),
        (NAT4, 80, "tcp", "nat", ["198.18.2.11", "198.18.2.12"], 8080),
        (NAT4, 53, "udp", "nat", ["198.18.2.11", "198.18.2.12"], 5353),
        (NAT6, 80, "tcp", "nat", ["2001:db8:2::11", "2001:db8:2::12"], 8080),
        (NAT6, 53, "udp", "nat", ["2001:db8:2::11"], 5353),
        (SHARED4[0], 80, "tcp", "nat", [SHARED_BACKEND4], 8080),
        (SHARED4[1], 80, "tcp", "nat", [SHARED_BACKEND4], 8080),
        (SHARED6[0], 80, "tcp", "nat", [SHARED_BACKEND6], 8080),
        (SHARED6[1], 80, "tcp", "nat", [SHARED_BACKEND6], 8080),
    ])
# The testbed holds 16 VIPs: the multi-port one here, the ICMP section's four below (on BASE_CONFIG).
CONFIG = BASE_CONFIG + f"""
[[vip]]
address = "{NAT4}"
ports = [21, "30000-30010"]
forwarding = "nat"
[[vip.backend]]
address = "198.18.2.11"
[[vip.backend]]
address = "198.18.2.12"
"""


@pytest.fixture(scope="module")
def prog(loaded):
    loaded.apply(CONFIG)
    loaded.flush_conntrack()
    yield loaded
    loaded.flush_conntrack()


def eth():
    return Ether(src=CLIENT_MAC, dst=LB_MAC)


def ip_of(pkt):
    return pkt[IP] if IP in pkt else pkt[IPv6]


def run_row(prog, pkt, reason):
    data = bytes(pkt)
    before = prog.reason_counts()
    verdict, out = prog.run(data)
    after = prog.reason_counts()
    assert verdict == VERDICT_CODES[cdefs.reason_verdict(reason)]
    assert {k: after[k] - before[k] for k in after if after[k] != before[k]} == {reason: 1}
    return out


# ---- tunnel ---------------------------------------------------------------------

def tunnel_expected(prog, pkt, out: bytes) -> bytes:
    """The rule: a new Ethernet header to the backend's next hop (src: the LB's MAC,
    VLAN tags kept), an outer IP header from the tunnel prefix to the backend
    (IPv4: DF, TTL 64, id 0, the inner TOS; IPv6: hop limit 64), then the
    inner IP packet unchanged. The outer source's host bits come from the
    program; the rule only says they stay in the prefix."""
    backend = ipaddress.ip_address(expected_backend(prog.config, prog.sizes, pkt))
    inner = ip_of(pkt)
    l2 = pkt.copy()
    l2[Ether].src, l2[Ether].dst = LB_MAC, fake_mac(backend)
    l2_bytes = bytes(l2)[:len(bytes(pkt)) - len(bytes(inner))]
    got = Ether(out)
    if backend.version == 4:
        outer_src = ipaddress.ip_address(got[IP].src)
        assert outer_src in TUNNEL_NET4
        outer = IP(src=str(outer_src), dst=str(backend), proto=4 if IP in pkt else 41, ttl=64, id=0,
                   flags="DF", tos=inner.tos if IP in pkt else 0)
    else:
        outer_src = ipaddress.ip_address(got[IPv6].src)
        assert outer_src in TUNNEL_NET6
        outer = IPv6(src=str(outer_src), dst=str(backend), nh=4 if IP in pkt else 41, hlim=64)
    body = bytes(outer / Raw(bytes(inner)))
    if backend.version == 4:
        ethertype = b"\x08\x00"
    else:
        ethertype = b"\x86\xdd"
    return l2_bytes[:-2] + ethertype + body


TUNNEL_ROWS = [
    ("IPv4 TCP in IPv4", lambda: eth() / IP(src=CLIENT4, dst=TUN4, tos=0x28) / TCP(sport=40001, dport=80, flags="S")),
    ("IPv4 UDP in IPv4", lambda: eth() / IP(src=CLIENT4, dst=TUN4) / UDP(sport=40001, dport=53) / Raw(b"q" * 30)),
    ("IPv6 TCP in IPv6", lambda: eth() / IPv6(src=CLIENT6, dst=TUN6) / TCP(sport=40001, dport=80)),
    ("IPv4 TCP in IPv6", lambda: eth() / IP(src=CLIENT4, dst=TUN46) / TCP(sport=40001, dport=80) / Raw(b"x" * 100)),
    ("VLAN-tagged IPv4 in IPv4", lambda: eth() / Dot1Q(vlan=7) / IP(src=CLIENT4, dst=TUN4) / TCP(sport=40002, dport=80)),
]


@pytest.mark.parametrize("desc,make", TUNNEL_ROWS, ids=[r[0] for r in TUNNEL_ROWS])
def test_tunnel(prog, desc, make):
    pkt = make()
    out = run_row(prog, pkt, "FL_TX_TUNNEL")
    assert out == tunnel_expected(prog, pkt, out)


def test_tunnel_outer_source_is_stable_per_flow_and_varies_across_flows(prog):
    sources = set()
    for sport in range(41000, 41040):
        pkt = eth() / IP(src=CLIENT4, dst=TUN4) / TCP(sport=sport, dport=80)
        first = Ether(prog.run(bytes(pkt))[1])[IP].src
        again = Ether(prog.run(bytes(pkt))[1])[IP].src
        assert first == again
        sources.add(first)
    assert len(sources) > 20


# ---- NAT --------------------------------------------------------------------------

def recompute(pkt):
    """Let scapy recompute every checksum and length field."""
    for layer in (IP, TCP, UDP):
        if layer in pkt:
            for field in ("chksum", "len"):
                if field in pkt[layer].fields and not (layer is UDP and field == "chksum" and pkt[UDP].chksum == 0):
                    del pkt[layer].fields[field]
    if IPv6 in pkt:
        pkt[IPv6].fields.pop("plen", None)
    return Ether(bytes(pkt))


def nat_forward_expected(prog, pkt) -> bytes:
    """The rule: destination address and port become the backend's, MACs become
    (backend's next hop, the LB's), checksums valid, all else unchanged."""
    backend = expected_backend(prog.config, prog.sizes, pkt)
    vip = next(v for v in prog.config.vips if str(v.address) == ip_of(pkt).dst and v.serves(pkt.dport))
    # A multi-port VIP's backends take the port the client used; a single-port VIP's, their own.
    bport = pkt.dport if vip.multi_port else next(b.port for b in vip.backends if str(b.address) == backend)
    out = pkt.copy()
    out[Ether].src, out[Ether].dst = LB_MAC, fake_mac(backend)
    ip_of(out).dst = backend
    (out[TCP] if TCP in out else out[UDP]).dport = bport
    return bytes(recompute(out))


NAT_ROWS = [
    ("IPv4 TCP SYN", lambda: eth() / IP(src=CLIENT4, dst=NAT4) / TCP(sport=40001, dport=80, flags="S")),
    ("IPv4 TCP with payload", lambda: eth() / IP(src=CLIENT4, dst=NAT4) / TCP(sport=40002, dport=80, flags="PA") / Raw(b"GET / HTTP/1.0\r\n\r\n")),
    ("IPv4 UDP", lambda: eth() / IP(src=CLIENT4, dst=NAT4) / UDP(sport=40001, dport=53) / Raw(b"query")),
    ("IPv4 UDP without checksum", lambda: eth() / IP(src=CLIENT4, dst=NAT4) / UDP(sport=40003, dport=53, chksum=0) / Raw(b"q")),
    ("IPv6 TCP", lambda: eth() / IPv6(src=CLIENT6, dst=NAT6) / TCP(sport=40001, dport=80, flags="S")),
    ("IPv6 UDP", lambda: eth() / IPv6(src=CLIENT6, dst=NAT6) / UDP(sport=40001, dport=53) / Raw(b"query")),
    ("multi-port VIP, first port", lambda: eth() / IP(src=CLIENT4, dst=NAT4) / TCP(sport=40011, dport=21, flags="S")),
    ("multi-port VIP, a ranged port", lambda: eth() / IP(src=CLIENT4, dst=NAT4) / TCP(sport=40012, dport=30007, flags="S")),
]


@pytest.mark.parametrize("desc,make", NAT_ROWS, ids=[r[0] for r in NAT_ROWS])
def test_nat_forward_and_reply(prog, desc, make):
    pkt = recompute(make())
    out = run_row(prog, pkt, "FL_TX_NAT")
    assert out == nat_forward_expected(prog, pkt)
    fwd = Ether(out)
    # The backend answers the client directly at the IP level; the LB is its gateway.
    l4 = TCP(sport=fwd.dport, dport=pkt.sport, flags="SA") if TCP in pkt else \
        UDP(sport=fwd.dport, dport=pkt.sport, chksum=0 if pkt[UDP].chksum == 0 else None)
    ipl = IP(src=ip_of(fwd).dst, dst=ip_of(pkt).src) if IP in pkt else IPv6(src=ip_of(fwd).dst, dst=ip_of(pkt).src)
    reply = recompute(Ether(src=fake_mac(ip_of(fwd).dst), dst=LB_MAC) / ipl / l4 / Raw(b"answer"))
    back = run_row(prog, reply, "FL_TX_NAT_REPLY")
    # The rule: source address and port become the VIP's, MACs (client, LB), checksums valid.
    want = reply.copy()
    want[Ether].src, want[Ether].dst = LB_MAC, CLIENT_MAC
    ip_of(want).src = ip_of(pkt).dst
    (want[TCP] if TCP in want else want[UDP]).sport = pkt.dport
    assert back == bytes(recompute(want))


def responses(prog) -> tuple[int, int]:
    """(µs, count) of every backend's timed first responses (backend_resp, all CPUs)."""
    sums = response.read(prog.maps, range(prog.maps.info("backend_resp").max_entries))
    return sum(t for t, _ in sums.values()), sum(c for _, c in sums.values())


@pytest.mark.parametrize("proto", ["tcp", "udp"])
def test_nat_times_each_connections_first_response_once(prog, proto):
    """lrt under NAT: from the client's first payload to the backend's first payload, once per
    connection; a SYN-ACK (no payload) and later payloads in either direction are not timed."""
    port, sport = (80, 40200) if proto == "tcp" else (53, 40200)
    l4 = (lambda **kw: TCP(sport=sport, dport=port, **kw)) if proto == "tcp" else \
        (lambda **kw: UDP(sport=sport, dport=port))
    before = responses(prog)
    if proto == "tcp":
        fwd = Ether(run_row(prog, recompute(eth() / IP(src=CLIENT4, dst=NAT4) / l4(flags="S")), "FL_TX_NAT"))
        synack = recompute(Ether(src=fake_mac(ip_of(fwd).dst), dst=LB_MAC) / IP(src=ip_of(fwd).dst, dst=CLIENT4) /
                           TCP(sport=fwd[TCP].dport, dport=sport, flags="SA"))
        run_row(prog, synack, "FL_TX_NAT_REPLY")
        assert responses(prog) == before          # no payload yet
    request = recompute(eth() / IP(src=CLIENT4, dst=NAT4) / l4(**({"flags": "PA"} if proto == "tcp" else {})) /
                        Raw(b"GET / HTTP/1.0\r\n\r\n"))
    fwd = Ether(run_row(prog, request, "FL_TX_NAT"))
    back = (TCP(sport=fwd[TCP].dport, dport=sport, flags="PA") if proto == "tcp"
            else UDP(sport=fwd[UDP].dport, dport=sport))
    reply = recompute(Ether(src=fake_mac(ip_of(fwd).dst), dst=LB_MAC) / IP(src=ip_of(fwd).dst, dst=CLIENT4) /
                      back / Raw(b"answer"))
    run_row(prog, reply, "FL_TX_NAT_REPLY")
    total, count = responses(prog)
    assert count == before[1] + 1 and total - before[0] < 10_000_000     # one, and under 10 s
    run_row(prog, request, "FL_TX_NAT")
    run_row(prog, reply, "FL_TX_NAT_REPLY")
    assert responses(prog)[1] == count           # the connection's later payloads: not timed again


def nat_reply_to(fwd, flags="SA"):
    """The backend's answer to a NAT-forwarded packet, sent to the LB as its gateway."""
    ipl = IP(src=ip_of(fwd).dst, dst=ip_of(fwd).src) if IP in fwd else IPv6(src=ip_of(fwd).dst, dst=ip_of(fwd).src)
    return recompute(Ether(src=fake_mac(ip_of(fwd).dst), dst=LB_MAC) / ipl /
                     TCP(sport=fwd[TCP].dport, dport=fwd[TCP].sport, flags=flags) / Raw(b"answer"))


@pytest.mark.parametrize("family", [4, 6])
def test_two_nat_vips_sharing_a_backend_keep_one_client_port_apart(prog, family):
    """One client, one source port, two NAT VIPs with the same backend address:port
    (Linux allows it toward different destinations). Netfilter's rule: the tuple
    toward the backend stays unique; on a clash the source port toward the backend
    is remapped, and the reply gets the client's own port back."""
    client, (vip_a, vip_b) = (CLIENT4, SHARED4) if family == 4 else (CLIENT6, SHARED6)
    ipc = IP if family == 4 else IPv6
    sport = 40100
    syn_a = recompute(eth() / ipc(src=client, dst=vip_a) / TCP(sport=sport, dport=80, flags="S"))
    syn_b = recompute(eth() / ipc(src=client, dst=vip_b) / TCP(sport=sport, dport=80, flags="S"))
    fwd_a = Ether(run_row(prog, syn_a, "FL_TX_NAT"))
    assert bytes(fwd_a) == nat_forward_expected(prog, syn_a)  # no clash: the client's own port
    fwd_b = Ether(run_row(prog, syn_b, "FL_TX_NAT"))
    remapped = fwd_b[TCP].sport
    assert remapped != sport
    # The rule for the clashing one: as any NAT forward, and the source port remapped.
    want_b = Ether(nat_forward_expected(prog, syn_b))
    want_b[TCP].sport = remapped
    assert bytes(fwd_b) == bytes(recompute(want_b))
    # Later packets of each flow keep their tuple toward the backend.
    ack_b = recompute(eth() / ipc(src=client, dst=vip_b) / TCP(sport=sport, dport=80, flags="A"))
    assert Ether(run_row(prog, ack_b, "FL_TX_NAT"))[TCP].sport == remapped
    ack_a = recompute(eth() / ipc(src=client, dst=vip_a) / TCP(sport=sport, dport=80, flags="A"))
    assert Ether(run_row(prog, ack_a, "FL_TX_NAT"))[TCP].sport == sport
    # Each reply leaves from the VIP its connection was made to, to the client's own port.
    for fwd, vip in ((fwd_a, vip_a), (fwd_b, vip_b)):
        reply = nat_reply_to(fwd)
        back = run_row(prog, reply, "FL_TX_NAT_REPLY")
        want = reply.copy()
        want[Ether].src, want[Ether].dst = LB_MAC, CLIENT_MAC
        ip_of(want).src = vip
        want[TCP].sport, want[TCP].dport = 80, sport
        assert back == bytes(recompute(want))
    # A "reply" to a port no recorded connection was translated to is not translated.
    stray = nat_reply_to(fwd_b)
    stray[TCP].dport = 1 + (remapped % 65535)
    stray = recompute(stray)
    assert run_row(prog, stray, "FL_PASS_NOT_VIP") == bytes(stray)


def test_a_nat_clash_with_no_free_port_is_dropped(prog):
    """When the client's own tuple toward the backend and every remapped port the
    flow may take (1024 + (hash + i) mod 64512, i < FL_NAT_PORT_TRIES; hash: the
    flow hash seeded with hash_seed ^ FL_NAT_SALT) belong to other connections,
    the packet is dropped, counted, never sent with a tuple another connection owns."""
    import ctypes

    from fastlb import core
    from fastlb.kernel import structs
    from helpers.packets import flow_of
    client, backend, sport = ipaddress.ip_address(CLIENT4), ipaddress.ip_address(SHARED_BACKEND4), 40200
    syn = recompute(eth() / IP(src=CLIENT4, dst=SHARED4[1]) / TCP(sport=sport, dport=80, flags="S"))
    h = core.flow_hash(*flow_of(syn), prog.sizes.hash_seed ^ cdefs.FL_NAT_SALT, cdefs.FL_HASH_5TUPLE)
    ports = [sport] + [cdefs.FL_NAT_PORT_MIN + (h + i) % cdefs.FL_NAT_PORT_SPAN
                       for i in range(cdefs.FL_NAT_PORT_TRIES)]
    other = structs.NatRev(vip=structs.pack_addr(ipaddress.ip_address(SHARED4[0])),
                           vip_port=structs.port_be(80), client_port=structs.port_be(sport))
    keys = [structs.FlowKey(src=structs.pack_addr(backend), dst=structs.pack_addr(client),
                            sport=structs.port_be(8080), dport=structs.port_be(p), proto=6,
                            family=cdefs.FL_AF_INET) for p in ports]
    try:
        for key in keys:
            prog.maps.update("nat_rev", key, other)
        run_row(prog, syn, "FL_DROP_NAT_NO_PORT")
        prog.maps.delete("nat_rev", keys[-1])
        # The last candidate is free again: the flow takes it.
        assert Ether(run_row(prog, syn, "FL_TX_NAT"))[TCP].sport == ports[-1]
    finally:
        for key in keys:
            prog.maps.delete("nat_rev", key)


def test_a_reply_with_no_nat_state_passes_untouched(prog):
    stray = recompute(Ether(src=fake_mac("198.18.2.11"), dst=LB_MAC) /
                      IP(src="198.18.2.11", dst=CLIENT4) / TCP(sport=8080, dport=45678, flags="A"))
    out = run_row(prog, stray, "FL_PASS_NOT_VIP")
    assert out == bytes(stray)


def test_every_reason_has_a_row():
    covered = {r.reason for r in DSR_ROWS} | {"FL_TX_TUNNEL", "FL_TX_NAT", "FL_TX_NAT_REPLY", "FL_TX_ICMP_ECHO",
                                              "FL_TX_ICMP_TO_BACKEND", "FL_TX_ARP_REPLY", "FL_TX_ND_ADVERT",
                                              "FL_REDIRECT_DSR", "FL_REDIRECT_TUNNEL", "FL_REDIRECT_NAT",
                                              "FL_REDIRECT_NAT_REPLY", "FL_REDIRECT_ICMP_TO_BACKEND",
                                              "FL_DROP_NO_EGRESS", "FL_DROP_NAT_NO_PORT", "FL_TX_ICMP_TOO_BIG",
                                              "FL_DROP_ICMP_RATE_LIMITED"} \
        | COVERED_ELSEWHERE
    reasons = set(cdefs.enum("fl_reason")) - {"FL_REASON_MAX"}
    assert reasons - covered == set()


# Reasons BPF_PROG_TEST_RUN on lo cannot provoke: its frames arrive on lo
# (MTU 65536), and bpf_xdp_adjust_head() has headroom for any outer header.
# tests/e2e/test_e2e_modes.py sends too-big frames through a real veth, and
# tests/bpf/test_fuzz.py makes its frames arrive on a veth of MTU 1400
# (ingress_ifindex), where the oracle checks the too-big answers byte for byte.
COVERED_ELSEWHERE = {"FL_DROP_TOO_BIG", "FL_DROP_ENCAP_FAILED"}


# ---- ICMP, ARP and ND -------------------------------------------------------------

from scapy.layers.inet import ICMP, IPerror, TCPerror  # noqa: E402
from scapy.layers.inet6 import (  # noqa: E402
    ICMPv6EchoRequest,
    ICMPv6ND_NA,
    ICMPv6ND_NS,
    ICMPv6NDOptDstLLAddr,
    ICMPv6NDOptSrcLLAddr,
    ICMPv6PacketTooBig,
)
from scapy.layers.l2 import ARP  # noqa: E402

from helpers.packets import VIP4 as DSR_VIP4  # noqa: E402
from helpers.packets import VIP6 as DSR_VIP6

ANNOUNCED4, ANNOUNCED6 = "198.19.3.1", "2001:db8:ffff::3:1"
ANNOUNCE_CONFIG = BASE_CONFIG + "".join(
    f'\n[[vip]]\naddress = "{vip}"\nport = 80\nannounce = "arp"\n[[vip.backend]]\naddress = "{b}"\n'
    for vip, b in ((ANNOUNCED4, "198.18.3.11"), (ANNOUNCED6, "2001:db8:3::11"))) + \
    f'\n[[vip]]\naddress = "{DSR_VIP4}"\nport = 80\n[[vip.backend]]\naddress = "198.18.0.11"\n' + \
    f'\n[[vip]]\naddress = "{DSR_VIP6}"\nport = 80\n[[vip.backend]]\naddress = "2001:db8::11"\n'


@pytest.fixture(scope="module")
def icmp_prog(prog):
    prog.apply(ANNOUNCE_CONFIG)
    prog.flush_conntrack()
    yield prog
    prog.apply(CONFIG)
    prog.flush_conntrack()


def echo_reply4(pkt):
    out = pkt.copy()
    out[Ether].src, out[Ether].dst = pkt[Ether].dst, pkt[Ether].src
    out[IP].src, out[IP].dst, out[IP].ttl = pkt[IP].dst, pkt[IP].src, 64
    out[ICMP].type = 0
    return bytes(recompute_icmp(out))


def recompute_icmp(pkt):
    for layer in (IP, ICMP):
        if layer in pkt:
            pkt[layer].fields.pop("chksum", None)
    for layer in (ICMPv6EchoRequest, ICMPv6ND_NA):
        if layer in pkt:
            pkt[layer].fields.pop("cksum", None)
    return Ether(bytes(pkt))


@pytest.mark.parametrize("vip", [DSR_VIP4, TUN4, NAT4, ANNOUNCED4])
def test_ping_of_a_vip_address_is_answered(icmp_prog, vip):
    pkt = recompute_icmp(eth() / IP(src=CLIENT4, dst=vip, ttl=17) / ICMP(type=8, id=7, seq=1) / Raw(b"ping" * 8))
    out = run_row(icmp_prog, pkt, "FL_TX_ICMP_ECHO")
    assert out == echo_reply4(pkt)


def test_ping6_of_a_vip_address_is_answered(icmp_prog):
    pkt = recompute_icmp(eth() / IPv6(src=CLIENT6, dst=DSR_VIP6, hlim=9) / ICMPv6EchoRequest(id=7, seq=1, data=b"x" * 20))
    out = run_row(icmp_prog, pkt, "FL_TX_ICMP_ECHO")
    want = pkt.copy()
    want[Ether].src, want[Ether].dst = pkt[Ether].dst, pkt[Ether].src
    want[IPv6].src, want[IPv6].dst, want[IPv6].hlim = DSR_VIP6, CLIENT6, 64
    want[ICMPv6EchoRequest].type = 129
    assert out == bytes(recompute_icmp(want))
    from scapy.layers.inet6 import ICMPv6EchoReply
    assert ICMPv6EchoReply in Ether(out)


@pytest.mark.parametrize("desc,make,reason", [
    ("ping in a broadcast frame", lambda: Ether(src=CLIENT_MAC, dst="ff:ff:ff:ff:ff:ff") / IP(src=CLIENT4, dst=DSR_VIP4) / ICMP(),
     "FL_PASS_L2_NOT_UNICAST"),
    ("timestamp request to a VIP address", lambda: eth() / IP(src=CLIENT4, dst=DSR_VIP4) / ICMP(type=13), "FL_PASS_VIP_PORT"),
    ("ping of a non-VIP", lambda: eth() / IP(src=CLIENT4, dst="198.18.0.2") / ICMP(), "FL_PASS_NOT_VIP"),
    ("frag-needed about a port with no VIP", lambda: eth() / IP(src="198.18.9.9", dst=DSR_VIP4) / ICMP(type=3, code=4, nexthopmtu=1400)
     / IPerror(src=DSR_VIP4, dst=CLIENT4) / TCPerror(sport=81, dport=49999), "FL_PASS_VIP_PORT"),
    ("ARP for a VIP that is not announced", lambda: Ether(src=CLIENT_MAC, dst="ff:ff:ff:ff:ff:ff") /
     ARP(op=1, hwsrc=CLIENT_MAC, psrc=CLIENT4, pdst=DSR_VIP4), "FL_PASS_NOT_IP"),
    ("ARP reply for an announced VIP", lambda: Ether(src=CLIENT_MAC, dst=LB_MAC) /
     ARP(op=2, hwsrc=CLIENT_MAC, psrc=CLIENT4, pdst=ANNOUNCED4), "FL_PASS_NOT_IP"),
    ("NS for a VIP that is not announced", lambda: Ether(src=CLIENT_MAC, dst="33:33:ff:00:01:00") /
     IPv6(src=CLIENT6, dst="ff02::1:ff00:100", hlim=255) / ICMPv6ND_NS(tgt=DSR_VIP6) / ICMPv6NDOptSrcLLAddr(lladdr=CLIENT_MAC),
     "FL_PASS_NOT_VIP"),
], ids=lambda v: v if isinstance(v, str) else "")
def test_icmp_and_arp_that_pass(icmp_prog, desc, make, reason):
    pkt = Ether(bytes(make()))
    assert run_row(icmp_prog, pkt, reason) == bytes(pkt)


def frag_needed_about(flow_pkt, vip, lb_side_mtu=1400):
    """A router's frag-needed about the VIP's reply to the flow's client."""
    quote = IPerror(src=vip, dst=CLIENT4) / TCPerror(sport=flow_pkt[TCP].dport, dport=flow_pkt[TCP].sport)
    return recompute_icmp(eth() / IP(src="198.18.9.9", dst=vip) / ICMP(type=3, code=4, nexthopmtu=lb_side_mtu) / quote)


def test_frag_needed_about_a_dsr_flow_goes_to_its_backend(icmp_prog):
    flow = eth() / IP(src=CLIENT4, dst=DSR_VIP4) / TCP(sport=46000, dport=80, flags="S")
    verdict, out = icmp_prog.run(bytes(flow))
    backend_mac = Ether(out).dst
    err = frag_needed_about(flow, DSR_VIP4)
    out = run_row(icmp_prog, err, "FL_TX_ICMP_TO_BACKEND")
    want = err.copy()
    want[Ether].src, want[Ether].dst = LB_MAC, backend_mac
    assert out == bytes(want)


def test_frag_needed_about_a_tunnel_flow_is_tunnelled_to_its_backend(icmp_prog):
    flow = eth() / IP(src=CLIENT4, dst=TUN4) / TCP(sport=46001, dport=80, flags="S")
    first = Ether(icmp_prog.run(bytes(flow))[1])
    err = frag_needed_about(flow, TUN4)
    out = Ether(run_row(icmp_prog, err, "FL_TX_ICMP_TO_BACKEND"))
    assert out[IP].dst == first[IP].dst and out[IP].src == first[IP].src and out[IP].proto == 4
    assert bytes(out[IP].payload) == bytes(err[IP])


@pytest.mark.parametrize("sport", range(49990, 49998))
def test_frag_needed_about_a_flow_not_in_conntrack_goes_to_its_ring_backend(icmp_prog, sport):
    """Behind ECMP a router's ICMP lands on any box, and a flow the guard left
    unrecorded has no entry: the backend is the VIP's consistent-hash pick for the
    reversed quote (the flow client -> VIP), as Katran does; the same one its
    mid-flow packets reach."""
    icmp_prog.flush_conntrack()
    flow = eth() / IP(src=CLIENT4, dst=TUN4) / TCP(sport=sport, dport=80, flags="A")
    backend = expected_backend(icmp_prog.config, icmp_prog.sizes, flow)
    err = frag_needed_about(flow, TUN4)
    out = Ether(run_row(icmp_prog, err, "FL_TX_ICMP_TO_BACKEND"))
    assert out[IP].dst == backend and out[IP].proto == 4
    assert bytes(out[IP].payload) == bytes(err[IP])
    assert not list(icmp_prog.maps.keys("conntrack"))  # nothing recorded
    dsr_flow = eth() / IP(src=CLIENT4, dst=DSR_VIP4) / TCP(sport=sport, dport=80, flags="A")
    err = frag_needed_about(dsr_flow, DSR_VIP4)
    out = run_row(icmp_prog, err, "FL_TX_ICMP_TO_BACKEND")
    want = err.copy()
    want[Ether].src, want[Ether].dst = LB_MAC, fake_mac(expected_backend(icmp_prog.config, icmp_prog.sizes, dsr_flow))
    assert out == bytes(want)


def test_packet_too_big_about_an_ipv6_flow_not_in_conntrack_goes_to_its_ring_backend(icmp_prog):
    icmp_prog.flush_conntrack()
    flow = eth() / IPv6(src=CLIENT6, dst=DSR_VIP6) / TCP(sport=46100, dport=80, flags="A")
    quote = IPv6(src=DSR_VIP6, dst=CLIENT6) / TCP(sport=80, dport=46100, flags="A")
    err = Ether(bytes(eth() / IPv6(src="2001:db8:9::9", dst=DSR_VIP6) / ICMPv6PacketTooBig(mtu=1400) / quote))
    out = run_row(icmp_prog, err, "FL_TX_ICMP_TO_BACKEND")
    want = err.copy()
    want[Ether].src, want[Ether].dst = LB_MAC, fake_mac(expected_backend(icmp_prog.config, icmp_prog.sizes, flow))
    assert out == bytes(want)


def test_frag_needed_about_a_nat_flow_passes(icmp_prog):
    flow = eth() / IP(src=CLIENT4, dst=NAT4) / TCP(sport=46002, dport=80, flags="S")
    icmp_prog.run(bytes(flow))
    err = frag_needed_about(flow, NAT4)
    assert run_row(icmp_prog, err, "FL_PASS_VIP_PORT") == bytes(err)


def test_packet_too_big_about_an_ipv6_flow_goes_to_its_backend(icmp_prog):
    flow = eth() / IPv6(src=CLIENT6, dst=DSR_VIP6) / TCP(sport=46003, dport=80, flags="S")
    backend_mac = Ether(icmp_prog.run(bytes(flow))[1]).dst
    quote = IPv6(src=DSR_VIP6, dst=CLIENT6) / TCP(sport=80, dport=46003, flags="SA")
    err = Ether(bytes(eth() / IPv6(src="2001:db8:9::9", dst=DSR_VIP6) / ICMPv6PacketTooBig(mtu=1400) / quote))
    out = run_row(icmp_prog, err, "FL_TX_ICMP_TO_BACKEND")
    want = err.copy()
    want[Ether].src, want[Ether].dst = LB_MAC, backend_mac
    assert out == bytes(want)


def test_arp_request_for_an_announced_vip_is_answered(icmp_prog):
    pkt = Ether(src=CLIENT_MAC, dst="ff:ff:ff:ff:ff:ff") / ARP(op=1, hwsrc=CLIENT_MAC, psrc=CLIENT4, pdst=ANNOUNCED4)
    out = run_row(icmp_prog, pkt, "FL_TX_ARP_REPLY")
    want = Ether(src=LB_MAC, dst=CLIENT_MAC) / ARP(op=2, hwsrc=LB_MAC, psrc=ANNOUNCED4, hwdst=CLIENT_MAC, pdst=CLIENT4)
    assert out == bytes(want)[:len(out)]
    assert len(out) == len(bytes(pkt))


@pytest.mark.parametrize("with_option", [True, False], ids=["NS with source link-layer option", "NS without options"])
def test_neighbour_solicitation_for_an_announced_vip_is_answered(icmp_prog, with_option):
    ns = Ether(src=CLIENT_MAC, dst="33:33:ff:03:00:01") / IPv6(src=CLIENT6, dst="ff02::1:ff03:1", hlim=255) / \
        ICMPv6ND_NS(tgt=ANNOUNCED6)
    if with_option:
        ns = ns / ICMPv6NDOptSrcLLAddr(lladdr=CLIENT_MAC)
    ns = Ether(bytes(ns))
    out = run_row(icmp_prog, ns, "FL_TX_ND_ADVERT")
    want = Ether(src=LB_MAC, dst=CLIENT_MAC) / IPv6(src=ANNOUNCED6, dst=CLIENT6, hlim=255) / \
        ICMPv6ND_NA(tgt=ANNOUNCED6, R=0, S=1, O=1) / ICMPv6NDOptDstLLAddr(lladdr=LB_MAC)
    assert out == bytes(want)


# ---- two-arm: out of another interface ---------------------------------------------

BACKEND_SIDE_MAC = "02:00:00:00:0b:0b"
BACKEND_SIDE_MTU = 1500
NOT_A_DEVICE = 999                  # an ifindex no interface has


@pytest.fixture(scope="module")
def backend_side(runid):
    """The backends' interface: a veth of this run (down, no address, MTU 1500),
    so that the program's MTU check has a real egress device to consult."""
    import subprocess
    name = f"flm{runid}"
    subprocess.run(["ip", "link", "add", name, "mtu", str(BACKEND_SIDE_MTU), "type", "veth",
                    "peer", "name", f"flm{runid}p"], check=True)
    try:
        yield int(open(f"/sys/class/net/{name}/ifindex").read())
    finally:
        subprocess.run(["ip", "link", "del", name], check=False)


@pytest.fixture
def two_arm(prog, backend_side):
    """Backends of the modes' VIPs behind another interface (slot 1). The devmap
    slot points at lo, the one device test runs may send to: nothing is sent."""
    import ctypes

    from fastlb.kernel import structs
    maps = prog.maps
    saved = {}
    iface = structs.Iface(ifindex=backend_side)
    ctypes.memmove(iface.mac, structs.mac_bytes(BACKEND_SIDE_MAC), 6)
    clients = structs.Iface(ifindex=1)  # slot 0: the clients' side, where test frames arrive (lo)
    ctypes.memmove(clients.mac, structs.mac_bytes(LB_MAC), 6)
    maps.update("ifaces", ctypes.c_uint32(0), clients)
    maps.update("ifaces", ctypes.c_uint32(1), iface)
    maps.update("tx_ports", ctypes.c_uint32(1), ctypes.c_int32(1))
    for be_id in range(prog.sizes.max_backends):
        entry = maps.lookup("backends", ctypes.c_uint32(be_id))
        if entry is not None and entry.flags:
            saved[be_id] = structs.Backend.from_buffer_copy(entry)
            entry.egress_ifindex, entry.egress_slot = backend_side, 1
            maps.update("backends", ctypes.c_uint32(be_id), entry)
    prog.flush_conntrack()
    yield prog
    for be_id, entry in saved.items():
        maps.update("backends", ctypes.c_uint32(be_id), entry)
    for slot in (0, 1):
        maps.update("ifaces", ctypes.c_uint32(slot), structs.Iface())
    maps.delete("tx_ports", ctypes.c_uint32(1))
    prog.flush_conntrack()


@pytest.mark.parametrize("desc,make,reason", [
    ("DSR", lambda: eth() / IP(src=CLIENT4, dst=DSR_VIP4) / TCP(sport=47000, dport=80, flags="S"), "FL_REDIRECT_DSR"),
    ("tunnel", lambda: eth() / IP(src=CLIENT4, dst=TUN4) / TCP(sport=47000, dport=80, flags="S"), "FL_REDIRECT_TUNNEL"),
    ("NAT", lambda: eth() / IP(src=CLIENT4, dst=NAT4) / TCP(sport=47000, dport=80, flags="S"), "FL_REDIRECT_NAT"),
], ids=lambda v: v if isinstance(v, str) and " " not in v else None)
def test_two_arm_sends_to_backends_out_of_their_interface(icmp_prog, two_arm, desc, make, reason):
    pkt = recompute(make())
    out = Ether(run_row(two_arm, pkt, reason))
    assert out.src == BACKEND_SIDE_MAC  # the egress interface's MAC, not the ingress one
    assert out.dst in {fake_mac(b.address) for v in two_arm.config.vips for b in v.backends}


def test_two_arm_nat_replies_leave_by_the_clients_interface(icmp_prog, two_arm):
    import ctypes

    from fastlb.kernel import structs
    # The reply comes in on the backends' side: make that the clients' slot's "other" interface.
    pkt = recompute(eth() / IP(src=CLIENT4, dst=NAT4) / TCP(sport=47001, dport=80, flags="S"))
    fwd = Ether(two_arm.run(bytes(pkt))[1])
    clients = structs.Iface(ifindex=NOT_A_DEVICE)  # not lo: the reply must be redirected
    ctypes.memmove(clients.mac, structs.mac_bytes(LB_MAC), 6)
    two_arm.maps.update("ifaces", ctypes.c_uint32(0), clients)
    two_arm.maps.update("tx_ports", ctypes.c_uint32(0), ctypes.c_int32(1))
    try:
        reply = recompute(Ether(src=fwd.dst, dst=BACKEND_SIDE_MAC) / IP(src=fwd[IP].dst, dst=CLIENT4) /
                          TCP(sport=fwd[TCP].dport, dport=47001, flags="SA"))
        out = Ether(run_row(two_arm, reply, "FL_REDIRECT_NAT_REPLY"))
        assert (out.src, out.dst, out[IP].src, out[TCP].sport) == (LB_MAC, CLIENT_MAC, NAT4, 80)
    finally:
        two_arm.maps.delete("tx_ports", ctypes.c_uint32(0))


def test_two_arm_icmp_error_goes_out_of_the_backends_interface(icmp_prog, two_arm):
    flow = eth() / IP(src=CLIENT4, dst=DSR_VIP4) / TCP(sport=47002, dport=80, flags="S")
    backend_mac = Ether(two_arm.run(bytes(flow))[1]).dst
    out = Ether(run_row(two_arm, frag_needed_about(flow, DSR_VIP4), "FL_REDIRECT_ICMP_TO_BACKEND"))
    assert (out.dst, out.src) == (backend_mac, BACKEND_SIDE_MAC)


def test_a_backend_whose_interface_is_not_attached_is_dropped(icmp_prog, two_arm):
    import ctypes

    from fastlb.kernel import structs
    two_arm.maps.update("ifaces", ctypes.c_uint32(1), structs.Iface())  # slot 1 gone
    pkt = recompute(eth() / IP(src=CLIENT4, dst=DSR_VIP4) / TCP(sport=47003, dport=80, flags="S"))
    run_row(two_arm, pkt, "FL_DROP_NO_EGRESS")


def test_a_reapply_without_the_mac_keeps_the_interface_mac(icmp_prog):
    """The controller re-applies tables without lb_mac: ARP answers must keep the LB's MAC."""
    from fastlb.dataplane import tables
    tables.apply(icmp_prog.maps, icmp_prog.config, {str(b.address): fake_mac(b.address)
                                                    for v in icmp_prog.config.vips for b in v.backends},
                 icmp_prog.sizes)
    pkt = Ether(src=CLIENT_MAC, dst="ff:ff:ff:ff:ff:ff") / ARP(op=1, hwsrc=CLIENT_MAC, psrc=CLIENT4, pdst=ANNOUNCED4)
    out = Ether(run_row(icmp_prog, pkt, "FL_TX_ARP_REPLY"))
    assert out[ARP].hwsrc == LB_MAC and out.src == LB_MAC


# ---- the tunnel's MTU check: the L3 length against the egress device -------------

def too_big_reply4(pkt, mtu):
    """The rule: an ICMP frag-needed from icmp_source to the client, quoting the IP
    header and 8 bytes, next-hop MTU = the egress MTU minus the outer header; the
    L2 header (VLAN tags kept) turned around."""
    quote = bytes(pkt[IP])[:28]
    l2 = pkt.copy()
    l2[Ether].src, l2[Ether].dst = pkt[Ether].dst, pkt[Ether].src
    l2_bytes = bytes(l2)[:len(bytes(pkt)) - len(bytes(pkt[IP]))]
    icmp = IP(src="198.18.0.2", dst=pkt[IP].src, ttl=64, id=0) / ICMP(type=3, code=4, nexthopmtu=mtu) / Raw(quote)
    return l2_bytes + bytes(IP(bytes(icmp)))


@pytest.mark.parametrize("tags", [0, 1, 2], ids=["untagged", "one VLAN tag", "two VLAN tags"])
@pytest.mark.parametrize("l3_len,fits", [(1480, True), (1481, False)], ids=["1480 fits", "1481 too big"])
def test_tunnel_mtu_is_the_egress_devices_l3_mtu(icmp_prog, two_arm, tags, l3_len, fits):
    """IPv4-in-IPv4 adds 20 bytes: an inner packet of 1480 bytes fits a 1500 MTU
    egress, VLAN tags or not (tags are L2: they do not count against the MTU);
    1481 does not, and the client gets frag-needed with MTU 1480."""
    l2 = eth()
    for vlan in range(tags):
        l2 = l2 / Dot1Q(vlan=7 + vlan)
    payload = l3_len - 20 - 20
    pkt = Ether(bytes(l2 / IP(src=CLIENT4, dst=TUN4, flags="DF") / TCP(sport=48000 + tags, dport=80, flags="A")
                      / Raw(b"m" * payload)))
    if fits:
        out = run_row(two_arm, pkt, "FL_REDIRECT_TUNNEL")
        assert len(out) == len(bytes(pkt)) + 20
    else:
        out = run_row(two_arm, pkt, "FL_TX_ICMP_TOO_BIG")
        assert out == too_big_reply4(pkt, BACKEND_SIDE_MTU - 20)


def test_a_too_big_first_packet_records_no_flow(icmp_prog, two_arm):
    """The flow is recorded only once its packet passed the MTU check: a datagram
    that gets frag-needed instead opened nothing on the backend."""
    pkt = Ether(bytes(eth() / IP(src=CLIENT4, dst=TUN4, flags="DF") / UDP(sport=48100, dport=53) / Raw(b"u" * 1470)))
    run_row(two_arm, pkt, "FL_TX_ICMP_TOO_BIG")
    assert not list(two_arm.maps.keys("conntrack"))


def test_a_too_big_syn_of_a_known_tunnel_flow_is_that_flows_packet(icmp_prog, two_arm):
    """A SYN to a maglev VIP takes the SYN path (pick, then insert), but one of a
    flow that has an entry is that flow's packet (rule 9), too big or not: its FIN
    closes the entry and ends the flow's active count, as on any other hit (the fuzzer's
    seed 2467642223 found the SYN path's MTU check skipping the entry)."""
    def segment(flags, size=0):
        return Ether(bytes(eth() / IP(src=CLIENT4, dst=TUN4, flags="DF") / TCP(sport=48200, dport=80, flags=flags)
                           / Raw(b"s" * size)))

    run_row(two_arm, segment("S"), "FL_REDIRECT_TUNNEL")
    run_row(two_arm, segment("A"), "FL_REDIRECT_TUNNEL")
    [(_, entry)] = flows.read(two_arm.maps)
    assert entry.flags & cdefs.FL_CT_F_COUNTED
    active = two_arm.maps.lookup("backend_active", ctypes.c_uint32(entry.backend_id)).value
    out = run_row(two_arm, segment("SF", 1481 - 40), "FL_TX_ICMP_TOO_BIG")
    assert out == too_big_reply4(segment("SF", 1481 - 40), BACKEND_SIDE_MTU - 20)
    [(_, entry)] = flows.read(two_arm.maps)
    assert entry.flags & cdefs.FL_CT_F_CLOSING
    assert two_arm.maps.lookup("backend_active", ctypes.c_uint32(entry.backend_id)).value == active - 1


@pytest.fixture
def icmp_limit(two_arm):
    """The generated-ICMP token bucket set to `burst` errors, refilled at 1 a second."""
    import ctypes
    zero = ctypes.c_uint32(0)
    saved = two_arm.maps.lookup("settings", zero)
    saved = type(saved).from_buffer_copy(saved)
    limited = type(saved).from_buffer_copy(saved)
    limited.icmp_rate, limited.icmp_burst = 1, 4
    two_arm.maps.update("settings", zero, limited)
    yield limited.icmp_burst
    two_arm.maps.update("settings", zero, saved)


def test_generated_icmp_errors_are_rate_limited_per_cpu(icmp_prog, two_arm, icmp_limit):
    """RFC 1812 4.3.2.8 / RFC 4443 2.4(f): a token bucket per CPU (icmp_rate a
    second, icmp_burst deep). Within the burst every too-big packet gets its
    frag-needed; beyond it they are dropped, counted as FL_DROP_ICMP_RATE_LIMITED.
    The 1-a-second refill can add one token per second the loop took."""
    import os
    import time
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})  # one CPU: one bucket
    try:
        before = two_arm.reason_counts()
        start = time.monotonic()
        for i in range(icmp_limit * 3):
            pkt = eth() / IP(src=CLIENT4, dst=TUN4, flags="DF") / TCP(sport=48200 + i, dport=80, flags="A") / \
                Raw(b"b" * 1470)
            two_arm.run(bytes(pkt))
        elapsed = time.monotonic() - start
        after = two_arm.reason_counts()
    finally:
        os.sched_setaffinity(0, set(range(os.cpu_count())))
    sent = after["FL_TX_ICMP_TOO_BIG"] - before["FL_TX_ICMP_TOO_BIG"]
    limited = after["FL_DROP_ICMP_RATE_LIMITED"] - before["FL_DROP_ICMP_RATE_LIMITED"]
    assert sent + limited == icmp_limit * 3
    assert icmp_limit <= sent <= icmp_limit + int(elapsed) + 1
