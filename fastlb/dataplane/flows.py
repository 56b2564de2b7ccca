"""The conntrack map from userspace: list, flush, and correct the active counts.

The data plane decides a flow's life where it reads the entry (DATAPLANE.md):
an entry past its timeout (UDP idle, or TCP by state) counts as absent, and
the LRU reclaims it; a backend's active TCP connections are counted by the
program in ``backend_active`` (+1 at the first ACK of a flow recorded from
its SYN, -1 at its first FIN or RST, or when it is met past its timeout).
Nothing here runs periodically: the controller walks no table.

A count can still drift when a counted flow ends unseen and its entry is
never read again (the LRU evicts it, or ``fastlb flows flush`` deletes it).
:func:`reconcile_active` corrects that on demand: it writes
``backend_active_fix``, which the program adds to its own count, so the
correction never races the program's increments (userspace never writes
``backend_active`` itself, except zeroing it with a new backend generation).

The map is read with batch lookups (:func:`fastlb.kernel.bpfsys.map_lookup_batch`).
Nothing here is a snapshot: the kernel keeps changing the map while it is
read.
"""

from __future__ import annotations

import ctypes
import time
from collections import Counter
from dataclasses import dataclass

from fastlb.config.model import hostport
from fastlb.dataplane import identity
from fastlb.kernel import bpfsys, cdefs, structs
from fastlb.kernel.maps import PinnedMaps

CLOCK_MONOTONIC_COARSE = getattr(time, "CLOCK_MONOTONIC_COARSE", 6)  # Linux's value; Python 3.11 lacks the name


def now_ns() -> int:
    """The kernel's clock for conntrack times (bpf_ktime_get_coarse_ns)."""
    return time.clock_gettime_ns(CLOCK_MONOTONIC_COARSE)


def read(maps: PinnedMaps) -> list[tuple[structs.FlowKey, structs.CtValue]]:
    """Every conntrack entry, by batch lookups."""
    return bpfsys.map_lookup_batch(maps.fds["conntrack"], structs.FlowKey, structs.CtValue)


def count(maps: PinnedMaps) -> int:
    """How many entries conntrack holds (stale ones too, until the LRU reclaims them), by
    batch lookups into one buffer: what ``fastlb stats`` and the metrics show."""
    return bpfsys.map_count(maps.fds["conntrack"], structs.FlowKey, structs.CtValue)


@dataclass(frozen=True)
class Slots:
    """What the kernel's conntrack-hit test needs: the live VIP generations and backend slots."""

    vip_gens: dict[int, int]           # valid vip id -> generation
    backends: dict[int, structs.Backend]  # valid backend id -> entry

    @classmethod
    def read(cls, maps: PinnedMaps) -> "Slots":
        vip_gens = {}
        for vip_id in range(maps.info("vip_table").max_entries):
            meta = maps.lookup("vip_table", ctypes.c_uint32(vip_id))
            if meta is not None and meta.flags & cdefs.FL_VIP_F_VALID:
                vip_gens[vip_id] = meta.gen
        return cls(vip_gens, {be_id: slot.entry for be_id, slot in identity.backends(maps).items() if slot.valid})

    def stands(self, value: structs.CtValue) -> bool:
        """True when the kernel would still send this flow to its recorded backend."""
        be = self.backends.get(value.backend_id)
        return (self.vip_gens.get(value.vip_id) == value.vip_gen and be is not None
                and be.vip_id == value.vip_id and be.gen == value.backend_gen)


def is_active(value: structs.CtValue) -> bool:
    return bool(value.flags & cdefs.FL_CT_F_COUNTED) and not value.flags & cdefs.FL_CT_F_CLOSING


def _signed(values: list[int]) -> list[int]:
    return [v - (1 << 32) if v >= 1 << 31 else v for v in values]


def active_counts(maps: PinnedMaps) -> list[int]:
    """Each backend slot's active connections as the program weighs them:
    its count plus the correction, never below 0."""
    size = maps.info("backend_active").max_entries
    counts = _signed(maps.read_u32_slice("backend_active", 0, size))
    fixes = _signed(maps.read_u32_slice("backend_active_fix", 0, size))
    return [max(0, c + f) for c, f in zip(counts, fixes)]


def write_correction(maps: PinnedMaps, fixes: dict[int, int]) -> None:
    """Set the corrections the program adds to these backends' counts."""
    for be_id, fix in fixes.items():
        maps.update("backend_active_fix", ctypes.c_uint32(be_id), ctypes.c_int32(fix))


def reconcile_active(maps: PinnedMaps, entries=None) -> dict[int, tuple[int, int]]:
    """Correct each backend's count to its live counted flows in conntrack (on demand).

    The program's own count is never written: the correction goes to
    ``backend_active_fix``. A count that moved while conntrack was read
    (read before and after) is left alone, so a flow that opens or closes
    meanwhile is never lost. Returns {backend id: (old, new)} of the
    corrected counts.
    """
    size = maps.info("backend_active").max_entries
    before = _signed(maps.read_u32_slice("backend_active", 0, size))
    if entries is None:
        entries = read(maps)
    slots = Slots.read(maps)
    counts = Counter(v.backend_id for _, v in entries if is_active(v) and slots.stands(v))
    after = _signed(maps.read_u32_slice("backend_active", 0, size))
    fixes = _signed(maps.read_u32_slice("backend_active_fix", 0, size))
    fixed = {}
    for be_id in range(size):
        want = counts.get(be_id, 0)
        if before[be_id] == after[be_id] and max(0, after[be_id] + fixes[be_id]) != want:
            write_correction(maps, {be_id: want - after[be_id]})
            fixed[be_id] = (max(0, after[be_id] + fixes[be_id]), want)
    return fixed


