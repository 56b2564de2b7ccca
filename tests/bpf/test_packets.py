"""Packet tables through the real XDP program (BPF_PROG_TEST_RUN).

Each row: a description, a scapy input, the expected verdict reason (its
FL_PASS_/FL_DROP_/FL_TX_ prefix gives the XDP verdict) and the rule that
derives the expected output bytes from the input. Forwarded rows expect
"destination MAC becomes the backend's, source MAC becomes the LB's (the
frame's old destination), all else unchanged"; the backend comes from the
userspace model (fastlb.core's flow hash and Maglev table), never from the
program's own output. Every row also checks that exactly one reason counter
moved, by one.
"""

from __future__ import annotations

import pytest
from scapy.layers.inet import TCP
from scapy.layers.l2 import Ether

from fastlb.kernel import cdefs
from fastlb.testing.testbed import XDP_VERDICTS as VERDICT_CODES
from fastlb.testing.testbed import fake_mac
from helpers.packets import CONFIG, ROWS, eth, expected_backend, tcp, v4

pytestmark = pytest.mark.root


@pytest.fixture(scope="module")
def prog(loaded):
    loaded.apply(CONFIG)
    loaded.flush_conntrack()
    return loaded


def dsr_rewrite(config, sizes, pkt) -> bytes:
    """The rule: dst MAC -> the backend's, src MAC -> the LB's (the old dst), nothing else."""
    out = pkt.copy()
    backend = expected_backend(config, sizes, pkt)
    out[Ether].src = pkt[Ether].dst
    out[Ether].dst = fake_mac(backend)
    return bytes(out)


@pytest.mark.parametrize("row", ROWS, ids=[r.desc for r in ROWS])
def test_packet_table(prog, row):
    pkt = row.packet()
    data = bytes(pkt)
    before = prog.reason_counts()
    verdict, out = prog.run(data)
    after = prog.reason_counts()

    assert verdict == VERDICT_CODES[cdefs.reason_verdict(row.reason)], f"verdict {verdict}"
    moved = {k: after[k] - before[k] for k in after if after[k] != before[k]}
    assert moved == {row.reason: 1}
    if row.expect == "same":
        assert out == data
    elif row.expect == "dsr":
        assert out == dsr_rewrite(prog.config, prog.sizes, Ether(data))


def test_vip_and_backend_counters_move(prog):
    pkt = eth() / v4() / tcp(sport=41001)
    backend = expected_backend(prog.config, prog.sizes, pkt)
    vip_id = 0
    be_id = next(i for i, b in enumerate(prog.config.vips[0].backends) if str(b.address) == backend)
    vip_before = prog.maps.counter("vip_stats", vip_id)
    be_before = prog.maps.counter("backend_stats", be_id)
    vip_before = (vip_before.packets, vip_before.bytes, vip_before.new_flows)
    be_before = (be_before.packets, be_before.bytes, be_before.new_flows)
    for _ in range(3):
        verdict, _ = prog.run(bytes(pkt))
        assert verdict == VERDICT_CODES["tx"]
    v = prog.maps.counter("vip_stats", vip_id)
    b = prog.maps.counter("backend_stats", be_id)
    size = len(pkt)
    assert (v.packets, v.bytes, v.new_flows) == (vip_before[0] + 3, vip_before[1] + 3 * size, vip_before[2] + 1)
    assert (b.packets, b.bytes, b.new_flows) == (be_before[0] + 3, be_before[1] + 3 * size, be_before[2] + 1)


def test_repeats_within_one_connection_count_one_new_flow(prog):
    """Issue 13 item 5: every packet a client sends in one connection, retransmissions
    included (a SYN again, a FIN again, TIME_WAIT's ACK of the server's repeated FIN),
    counts as a packet of one flow: new_flows moves once, on the VIP and on its backend."""
    sport = 41002
    pkt = eth() / v4() / tcp(sport=sport)
    backend = expected_backend(prog.config, prog.sizes, pkt)
    be_id = next(i for i, b in enumerate(prog.config.vips[0].backends) if str(b.address) == backend)
    before = [prog.maps.counter(t, i) for t, i in (("vip_stats", 0), ("backend_stats", be_id))]
    flags = ["S", "S", "A", "PA", "A", "FA", "FA", "A"]
    frames = [bytes(eth() / v4() / tcp(sport=sport, flags=f)) for f in flags]
    for data in frames:
        verdict, out = prog.run(data)
        assert verdict == VERDICT_CODES["tx"] and _backend_mac(out) == fake_mac(backend)
    after = [prog.maps.counter(t, i) for t, i in (("vip_stats", 0), ("backend_stats", be_id))]
    for b, a in zip(before, after):
        assert (a.packets - b.packets, a.bytes - b.bytes, a.new_flows - b.new_flows) == \
            (len(frames), sum(map(len, frames)), 1)


