"""Compiling and loading an XDP program with BCC: the one BCC loader.

BCC compiles the C at every load (a second or more), so callers compile
once and then configure through the maps. The map layouts the program
declares are in :mod:`fastlb.kernel.layout`; before a compile reuses pinned
maps (BCC reuses a pin silently, whatever its layout), ``check_pinned_layouts``
compares every pin against them.
"""

from __future__ import annotations

import os
from pathlib import Path

from fastlb.errors import PrivilegeError
from fastlb.kernel import bpfsys, cdefs
from fastlb.kernel.bcc_load import load_xdp
from fastlb.kernel.layout import MAP_SPECS, Sizes, check_pinned_layouts

PROGRAM_SOURCE = "fastlb_kern.c"
PROGRAM_FUNCTION = "xdp_fastlb"


def bpf_dir() -> Path:
    return cdefs.bpf_dir()


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
        self.pin_dir.mkdir(parents=True, exist_ok=True)
        check_pinned_layouts(self.pin_dir, self.sizes, self.specs)
        bpf, fn, self.messages = load_xdp(bpf_dir() / self.source, self.function, self.cflags())
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
