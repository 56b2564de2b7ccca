"""Typed access to an attachment's pinned maps.

Opens the pins under an attachment folder (see fastlb.kernel.pins) and reads or
writes them with the ctypes layouts of fastlb.kernel.structs. Used by the writer
(fastlb.dataplane.tables), by status/stats, and by the tests.
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

from fastlb.errors import BpfError, os_error
from fastlb.kernel import bpfsys, structs
from fastlb.kernel.layout import MAP_SPECS, MapSpec


class PinnedMaps:
    """File descriptors of the maps pinned in ``pin_dir`` (a context manager)."""

    def __init__(self, pin_dir: Path, specs=MAP_SPECS):
        self.pin_dir = Path(pin_dir)
        self.fds: dict[str, int] = {}
        self.specs: dict[str, MapSpec] = {s.name: s for s in specs}
        self.ncpus = bpfsys.possible_cpus()
        try:
            for spec in specs:
                path = self.pin_dir / spec.name
                try:
                    self.fds[spec.name] = bpfsys.obj_get(str(path))
                except OSError as exc:
                    raise BpfError(f"cannot open pinned map {path}: {os_error(exc)}",
                                   fix="attach fastlb first, or detach and attach again") from exc
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()

    def __enter__(self) -> "PinnedMaps":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def info(self, name: str) -> bpfsys.MapInfo:
        return bpfsys.map_info(self.fds[name])

    # ---- plain maps ----
    def lookup(self, name: str, key):
        value = self.specs[name].value()
        return value if bpfsys.map_lookup(self.fds[name], key, value) else None

    def update(self, name: str, key, value) -> None:
        bpfsys.map_update(self.fds[name], key, value)

    def delete(self, name: str, key) -> bool:
        return bpfsys.map_delete(self.fds[name], key)

    def keys(self, name: str):
        return bpfsys.map_keys(self.fds[name], self.specs[name].key)

    def items(self, name: str):
        for key in self.keys(name):
            value = self.lookup(name, key)
            if value is not None:
                yield key, value

    def write_u32_slice(self, name: str, start: int, values) -> None:
        """Write ``values`` (a sequence of u32) to array slots start, start+1, ..."""
        count = len(values)
        if count == 0:
            return
        keys = (ctypes.c_uint32 * count)(*range(start, start + count))
        vals = (ctypes.c_uint32 * count)(*values)
        bpfsys.map_update_batch(self.fds[name], keys, vals, count)

    def write_u32_slots(self, name: str, slots, values) -> None:
        """Write ``values[i]`` to slot ``slots[i]`` (a delta)."""
        count = len(slots)
        if count == 0:
            return
        keys = (ctypes.c_uint32 * count)(*slots)
        vals = (ctypes.c_uint32 * count)(*values)
        bpfsys.map_update_batch(self.fds[name], keys, vals, count)

    def read_u32_slice(self, name: str, start: int, count: int) -> list[int]:
        return bpfsys.array_lookup_batch(self.fds[name], start, count, ctypes.c_uint32)

    # ---- per-CPU counters ----
    def counter(self, name: str, index: int) -> structs.Counter:
        """The sum over CPUs of a per-CPU ``fl_counter`` slot."""
        per_cpu = (structs.Counter * self.ncpus)()
        total = structs.Counter()
        if bpfsys.map_lookup(self.fds[name], ctypes.c_uint32(index), per_cpu):
            for c in per_cpu:
                total.packets += c.packets
                total.bytes += c.bytes
                total.new_flows += c.new_flows
        return total

    def counters(self, name: str, count: int) -> list[structs.Counter]:
        """Slots 0..count-1 of a per-CPU ``fl_counter`` array, each summed over
        CPUs, read with one BPF_MAP_LOOKUP_BATCH (not one syscall per slot)."""
        out = []
        for per_cpu in bpfsys.array_lookup_batch(self.fds[name], 0, count, structs.Counter * self.ncpus):
            total = structs.Counter()
            for c in per_cpu:
                total.packets += c.packets
                total.bytes += c.bytes
                total.new_flows += c.new_flows
            out.append(total)
        return out

    def array(self, name: str, count: int | None = None) -> list:
        """Slots 0..count-1 (all by default) of an array map, by batch lookups."""
        if count is None:
            count = self.info(name).max_entries
        return bpfsys.array_lookup_batch(self.fds[name], 0, count, self.specs[name].value)
