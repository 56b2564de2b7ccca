"""Compiling and loading the XDP program with BCC.

BCC compiles the C at every load (a second or more), so callers compile
once and then configure through the maps. The map layouts the program
declares are listed in ``MAP_SPECS``; before a compile reuses pinned maps
(BCC reuses a pin silently, whatever its layout), ``check_pinned_layouts``
compares every pin against them.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from . import bpfsys, cdefs, structs
from .errors import BpfError, PrivilegeError, ToolchainError

PROGRAM_SOURCE = "fastlb_kern.c"
PROGRAM_FUNCTION = "xdp_fastlb"


def bpf_dir() -> Path:
    return cdefs.bpf_dir()


@dataclass(frozen=True)
class Sizes:
    """The compile-time limits (-D macros), taken from the config's [settings]."""
    max_vips: int = 16
    max_backends: int = 1024
    ring_size: int = 65537
    conntrack_size: int = 65536
    seq_size: int = 1024
    hash_seed: int = 0

    @classmethod
    def from_settings(cls, settings) -> "Sizes":
        return cls(max_vips=settings.max_vips, max_backends=settings.max_backends,
                   ring_size=settings.ring_size, conntrack_size=settings.conntrack_size,
                   seq_size=settings.swrr_size, hash_seed=settings.hash_seed)

    def cflags(self) -> list[str]:
        return [f"-DFASTLB_MAX_VIPS={self.max_vips}", f"-DFASTLB_MAX_BACKENDS={self.max_backends}",
                f"-DFASTLB_RING_SIZE={self.ring_size}", f"-DFASTLB_CT_SIZE={self.conntrack_size}",
                f"-DFASTLB_SEQ_SIZE={self.seq_size}", f"-DFASTLB_HASH_SEED={self.hash_seed}u"]


@dataclass(frozen=True)
class MapSpec:
    name: str
    type: str
    key: type
    value: type
    percpu: bool = False

    def entries(self, sizes: Sizes) -> int:
        return {
            "vips": sizes.max_vips * 2,
            "vip_table": sizes.max_vips,
            "backends": sizes.max_backends,
            "ring": sizes.max_vips * sizes.ring_size,
            "seq": sizes.max_vips * sizes.seq_size,
            "seq_cursor": sizes.max_vips,
            "backend_active": sizes.max_backends,
            "conntrack": sizes.conntrack_size,
            "nat_rev": sizes.conntrack_size * 2,
            "settings": 1,
            "flood": 1,
            "tx_ports": cdefs.FASTLB_MAX_IFACES,
            "ifaces": cdefs.FASTLB_MAX_IFACES,
            "event_stats": cdefs.FL_EVENT_MAX,
            "addrs": cdefs.FASTLB_DECAP_MAX_ADDRS,
            "decap_stats": cdefs.FL_DECAP_REASON_MAX,
            "reason_stats": cdefs.FL_REASON_MAX,
            "vip_stats": sizes.max_vips,
            "backend_stats": sizes.max_backends,
        }[self.name]