def _backend_mac(out: bytes) -> str:
    return Ether(out).dst


def test_conntrack_keeps_a_flow_on_its_backend_when_the_table_changes(prog, loaded):
    pkt = eth() / v4() / tcp(sport=42424, flags="A")
    first = expected_backend(prog.config, prog.sizes, pkt)
    verdict, out = prog.run(bytes(pkt))
    assert verdict == VERDICT_CODES["tx"] and _backend_mac(out) == fake_mac(first)

    # Weight 0 takes the flow's backend out of the VIP's table (first VIP's block).
    changed = loaded.apply(CONFIG.replace(f'address = "{first}"\n', f'address = "{first}"\nweight = 0\n', 1))
    try:
        now = expected_backend(changed, prog.sizes, pkt)
        assert now != first
        verdict, out = prog.run(bytes(pkt))
        assert verdict == VERDICT_CODES["tx"] and _backend_mac(out) == fake_mac(first), "conntrack lost the flow"
        # A flow with no conntrack entry follows the new table.
        loaded.flush_conntrack()
        verdict, out = prog.run(bytes(pkt))
        assert verdict == VERDICT_CODES["tx"] and _backend_mac(out) == fake_mac(now)
    finally:
        loaded.apply(CONFIG)
        loaded.flush_conntrack()


def test_a_removed_vip_stops_forwarding_its_established_flows(prog, loaded):
    """Slot 0 passes to another VIP: the old flow's conntrack entry must not forward."""
    pkt = eth() / v4() / tcp(sport=43434, flags="A")
    verdict, _ = prog.run(bytes(pkt))
    assert verdict == VERDICT_CODES["tx"]
    without_first = CONFIG.replace(CONFIG[CONFIG.index("[[vip]]"):CONFIG.index("[[vip]]", CONFIG.index("[[vip]]") + 1)], "", 1)
    loaded.apply(without_first)
    try:
        assert loaded.maps.lookup("conntrack", next(iter(loaded.maps.keys("conntrack")))) is not None
        before = prog.reason_counts()
        verdict, out = prog.run(bytes(pkt))
        after = prog.reason_counts()
        assert verdict == VERDICT_CODES["pass"] and out == bytes(pkt)
        assert {k: after[k] - before[k] for k in after if after[k] != before[k]} == {"FL_PASS_VIP_PORT": 1}
    finally:
        loaded.apply(CONFIG)
        loaded.flush_conntrack()


def test_removing_a_backend_moves_only_its_own_flows(prog, loaded):
    """Its flows go to a live backend; every other flow keeps its backend (slots are stable)."""
    flows = [eth() / v4() / tcp(sport=port, flags="A") for port in range(45000, 45060)]
    backend_of = {}
    for pkt in flows:
        verdict, out = prog.run(bytes(pkt))
        assert verdict == VERDICT_CODES["tx"]
        backend_of[pkt[TCP].sport] = _backend_mac(out)
    gone = fake_mac("198.18.0.11")
    assert gone in backend_of.values() and len(set(backend_of.values())) == 3
    cfg = loaded.apply(CONFIG.replace('[[vip.backend]]\naddress = "198.18.0.11"\n', "", 1))
    try:
        for pkt in flows:
            verdict, out = prog.run(bytes(pkt))
            assert verdict == VERDICT_CODES["tx"]
            before = backend_of[pkt[TCP].sport]
            if before == gone:
                assert _backend_mac(out) == fake_mac(expected_backend(cfg, prog.sizes, pkt))
            else:
                assert _backend_mac(out) == before, "an unrelated established flow moved"
    finally:
        loaded.apply(CONFIG)
        loaded.flush_conntrack()
