"""Every algorithm through the real XDP program, against the userspace model.

`fastlb explain` (fastlb.dataplane.explain) must name the backend the kernel picks:
10,000 random flows to a maglev VIP and to lc/lrt VIPs with fixed counts.
rr/wrr walk a per-CPU cursor, so the test pins itself to one CPU and checks
the exact sequence. Active-connection counting follows the conntrack state.
"""

from __future__ import annotations

import ctypes
import ipaddress
import os
import random

import pytest
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.l2 import Ether

from fastlb.dataplane import explain
from fastlb.testing.testbed import XDP_VERDICTS, fake_mac

pytestmark = pytest.mark.root

VIP = "198.19.0.100"
BACKENDS = ("198.18.0.11", "198.18.0.12", "198.18.0.13")
FLOWS = 10_000


def vip_block(port, algorithm, protocol="udp", weights=(1, 1, 1), hash_fields="5tuple"):
    text = (f'[[vip]]\naddress = "{VIP}"\nport = {port}\nprotocol = "{protocol}"\n'
            f'algorithm = "{algorithm}"\nhash = "{hash_fields}"\n')
    for addr, w in zip(BACKENDS, weights):
        text += f'[[vip.backend]]\naddress = "{addr}"\nweight = {w}\n'
    return text


# new_flow_rate = 0: the guard off. Its default (conntrack_size / possible CPUs a
# second, 2048 here on 2 CPUs) is below the rate these loops make new flows, and
# a flow over it goes by its ring slot, which explain() does not model for lc/lrt.
CONFIG = "[settings]\nconntrack_size = 4096\nnew_flow_rate = 0\nhash_seed = 12345\n\n" + "\n".join([
    vip_block(1001, "maglev", weights=(1, 2, 3)),
    vip_block(1002, "lc", weights=(3, 1, 2)),
    vip_block(1003, "lrt", weights=(1, 1, 2)),
    vip_block(1004, "wrr", "tcp", weights=(5, 1, 1)),
    vip_block(1005, "rr", "tcp", weights=(5, 1, 1)),
    vip_block(1006, "lc", "tcp"),
    vip_block(1007, "maglev", "tcp", hash_fields="src"),
])
MAC_TO_BACKEND = {fake_mac(b): b for b in BACKENDS}


@pytest.fixture(scope="module")
def bed():
    from fastlb.kernel.layout import Sizes

    # hash_seed is compiled in: this module needs its own load with seed 12345.
    from fastlb.testing.testbed import Testbed
    sizes = Sizes(max_vips=8, max_backends=64, conntrack_size=4096, hash_seed=12345)
    with Testbed(sizes, name=f"alg-{os.getpid()}") as tb:
        tb.apply(CONFIG)
        yield tb


def vip_of(bed, port):
    return next(v for v in bed.config.vips if v.port == port)


def backend_ids(bed, port) -> list[int]:
    """Backend slot ids of a VIP, in config order."""
    from fastlb.kernel import structs
    vip = vip_of(bed, port)
    ids = []
    for b in vip.backends:
        for be_id in range(bed.sizes.max_backends):
            e = bed.maps.lookup("backends", ctypes.c_uint32(be_id))
            if e is not None and e.flags and bytes(e.addr) == bytes(structs.pack_addr(b.address)) \
                    and structs.port_host(e.port) == b.port and bed.maps.lookup("vips", structs.vip_key(
                        vip.address, vip.port, vip.proto_number)).value == e.vip_id:
                ids.append(be_id)
    assert len(ids) == len(vip.backends)
    return ids


def set_figures(bed, port, active, rtt=None):
    for i, be_id in enumerate(backend_ids(bed, port)):
        bed.maps.update("backend_active", ctypes.c_uint32(be_id), ctypes.c_uint32(active[i]))
        if rtt is not None:
            e = bed.maps.lookup("backends", ctypes.c_uint32(be_id))
            e.rtt_us = rtt[i]
            bed.maps.update("backends", ctypes.c_uint32(be_id), e)


