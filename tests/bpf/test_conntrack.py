"""The conntrack entry's life, decided by the data plane: expiry by age and
TCP state, active counts per backend generation, the new-flow paths.

Every test runs real packets through the loaded program (BPF_PROG_TEST_RUN)
and reads the maps; nothing here walks conntrack from userspace. Timeouts
are set to their 1 s minimum and the tests sleep past them (expiry is
"older than the timeout plus the 1 s refresh step", so they sleep 2.5 s).
"""

from __future__ import annotations

import ctypes
import ipaddress
import os
import time

import pytest
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.l2 import Ether

from fastlb.config import parse_config
from fastlb.dataplane import flows
from fastlb.kernel import cdefs, structs
from fastlb.testing.testbed import XDP_VERDICTS, fake_mac

pytestmark = pytest.mark.root

VIP = "198.19.0.100"
A, X, B, Y = "198.18.0.11", "198.18.0.12", "198.18.0.13", "198.18.0.14"
PAST_TIMEOUT_S = 2.5   # timeout 1 s + the 1 s refresh step + margin
RR_UDP, LC_TCP, LRT_TCP, MAGLEV_TCP, RR_TCP, LC_UDP, NAT_LC_TCP = 2001, 2002, 2003, 2004, 2005, 2006, 2007


def vip_block(port, algorithm, protocol, backends, weights=None, forwarding="dsr", ports=None):
    text = (f'[[vip]]\naddress = "{VIP}"\nport = {port}\nprotocol = "{protocol}"\n'
            f'algorithm = "{algorithm}"\nforwarding = "{forwarding}"\n')
    for i, addr in enumerate(backends):
        w = 1 if weights is None else weights[i]
        text += f'[[vip.backend]]\naddress = "{addr}"\nweight = {w}\n'
        if ports is not None:
            text += f'port = {ports[i]}\n'
    return text


def config(settings="", lc_backends=(A, X, B), lc_weights=None, rr_tcp=(A, X, B),
           nat_ports=(NAT_LC_TCP,) * 3, maglev=(A, X, B)) -> str:
    return ("[settings]\nconntrack_size = 4096\nhash_seed = 777\nring_size = 1021\n" + settings + "\n" +
            "\n".join([
        vip_block(RR_UDP, "rr", "udp", (A, X, B)),
        vip_block(LC_TCP, "lc", "tcp", lc_backends, lc_weights),
        vip_block(LRT_TCP, "lrt", "tcp", (A, X, B)),
        vip_block(MAGLEV_TCP, "maglev", "tcp", maglev),
        vip_block(RR_TCP, "rr", "tcp", rr_tcp),
        vip_block(LC_UDP, "lc", "udp", (A, X, B)),
        vip_block(NAT_LC_TCP, "lc", "tcp", (A, X, B), forwarding="nat", ports=nat_ports),
    ]))


SHORT = "udp_timeout = 1\ntcp_syn_timeout = 1\ntcp_timeout = 1\ntcp_fin_timeout = 1\n"
MAC_TO_BACKEND = {fake_mac(b): b for b in (A, X, B, Y)}


@pytest.fixture(scope="module")
def bed():
    from fastlb.kernel.layout import Sizes
    from fastlb.testing.testbed import Testbed
    sizes = Sizes(max_vips=8, max_backends=64, conntrack_size=4096, hash_seed=777, ring_size=1021)
    with Testbed(sizes, name=f"ct-{os.getpid()}") as tb:
        tb.apply(config())
        yield tb


@pytest.fixture
def fresh(bed):
    bed.apply(config())
    bed.flush_conntrack()
    for be_id in range(bed.sizes.max_backends):
        bed.maps.update("backend_active", ctypes.c_uint32(be_id), ctypes.c_uint32(0))
    yield bed
    bed.apply(config())
    bed.flush_conntrack()


