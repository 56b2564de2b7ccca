"""Persistence in the kernel: a client keeps its backend across its connections, ports and table changes.

The real program through BPF_PROG_TEST_RUN (tests/conftest.py's ``loaded``):
each SYN is a new connection; the backend is read from the output frame's
destination MAC (the testbed gives each backend its own fake MAC).
"""

from __future__ import annotations

import os
import time

import pytest
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.l2 import Ether

from fastlb.dataplane import flows
from fastlb.kernel import cdefs, structs
from fastlb.testing.testbed import LB_MAC, fake_mac

pytestmark = pytest.mark.root

VIP = "198.19.5.1"
CLIENT_MAC = "02:00:00:00:00:01"


def config(backends: int, algorithm="maglev", persistence=600, extra="", ports="port = 80") -> str:
    head = f'[[vip]]\naddress = "{VIP}"\n{ports}\nalgorithm = "{algorithm}"\n'
    if persistence:
        head += f"persistence = {persistence}\n{extra}"
    return head + "".join(f'[[vip.backend]]\naddress = "198.18.5.{10 + i}"\n' for i in range(backends))


@pytest.fixture
def bed(loaded):
    loaded.flush_conntrack()
    for key in list(loaded.maps.keys("persist")):
        loaded.maps.delete("persist", key)
    yield loaded
    loaded.flush_conntrack()


def backend_of(bed, client: str, sport: int, dport: int = 80) -> str:
    pkt = Ether(src=CLIENT_MAC, dst=LB_MAC) / IP(src=client, dst=VIP) / TCP(sport=sport, dport=dport, flags="S")
    _, out = bed.run(bytes(pkt))
    mac = Ether(out).dst
    return next(b for v in bed.config.vips for b in (str(x.address) for x in v.backends) if fake_mac(b) == mac)


def picks(bed, clients, sport0: int, dport: int = 80) -> dict[str, str]:
    return {c: backend_of(bed, c, sport0 + i, dport) for i, c in enumerate(clients)}


CLIENTS = [f"198.18.7.{i}" for i in range(1, 31)]


def test_under_rr_a_bound_client_s_connections_all_go_to_one_backend(bed):
    bed.apply(config(3, "rr"))
    for client in CLIENTS[:5]:
        assert len({backend_of(bed, client, 40000 + n) for n in range(12)}) == 1
    bed.apply(config(3, "rr", persistence=0))
    assert len({backend_of(bed, CLIENTS[0], 41000 + n) for n in range(12)}) == 3   # the control: rr spreads


def test_bindings_survive_added_backends_and_the_control_run_moves(bed):
    bed.apply(config(3))
    before = picks(bed, CLIENTS, 42000)
    bed.apply(config(6))
    after = picks(bed, CLIENTS, 43000)
    assert after == before
    bed.flush_conntrack()
    bed.apply(config(3, persistence=0))
    plain = picks(bed, CLIENTS, 44000)
    bed.apply(config(6, persistence=0))
    moved = sum(plain[c] != b for c, b in picks(bed, CLIENTS, 45000).items())
    print(f"\npersistence: 30 clients, 3 -> 6 backends: {sum(after[c] == before[c] for c in CLIENTS)} kept "
          f"their backend; without persistence {moved} moved")
    assert moved >= 5


def test_a_removed_backend_s_clients_pick_again_and_are_bound_anew(bed):
    bed.apply(config(3))
    before = picks(bed, CLIENTS, 46000)
    gone = before[CLIENTS[0]]
    remaining = 3 - 1
    text = config(3).replace(f'[[vip.backend]]\naddress = "{gone}"\n', "")
    bed.apply(text)
    assert bed.config.vips[0].backends.__len__() == remaining
    after = picks(bed, CLIENTS, 47000)
    assert all(after[c] != gone for c in CLIENTS)
    assert all(after[c] == before[c] for c in CLIENTS if before[c] != gone)   # the others keep theirs
    again = picks(bed, CLIENTS, 48000)
    assert again == after                                                      # and the moved ones are bound anew


def test_the_prefix_groups_clients_and_a_binding_holds_on_every_port_of_a_multi_port_vip(bed):
    bed.apply(config(3, "rr", extra="persistence_prefix = 24\n", ports='ports = [21, "30000-30010"]'))
    first = backend_of(bed, "198.18.9.1", 40000, 21)
    assert {backend_of(bed, f"198.18.9.{i}", 40000 + i, 30000 + i % 11) for i in range(2, 30)} == {first}
    keys = [(k, v) for k, v in flows.bindings(bed.maps)]
    assert len(keys) == 1 and str(structs.unpack_addr(keys[0][0].addr, keys[0][0].family)) == "198.18.9.0"


def live_bindings(bed) -> list[dict]:
    names, slots = flows.Names.read(bed.maps), flows.Slots.read(bed.maps)
    conf = flows.persistence(bed.maps)
    return [flows.describe_binding(k, v, names, slots, conf, flows.now_ns()) for k, v in flows.bindings(bed.maps)]


def test_a_binding_ends_after_persistence_seconds_without_packets(bed):
    bed.apply(config(3, "rr", persistence=1))
    bound = backend_of(bed, CLIENTS[0], 40000)
    [row] = live_bindings(bed)
    assert row["live"] and row["backend"] == f"{bound}:80" and row["client"] == f"{CLIENTS[0]}/32"
    time.sleep(2.2)   # the kernel's coarse clock: the binding is now older than 1 s
    [row] = live_bindings(bed)
    assert not row["live"] and row["expires_in_s"] == 0
    picked = {backend_of(bed, CLIENTS[0], 40100 + n) for n in range(6)}   # rr picks, and binds again
    assert len(picked) == 1 and live_bindings(bed)[0]["live"]


