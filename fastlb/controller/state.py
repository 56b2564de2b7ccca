"""The controller's memory across restarts: each backend's last known health.

The maps and conntrack survive a controller that dies (they are pinned);
the health states are kept here, in ``/run/fastlb/state/net<netns
inode>/<ifname>.json`` (``FASTLB_STATE_ROOT`` overrides the root), written
atomically at every transition. A new ``fastlb attach`` on an attached
interface starts from them, so a restart does not empty the tables while
the checks warm up. ``fastlb detach`` removes the file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from fastlb.controller.files import write_atomic
from fastlb.kernel import pins

DEFAULT_ROOT = "/run/fastlb/state"
VERSION = 1


def path(ifname: str) -> Path:
    root = Path(os.environ.get("FASTLB_STATE_ROOT", DEFAULT_ROOT))
    if "/" in ifname or ifname in (".", ".."):
        raise ValueError(f"bad interface name {ifname!r}")
    return root / pins.netns_id() / f"{ifname}.json"


def _name(key: tuple[str, bytes]) -> str:
    return f"{key[0]} {key[1].decode()}"


def load(ifname: str) -> dict[tuple[str, bytes], str]:
    """{(VIP name, backend key): "up" | "down"} as last written; {} when there is no usable file."""
    try:
        data = json.loads(path(ifname).read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or data.get("version") != VERSION:
        return {}
    out = {}
    for name, st in data.get("backends", {}).items():
        vip, _, backend = name.partition(" ")
        if backend and st in ("up", "down"):
            out[(vip, backend.encode())] = st
    return out


def save(ifname: str, states: dict[tuple[str, bytes], str]) -> None:
    p = path(ifname)
    p.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    body = {"version": VERSION,
            "backends": {_name(k): v for k, v in sorted(states.items()) if v in ("up", "down")}}
    write_atomic(p, json.dumps(body, indent=1) + "\n")


def remove(ifname: str) -> None:
    try:
        path(ifname).unlink()
    except FileNotFoundError:
        pass