def frame(src, sport, dport, proto="tcp", flags="S") -> bytes:
    l4 = UDP(sport=sport, dport=dport) if proto == "udp" else TCP(sport=sport, dport=dport, flags=flags)
    return bytes(Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02") / IP(src=src, dst=VIP) / l4)


def pick(bed, data) -> str:
    verdict, out = bed.run(data)
    assert verdict == XDP_VERDICTS["tx"]
    return MAC_TO_BACKEND[Ether(out).dst]


def on_one_cpu(cpu=None):
    old = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {sorted(old)[0] if cpu is None else cpu})
    return old


def slot_of(bed, port, address) -> int:
    vip = next(v for v in bed.config.vips if v.port == port)
    vip_id = bed.maps.lookup("vips", structs.vip_key(vip.address, vip.port, vip.proto_number)).value
    for be_id in range(bed.sizes.max_backends):
        e = bed.maps.lookup("backends", ctypes.c_uint32(be_id))
        if e is not None and e.family and e.vip_id == vip_id and \
                bytes(e.addr) == bytes(structs.pack_addr(ipaddress.ip_address(address))):
            return be_id
    raise AssertionError(f"no slot for {address} in VIP port {port}")


def raw_active(bed, be_id) -> int:
    return bed.maps.lookup("backend_active", ctypes.c_uint32(be_id)).value


def active(bed, port, address) -> int:
    """The count the program uses for P2C (kernel count plus userspace's correction)."""
    return flows.active_counts(bed.maps)[slot_of(bed, port, address)]


def vip_new_flows(bed, port) -> int:
    vip = next(v for v in bed.config.vips if v.port == port)
    vip_id = bed.maps.lookup("vips", structs.vip_key(vip.address, vip.port, vip.proto_number)).value
    return bed.maps.counter("vip_stats", vip_id).new_flows


# ---- issue 14.1 / 13.15: expiry decided where the entry is read ----

def test_a_udp_flow_idle_past_udp_timeout_takes_a_new_pick(fresh):
    bed = fresh
    bed.apply(config(SHORT))
    old = on_one_cpu()
    try:
        first = pick(bed, frame("198.18.7.1", 5000, RR_UDP, "udp"))
        assert pick(bed, frame("198.18.7.1", 5000, RR_UDP, "udp")) == first  # recorded: it sticks
        new_before = vip_new_flows(bed, RR_UDP)
        time.sleep(PAST_TIMEOUT_S)
        # rr: the stale entry counts as absent, so the flow takes the sequence's next slot
        again = pick(bed, frame("198.18.7.1", 5000, RR_UDP, "udp"))
    finally:
        os.sched_setaffinity(0, old)
    assert again != first
    assert vip_new_flows(bed, RR_UDP) - new_before == 1


def test_a_udp_flow_within_udp_timeout_keeps_its_backend(fresh):
    bed = fresh
    bed.apply(config("udp_timeout = 30\n"))
    old = on_one_cpu()
    try:
        first = pick(bed, frame("198.18.7.2", 5001, RR_UDP, "udp"))
        time.sleep(PAST_TIMEOUT_S)
        assert pick(bed, frame("198.18.7.2", 5001, RR_UDP, "udp")) == first
    finally:
        os.sched_setaffinity(0, old)


def test_a_stale_syn_only_entry_no_longer_steers_a_reused_port_syn_to_a_drained_backend(fresh):
    bed = fresh
    bed.apply(config(SHORT))
    client, sport = "198.18.7.3", 5002
    first = pick(bed, frame(client, sport, LC_TCP))
    assert pick(bed, frame(client, sport, LC_TCP)) == first  # a retransmitted SYN keeps its backend
    weights = [0 if b == first else 1 for b in (A, X, B)]
    bed.apply(config(SHORT, lc_weights=weights))              # drain the backend it went to
    time.sleep(PAST_TIMEOUT_S)
    assert pick(bed, frame(client, sport, LC_TCP)) != first