def test_a_multi_port_vip_s_backends_keep_their_slots_when_one_is_removed(bed):
    """A multi-port VIP's backends hold port 0 in the map; placing them again must find those slots,
    or a rebuild (a reload, a removal) would renumber them and their flows and bindings would end."""
    from fastlb.dataplane import tables
    ports = 'ports = [21, "30000-30010"]'
    cfg = bed.apply(config(3, ports=ports))
    before = tables.place(cfg, bed.maps, bed.sizes).backend_ids
    first = f'[[vip.backend]]\naddress = "{cfg.vips[0].backends[0].address}"\n'
    cfg2 = bed.apply(config(3, ports=ports).replace(first, ""))
    after = tables.place(cfg2, bed.maps, bed.sizes).backend_ids
    assert [after[(cfg2.vips[0].name, p)] for p in (0, 1)] == [before[(cfg.vips[0].name, p)] for p in (1, 2)]


def test_clients_bound_to_a_replaced_backend_pick_again_as_a_removed_one_s_do(bed):
    """A config that puts Y where X was (same position, so the same slot with a new backend
    generation) ends X's bindings as a removal would (issue 13 item 1's rule for flows, here for
    bindings): X's clients pick again by rr, the others keep theirs."""
    from fastlb.dataplane import tables
    cfg = bed.apply(config(3, "rr"))
    x = str(cfg.vips[0].backends[1].address)
    before = picks(bed, CLIENTS, 40000)
    on_x = [c for c in CLIENTS if before[c] == x]
    assert len(on_x) >= 5
    slot = tables.place(cfg, bed.maps, bed.sizes).backend_ids[(cfg.vips[0].name, 1)]
    cfg2 = bed.apply(config(3, "rr").replace(f'"{x}"', '"198.18.5.20"'))
    assert tables.place(cfg2, bed.maps, bed.sizes).backend_ids[(cfg2.vips[0].name, 1)] == slot  # Y took X's slot
    rows = {r["client"].split("/")[0]: r for r in live_bindings(bed)}
    assert not any(rows[c]["live"] for c in on_x)                    # flows list --persistent and explain say so
    assert all(rows[c]["live"] for c in CLIENTS if c not in on_x)
    after = picks(bed, CLIENTS, 41000)
    assert all(after[c] == before[c] for c in CLIENTS if c not in on_x)
    assert {after[c] for c in on_x} == {str(b.address) for b in cfg2.vips[0].backends}   # rr spread them again


def _on_one_cpu():
    old = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {sorted(old)[0]})
    return old


def _udp(client: str, sport: int) -> bytes:
    return bytes(Ether(src=CLIENT_MAC, dst=LB_MAC) / IP(src=client, dst=VIP) / UDP(sport=sport, dport=80))


def _backend(bed, data: bytes) -> str:
    _, out = bed.run(data)
    mac = Ether(out).dst
    return next(b for v in bed.config.vips for b in (str(x.address) for x in v.backends) if fake_mac(b) == mac)


def test_a_flow_whose_conntrack_entry_expired_returns_to_its_client_s_binding(bed):
    """Conntrack expiry (udp_timeout, decided by the kernel) ends the flow's entry, not its
    client's binding: the next packet is a new flow, and rr would pick the next backend, but
    the binding (persistence 600, refreshed by the flow's packets) sends it back."""
    bed.apply("[settings]\nudp_timeout = 1\n" + config(3, "rr").replace('port = 80\n', 'port = 80\nprotocol = "udp"\n'))
    old = _on_one_cpu()
    try:
        first = _backend(bed, _udp(CLIENTS[0], 5000))
        expired = bed.maps.counter("event_stats", cdefs.FL_EV_CT_EXPIRED).packets
        time.sleep(2.5)                    # udp_timeout 1 s + the 1 s refresh step + margin
        again = [_backend(bed, _udp(CLIENTS[0], 5000)) for _ in range(3)]
        other = [_backend(bed, _udp(CLIENTS[1], 6000 + n)) for n in range(3)]   # unbound: rr moves on
    finally:
        os.sched_setaffinity(0, old)
    assert bed.maps.counter("event_stats", cdefs.FL_EV_CT_EXPIRED).packets == expired + 1
    assert again == [first] * 3
    assert len(set(other)) == 1 and len(flows.bindings(bed.maps)) == 2


@pytest.mark.parametrize("algorithm", ["maglev", "rr"])
def test_the_guard_s_unrecorded_flows_bind_nothing(bed, algorithm):
    """Over new_flow_rate a new flow is forwarded unrecorded and binds no client (maglev's SYN
    fast path and the other algorithms' path alike): a flood cannot evict bound clients."""
    bed.apply("[settings]\nnew_flow_rate = 10\n" + config(3, algorithm))
    old = _on_one_cpu()
    try:
        time.sleep(1.1)                    # a fresh guard window on this CPU
        unrecorded = bed.maps.counter("event_stats", cdefs.FL_EV_GUARD_UNRECORDED).packets
        for i in range(60):
            backend_of(bed, f"198.18.{8 + i // 250}.{1 + i % 250}", 40000 + i)
    finally:
        os.sched_setaffinity(0, old)
    assert bed.maps.counter("event_stats", cdefs.FL_EV_GUARD_UNRECORDED).packets - unrecorded == 50
    assert len(flows.bindings(bed.maps)) == 10
