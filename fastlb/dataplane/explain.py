"""Which backend a new flow gets, and why, from the config and the core alone.

This is the userspace model of bpf/fastlb_kern.c's new-flow path: the flow
hash of docs/HASH.md over the VIP's hash fields, then the VIP's algorithm:

- maglev: ring slot ``hash % M``;
- lc, lrt: power of two choices between the ring slot of the hash and a
  second, distinct backend found after the rehash; the lower score wins;
- rr, wrr: the next slot of the VIP's smooth-WRR sequence, by the cursor of
  the CPU that receives the packet (not predictable from the flow alone).

A flow that cannot be recorded in conntrack takes the ring slot under every
algorithm. The live active-connection and response-time figures of lc/lrt
may be read from an attachment's pinned maps; conntrack is never read.
"""

from __future__ import annotations

import datetime
import functools
import ipaddress
from dataclasses import dataclass, field

from fastlb import core
from fastlb.dataplane import identity
from fastlb.dataplane.tables import ring_positions, seq_positions
from fastlb.errors import FastlbError
from fastlb.kernel import cdefs
from fastlb.kernel.layout import Sizes


@dataclass
class Candidate:
    slot: int
    backend: str
    weight: int
    active: int
    rtt_us: int


@dataclass
class Explanation:
    vip: str
    algorithm: str
    hash_mode: str
    flow: str
    hash: int
    ring_size: int
    ring_slot: int
    ring_backend: str | None
    backend: str | None            # the pick, when the flow alone decides it
    candidates: list[Candidate] = field(default_factory=list)
    sequence: list[str] = field(default_factory=list)
    counts_source: str = ""

    def lines(self) -> list[str]:
        out = [f"flow {self.flow} -> VIP {self.vip} ({self.algorithm}, hash fields: {self.hash_mode})",
               f"flow hash: {self.hash:#010x} (jhash, docs/HASH.md); ring slot {self.ring_slot} of "
               f"{self.ring_size} -> {self.ring_backend or 'no backend'}"]
        if self.algorithm == "maglev":
            out.append(f"backend: {self.backend or 'none (every weight is 0): dropped'}")
        elif self.algorithm in ("lc", "lrt"):
            score = "(active+1)/weight" if self.algorithm == "lc" else "rtt*(active+1)/weight"
            out.append(f"power of two choices, lower {score} wins, ties to the first ({self.counts_source}):")
            for i, c in enumerate(self.candidates):
                rtt = f", rtt {c.rtt_us} us" if self.algorithm == "lrt" else ""
                out.append(f"  candidate {i + 1}: slot {c.slot} -> {c.backend} (weight {c.weight}, "
                           f"active {c.active}{rtt})")
            out.append(f"backend: {self.backend or 'none: dropped'}")
        else:
            seq = " ".join(self.sequence) if len(self.sequence) <= 24 else \
                " ".join(self.sequence[:24]) + f" ... ({len(self.sequence)} slots)"
            out.append(f"sequence: {seq}")
            out.append("backend: the next slot of this sequence, by the cursor of the CPU that receives "
                       "the flow's first packet (each CPU walks its own cursor), so the flow alone does "
                       "not decide it")
        if self.algorithm == "maglev":
            out.append("every fastlb box with this config (backends, weights, ring_size, hash_seed) and the "
                       "same healthy backends picks the same, for a new flow and for one ECMP moved to it")
        else:
            out.append(f"a packet of this flow with no conntrack entry on the box it reaches (ECMP moved the "
                       f"flow from another box, or the entry was evicted), or a flow that cannot be recorded "
                       f"(conntrack full or flood guard): ring slot -> {self.ring_backend or 'none'}, on "
                       f"every box with this config")
        return out


@functools.lru_cache(maxsize=64)
def _ring(vip, sizes: Sizes):
    """The VIP's ring, built once per (VIP, sizes): explaining many flows reuses it."""
    return ring_positions(vip, sizes)


def _mode_value(vip) -> int:
    return cdefs.FL_HASH_SRC if vip.hash == "src" else cdefs.FL_HASH_5TUPLE


def flow_hash(vip, src: str, sport: int, seed: int) -> int:
    return core.flow_hash(ipaddress.ip_address(src).packed, vip.address.packed, sport, vip.port,
                          vip.proto_number, seed, _mode_value(vip))