def test_half_open_entries_do_not_count_as_active(fresh):
    """Held SYNs (a SYN flood) never count: a flow counts from its first ACK (IPVS's activeconns)."""
    bed = fresh
    for sport in range(6000, 6030):
        pick(bed, frame("198.18.7.4", sport, LC_TCP, flags="S"))
    assert sum(active(bed, LC_TCP, b) for b in (A, X, B)) == 0
    for sport in range(6000, 6010):
        pick(bed, frame("198.18.7.4", sport, LC_TCP, flags="A"))
    assert sum(active(bed, LC_TCP, b) for b in (A, X, B)) == 10


def test_a_stale_established_entry_stops_counting_when_read(fresh):
    bed = fresh
    bed.apply(config(SHORT))
    client, sport = "198.18.7.5", 5003
    first = pick(bed, frame(client, sport, LC_TCP, flags="S"))
    pick(bed, frame(client, sport, LC_TCP, flags="A"))
    assert active(bed, LC_TCP, first) == 1
    time.sleep(PAST_TIMEOUT_S)
    pick(bed, frame(client, sport, LC_TCP, flags="S"))   # the port reused: the stale entry is gone
    assert active(bed, LC_TCP, first) == 0
    assert sum(active(bed, LC_TCP, b) for b in (A, X, B)) == 0


def test_tcp_timeouts_are_per_state(fresh):
    """An established flow outlives the SYN timeout; a closing one ends at the FIN timeout."""
    bed = fresh
    bed.apply(config("tcp_syn_timeout = 1\ntcp_timeout = 60\ntcp_fin_timeout = 1\n"))
    old = on_one_cpu()
    try:
        est = pick(bed, frame("198.18.7.6", 5004, RR_TCP, flags="S"))
        pick(bed, frame("198.18.7.6", 5004, RR_TCP, flags="A"))
        fin = pick(bed, frame("198.18.7.6", 5005, RR_TCP, flags="S"))
        pick(bed, frame("198.18.7.6", 5005, RR_TCP, flags="FA"))
        time.sleep(PAST_TIMEOUT_S)
        # rr: a SYN that re-picks takes the next sequence slot; one on a live entry keeps it
        assert pick(bed, frame("198.18.7.6", 5004, RR_TCP, flags="S")) == est
        new_before = vip_new_flows(bed, RR_TCP)
        pick(bed, frame("198.18.7.6", 5005, RR_TCP, flags="A"))  # the closing entry expired: a mid-flow miss
        assert vip_new_flows(bed, RR_TCP) - new_before == 1
    finally:
        os.sched_setaffinity(0, old)
    assert fin in (A, X, B)


# ---- issue 13.1 / 13.11: counts per backend generation, never wrapping ----

def test_a_backend_replaced_at_a_reload_does_not_inherit_its_predecessors_flows(fresh):
    """lc VIP A, X, B; a connection on X; the config replaces X by Y at the same position."""
    bed = fresh
    from fastlb.dataplane import explain
    from fastlb.dataplane.tables import ring_positions
    replaced = config(lc_backends=(A, Y, B))
    new_vip = next(v for v in parse_config(replaced).vips
                   if v.port == LC_TCP)
    ring = ring_positions(new_vip, bed.sizes)

    def ring_backend(src, sport):
        h = explain.flow_hash(new_vip, src, sport, bed.sizes.hash_seed)
        return str(new_vip.backends[ring[h % bed.sizes.ring_size]].address)

    # A connection on X whose ring slot in the new table is not Y: a moved flow goes to
    # its ring slot (a removed backend's flows do), so this tells moved from inherited.
    conn = None
    for sport in range(7000, 7400):
        if pick(bed, frame("198.18.7.7", sport, LC_TCP, flags="S")) == X \
                and ring_backend("198.18.7.7", sport) != Y:
            conn = sport
            break
    assert conn is not None
    pick(bed, frame("198.18.7.7", conn, LC_TCP, flags="A"))
    x_slot = slot_of(bed, LC_TCP, X)
    assert active(bed, LC_TCP, X) >= 1
    bed.apply(replaced)
    assert slot_of(bed, LC_TCP, Y) == x_slot   # the newcomer took the slot
    assert active(bed, LC_TCP, Y) == 0
    assert pick(bed, frame("198.18.7.7", conn, LC_TCP, flags="A")) != Y
    assert pick(bed, frame("198.18.7.7", conn, LC_TCP, flags="FA")) != Y
    assert raw_active(bed, x_slot) != 0xFFFFFFFF
    assert active(bed, LC_TCP, Y) == 0


