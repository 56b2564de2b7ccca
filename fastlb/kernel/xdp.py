"""Attaching the program to an interface through a pinned BPF link.

A link gives fastlb exactly the guarantees it needs, which BCC's
``attach_xdp`` cannot: creating it fails (EBUSY) when another program is
attached, so fastlb never replaces a program it did not attach; only the
link's holder can swap its program (``link_update``, atomic); and the pinned
link keeps the program attached after the controller exits.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

from fastlb.errors import AttachError, os_error
from fastlb.kernel import bpfsys, pins
from fastlb.kernel.neighbours import Interface

MODES = {"native": bpfsys.XDP_FLAGS_DRV_MODE, "generic": bpfsys.XDP_FLAGS_SKB_MODE}
MODE_NAMES = {1: "native", 2: "generic", 3: "offload", 4: "multi"}


def link_pin(pin_dir: Path, iface: Interface | None = None, primary: bool = True) -> Path:
    """Where the link of ``iface`` is pinned: ``link`` for the attachment's
    first interface, ``link-<name>`` for the others (two-arm)."""
    return pin_dir / (pins.LINK_PIN if primary else f"{pins.LINK_PIN}-{iface.name}")


def owned_link(pin_dir: Path, path: Path | None = None) -> bpfsys.LinkInfo | None:
    """The pinned link's info, or None when there is no pinned link."""
    path = path or pin_dir / pins.LINK_PIN
    if not path.exists():
        return None
    fd = bpfsys.obj_get(str(path))
    try:
        return bpfsys.link_info(fd)
    finally:
        os.close(fd)


def is_ours(iface: Interface, pin_dir: Path, primary: bool = True) -> bool:
    """True when the program attached to ``iface`` is fastlb's, through its pinned link."""
    if not iface.xdp_prog_id:
        return False
    info = owned_link(pin_dir, link_pin(pin_dir, iface, primary))
    return info is not None and info.ifindex == iface.index and info.prog_id == iface.xdp_prog_id


def refuse_foreign(iface: Interface, pin_dir: Path, primary: bool = True) -> None:
    if iface.xdp_prog_id and not is_ours(iface, pin_dir, primary):
        raise AttachError(
            f"{iface.name} already has an XDP program (id {iface.xdp_prog_id}) that fastlb did not attach",
            fix=f"remove it with the tool that attached it (e.g. ip link set dev {iface.name} xdp off) "
                "if it is not needed, then attach again")


def attach(prog_fd: int, iface: Interface, pin_dir: Path, mode: str, primary: bool = True) -> str:
    """Attach, or swap the program of fastlb's existing link. Returns the mode used.

    ``mode`` is "native", "generic", or "auto" (native, else generic with a note
    printed by the caller). ``primary`` is False for the other interfaces of a
    two-arm attachment, whose links are pinned beside the first one's.
    """
    link_path = link_pin(pin_dir, iface, primary)
    if is_ours(iface, pin_dir, primary):
        fd = bpfsys.obj_get(str(link_path))
        try:
            bpfsys.link_update(fd, prog_fd)
        except OSError as exc:
            raise AttachError(f"replacing fastlb's program on {iface.name} failed: {os_error(exc)}",
                              fix=f"fastlb detach {iface.name}, then attach again") from exc
        finally:
            os.close(fd)
        return MODE_NAMES.get(iface.xdp_mode, "native")
    refuse_foreign(iface, pin_dir, primary)
    if link_path.exists():
        link_path.unlink()  # a link left by an interface that no longer exists
    tried = ["native", "generic"] if mode == "auto" else [mode]
    last: OSError | None = None
    for name in tried:
        try:
            fd = bpfsys.link_create_xdp(prog_fd, iface.index, MODES[name])
        except OSError as exc:
            last = exc
            if exc.errno == errno.EBUSY:
                raise AttachError(f"{iface.name} already has an XDP program that fastlb did not attach",
                                  fix="remove it with the tool that attached it, then attach again") from exc
            continue
        try:
            bpfsys.obj_pin(fd, str(link_path))
        except OSError as exc:
            bpfsys.link_detach(fd)
            raise AttachError(f"pinning the XDP link of {iface.name} at {link_path} failed: {os_error(exc)}",
                              fix="check that the bpffs at /run/fastlb/bpffs is mounted and writable") from exc
        finally:
            os.close(fd)
        return name
    assert last is not None
    hint = "try --xdp-mode generic" if mode == "native" else "check that the kernel supports XDP"
    raise AttachError(f"attaching XDP to {iface.name} in {'/'.join(tried)} mode failed: {os_error(last)}",
                      fix=hint) from last


def links(pin_dir: Path) -> list[Path]:
    """The attachment's pinned links: the first interface's, then the others'."""
    if not pin_dir.is_dir():
        return []
    return sorted((p for p in pin_dir.iterdir() if p.name == pins.LINK_PIN or
                   p.name.startswith(pins.LINK_PIN + "-")), key=lambda p: (p.name != pins.LINK_PIN, p.name))


def detach(pin_dir: Path) -> bool:
    """Detach every link of the attachment (if pinned); True when one was attached."""
    found = False
    for link_path in links(pin_dir):
        fd = bpfsys.obj_get(str(link_path))
        try:
            bpfsys.link_detach(fd)
        except OSError as exc:
            if exc.errno not in (errno.ENOLINK, errno.EINVAL):  # already defunct
                raise AttachError(f"detaching the link pinned at {link_path} failed: {os_error(exc)}",
                                  fix="remove the pin by hand after checking ip link") from exc
        finally:
            os.close(fd)
        found = True
    return found
