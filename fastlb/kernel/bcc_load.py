"""The one BCC load-and-wrap: compile a C file, load one XDP function, wrap BCC's bare Exception.

BCC prints the compiler's messages on the C library's stderr and raises a
bare ``Exception``; :func:`load_xdp` captures the messages and raises a
ToolchainError (no bcc module, no kernel headers) or a BpfError that names
the file and quotes the compiler's last error lines. The balancer's loader
(fastlb.kernel.loader.Program), the lab's XDP_PASS program and its traffic
generator all load through it.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

from fastlb.errors import BpfError, ToolchainError


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


def load_xdp(src: Path, function: str, cflags=()) -> tuple[object, object, str]:
    """(the ``bcc.BPF`` object, the loaded function, the compiler's messages) of ``function`` in ``src``."""
    try:
        from bcc import BPF
    except ImportError as exc:
        raise ToolchainError("BCC's Python module (bcc) is not importable",
                             fix="sudo make setup (installs python3-bpfcc and the venv)") from exc
    if not Path(src).is_file():
        raise BpfError(f"{src} is missing", fix="reinstall fastlb, or set FASTLB_BPF_DIR to the folder holding the BPF sources")
    with _captured_stderr() as err:
        try:
            bpf = BPF(src_file=os.fsencode(src), cflags=list(cflags))
            fn = bpf.load_func(function.encode(), BPF.XDP)
        except Exception as exc:  # BCC raises bare Exception
            failure = exc
        else:
            failure = None
    messages = err["text"]
    if failure is not None:
        detail = _last_lines(messages)
        if "kernel headers" in messages or "modules/" in messages:
            raise ToolchainError(f"BCC could not find kernel headers: {detail}",
                                 fix="sudo make setup (links Debian's linux-headers-amd64)") from failure
        raise BpfError(f"compiling/loading {src} failed: {failure}; {detail}",
                       fix="run with FASTLB_DEBUG=1 for the full compiler output") from failure
    return bpf, fn, messages


def _last_lines(text: str, count: int = 6) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    if os.environ.get("FASTLB_DEBUG") == "1":
        return "\n".join(lines)
    errors = [ln for ln in lines if "error" in ln.lower()] or lines
    return " | ".join(errors[-count:])
