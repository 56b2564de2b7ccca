"""The map layouts the BPF programs declare: compile-time sizes and one spec per map.

``Sizes`` holds the -D limits a compile takes from the config's [settings];
``MAP_SPECS`` and ``DECAP_MAP_SPECS`` list every map's type, key, value and
entries, so that typed map access (:mod:`fastlb.kernel.maps`) and the check of
pinned maps need no loader.
"""

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass
from pathlib import Path

from fastlb.errors import BpfError
from fastlb.kernel import bpfsys, cdefs, structs


@dataclass(frozen=True)
class Sizes:
    """The compile-time limits (-D macros), taken from the config's [settings]."""
    max_vips: int = 16
    max_backends: int = 1024
    ring_size: int = 65537
    conntrack_size: int = 65536
    seq_size: int = 1024
    hash_seed: int = 0
    max_vip_ports: int = 1024

    @classmethod
    def from_settings(cls, settings) -> "Sizes":
        return cls(max_vips=settings.max_vips, max_backends=settings.max_backends,
                   ring_size=settings.ring_size, conntrack_size=settings.conntrack_size,
                   seq_size=settings.swrr_size, hash_seed=settings.hash_seed,
                   max_vip_ports=settings.max_vip_ports)

    def cflags(self) -> list[str]:
        return [f"-DFASTLB_MAX_VIPS={self.max_vips}", f"-DFASTLB_MAX_BACKENDS={self.max_backends}",
                f"-DFASTLB_RING_SIZE={self.ring_size}", f"-DFASTLB_CT_SIZE={self.conntrack_size}",
                f"-DFASTLB_SEQ_SIZE={self.seq_size}", f"-DFASTLB_HASH_SEED={self.hash_seed}u",
                f"-DFASTLB_MAX_VIP_PORTS={self.max_vip_ports}"]


