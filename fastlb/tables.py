"""From a validated config to the contents of the maps.

VIP ids and backend ids are positions in the config (VIP order, then each
VIP's backends in order). A VIP's Maglev ring comes from the selection core
(fastlb.core), as backend positions that are mapped to backend ids here.
Rings are written as deltas against what the map holds, so re-applying an
unchanged config writes no ring slot.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

from . import cdefs, core, structs
from .maps import PinnedMaps
from .program import Sizes

ALGORITHMS = {"maglev": "FL_ALG_MAGLEV", "rr": "FL_ALG_RR", "wrr": "FL_ALG_WRR",
              "lc": "FL_ALG_LC", "lrt": "FL_ALG_LRT"}
FORWARDING = {"dsr": "FL_FWD_DSR", "tunnel": "FL_FWD_TUNNEL", "nat": "FL_FWD_NAT"}
HASH_MODES = {"5tuple": "FL_HASH_5TUPLE", "src": "FL_HASH_SRC"}


@dataclass(frozen=True)
class Placement:
    """Where a config's VIPs and backends live in the maps."""
    vip_ids: dict[str, int]                  # vip.name -> vip id
    backend_ids: dict[tuple[str, int], int]  # (vip.name, backend position) -> backend id


def place(config) -> Placement:
    vip_ids, backend_ids = {}, {}
    next_backend = 0
    for vip_id, vip in enumerate(config.vips):
        vip_ids[vip.name] = vip_id
        for pos in range(len(vip.backends)):
            backend_ids[(vip.name, pos)] = next_backend
            next_backend += 1
    return Placement(vip_ids, backend_ids)


def ring_positions(vip, sizes: Sizes):
    """The VIP's Maglev table, as backend positions (-1: no backend)."""
    keys = [b.key for b in vip.backends]
    weights = [b.weight for b in vip.backends]
    return core.maglev_table(keys, weights, sizes.ring_size, sizes.hash_seed)


def vip_meta(vip, vip_id: int, sizes: Sizes) -> structs.VipMeta:
    return structs.VipMeta(
        vip_id=vip_id, algorithm=cdefs.defs()[ALGORITHMS[vip.algorithm]],
        forwarding=cdefs.defs()[FORWARDING[vip.forwarding]],
        hash_mode=cdefs.defs()[HASH_MODES[vip.hash]], flags=0, seq_len=0,
        ring_size=sizes.ring_size)


def backend_entry(vip_id: int, backend, mac: str) -> structs.Backend:
    entry = structs.Backend(addr=structs.pack_addr(backend.address), family=structs.family_of(backend.address),
                            flags=cdefs.FL_BE_F_VALID, port=structs.port_be(backend.port),
                            weight=backend.weight, vip_id=vip_id, rtt_us=0)
    ctypes.memmove(entry.mac, structs.mac_bytes(mac), 6)
    return entry


def apply(maps: PinnedMaps, config, macs: dict[str, str], sizes: Sizes) -> dict[str, int]:
    """Make the maps hold ``config``. Returns counts of what was written."""
    placement = place(config)
    written = {"vips": 0, "backends": 0, "ring_slots": 0, "removed": 0}
    empty = cdefs.FL_RING_EMPTY

    # Backends first, so a ring never names a backend slot that is not filled.
    used_backends = set()
    for vip in config.vips:
        vip_id = placement.vip_ids[vip.name]
        for pos, backend in enumerate(vip.backends):
            be_id = placement.backend_ids[(vip.name, pos)]
            maps.update("backends", ctypes.c_uint32(be_id), backend_entry(vip_id, backend, macs[str(backend.address)]))
            used_backends.add(be_id)
            written["backends"] += 1

    for vip in config.vips:
        vip_id = placement.vip_ids[vip.name]
        positions = ring_positions(vip, sizes)
        ids = [placement.backend_ids[(vip.name, p)] if p >= 0 else empty for p in positions]
        start = vip_id * sizes.ring_size
        current = maps.read_u32_slice("ring", start, sizes.ring_size) if _ring_written(maps, vip, vip_id) \
            else None
        if current is None:
            maps.write_u32_slice("ring", start, ids)
            written["ring_slots"] += len(ids)
        else:
            slots = [i for i in range(len(ids)) if ids[i] != current[i]]
            maps.write_u32_slots("ring", [start + i for i in slots], [ids[i] for i in slots])
            written["ring_slots"] += len(slots)

    # VIPs last: a VIP becomes visible to the program once its ring is ready.
    wanted_keys = {}
    for vip in config.vips:
        vip_id = placement.vip_ids[vip.name]
        proto = vip.proto_number
        wanted_keys[bytes(structs.vip_key(vip.address, vip.port, proto))] = vip_meta(vip, vip_id, sizes)
        marker = structs.VipMeta(vip_id=vip_id, flags=cdefs.FL_VIP_F_ADDR_ONLY)
        wanted_keys.setdefault(bytes(structs.addr_marker_key(vip.address)), marker)
    for raw, meta in wanted_keys.items():
        maps.update("vips", structs.VipKey.from_buffer_copy(raw), meta)
        written["vips"] += 1

    # Remove what the config no longer has.
    for key in list(maps.keys("vips")):
        if bytes(key) not in wanted_keys:
            maps.delete("vips", key)
            written["removed"] += 1
    for be_id, entry in list(_valid_backends(maps, sizes)):
        if be_id not in used_backends:
            maps.update("backends", ctypes.c_uint32(be_id), structs.Backend())
            written["removed"] += 1
    return written


def _ring_written(maps: PinnedMaps, vip, vip_id: int) -> bool:
    """True when the VIP is already in the map with this id (its ring slice is live)."""
    meta = maps.lookup("vips", structs.vip_key(vip.address, vip.port, vip.proto_number))
    return meta is not None and meta.vip_id == vip_id


def _valid_backends(maps: PinnedMaps, sizes: Sizes):
    for be_id in range(sizes.max_backends):
        entry = maps.lookup("backends", ctypes.c_uint32(be_id))
        if entry is not None and entry.flags & cdefs.FL_BE_F_VALID:
            yield be_id, entry
