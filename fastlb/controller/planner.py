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
from fastlb.controller.health import MAX_WEIGHT, UP

NO_MAC = "00:00:00:00:00:00"
RAMP_SCALE = 100            # during a VIP's slow start its weights are scaled up so that a ramp has steps

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


def asked_weight(weight: int, asked: tuple[int | None, int | None]) -> int:
    """A backend's weight as its check asks: exec's ``weight N``, else the agent's
    percent of the configured ``weight``, else ``weight``. A share that rounds to 0
    keeps weight 1: only drain (0 %) is 0."""
    fixed, percent = asked
    if fixed is not None:
        return fixed
    if percent is not None and weight:
        return min(MAX_WEIGHT, max(1, (weight * percent + 50) // 100)) if percent else 0
    return weight


def ramped(weights: list[int], ramps: list[float | None]) -> list[int]:
    """A VIP's weights during a slow start (``ramps``: how far along each backend's
    ramp is, 0..1, None when it does not ramp): everyone's scaled up, a ramping
    backend's linearly from 1 to its full weight. Equal weights scaled alike build
    the same Maglev table, so only the ramping backend's slots move, step by step
    (HASH.md)."""
    if all(r is None for r in ramps):
        return weights
    scale = max(1, min(RAMP_SCALE, MAX_WEIGHT // max(max(weights), 1)))
    return [w * scale if r is None or not w else max(1, round(w * scale * r)) for w, r in zip(weights, ramps)]


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


def plan(config: Config, states: Mapping[Key, str], macs: Mapping[str, str], memory: Memory = Memory(),
         weights: Mapping[Key, int] | None = None) -> Plan:
    """The tables ``config`` asks for, given each backend's health state and its next hop's MAC.

    ``weights`` overrides a backend's configured weight (what its exec or
    agent check asks, a slow start's step); backends not in it keep theirs.

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
            weight = weights.get((vip.name, b.key), b.weight) if weights else b.weight
            if weight != b.weight:
                b = dataclasses.replace(b, weight=weight)
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
