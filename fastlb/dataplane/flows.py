"""The conntrack map from userspace: list, flush, expire, and keep the active counts right.

The kernel records each flow in the ``conntrack`` LRU map and counts a
backend's active TCP connections in ``backend_active`` (+1 when a flow is
recorded, -1 at its first FIN or RST). Counts drift when a flow ends
without the balancer seeing it close: the LRU evicts it, the controller
deletes it, or the kernel moves it to another backend because its own
became invalid. :func:`reconcile_active` recounts from conntrack: the
flows that are counted, not closing, and whose VIP and backend still
stand (the kernel's own test for a conntrack hit).

The map is read with batch lookups (:func:`fastlb.kernel.bpfsys.map_lookup_batch`).
Nothing here is a snapshot: the kernel keeps changing the map while it is
read, so each writer re-checks what it is about to change.
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
                and be.vip_id == value.vip_id)


def is_active(value: structs.CtValue) -> bool:
    return bool(value.flags & cdefs.FL_CT_F_COUNTED) and not value.flags & cdefs.FL_CT_F_CLOSING


def reconcile_active(maps: PinnedMaps, entries=None) -> dict[int, tuple[int, int]]:
    """Set each backend's active count to its live counted flows in conntrack.

    A count is corrected only if it did not move while conntrack was read
    (read before and after), so a flow that opens or closes meanwhile is
    never lost; such a count waits for the next sweep. Returns
    {backend id: (old count, new count)} of the corrections.
    """
    size = maps.info("backend_active").max_entries
    before = maps.read_u32_slice("backend_active", 0, size)
    if entries is None:
        entries = read(maps)
    slots = Slots.read(maps)
    counts = Counter(v.backend_id for _, v in entries if is_active(v) and slots.stands(v))
    after = maps.read_u32_slice("backend_active", 0, size)
    fixed = {}
    for be_id in range(size):
        want = counts.get(be_id, 0)
        if before[be_id] == after[be_id] != want:
            maps.update("backend_active", ctypes.c_uint32(be_id), ctypes.c_uint32(want))
            fixed[be_id] = (after[be_id], want)
    return fixed


def delete(maps: PinnedMaps, keys: list[structs.FlowKey]) -> int:
    """Delete these conntrack entries; returns how many were still there."""
    if not keys:
        return 0
    arr = (structs.FlowKey * len(keys))(*keys)
    return bpfsys.map_delete_batch(maps.fds["conntrack"], arr, len(keys))


def expire_udp(maps: PinnedMaps, timeout_s: float, entries=None) -> int:
    """Delete UDP flows idle for more than ``timeout_s``; returns how many.

    Each candidate is looked up again just before it goes: a packet that
    arrived since the walk keeps its flow.
    """
    if entries is None:
        entries = read(maps)
    limit = int(timeout_s * 1e9)
    now = now_ns()
    stale = [k for k, v in entries if k.proto == 17 and now - v.last_seen_ns > limit]
    gone = []
    for key in stale:
        value = maps.lookup("conntrack", key)
        if value is not None and now_ns() - value.last_seen_ns > limit:
            gone.append(key)
    return delete(maps, gone)


def purge_backends(maps: PinnedMaps, backend_ids: set[int], before_ns: int) -> int:
    """Delete the flows recorded for these backend slots before ``before_ns``.

    For a backend that failed or was removed: its flows' next packets then
    pick a live backend (the kernel would also re-pick them, since their slot
    is no longer valid; deleting them keeps a returning backend, or the next
    one given the slot, from getting them back).
    """
    if not backend_ids:
        return 0
    keys = [k for k, v in read(maps) if v.backend_id in backend_ids and v.last_seen_ns < before_ns]
    return delete(maps, keys)


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
            and be.vip_id == key.vip_id and be.weight > 0)
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
    flags = [n for n, bit in (("counted", cdefs.FL_CT_F_COUNTED), ("closing", cdefs.FL_CT_F_CLOSING))
             if value.flags & bit]
    proto = identity.PROTO_NAMES.get(key.proto, str(key.proto))
    clock = "idle_s" if key.proto == 17 else "age_s"
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