def frame(src, sport, dport, proto="udp", flags="S") -> bytes:
    l4 = UDP(sport=sport, dport=dport) if proto == "udp" else TCP(sport=sport, dport=dport, flags=flags)
    return bytes(Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02") / IP(src=src, dst=VIP) / l4)


def kernel_pick(bed, data) -> str:
    verdict, out = bed.run(data)
    assert verdict == XDP_VERDICTS["tx"]
    return MAC_TO_BACKEND[Ether(out).dst]


def random_flows(seed):
    rnd = random.Random(seed)
    for _ in range(FLOWS):
        yield str(ipaddress.IPv4Address(rnd.randrange(0xC6120000, 0xC6140000))), rnd.randrange(1024, 65536)


def fast_frames(port):
    """(src, sport, frame) for the random flows: a template with the source patched in
    (the program reads no checksum, and scapy per frame would dominate the test)."""
    template = bytearray(frame("0.0.0.0", 0, port))
    for src, sport in random_flows(port):
        template[26:30] = ipaddress.IPv4Address(src).packed
        template[34:36] = sport.to_bytes(2, "big")
        yield src, sport, bytes(template)


@pytest.mark.parametrize("port,active,rtt,worst", [
    (1001, None, None, None),
    # scores (active+1)/weight: 13.7, 8, 10: the most loaded (.11) never wins a pair
    (1002, [40, 7, 19], None, "198.18.0.11"),
    # scores rtt*(active+1)/weight: 3600, 1500, 5000: .13 never wins a pair
    (1003, [3, 9, 4], [900, 150, 2000], "198.18.0.13"),
], ids=["maglev", "lc", "lrt"])
def test_explain_agrees_with_the_kernel_on_10000_flows(bed, port, active, rtt, worst):
    vip = vip_of(bed, port)
    if active is not None:
        set_figures(bed, port, active, rtt)
    bed.flush_conntrack()
    disagree, seen, worst_in_a_pair = 0, set(), 0
    for src, sport, data in fast_frames(port):
        want = explain.explain(bed.config, vip, src, sport, active, rtt)
        got = kernel_pick(bed, data)
        disagree += want.backend != got
        seen.add(got)
        worst_in_a_pair += len(want.candidates) == 2 and got == worst
    bed.flush_conntrack()
    assert disagree == 0
    assert seen >= set(BACKENDS) - {worst}  # the worst may win only when it is the sole candidate
    assert worst_in_a_pair == 0


def test_lc_prefers_the_idle_backends(bed):
    """Backend 1 holds 30 connections, 2 and 3 none: new flows avoid 1 (most-loaded never wins a pair)."""
    set_figures(bed, 1002, [30, 0, 0])
    bed.flush_conntrack()
    picks = {kernel_pick(bed, frame(src, sport, 1002)) for src, sport in list(random_flows(7))[:500]}
    assert BACKENDS[0] not in picks


def _on_one_cpu():
    cpu = sorted(os.sched_getaffinity(0))[0]
    old = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {cpu})
    return cpu, old


@pytest.mark.parametrize("port,expected", [
    (1004, ["198.18.0.11", "198.18.0.11", "198.18.0.12", "198.18.0.11", "198.18.0.13", "198.18.0.11",
            "198.18.0.11"]),
    (1005, list(BACKENDS)),
], ids=["wrr 5:1:1 interleaves", "rr ignores weights"])
def test_sequence_algorithms_walk_the_smooth_wrr_sequence(bed, port, expected):
    vip = vip_of(bed, port)
    sequence = explain.explain(bed.config, vip, "198.18.0.1", 1).sequence
    assert sequence == expected
    cpu, old = _on_one_cpu()
    try:
        bed.flush_conntrack()
        picks = [kernel_pick(bed, frame("198.18.1.1", 20000 + i, port, "tcp", "SF")) for i in range(10 * len(expected))]
    finally:
        os.sched_setaffinity(0, old)
        bed.flush_conntrack()
    # Where this CPU's cursor starts depends on earlier tests: find the rotation.
    n = len(expected)
    rotations = [i for i in range(n) if picks[:n] == expected[i:] + expected[:i]]
    assert rotations, f"kernel order {picks[:n]} is no rotation of {expected}"
    r = rotations[0]
    assert picks == (expected[r:] + expected[:r]) * 10


