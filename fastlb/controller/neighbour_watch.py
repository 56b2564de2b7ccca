"""Keeping the backends' MAC addresses current: resolve, then follow neighbour changes.

A backend's packets leave with the MAC of its next hop: the backend itself
on the segment (DSR), or its route's gateway (tunnel, NAT); see
:func:`fastlb.kernel.neighbours.next_hop`. :func:`resolve` is
:func:`fastlb.kernel.neighbours.resolve_macs` that returns what it found instead of
failing on the first unresolved next hop, so that one dead backend host
does not stop a controller (it is then down). :class:`Watcher` listens to
the kernel's neighbour notifications (rtnetlink RTMGRP_NEIGH) for the
attach interface: a next hop whose entry gets a new MAC is reported, and
one whose entry fails or goes away is probed again (a neighbour entry with
NTF_USE starts ARP/ND), so its MAC comes back by itself when the host
answers.
"""

from __future__ import annotations

import select
import threading
import time
from collections.abc import Callable

from pyroute2 import IPRoute
from pyroute2.netlink.rtnl import RTMGRP_NEIGH

from fastlb.kernel import neighbours

RESOLVE_TIMEOUT = 3.0
KICK_EVERY = 5.0   # seconds between two resolution attempts of one lost neighbour


def next_hops(ifaces, addresses, on_link=()) -> dict[str, str]:
    """Backend address -> the address whose MAC its packets leave with (itself, or its gateway).

    ``ifaces``: the attached interface, or several (two-arm). A DSR backend
    (in ``on_link``) that is not on an attached segment raises
    NeighbourError: that is a config error, not a dead host.
    """
    on_link = {str(a) for a in on_link}
    with IPRoute() as ipr:
        return {str(a): neighbours.next_hop(ipr, ifaces, a, str(a) in on_link) for a in addresses}


def resolve(ifaces, hops: dict[str, str], timeout: float = RESOLVE_TIMEOUT) -> dict[str, str]:
    """Backend address -> MAC of its next hop, for those that resolve within ``timeout``.

    ``hops`` comes from :func:`next_hops`. Unresolved ones are left out.
    """
    return neighbours.find_macs(ifaces, hops, timeout)


class Watcher:
    """Reports ``on_change(next hop, mac or None)`` for the watched next hops on the attached interfaces."""

    def __init__(self, ifaces, on_change: Callable[[str, str | None], None]):
        self.ifindexes = {i.index for i in neighbours.as_list(ifaces)}
        self.on_change = on_change
        self.watched: set[str] = set()
        self.kicked: dict[str, float] = {}
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, name="fastlb-neigh", daemon=True)

    def watch(self, addresses) -> None:
        self.watched = {str(a) for a in addresses}

    def start(self) -> None:
        self.thread.start()

    def _run(self) -> None:
        # pyroute2 binds a socket to the thread that made it: make it here.
        with IPRoute() as ipr:
            ipr.bind(groups=RTMGRP_NEIGH)
            while not self.stopped.is_set():
                try:
                    ready, _, _ = select.select([ipr], [], [], 0.5)
                    messages = ipr.get() if ready else []
                except (OSError, ValueError):
                    time.sleep(0.5)
                    continue
                for msg in messages:
                    self._message(msg)

    def _message(self, msg) -> None:
        if msg.get("ifindex") not in self.ifindexes:
            return
        addr = msg.get_attr("NDA_DST")
        if addr not in self.watched:
            return
        state = msg.get("state", 0)
        mac = msg.get_attr("NDA_LLADDR")
        if msg["event"] == "RTM_NEWNEIGH" and state & neighbours.NUD_USABLE and mac and mac != "00:00:00:00:00:00":
            self.on_change(addr, mac)
        elif msg["event"] == "RTM_DELNEIGH" or state & neighbours.NUD_FAILED:
            self.on_change(addr, None)
            now = time.monotonic()
            if now - self.kicked.get(addr, -KICK_EVERY) >= KICK_EVERY:
                self.kicked[addr] = now
                with IPRoute() as ipr:
                    neighbours.kick(ipr, msg.get("ifindex"), addr)

    def stop(self) -> None:
        self.stopped.set()
        if self.thread.is_alive():
            self.thread.join(timeout=5)