def test_a_backend_whose_nat_port_changes_starts_clean(fresh):
    bed = fresh

    def nat_backend(data):
        verdict, out = bed.run(data)
        assert verdict == XDP_VERDICTS["tx"]
        return str(IP(Ether(out)[IP].build()).dst), Ether(out)[TCP].dport

    conn = None
    for sport in range(7400, 7800):
        if nat_backend(frame("198.18.7.8", sport, NAT_LC_TCP, flags="S")) == (X, NAT_LC_TCP):
            conn = sport
            break
    assert conn is not None
    nat_backend(frame("198.18.7.8", conn, NAT_LC_TCP, flags="A"))
    slot = slot_of(bed, NAT_LC_TCP, X)
    assert active(bed, NAT_LC_TCP, X) == 1
    bed.apply(config(nat_ports=(NAT_LC_TCP, 8080, NAT_LC_TCP)))
    assert slot_of(bed, NAT_LC_TCP, X) == slot and active(bed, NAT_LC_TCP, X) == 0
    # The flow is the old backend's: it is re-picked (to its ring slot), not sent to X:8080 as its own.
    nat_backend(frame("198.18.7.8", conn, NAT_LC_TCP, flags="R"))
    assert raw_active(bed, slot) != 0xFFFFFFFF
    assert active(bed, NAT_LC_TCP, X) == 0


def test_a_correction_from_userspace_is_added_in_and_never_wraps(fresh):
    bed = fresh
    slot = slot_of(bed, LC_TCP, A)
    flows.write_correction(bed.maps, {slot: 5})
    assert active(bed, LC_TCP, A) == 5
    flows.write_correction(bed.maps, {slot: -3})
    assert active(bed, LC_TCP, A) == 0   # clamped at 0, never below
    flows.write_correction(bed.maps, {slot: 0})


# ---- issue 13.4: lrt without samples ----

def test_lrt_without_samples_follows_the_active_counts(fresh):
    """400 held connections over backends with unequal counts: the loaded one never wins a pair."""
    bed = fresh
    loaded = slot_of(bed, LRT_TCP, A)
    flows.write_correction(bed.maps, {loaded: 200})
    try:
        picks = [pick(bed, frame("198.18.8.1", 10000 + i, LRT_TCP, flags="S")) for i in range(400)]
    finally:
        flows.write_correction(bed.maps, {loaded: 0})
    assert picks.count(A) < 400 // 3 // 4, {b: picks.count(b) for b in (A, X, B)}


# ---- issue 13.10: unrecorded flows keep their backend ----

@pytest.mark.parametrize("port", [RR_UDP, LC_UDP], ids=["rr", "lc"])
def test_an_unrecorded_udp_flow_keeps_its_backend_when_a_later_packet_is_recorded(fresh, port):
    bed = fresh
    bed.apply(config("new_flow_rate = 10\n"))
    old = on_one_cpu()
    try:
        flood_before = bed.maps.counter("event_stats", cdefs.FL_EV_GUARD_UNRECORDED).packets
        firsts = {s: pick(bed, frame("198.18.9.1", s, port, "udp")) for s in range(11000, 11060)}
        assert bed.maps.counter("event_stats", cdefs.FL_EV_GUARD_UNRECORDED).packets > flood_before
        time.sleep(1.2)   # a new guard window: later packets may be recorded now
        later = {s: pick(bed, frame("198.18.9.1", s, port, "udp")) for s in firsts}
    finally:
        os.sched_setaffinity(0, old)
    assert later == firsts