def test_active_connections_follow_syn_and_fin(bed):
    port = 1006
    ids = backend_ids(bed, port)
    set_figures(bed, port, [0, 0, 0])
    bed.flush_conntrack()

    def counts():
        return [bed.maps.lookup("backend_active", ctypes.c_uint32(i)).value for i in ids]

    opened = {}
    for sport in range(30000, 30030):
        opened[sport] = kernel_pick(bed, frame("198.18.2.2", sport, port, "tcp", "S"))
    assert sum(counts()) == 0   # a flow counts from its first ACK: held SYNs never do
    for sport in range(30000, 30030):  # the handshake's ACK, twice: one increment each
        for _ in range(2):
            assert kernel_pick(bed, frame("198.18.2.2", sport, port, "tcp", "A")) == opened[sport]
    assert sum(counts()) == 30
    for sport in range(30000, 30010):  # FIN, then FIN again, then the last ACK: one decrement each
        for flags in ("FA", "FA", "A"):
            assert kernel_pick(bed, frame("198.18.2.2", sport, port, "tcp", flags)) == opened[sport]
    assert sum(counts()) == 20
    for sport in range(30010, 30015):
        kernel_pick(bed, frame("198.18.2.2", sport, port, "tcp", "R"))
    assert sum(counts()) == 15
    kernel_pick(bed, frame("198.18.2.2", 31000, port, "tcp", "R"))  # a new flow that opens with RST is not counted
    assert sum(counts()) == 15
    per_backend = [sum(1 for s, b in opened.items() if s >= 30015 and b == name) for name in BACKENDS]
    assert counts() == per_backend
    bed.flush_conntrack()


def test_source_hash_gives_one_client_one_backend(bed):
    bed.flush_conntrack()
    for client in ("198.18.3.1", "198.18.3.2", "198.18.3.3", "198.18.3.4"):
        picks = {kernel_pick(bed, frame(client, sport, 1007, "tcp")) for sport in range(40000, 40050)}
        assert len(picks) == 1
        vip = vip_of(bed, 1007)
        assert picks == {explain.explain(bed.config, vip, client, 1).backend}
    bed.flush_conntrack()


def events(bed) -> dict[str, int]:
    from fastlb.kernel import cdefs
    return {name: bed.maps.counter("event_stats", idx).packets
            for name, idx in cdefs.enum("fl_event").items() if name != "FL_EVENT_MAX"}


def ring_backend(bed, vip, src, sport) -> str:
    """The backend of the flow's ring slot (what maglev would pick)."""
    from fastlb.dataplane.tables import ring_positions
    h = explain.flow_hash(vip, src, sport, bed.sizes.hash_seed)
    return str(vip.backends[ring_positions(vip, bed.sizes)[h % bed.sizes.ring_size]].address)


def test_a_mid_flow_packet_without_an_entry_takes_its_ring_slot(bed):
    """Evicted, unrecorded, or moved here by ECMP: every box agrees on the ring slot."""
    vip = vip_of(bed, 1004)  # wrr: a SYN would take the next sequence slot
    bed.flush_conntrack()
    before = events(bed)["FL_EV_MIDFLOW_RING"]
    for sport in range(33000, 33040):
        assert kernel_pick(bed, frame("198.18.4.4", sport, 1004, "tcp", "A")) == \
            ring_backend(bed, vip, "198.18.4.4", sport)
    assert events(bed)["FL_EV_MIDFLOW_RING"] - before == 40
    bed.flush_conntrack()


