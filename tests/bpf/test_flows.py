"""Conntrack on the loaded program: reconcile, batch walks and deletes (fastlb.dataplane.flows).

Expiry is the data plane's (tests/bpf/test_conntrack.py)."""

from __future__ import annotations

import ctypes
import ipaddress

import pytest

from helpers.configs import BACKENDS, VIP

pytestmark = pytest.mark.root


@pytest.fixture
def bed(loaded):
    loaded.apply(VIP + BACKENDS + '\n[[vip]]\naddress = "198.19.0.100"\nport = 53\nprotocol = "udp"\n'
                 '[[vip.backend]]\naddress = "198.18.0.13"\n')
    loaded.flush_conntrack()
    yield loaded
    loaded.forget()   # the next module places its slots from scratch


def _slots(maps):
    from fastlb.dataplane import flows
    return flows.Slots.read(maps)


def _flow(n: int, proto: int = 6):
    from fastlb.kernel import structs
    return structs.FlowKey(src=structs.pack_addr(ipaddress.ip_address(f"10.{n >> 16 & 255}.{n >> 8 & 255}.{n & 255}")),
                           dst=structs.pack_addr(ipaddress.ip_address("198.19.0.100")), sport=n & 0xFFFF,
                           dport=structs.port_be(80 if proto == 6 else 53), proto=proto, family=2)


def test_reconcile_counts_live_counted_flows_only(bed):
    from fastlb.dataplane import flows
    from fastlb.kernel import cdefs, structs
    maps = bed.maps
    slots = _slots(maps)
    (vip_id, gen), = [(v, g) for v, g in slots.vip_gens.items()
                      if any(be.vip_id == v and be.family for be in slots.backends.values())][:1]
    be_ids = sorted(b for b, e in slots.backends.items() if e.vip_id == vip_id)
    a, b = be_ids[:2]
    flags = [cdefs.FL_CT_F_COUNTED, cdefs.FL_CT_F_COUNTED, cdefs.FL_CT_F_COUNTED | cdefs.FL_CT_F_CLOSING, 0]
    for n, (be, f) in enumerate(zip([a, a, a, b], flags)):
        maps.update("conntrack", _flow(n), structs.CtValue(backend_id=be, vip_id=vip_id, vip_gen=gen, flags=f,
                                                           backend_gen=slots.backends[be].gen))
    maps.update("conntrack", _flow(9), structs.CtValue(backend_id=b, vip_id=vip_id, vip_gen=gen + 1,
                                                       flags=cdefs.FL_CT_F_COUNTED))  # an old VIP generation
    for be in (a, b):
        maps.update("backend_active", ctypes.c_uint32(be), ctypes.c_int32(50))
    fixed = flows.reconcile_active(maps)
    assert fixed[a] == (50, 2) and fixed[b] == (50, 0)
    assert flows.reconcile_active(maps) == {}
    # The correction goes beside the program's count, which userspace does not write.
    assert [maps.lookup("backend_active", ctypes.c_uint32(be)).value for be in (a, b)] == [50, 50]
    assert [flows.active_counts(maps)[be] for be in (a, b)] == [2, 0]
    flows.write_correction(maps, {a: 0, b: 0})
    for be in (a, b):
        maps.update("backend_active", ctypes.c_uint32(be), ctypes.c_int32(0))


def test_batch_walk_and_delete_cover_every_entry(bed):
    from fastlb.dataplane import flows
    from fastlb.kernel import bpfsys, structs
    maps = bed.maps
    keys = [_flow(n) for n in range(1500)]
    for k in keys:
        maps.update("conntrack", k, structs.CtValue(backend_id=k.sport % 7))
    got = bpfsys.map_lookup_batch(maps.fds["conntrack"], structs.FlowKey, structs.CtValue, chunk=64)
    assert sorted(k.sport for k, _ in got) == list(range(1500))
    assert all(v.backend_id == k.sport % 7 for k, v in got)
    assert flows.delete(maps, keys[:10] + keys[:10]) == 10  # absent keys are skipped, not fatal
    assert len(flows.read(maps)) == 1490