def test_a_known_maglev_flows_syn_over_the_guard_keeps_its_entry(fresh):
    """A retransmitted SYN of a recorded maglev flow, met over the guard's rate after
    the ring moved, goes to its entry's backend and is no new flow (the SYN path
    reads no entry before the guard, and over it nothing else would)."""
    from fastlb.config import parse_config
    from helpers.packets import expected_backend

    bed = fresh
    old = on_one_cpu()
    try:
        syn = {s: frame("198.18.9.3", s, MAGLEV_TCP) for s in range(13000, 13060)}
        recorded = {s: pick(bed, f) for s, f in syn.items()}
        moved_config = config("new_flow_rate = 1\n", maglev=(A, X, B, Y))
        bed.apply(moved_config)            # Y takes a quarter of the ring; the guard admits 1 a second
        ring = {s: expected_backend(parse_config(moved_config), bed.sizes, Ether(f)) for s, f in syn.items()}
        assert any(ring[s] != recorded[s] for s in syn), "the ring moved none of the recorded flows"
        new_before, ev_before = vip_new_flows(bed, MAGLEV_TCP), \
            bed.maps.counter("event_stats", cdefs.FL_EV_GUARD_UNRECORDED).packets
        again = {}
        for s, f in syn.items():
            pick(bed, frame("198.18.9.4", s, MAGLEV_TCP))   # a new flow: the window's budget is used
            again[s] = pick(bed, f)                          # ... so this SYN is over the guard
        new_flows = vip_new_flows(bed, MAGLEV_TCP) - new_before
        unrecorded = bed.maps.counter("event_stats", cdefs.FL_EV_GUARD_UNRECORDED).packets - ev_before
    finally:
        os.sched_setaffinity(0, old)
    assert again == recorded
    assert new_flows == len(syn) and unrecorded >= len(syn) - 1   # the new flows only, over the guard


def test_the_guard_counts_new_flows_not_packets(fresh):
    """An unrecorded UDP flow's later packets do not use up the guard's budget."""
    bed = fresh
    bed.apply(config("new_flow_rate = 10\n"))
    old = on_one_cpu()
    try:
        time.sleep(1.1)  # a fresh guard window
        for s in range(12000, 12010):       # ten flows: the budget
            pick(bed, frame("198.18.9.2", s, RR_UDP, "udp"))
        for _ in range(20):                  # many packets of the same ten flows
            for s in range(12000, 12010):
                pick(bed, frame("198.18.9.2", s, RR_UDP, "udp"))
        ev = bed.maps.counter("event_stats", cdefs.FL_EV_GUARD_UNRECORDED).packets
        pick(bed, frame("198.18.9.2", 12999, RR_UDP, "udp"))   # the 11th flow: over the budget
        assert bed.maps.counter("event_stats", cdefs.FL_EV_GUARD_UNRECORDED).packets == ev + 1
    finally:
        os.sched_setaffinity(0, old)


# ---- issue 13.13: staggered rr/wrr cursors ----

def test_rr_cursors_start_staggered_across_cpus(fresh):
    bed = fresh
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        pytest.skip("needs two CPUs")
    bed.apply(config(rr_tcp=(A, X, B, Y)))      # a new sequence: the cursors are written afresh
    firsts = []
    for cpu in cpus[:2]:
        old = on_one_cpu(cpu)
        try:
            firsts.append(pick(bed, frame("198.18.10.1", 13000 + cpu, RR_TCP, flags="S")))
        finally:
            os.sched_setaffinity(0, old)
    assert firsts[0] != firsts[1]


# ---- issue 14.3: the SYN fast path for maglev ----