# The maps of bpf/fastlb_maps.h; tests/test_structs.py checks this against the loaded program.
MAP_SPECS = (
    MapSpec("vips", "hash", structs.VipKey, ctypes.c_uint32),
    MapSpec("vip_table", "array", ctypes.c_uint32, structs.VipMeta),
    MapSpec("backends", "array", ctypes.c_uint32, structs.Backend),
    MapSpec("ring", "array", ctypes.c_uint32, ctypes.c_uint32),
    MapSpec("seq", "array", ctypes.c_uint32, ctypes.c_uint32),
    MapSpec("seq_cursor", "percpu_array", ctypes.c_uint32, ctypes.c_uint32, percpu=True),
    MapSpec("backend_active", "array", ctypes.c_uint32, ctypes.c_uint32),
    MapSpec("conntrack", "lru_hash", structs.FlowKey, structs.CtValue),
    MapSpec("nat_rev", "lru_hash", structs.FlowKey, structs.NatRev),
    MapSpec("settings", "array", ctypes.c_uint32, structs.Settings),
    MapSpec("flood", "percpu_array", ctypes.c_uint32, structs.Flood, percpu=True),
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
        want = (spec.type, ctypes.sizeof(spec.key), ctypes.sizeof(spec.value), spec.entries(sizes))
        have = (info.type_name, info.key_size, info.value_size, info.max_entries)
        if want != have:
            raise BpfError(
                f"pinned map {path} has type/key/value/entries {have}, the program declares {want}",
                fix=f"the config's [settings] or fastlb's version changed; run 'fastlb detach {pin_dir.name}' "
                    "to drop the old maps (this drops conntrack state), then attach again")


@contextlib.contextmanager
def _captured_stderr():
    """Capture the C library's stderr (BCC prints compiler messages there)."""
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        saved = os.dup(2)
        os.dup2(tmp.fileno(), 2)
        box = {"text": ""}
        try:
            yield box
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            box["text"] = tmp.read().decode(errors="replace")


class Program:
    """An XDP program compiled and loaded by BCC, its maps pinned in ``pin_dir``.

    By default the balancer (bpf/fastlb_kern.c); the decap program passes its
    own source, function and map specs.
    """

    def __init__(self, pin_dir: Path, sizes: Sizes, source: str = PROGRAM_SOURCE,
                 function: str = PROGRAM_FUNCTION, specs=MAP_SPECS):
        self.pin_dir = Path(pin_dir)
        self.sizes = sizes
        self.source = source
        self.function = function
        self.specs = specs
        self.bpf = None
        self.fd = -1
        self.messages = ""

    def cflags(self) -> list[str]:
        pin = str(self.pin_dir).replace('"', "")
        return ["-I" + str(bpf_dir()), f'-DFASTLB_PIN_DIR="{pin}"', *self.sizes.cflags()]

    def load(self) -> "Program":
        if os.geteuid() != 0:
            raise PrivilegeError("loading an XDP program needs root (CAP_BPF, CAP_NET_ADMIN)",
                                 fix="run fastlb as root (sudo)")
        try:
            from bcc import BPF
        except ImportError as exc:
            raise ToolchainError("BCC's Python module (bcc) is not importable",
                                 fix="sudo make setup (installs python3-bpfcc and the venv)") from exc
        self.pin_dir.mkdir(parents=True, exist_ok=True)
        check_pinned_layouts(self.pin_dir, self.sizes, self.specs)
        src = bpf_dir() / self.source
        with _captured_stderr() as err:
            try:
                bpf = BPF(src_file=str(src).encode(), cflags=self.cflags())
                fn = bpf.load_func(self.function.encode(), BPF.XDP)
            except Exception as exc:  # BCC raises bare Exception
                failure = exc
            else:
                failure = None
        self.messages = err["text"]
        if failure is not None:
            detail = _last_lines(self.messages)
            if "kernel headers" in self.messages or "modules/" in self.messages:
                raise ToolchainError(f"BCC could not find kernel headers: {detail}",
                                     fix="sudo make setup (links Debian's linux-headers-amd64)") from failure
            raise BpfError(f"compiling/loading {src} failed: {failure}; {detail}",
                           fix="run with FASTLB_DEBUG=1 for the full compiler output") from failure
        self.bpf = bpf
        self.fd = fn.fd
        return self

    def pin(self) -> None:
        """Pin the program next to its maps (status and benchmarks open it there)."""
        path = self.pin_dir / "prog"
        if path.exists():
            path.unlink()
        bpfsys.obj_pin(self.fd, str(path))

    def close(self) -> None:
        if self.bpf is not None:
            self.bpf.cleanup()
            self.bpf = None
            self.fd = -1


def _last_lines(text: str, count: int = 6) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    if os.environ.get("FASTLB_DEBUG") == "1":
        return "\n".join(lines)
    errors = [ln for ln in lines if "error" in ln.lower()] or lines
    return " | ".join(errors[-count:])