def delete(maps: PinnedMaps, keys: list[structs.FlowKey]) -> int:
    """Delete these conntrack entries; returns how many were still there."""
    if not keys:
        return 0
    arr = (structs.FlowKey * len(keys))(*keys)
    return bpfsys.map_delete_batch(maps.fds["conntrack"], arr, len(keys))


# ---- persistence bindings ----

def bindings(maps: PinnedMaps) -> list[tuple[structs.PersistKey, structs.PersistValue]]:
    """Every persistence binding (client prefix of a VIP -> backend), by batch lookups."""
    return bpfsys.map_lookup_batch(maps.fds["persist"], structs.PersistKey, structs.PersistValue)


def unbind_backends(maps: PinnedMaps, backend_ids: set[int]) -> int:
    """Delete the bindings to these backend slots (removed or failed): their clients pick again."""
    keys = [k for k, v in bindings(maps) if v.backend_id in backend_ids] if backend_ids else []
    if not keys:
        return 0
    return bpfsys.map_delete_batch(maps.fds["persist"], (structs.PersistKey * len(keys))(*keys), len(keys))


def persistence(maps: PinnedMaps) -> dict[int, tuple[int, int]]:
    """vip id -> (timeout in ns, client prefix length) of the VIPs with persistence."""
    out = {}
    for vip_id in range(maps.info("vip_persist").max_entries):
        conf = maps.lookup("vip_persist", ctypes.c_uint32(vip_id))
        if conf is not None and conf.timeout_ns:
            out[vip_id] = (conf.timeout_ns, sum(bin(w).count("1") for w in conf.mask))
    return out


def describe_binding(key: structs.PersistKey, value: structs.PersistValue, names: "Names", slots: Slots,
                     conf: dict[int, tuple[int, int]], now: int) -> dict:
    """One binding as a dict (``fastlb flows list --persistent --json``)."""
    timeout_ns, prefix = conf.get(key.vip_id, (0, 0))
    idle = max(0, now - value.last_seen_ns)
    be = slots.backends.get(value.backend_id)
    live = (slots.vip_gens.get(key.vip_id) == value.vip_gen and idle <= timeout_ns and be is not None
            and be.vip_id == key.vip_id and be.gen == value.backend_gen and be.weight > 0)
    return {"client": f"{structs.unpack_addr(key.addr, key.family)}/{prefix}",
            "vip": names.vips.get(key.vip_id, f"vip#{key.vip_id}"),
            "backend": names.backends.get(value.backend_id, f"backend#{value.backend_id}"),
            "idle_s": round(idle / 1e9, 3), "expires_in_s": round(max(0, timeout_ns - idle) / 1e9, 3),
            "live": live}


# ---- listing and flushing (fastlb flows) ----

@dataclass(frozen=True)
class Names:
    """VIP and backend names by slot, from the maps."""

    vips: dict[int, str]
    backends: dict[int, str]

    @classmethod
    def read(cls, maps: PinnedMaps) -> "Names":
        return cls({vip_id: slot.name for vip_id, slot in identity.vips(maps).items()},
                   {be_id: slot.name for be_id, slot in identity.backends(maps).items()})


def describe(key: structs.FlowKey, value: structs.CtValue, names: Names, slots: Slots, now: int) -> dict:
    """One flow as a dict (``fastlb flows list --json``)."""
    src = structs.unpack_addr(key.src, key.family)
    dst = structs.unpack_addr(key.dst, key.family)
    flags = [n for n, bit in (("counted", cdefs.FL_CT_F_COUNTED), ("closing", cdefs.FL_CT_F_CLOSING),
                              ("syn", cdefs.FL_CT_F_SYN), ("established", cdefs.FL_CT_F_ESTABLISHED))
             if value.flags & bit]
    proto = identity.PROTO_NAMES.get(key.proto, str(key.proto))
    clock = "idle_s"
    same_vip = slots.vip_gens.get(value.vip_id) == value.vip_gen
    return {"proto": proto, "client": hostport(src, structs.port_host(key.sport)),
            "vip": names.vips.get(value.vip_id, "?") if same_vip else "(removed)",
            "dst": hostport(dst, structs.port_host(key.dport)),
            "backend": names.backends.get(value.backend_id, f"slot {value.backend_id}"),
            "backend_id": value.backend_id, "live": slots.stands(value), "flags": flags,
            clock: round(max(0, now - value.last_seen_ns) / 1e9, 3)}


def select(entries, vip_ids: set[int] | None = None, backend_ids: set[int] | None = None):
    """The entries of these VIP and backend slots (None: any)."""
    return [(k, v) for k, v in entries
            if (vip_ids is None or v.vip_id in vip_ids) and (backend_ids is None or v.backend_id in backend_ids)]