def test_a_maglev_syn_records_its_ring_pick_and_a_retransmit_lands_on_the_same_slot(fresh):
    bed = fresh
    vip = next(v for v in bed.config.vips if v.port == MAGLEV_TCP)
    from fastlb.dataplane import explain
    for sport in range(14000, 14050):
        want = explain.explain(bed.config, vip, "198.18.11.1", sport).backend
        assert pick(bed, frame("198.18.11.1", sport, MAGLEV_TCP, flags="S")) == want
        assert pick(bed, frame("198.18.11.1", sport, MAGLEV_TCP, flags="S")) == want
    assert len(list(bed.maps.keys("conntrack"))) == 50
    assert vip_new_flows(bed, MAGLEV_TCP) >= 50


def test_a_maglev_syn_on_a_live_entry_keeps_its_backend_after_the_ring_changed(fresh):
    """The retransmitted SYN goes where the first went, even when the ring moved meanwhile."""
    bed = fresh
    firsts = {s: pick(bed, frame("198.18.11.2", s, MAGLEV_TCP, flags="S")) for s in range(14100, 14160)}
    bed.apply(config().replace(f'port = {MAGLEV_TCP}\nprotocol = "tcp"\nalgorithm = "maglev"\n'
                               f'[[vip.backend]]\naddress = "{A}"\nweight = 1\n',
                               f'port = {MAGLEV_TCP}\nprotocol = "tcp"\nalgorithm = "maglev"\n'
                               f'[[vip.backend]]\naddress = "{A}"\nweight = 5\n'))
    assert {s: pick(bed, frame("198.18.11.2", s, MAGLEV_TCP, flags="S")) for s in firsts} == firsts


# ---- issue 14.1: stats by batch reads ----

def test_counters_read_by_one_batch_equal_the_per_slot_sums(fresh):
    bed = fresh
    for sport in range(15000, 15040):
        pick(bed, frame("198.18.12.1", sport, MAGLEV_TCP, flags="S"))
    for name, count in (("vip_stats", bed.sizes.max_vips), ("backend_stats", bed.sizes.max_backends),
                        ("reason_stats", cdefs.FL_REASON_MAX)):
        batch = bed.maps.counters(name, count)
        single = [bed.maps.counter(name, i) for i in range(count)]
        assert [bytes(c) for c in batch] == [bytes(c) for c in single]
    assert sum(c.new_flows for c in bed.maps.counters("vip_stats", bed.sizes.max_vips)) >= 40
    from fastlb.dataplane import stats
    data = stats.collect(bed.maps, count_flows=False)
    vip = next(v for v in data["vips"] if v["vip"].endswith(f":{MAGLEV_TCP}/tcp"))
    assert vip["new_flows"] == vip_new_flows(bed, MAGLEV_TCP) and len(vip["backends"]) == 3


def test_conntrack_is_counted_by_batches_into_one_buffer_and_the_count_is_exact(fresh):
    """stats and the metrics count conntrack without reading it into Python objects; the
    reused buffer must neither lose nor repeat entries across batches."""
    from fastlb.kernel import bpfsys
    from fastlb.testing import _testrun
    bed = fresh
    bed.apply(config("new_flow_rate = 0\n"))             # no guard: every flow is recorded
    data = bytearray(frame("198.18.13.1", 5000, RR_UDP, "udp"))
    _testrun.time_calls(bed.fd, bytes(data), 3000, 26)   # 3,000 flows: the source address varies
    fd = bed.maps.fds["conntrack"]
    assert flows.count(bed.maps) == len(flows.read(bed.maps)) == 3000
    assert bpfsys.map_count(fd, structs.FlowKey, structs.CtValue, chunk=256) == 3000
    keys = [bytes(k) for k, _ in bpfsys.map_lookup_batch(fd, structs.FlowKey, structs.CtValue, chunk=256)]
    assert len(set(keys)) == 3000          # a list read by batches keeps each batch's own entries