def kernel_max_entries(requested: int, map_flags: int, map_type: str, ncpus: int) -> int:
    """The max_entries the kernel gives a map asked for ``requested`` entries.

    A per-CPU LRU (``BPF_F_NO_COMMON_LRU``) splits its entries over the possible
    CPUs, so htab_map_alloc() rounds them up to a multiple of their count (down
    when the u32 would overflow); every other map keeps what was asked.
    """
    if map_type not in ("lru_hash", "lru_percpu_hash") or not map_flags & bpfsys.BPF_F_NO_COMMON_LRU:
        return requested
    up = -(-requested // ncpus) * ncpus % 2**32
    return up if up >= requested else requested // ncpus * ncpus


@dataclass(frozen=True)
class MapSpec:
    name: str
    type: str
    key: type
    value: type
    percpu: bool = False
    flags: int = 0              # map_flags, as fastlb_maps.h declares them

    def entries(self, sizes: Sizes) -> int:
        return {
            "vips": sizes.max_vips * 2 + sizes.max_vip_ports,
            "vip_table": sizes.max_vips,
            "backends": sizes.max_backends,
            "ring": sizes.max_vips * sizes.ring_size,
            "seq": sizes.max_vips * sizes.seq_size,
            "seq_cursor": sizes.max_vips,
            "backend_active": sizes.max_backends,
            "backend_active_fix": sizes.max_backends,
            "unrecorded": cdefs.FL_UNRECORDED_SLOTS,
            "conntrack": sizes.conntrack_size * 2,  # established flows, and the guard's headroom
            "nat_rev": sizes.conntrack_size * 2,
            "vip_persist": sizes.max_vips,
            "persist": sizes.conntrack_size,
            "nat_port": sizes.conntrack_size,
            "settings": 1,
            "flood": 1,
            "icmp_bucket": 1,
            "tx_ports": cdefs.FASTLB_MAX_IFACES,
            "ifaces": cdefs.FASTLB_MAX_IFACES,
            "event_stats": cdefs.FL_EVENT_MAX,
            "addrs": cdefs.FASTLB_DECAP_MAX_ADDRS,
            "sources": cdefs.FASTLB_DECAP_MAX_SOURCES,
            "decap_stats": cdefs.FL_DECAP_REASON_MAX,
            "reason_stats": cdefs.FL_REASON_MAX,
            "vip_stats": sizes.max_vips,
            "backend_stats": sizes.max_backends,
        }[self.name]


# The maps of bpf/fastlb_maps.h; tests/bpf/test_structs.py checks this against the loaded program.
MAP_SPECS = (
    MapSpec("vips", "hash", structs.VipKey, ctypes.c_uint32),
    MapSpec("vip_table", "array", ctypes.c_uint32, structs.VipMeta),
    MapSpec("backends", "array", ctypes.c_uint32, structs.Backend),
    MapSpec("ring", "array", ctypes.c_uint32, ctypes.c_uint32),
    MapSpec("seq", "array", ctypes.c_uint32, ctypes.c_uint32),
    MapSpec("seq_cursor", "percpu_array", ctypes.c_uint32, ctypes.c_uint32, percpu=True),
    MapSpec("backend_active", "array", ctypes.c_uint32, ctypes.c_int32),
    MapSpec("backend_active_fix", "array", ctypes.c_uint32, ctypes.c_int32),
    MapSpec("unrecorded", "percpu_array", ctypes.c_uint32, structs.Unrecorded, percpu=True),
    MapSpec("conntrack", "lru_hash", structs.FlowKey, structs.CtValue),
    MapSpec("nat_rev", "lru_hash", structs.FlowKey, structs.NatRev),
    MapSpec("vip_persist", "array", ctypes.c_uint32, structs.VipPersist),
    MapSpec("persist", "lru_hash", structs.PersistKey, structs.PersistValue, flags=bpfsys.BPF_F_NO_COMMON_LRU),
    MapSpec("nat_port", "lru_hash", structs.FlowKey, ctypes.c_uint16),
    MapSpec("settings", "array", ctypes.c_uint32, structs.Settings),
    MapSpec("flood", "percpu_array", ctypes.c_uint32, structs.Flood, percpu=True),
    MapSpec("icmp_bucket", "percpu_array", ctypes.c_uint32, ctypes.c_uint64, percpu=True),
    MapSpec("tx_ports", "devmap", ctypes.c_uint32, ctypes.c_int32),
    MapSpec("ifaces", "array", ctypes.c_uint32, structs.Iface),
    MapSpec("event_stats", "percpu_array", ctypes.c_uint32, structs.Counter, percpu=True),
    MapSpec("reason_stats", "percpu_array", ctypes.c_uint32, structs.Counter, percpu=True),
    MapSpec("vip_stats", "percpu_array", ctypes.c_uint32, structs.Counter, percpu=True),
    MapSpec("backend_stats", "percpu_array", ctypes.c_uint32, structs.Counter, percpu=True),
)


# The maps of bpf/fastlb_decap.c, the backends' decapsulation program.
DECAP_MAP_SPECS = (
    MapSpec("addrs", "hash", structs.VipKey, ctypes.c_uint32),
    MapSpec("sources", "lpm_trie", structs.SrcKey, ctypes.c_uint32),
    MapSpec("decap_stats", "percpu_array", ctypes.c_uint32, structs.Counter, percpu=True),
)


def check_pinned_layouts(pin_dir: Path, sizes: Sizes, specs=MAP_SPECS) -> None:
    """Refuse pinned maps whose layout differs from what the program declares."""
    for spec in specs:
        path = pin_dir / spec.name
        if not path.exists():
            continue
        fd = bpfsys.obj_get(str(path))
        try:
            info = bpfsys.map_info(fd)
        finally:
            os.close(fd)
        entries = kernel_max_entries(spec.entries(sizes), spec.flags, spec.type, bpfsys.possible_cpus())
        lru_flavour = bpfsys.BPF_F_NO_COMMON_LRU  # the flag that changes what a pin holds (BCC adds others)
        want = (spec.type, ctypes.sizeof(spec.key), ctypes.sizeof(spec.value), entries, spec.flags & lru_flavour)
        have = (info.type_name, info.key_size, info.value_size, info.max_entries, info.map_flags & lru_flavour)
        if want != have:
            raise BpfError(
                f"pinned map {path} has type/key/value/entries/flags {have}, the program declares {want}",
                fix=f"the config's [settings] or fastlb's version changed; run 'fastlb detach {pin_dir.name}' "
                    "to drop the old maps (this drops conntrack state), then attach again")
