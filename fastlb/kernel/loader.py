"""Compiling and loading an XDP program with BCC: the one BCC loader.

BCC compiles the C at every load (a second or more), so callers compile
once and then configure through the maps. The map layouts the program
declares are in :mod:`fastlb.kernel.layout`; before a compile reuses pinned
maps (BCC reuses a pin silently, whatever its layout), ``check_pinned_layouts``
compares every pin against them.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

from fastlb.errors import BpfError, PrivilegeError, ToolchainError
from fastlb.kernel import bpfsys, cdefs
from fastlb.kernel.layout import MAP_SPECS, Sizes, check_pinned_layouts

PROGRAM_SOURCE = "fastlb_kern.c"
PROGRAM_FUNCTION = "xdp_fastlb"


def bpf_dir() -> Path:
    return cdefs.bpf_dir()


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

