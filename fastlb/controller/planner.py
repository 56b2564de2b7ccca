"""The controller's planner: what the tables should hold, as a pure function.

Given the config, each backend's health state, the backends' MACs and what
the last plan remembered (``Memory``: the all_down = "keep" sets and the VIPs
with no healthy backend), :func:`plan` returns the effective config for
fastlb.dataplane.tables, the backends whose slots lose their valid flag, the
MACs to write, the new memory and the transitions to log. No BPF, no root, no
clock, no I/O: the loop (fastlb.controller.loop) calls it once per change and
applies what it returns.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Mapping

from fastlb.config import Config, Vip, l4_view
from fastlb.controller.health import UP

NO_MAC = "00:00:00:00:00:00"

Key = tuple[str, bytes]     # (VIP name, backend key)
Transition = tuple[str, dict]   # (event, fields) for the loop's log


@dataclass(frozen=True)
class Memory:
    """What one plan hands to the next: the transitions are relative to it."""

    kept: Mapping[str, frozenset[bytes]] = field(default_factory=dict)   # all_down = "keep": last set in table
    empty: frozenset[str] = frozenset()                                  # VIPs with no healthy backend


@dataclass(frozen=True)
class Plan:
    effective: Config            # the config as the tables get it (a backend out of the table: weight 0)
    down: frozenset[Key]         # backends whose slot loses its valid flag (expire_nodest_conn)
    macs: dict[str, str]         # backend address -> MAC to write (NO_MAC when unresolved)
    memory: Memory
    transitions: tuple[Transition, ...]

    def in_table(self, vip: Vip) -> int:
        """How many of ``vip``'s backends (from ``effective``) take new flows."""
        return sum(1 for b in vip.backends if (vip.name, b.key) not in self.down and b.weight > 0)


def _live(vip: Vip, states: Mapping[Key, str], macs: Mapping[str, str], memory: Memory,
          kept: dict, empty: set, log: list) -> set[bytes]:
    """Keys of the VIP's backends that belong in its table (health, MAC, all_down policy)."""
    up = {b.key for b in vip.backends if states.get((vip.name, b.key)) == UP and str(b.address) in macs}
    if up:
        kept[vip.name] = frozenset(up)
        if vip.name in empty:
            empty.discard(vip.name)
            log.append(("vip_has_healthy_backend", {"vip": vip.name, "backends_up": len(up)}))
        return up
    if vip.name not in empty:
        empty.add(vip.name)
        log.append(("vip_no_healthy_backend", {
            "vip": vip.name, "policy": vip.all_down,
            "effect": "new flows dropped (reason no_backend)" if vip.all_down == "drop" else "the last table stays"}))
    if vip.all_down == "keep":
        return {k for k in memory.kept.get(vip.name, frozenset()) if any(b.key == k for b in vip.backends)}
    return set()


def plan(config: Config, states: Mapping[Key, str], macs: Mapping[str, str], memory: Memory = Memory()) -> Plan:
    """The tables ``config`` asks for, given each backend's health state and its next hop's MAC.

    A backend is in its VIP's table when it is up and its MAC is known. One
    that is not keeps its slot without the valid flag when the VIP expires
    its flows (``expire_nodest_conn``), else it only gets weight 0. A VIP with
    no backend left drops new flows, or keeps its last set (``all_down``).
    An http/https VIP's packets go to HAProxy: it keeps its slot with no
    backends here (``l4_view``).
    """
    config = l4_view(config)
    kept, empty, log = dict(memory.kept), set(memory.empty), []
    vips, down = [], set()
    for vip in config.vips:
        if vip.is_l7:        # its packets go to HAProxy (fastlb.controller.l7), which checks its backends
            vips.append(vip)
            continue
        live = _live(vip, states, macs, memory, kept, empty, log)
        backends = []
        for b in vip.backends:
            if b.key not in live:
                if vip.expire_nodest_conn:
                    down.add((vip.name, b.key))
                else:
                    b = dataclasses.replace(b, weight=0)
            backends.append(b)
        vips.append(dataclasses.replace(vip, backends=tuple(backends)))
    addresses = {str(b.address) for v in config.vips for b in v.backends}
    return Plan(effective=dataclasses.replace(config, vips=tuple(vips)), down=frozenset(down),
                macs={a: macs.get(a, NO_MAC) for a in addresses},
                memory=Memory(kept=kept, empty=frozenset(empty)), transitions=tuple(log))