def explain(config, vip, src: str, sport: int, active: list[int] | None = None,
            rtt_us: list[int] | None = None, counts_source: str = "") -> Explanation:
    """Explain the pick for a new flow from ``src:sport`` to ``vip``.

    ``active`` and ``rtt_us`` hold one figure per backend (config order) for
    lc/lrt; missing ones count as 0.
    """
    if ipaddress.ip_address(src).version != vip.family:
        raise ValueError(f"source {src} is not of the VIP's address family (IPv{vip.family})")
    sizes = Sizes.from_settings(config.settings)
    names = [str(b.address) for b in vip.backends]
    h = flow_hash(vip, src, sport, sizes.hash_seed)
    ring = _ring(vip, sizes)
    slot = h % sizes.ring_size
    ring_pos = ring[slot]
    ring_backend = names[ring_pos] if ring_pos >= 0 else None
    flow = f"{src}:{sport}" if vip.family == 4 else f"[{src}]:{sport}"
    result = Explanation(vip=vip.name, algorithm=vip.algorithm, hash_mode=vip.hash, flow=flow, hash=h,
                         ring_size=sizes.ring_size, ring_slot=slot, ring_backend=ring_backend,
                         backend=None, counts_source=counts_source)
    if vip.algorithm == "maglev":
        result.backend = ring_backend
    elif vip.algorithm in ("lc", "lrt"):
        if ring_pos < 0:
            return result
        active = list(active or [0] * len(names))
        weights = [b.weight for b in vip.backends]
        rtt = list(rtt_us or [0] * len(names)) if vip.algorithm == "lrt" else None
        a, b = core.p2c_candidates(h, ring, sizes.hash_seed)
        second_slot = _second_slot(h, ring, sizes.hash_seed, a, b)
        for s, pos in ((slot, a), (second_slot, b)) if b != a else ((slot, a),):
            result.candidates.append(Candidate(slot=s, backend=names[pos], weight=weights[pos],
                                               active=active[pos], rtt_us=rtt[pos] if rtt else 0))
        pick = core.p2c_pick(a, b, active, weights, rtt) if b != a else a
        result.backend = names[pick]
    else:
        result.sequence = [names[p] for p in seq_positions(vip, sizes)]
    return result


def _second_slot(h: int, ring, seed: int, a: int, b: int) -> int:
    """The ring slot where the second candidate was found (for the explanation)."""
    m = len(ring)
    start = core.p2c_rehash(h, seed) % m
    for i in range(cdefs.FL_P2C_PROBES):
        s = (start + i) % m
        if ring[s] == b and b != a:
            return s
    return start


def _serving(vip):
    """(interface, its open maps, the VIP's id) of each attachment in this network namespace serving ``vip``."""
    from fastlb.kernel import pins, structs
    from fastlb.kernel.maps import PinnedMaps
    base = pins.root()
    if not pins.is_bpffs(base):
        return
    key = structs.vip_key(vip.address, vip.port, vip.proto_number)
    for ifname in pins.attachments(base):
        try:
            maps = PinnedMaps(pins.attachment_dir(ifname, base))
        except FastlbError:  # a half-removed attachment: look at the next one
            continue
        with maps:
            vip_id = maps.lookup("vips", key)
            if vip_id is not None:
                yield ifname, maps, vip_id


def binding(vip, src: str) -> str | None:
    """What persistence says of client ``src`` on ``vip``, from the attachment serving it; None if none does."""
    from fastlb.dataplane import flows
    from fastlb.kernel import structs
    if not vip.persistence:
        return None
    for ifname, maps, vip_id in _serving(vip):
        timeout_ns, prefix = flows.persistence(maps).get(vip_id.value, (vip.persistence * 10**9, 0))
        client = ipaddress.ip_network(f"{src}/{vip.persistence_prefix}", strict=False)
        key = structs.PersistKey(addr=structs.pack_addr(client.network_address), vip_id=vip_id.value,
                                 family=structs.family_of(client.network_address))
        value = maps.lookup("persist", key)
        if value is None:
            return f"persistence: {client} is not bound on {ifname}: its next connection picks as below"
        names, slots = flows.Names.read(maps), flows.Slots.read(maps)
        row = flows.describe_binding(key, value, names, slots, {vip_id.value: (timeout_ns, prefix)}, flows.now_ns())
        if not row["live"]:
            return (f"persistence: {client} was bound to {row['backend']} on {ifname}, which has ended "
                    "(expired, or its backend is gone, down or drained): its next connection picks as below")
        until = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(seconds=row["expires_in_s"])
        return (f"persistence: {client} is bound to {row['backend']} on {ifname} until {until:%H:%M:%S} UTC "
                f"({row['expires_in_s']:.0f} s after its last packet, idle {row['idle_s']:.0f} s; each packet "
                "extends it): its new connections go there, whatever the pick below says")
    return None


def live_counts(vip) -> tuple[list[int], list[int], str] | None:
    """Active connections and rtt per backend of ``vip`` (config order), read
    from the attachment in this network namespace that serves it; None if none does."""
    from fastlb.dataplane import flows
    for ifname, maps, vip_id in _serving(vip):
        by_key = {}
        counts = flows.active_counts(maps)
        for be_id, slot in identity.backends(maps).items():
            if slot.valid and slot.entry.vip_id == vip_id.value:
                by_key[slot.name.encode()] = (counts[be_id], slot.entry.rtt_us)
        figures = [by_key.get(b.key, (0, 0)) for b in vip.backends]
        return [f[0] for f in figures], [f[1] for f in figures], f"live counts from {ifname}'s maps"
    return None