def test_the_new_flow_guard_forwards_but_does_not_record_a_flood(bed):
    limited = CONFIG.replace("new_flow_rate = 0\n", "new_flow_rate = 20\n")
    bed.apply(limited)
    vip = vip_of(bed, 1004)
    cpu, old = _on_one_cpu()
    try:
        bed.flush_conntrack()
        before = events(bed)["FL_EV_GUARD_UNRECORDED"]
        # One second's worth of the window may already be used by earlier tests: push well past it.
        picks = {sport: kernel_pick(bed, frame("198.18.5.5", sport, 1004, "tcp", "S")) for sport in range(34000, 34200)}
        unrecorded = events(bed)["FL_EV_GUARD_UNRECORDED"] - before
        recorded = len(list(bed.maps.keys("conntrack")))
    finally:
        os.sched_setaffinity(0, old)
        bed.apply(CONFIG)
        bed.flush_conntrack()
    assert recorded <= 20 and unrecorded >= 180 and recorded + unrecorded == 200
    # Unrecorded flows went to their ring slot, so all their packets agree.
    ring = [s for s in picks if picks[s] == ring_backend(bed, vip, "198.18.5.5", s)]
    assert len(ring) >= unrecorded


def test_a_syn_on_a_closed_flows_entry_is_a_new_connection(bed):
    """A client reusing its port after FIN: the SYN picks and counts afresh."""
    port = 1006  # lc, TCP
    ids = backend_ids(bed, port)
    set_figures(bed, port, [0, 0, 0])
    bed.flush_conntrack()

    def counts():
        return sum(bed.maps.lookup("backend_active", ctypes.c_uint32(i)).value for i in ids)

    from fastlb.kernel import structs
    vip_id = bed.maps.lookup("vips", structs.vip_key(vip_of(bed, port).address, port, 6)).value
    new_before = bed.maps.counter("vip_stats", vip_id).new_flows
    kernel_pick(bed, frame("198.18.6.6", 35000, port, "tcp", "S"))
    kernel_pick(bed, frame("198.18.6.6", 35000, port, "tcp", "A"))
    assert counts() == 1
    kernel_pick(bed, frame("198.18.6.6", 35000, port, "tcp", "FA"))
    assert counts() == 0
    kernel_pick(bed, frame("198.18.6.6", 35000, port, "tcp", "S"))
    kernel_pick(bed, frame("198.18.6.6", 35000, port, "tcp", "A"))
    assert counts() == 1
    assert bed.maps.counter("vip_stats", vip_id).new_flows - new_before == 2
    bed.flush_conntrack()


def test_tunnel_outer_source_host_bits_use_the_hash_seed(bed):
    """The tunnel's per-flow source bits are jhash_3words(the source address's words
    xor'ed, the ports word, the protocol, hash_seed) (docs/DATAPLANE.md): with the
    seed secret, nobody can aim flows at one RSS queue of a backend."""
    import ipaddress

    from scapy.layers.inet import IP, TCP
    from scapy.layers.l2 import Ether

    from fastlb import core
    text = CONFIG.replace("[settings]\n", '[settings]\ntunnel_source = "198.18.0.0/16"\n') + \
        '\n[[vip]]\naddress = "198.19.9.1"\nport = 80\nforwarding = "tunnel"\n[[vip.backend]]\naddress = "198.18.1.11"\n'
    bed.apply(text)
    try:
        for sport in range(42000, 42016):
            pkt = Ether() / IP(src="198.18.0.1", dst="198.19.9.1") / TCP(sport=sport, dport=80, flags="S")
            _, out = bed.run(bytes(pkt))
            src = int(ipaddress.ip_address(Ether(out)[IP].src)) & 0xffff
            src_word = int.from_bytes(ipaddress.ip_address("198.18.0.1").packed, "little")
            ports = (int.from_bytes((80).to_bytes(2, "big"), "little") << 16) | \
                int.from_bytes(sport.to_bytes(2, "big"), "little")
            bits = core.jhash_3words(src_word, ports, 6, bed.sizes.hash_seed)
            # The host bits are the address's last two bytes: those of the word as stored.
            assert src == int.from_bytes(bits.to_bytes(4, "little")[2:], "big")
    finally:
        bed.apply(CONFIG)
        bed.flush_conntrack()
