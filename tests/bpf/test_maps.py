"""Map access through the bpf() wrapper, against per-element lookups."""

from __future__ import annotations

import ctypes

import pytest

from fastlb.kernel import bpfsys

pytestmark = pytest.mark.root


@pytest.mark.parametrize("start,count", [(0, 5), (1, 5), (65530, 20), (3, 70000)])
def test_array_batch_read_matches_single_lookups(loaded, start, count):
    fd = loaded.maps.fds["ring"]
    values = list(range(1000, 1000 + count))
    loaded.maps.write_u32_slice("ring", start, values)
    assert loaded.maps.read_u32_slice("ring", start, count) == values
    one = ctypes.c_uint32()
    for idx in (start, start + count // 2, start + count - 1):
        assert bpfsys.map_lookup(fd, ctypes.c_uint32(idx), one)
        assert one.value == values[idx - start]


def test_delta_write_touches_only_the_given_slots(loaded):
    loaded.maps.write_u32_slice("ring", 100, [7] * 10)
    loaded.maps.write_u32_slots("ring", [102, 105], [8, 9])
    assert loaded.maps.read_u32_slice("ring", 100, 10) == [7, 7, 8, 7, 7, 9, 7, 7, 7, 7]


def test_percpu_counter_sums_cpus(loaded):
    from fastlb.kernel import structs
    per_cpu = (structs.Counter * loaded.maps.ncpus)()
    for i, c in enumerate(per_cpu):
        c.packets, c.bytes, c.new_flows = i + 1, 10 * (i + 1), 1
    bpfsys.map_update(loaded.maps.fds["vip_stats"], ctypes.c_uint32(7), per_cpu)
    total = loaded.maps.counter("vip_stats", 7)
    n = loaded.maps.ncpus
    assert (total.packets, total.bytes, total.new_flows) == (n * (n + 1) // 2, 10 * n * (n + 1) // 2, n)
    bpfsys.map_update(loaded.maps.fds["vip_stats"], ctypes.c_uint32(7), (structs.Counter * n)())


ARP_AND_PLAIN = """
[[vip]]
address = "198.18.0.100"
port = 80
announce = "arp"
[[vip.backend]]
address = "198.18.0.11"
[[vip]]
address = "198.19.0.100"
port = 53
protocol = "udp"
algorithm = "rr"
[[vip.backend]]
address = "198.18.0.12"
"""


def test_one_reader_skips_every_address_marker_for_every_command(loaded):
    """An arp VIP's address marker is no VIP to stats, metrics, status or flows (issue 13 item 3)."""
    from prometheus_client import CollectorRegistry, generate_latest

    from fastlb.controller import attachment
    from fastlb.controller.metrics import StatsCollector
    from fastlb.dataplane import flows, identity, stats
    loaded.apply(ARP_AND_PLAIN)
    try:
        names = {"198.18.0.100:80/tcp", "198.19.0.100:53/udp"}
        assert {s.name for s in identity.vips(loaded.maps).values()} == names
        data = stats.collect(loaded.maps)
        assert {v["vip"]: v["algorithm"] for v in data["vips"]} == {"198.18.0.100:80/tcp": "maglev",
                                                                    "198.19.0.100:53/udp": "rr"}
        assert set(flows.Names.read(loaded.maps).vips.values()) == names
        assert {v["vip"] for v in attachment._read_vips(loaded.maps)} == names
        registry = CollectorRegistry()
        registry.register(StatsCollector(lambda: dict(data, interface="eth0", controller=False)))
        assert b'vip="198.18.0.100:80/tcp"' in generate_latest(registry)
    finally:
        loaded.forget()   # the next module places its slots from scratch
