"""From a validated config to the contents of the maps.

VIPs and backends get slots (ids) in the maps, and keep them across applies
(see ``place``). A VIP's Maglev ring comes from the selection core
(fastlb.core), as backend positions that are mapped to backend ids here.
Rings are written as deltas against what the map holds, so re-applying an
unchanged config writes no ring slot, and no other entry either.

The controller (fastlb.controller.loop) passes the backends that failed their
health checks as ``down``: such a backend keeps its slot (so it comes back
to it, with its counters), but the slot is not valid, so the kernel re-picks
a backend for its flows (IPVS's ``expire_nodest_conn``), and it has no ring
or sequence slot.
"""

from __future__ import annotations

import ctypes
import dataclasses
import ipaddress
import math
from dataclasses import dataclass

from fastlb import core
from fastlb.config import l4_view
from fastlb.dataplane import identity
from fastlb.errors import FastlbError
from fastlb.kernel import bpfsys, cdefs, structs
from fastlb.kernel.layout import Sizes
from fastlb.kernel.maps import PinnedMaps

LRT_FLOOR_US = 2000         # lrt: scores below this are equal (probe noise on a LAN) ...
LRT_STEP = 1.5              # ... and above it, scores in the same step of this ratio are equal


def lrt_score(us: int) -> int:
    """The response-time score written for the kernel: rounded to a geometric
    step, so that backends of about the same latency tie and the ring spreads
    flows among them, while a clearly slower one still loses every pair."""
    if us <= LRT_FLOOR_US:
        return LRT_FLOOR_US
    steps = round(math.log(us / LRT_FLOOR_US, LRT_STEP))
    return min(int(LRT_FLOOR_US * LRT_STEP ** steps), 2**32 - 1)


# lrt: a backend with no latency sample scores as PeakEwma's default_us (HASH.md),
# so that its load counts from the first connection on.
UNMEASURED_RTT_US = lrt_score(core.PeakEwma().default_us)

ALGORITHMS = {"maglev": "FL_ALG_MAGLEV", "rr": "FL_ALG_RR", "wrr": "FL_ALG_WRR",
              "lc": "FL_ALG_LC", "lrt": "FL_ALG_LRT"}
FORWARDING = {"dsr": "FL_FWD_DSR", "tunnel": "FL_FWD_TUNNEL", "nat": "FL_FWD_NAT"}
HASH_MODES = {"5tuple": "FL_HASH_5TUPLE", "src": "FL_HASH_SRC"}


@dataclass(frozen=True)
class Placement:
    """Where a config's VIPs and backends live in the maps."""
    vip_ids: dict[str, int]                  # vip.name -> vip id
    backend_ids: dict[tuple[str, int], int]  # (vip.name, backend position) -> backend id


def place(config, maps: PinnedMaps, sizes: Sizes) -> Placement:
    """Give each VIP and backend a slot, keeping the slots they already hold.

    Conntrack entries name slots, so a VIP or backend that stays in the
    config must keep its slot: otherwise removing one backend would shift
    its neighbours and move their established flows.
    """
    config = l4_view(config)
    held_vips = {bytes(slot.key): vid for vid, slot in identity.vips(maps).items()}
    vip_ids: dict[str, int] = {}
    for vip in config.vips:
        vid = held_vips.get(bytes(_vip_key(vip)))
        if vid is not None and vid < sizes.max_vips:
            vip_ids[vip.name] = vid
    free_vips = (i for i in range(sizes.max_vips) if i not in set(vip_ids.values()))
    for vip in config.vips:
        if vip.name not in vip_ids:
            vip_ids[vip.name] = next(free_vips, None)
            if vip_ids[vip.name] is None:
                raise FastlbError(f"{len(config.vips)} VIPs do not fit the {sizes.max_vips} VIP slots the "
                                  "attached program was built with",
                                  fix="raise settings.max_vips and attach again (a new build)")

    held_backends = {_identity(e): be_id for be_id, e in _held_backends(maps)}
    backend_ids: dict[tuple[str, int], int] = {}
    for vip in config.vips:
        for pos, b in enumerate(vip.backends):
            be_id = held_backends.get((vip_ids[vip.name], bytes(structs.pack_addr(b.address)),
                                       0 if vip.multi_port else structs.port_be(b.port)))  # as backend_entry
            if be_id is not None:
                backend_ids[(vip.name, pos)] = be_id
    used = set(backend_ids.values())
    free_backends = (i for i in range(sizes.max_backends) if i not in used)
    for vip in config.vips:
        for pos in range(len(vip.backends)):
            if (vip.name, pos) not in backend_ids:
                backend_ids[(vip.name, pos)] = next(free_backends, None)
                if backend_ids[(vip.name, pos)] is None:
                    raise FastlbError(f"the backends do not fit the {sizes.max_backends} backend slots the "
                                      "attached program was built with",
                                      fix="raise settings.max_backends and attach again (a new build)")
    return Placement(vip_ids, backend_ids)


def ring_positions(vip, sizes: Sizes):
    """The VIP's Maglev table, as backend positions (-1: no backend)."""
    keys = [b.key for b in vip.backends]
    weights = [b.weight for b in vip.backends]
    return core.maglev_table(keys, weights, sizes.ring_size, sizes.hash_seed)


def seq_positions(vip, sizes: Sizes):
    """The VIP's smooth-WRR sequence (rr: equal weights), as backend positions."""
    if vip.algorithm not in ("rr", "wrr"):
        return []
    weights = [b.weight for b in vip.backends]
    if vip.algorithm == "rr":
        weights = [1 if w > 0 else 0 for w in weights]
    return list(core.swrr_sequence(weights, sizes.seq_size))


def vip_meta(vip, gen: int, seq_len: int, sizes: Sizes) -> structs.VipMeta:
    if vip.is_l7:   # the kernel only passes its packets on: algorithm and hash are HAProxy's
        return structs.VipMeta(gen=gen, algorithm=cdefs.defs()[ALGORITHMS[vip.algorithm]],
                               flags=cdefs.FL_VIP_F_VALID | cdefs.FL_VIP_F_L7, ring_size=sizes.ring_size)
    return structs.VipMeta(
        gen=gen, algorithm=cdefs.defs()[ALGORITHMS[vip.algorithm]],
        forwarding=cdefs.defs()[FORWARDING[vip.forwarding]],
        hash_mode=cdefs.defs()[HASH_MODES[vip.hash]],
        flags=cdefs.FL_VIP_F_VALID | (cdefs.FL_VIP_F_PERSIST if vip.persistence else 0), seq_len=seq_len,
        ring_size=sizes.ring_size)


def vip_persist(vip) -> structs.VipPersist:
    """The VIP's persistence timeout and client mask (all zero without persistence)."""
    if not vip.persistence:
        return structs.VipPersist()
    kind = ipaddress.IPv4Address if vip.address.version == 4 else ipaddress.IPv6Address
    bits = vip.address.max_prefixlen
    mask = kind(((1 << bits) - 1) ^ ((1 << (bits - vip.persistence_prefix)) - 1))
    return structs.VipPersist(timeout_ns=vip.persistence * 1_000_000_000, mask=structs.pack_addr(mask))


def backend_entry(vip_id: int, backend, mac: str, multi_port: bool = False) -> structs.Backend:
    """``multi_port``: port 0, the kernel's "the port the client used" (NAT rewrites nothing else)."""
    entry = structs.Backend(addr=structs.pack_addr(backend.address), family=structs.family_of(backend.address),
                            flags=cdefs.FL_BE_F_VALID, port=0 if multi_port else structs.port_be(backend.port),
                            weight=backend.weight, vip_id=vip_id, rtt_us=UNMEASURED_RTT_US)
    ctypes.memmove(entry.mac, structs.mac_bytes(mac), 6)
    return entry


def _vip_key(vip) -> structs.VipKey:
    return structs.vip_key(vip.address, vip.port, vip.proto_number)


def settings_entry(config, lb_mac: str | None) -> structs.Settings:
    """The settings map's one entry: tunnel source prefixes, ICMP sources, NAT use, the LB's MAC."""
    cfg = config.settings
    entry = structs.Settings(nat_vips=sum(1 for v in config.vips if v.forwarding == "nat"),
                             new_flow_rate=cfg.guard_rate(bpfsys.possible_cpus()),
                             icmp_rate=cfg.icmp_rate, icmp_burst=cfg.icmp_burst,
                             udp_timeout_s=math.ceil(cfg.udp_timeout),
                             tcp_syn_timeout_s=math.ceil(cfg.tcp_syn_timeout),
                             tcp_timeout_s=math.ceil(cfg.tcp_timeout),
                             tcp_fin_timeout_s=math.ceil(cfg.tcp_fin_timeout))
    if cfg.tunnel_source is not None:
        entry.tunnel_src4 = structs.pack_addr(cfg.tunnel_source.network_address)[0]
        entry.tunnel_host4 = structs.pack_addr(cfg.tunnel_source.hostmask)[0]
    if cfg.tunnel_source6 is not None:
        entry.tunnel_src6 = structs.pack_addr(cfg.tunnel_source6.network_address)
        entry.tunnel_host6 = structs.pack_addr(cfg.tunnel_source6.hostmask)[3]  # the varied bits: the last word's
    if cfg.icmp_source is not None:
        entry.icmp_src4 = structs.pack_addr(cfg.icmp_source)[0]
    if cfg.icmp_source6 is not None:
        entry.icmp_src6 = structs.pack_addr(cfg.icmp_source6)
    if lb_mac:
        ctypes.memmove(entry.lb_mac, structs.mac_bytes(lb_mac), 6)
    return entry


def without_down(vip, down) -> object:
    """``vip`` with weight 0 for its backends in ``down`` ((vip name, backend key) pairs)."""
    if not any((vip.name, b.key) in down for b in vip.backends):
        return vip
    return dataclasses.replace(vip, backends=tuple(
        dataclasses.replace(b, weight=0) if (vip.name, b.key) in down else b for b in vip.backends))


def apply(maps: PinnedMaps, config, macs: dict[str, str], sizes: Sizes,
          lb_mac: str | None = None, down: frozenset = frozenset(),
          ifaces=None, egress=None) -> dict[str, int]:
    """Make the maps hold ``config``. Returns counts of what was written.

    Two-arm attachments pass ``ifaces``, the interfaces as (ifindex, MAC) by
    slot (slot 0: the clients' side), and ``egress``, backend address ->
    ifindex of the interface towards it; a backend reached through another
    interface than the one its packets come in on leaves by XDP_REDIRECT.
    Without them (a re-apply) each backend keeps the egress its slot has.

    ``down`` holds (vip name, backend key) pairs of backends that keep their
    slot but not its valid flag (see the module's docstring). Entries equal
    to what the map holds are not written. ``written["ring_slots_by_vip"]``
    gives the ring and sequence slots changed per VIP name.

    The order keeps every packet's view consistent: VIPs that go away become
    unreachable first; then backends, rings and each VIP's settings are
    written before the vips entry that makes the VIP reachable; backends
    that go down lose their valid flag, and backends that go away are
    cleared, only once no ring or sequence holds them (until then a new flow
    picked for one would find no backend: FL_DROP_NO_BACKEND).
    """
    config = l4_view(config)
    placement = place(config, maps, sizes)
    written = {"vips": 0, "backends": 0, "ring_slots": 0, "removed": 0, "ring_slots_by_vip": {}}
    empty = cdefs.FL_RING_EMPTY
    if lb_mac is None:  # a re-apply (the controller's) keeps the interface's MAC the attach wrote
        current = maps.lookup("settings", ctypes.c_uint32(0))
        lb_mac = structs.mac_str(current.lb_mac) if current is not None and any(current.lb_mac) else None
    maps.update("settings", ctypes.c_uint32(0), settings_entry(config, lb_mac))
    slots = write_ifaces(maps, ifaces) if ifaces is not None else None

    wanted_keys: dict[bytes, int] = {}
    for vip in config.vips:
        for port in vip.listens():   # a multi-port VIP: one key per port, each with its vip id
            wanted_keys[bytes(structs.vip_key(vip.address, port, vip.proto_number))] = placement.vip_ids[vip.name]
        marker = bytes(structs.addr_marker_key(vip.address))
        if vip.announce == "arp":  # one announcing VIP makes fastlb answer ARP/ND for the address
            wanted_keys[marker] = cdefs.FL_VIP_ID_ANNOUNCE
        else:
            wanted_keys.setdefault(marker, cdefs.FL_VIP_ID_ADDR_ONLY)
    for key in list(maps.keys("vips")):
        if bytes(key) not in wanted_keys:
            maps.delete("vips", key)
            written["removed"] += 1
    for vip_id in range(sizes.max_vips):
        if vip_id not in placement.vip_ids.values():
            meta = maps.lookup("vip_table", ctypes.c_uint32(vip_id))
            if meta is not None and meta.flags & cdefs.FL_VIP_F_VALID:
                meta.flags = 0
                maps.update("vip_table", ctypes.c_uint32(vip_id), meta)

    used_backends = set()
    going_down = []
    held = dict(_held_backends(maps))
    for vip in config.vips:
        vip_id = placement.vip_ids[vip.name]
        for pos, backend in enumerate(vip.backends):
            be_id = placement.backend_ids[(vip.name, pos)]
            entry = backend_entry(vip_id, backend, macs[str(backend.address)], vip.multi_port)
            if (vip.name, backend.key) in down:
                entry.flags &= ~cdefs.FL_BE_F_VALID
            old = held.get(be_id)
            if slots is not None and egress and egress.get(str(backend.address)) in slots:
                entry.egress_ifindex = egress[str(backend.address)]
                entry.egress_slot = slots[entry.egress_ifindex]
            elif slots is None and old is not None and _identity(old) == _identity(entry):
                entry.egress_ifindex, entry.egress_slot = old.egress_ifindex, old.egress_slot
            fresh = old is None or _identity(old) != _identity(entry) or \
                (entry.flags & cdefs.FL_BE_F_VALID and not old.flags & cdefs.FL_BE_F_VALID)
            if fresh:
                # A new backend in the slot, or one back up: a new generation, so that no
                # conntrack entry of the slot's earlier life reaches it or its count.
                entry.gen = (_slot_gen(maps, be_id) + 1) & 0xFFFFFFFF
            else:
                entry.gen = old.gen
                if old.rtt_us:
                    entry.rtt_us = old.rtt_us  # lrt's live score stays until the controller writes one
            used_backends.add(be_id)
            if not fresh and old.flags & cdefs.FL_BE_F_VALID and not entry.flags & cdefs.FL_BE_F_VALID:
                going_down.append((be_id, entry))      # after the rings that still hold it
            elif old is None or bytes(old) != bytes(entry):
                maps.update("backends", ctypes.c_uint32(be_id), entry)
                written["backends"] += 1
            if fresh:
                # After the new generation is in place nothing decrements the old count, and a
                # new flow counts only from its first ACK: zeroing now loses no count.
                maps.update("backend_active", ctypes.c_uint32(be_id), ctypes.c_int32(0))
                maps.update("backend_active_fix", ctypes.c_uint32(be_id), ctypes.c_int32(0))
                if old is None or _identity(old) != _identity(entry):
                    maps.update("backend_stats", ctypes.c_uint32(be_id), (structs.Counter * maps.ncpus)())
                    maps.update("backend_resp", ctypes.c_uint32(be_id), (structs.Resp * maps.ncpus)())
    config = dataclasses.replace(config, vips=tuple(without_down(v, down) for v in config.vips))

    for vip in config.vips:
        vip_id = placement.vip_ids[vip.name]
        same_vip = maps.lookup("vips", _vip_key(vip))
        same_vip = same_vip is not None and same_vip.value == vip_id
        ids = [placement.backend_ids[(vip.name, p)] if p >= 0 else empty for p in ring_positions(vip, sizes)]
        start = vip_id * sizes.ring_size
        changed = _write_delta(maps, "ring", start, ids, live=same_vip)
        seq_ids = [placement.backend_ids[(vip.name, p)] for p in seq_positions(vip, sizes)]
        changed_seq = _write_delta(maps, "seq", vip_id * sizes.seq_size, seq_ids, live=same_vip)
        if changed_seq:
            write_cursors(maps, vip_id, len(seq_ids))
        written["ring_slots"] += changed
        written["ring_slots_by_vip"][vip.name] = changed + changed_seq
        old = maps.lookup("vip_table", ctypes.c_uint32(vip_id))
        gen = old.gen if same_vip else (old.gen + 1) & 0xFFFFFFFF
        meta = vip_meta(vip, gen, len(seq_ids), sizes)
        persist = vip_persist(vip)
        held_persist = maps.lookup("vip_persist", ctypes.c_uint32(vip_id))
        if held_persist is None or bytes(held_persist) != bytes(persist):
            maps.update("vip_persist", ctypes.c_uint32(vip_id), persist)   # before the flag that reads it
        if bytes(meta) != bytes(old):
            maps.update("vip_table", ctypes.c_uint32(vip_id), meta)

    for raw, value in wanted_keys.items():
        key = structs.VipKey.from_buffer_copy(raw)
        held_id = maps.lookup("vips", key)
        if held_id is None or held_id.value != value:
            maps.update("vips", key, ctypes.c_uint32(value))
            written["vips"] += 1
    for be_id, entry in going_down:
        maps.update("backends", ctypes.c_uint32(be_id), entry)
        written["backends"] += 1
    for be_id, entry in list(_held_backends(maps)):
        if be_id not in used_backends:
            # The slot keeps its generation, so that the next backend given it gets a new one.
            maps.update("backends", ctypes.c_uint32(be_id), structs.Backend(gen=entry.gen))
            written["removed"] += 1
    return written


def _write_delta(maps: PinnedMaps, name: str, start: int, ids: list[int], live: bool) -> int:
    """Write ``ids`` to slots start.. of array ``name``: only the changed ones when ``live``."""
    if not ids:
        return 0
    if not live:
        maps.write_u32_slice(name, start, ids)
        return len(ids)
    current = maps.read_u32_slice(name, start, len(ids))
    slots = [i for i in range(len(ids)) if ids[i] != current[i]]
    maps.write_u32_slots(name, [start + i for i in slots], [ids[i] for i in slots])
    return len(slots)


def write_cursors(maps: PinnedMaps, vip_id: int, seq_len: int) -> None:
    """Stagger the VIP's per-CPU sequence cursors over the sequence (CPU i starts
    at i * len / ncpus), so that at low connection rates the first backends of
    the sequence do not each get up to ncpus times their share."""
    starts = (PerCpuU32 * maps.ncpus)(*(PerCpuU32(i * seq_len // maps.ncpus) for i in range(maps.ncpus)))
    maps.update("seq_cursor", ctypes.c_uint32(vip_id), starts)


class PerCpuU32(ctypes.Structure):
    """One CPU's u32 in a per-CPU array's value: the kernel rounds each up to 8 bytes."""
    _fields_ = [("value", ctypes.c_uint32), ("pad", ctypes.c_uint32)]


def write_ifaces(maps: PinnedMaps, ifaces) -> dict[int, int]:
    """The attachment's interfaces by slot, in ifaces and the tx_ports devmap.
    Returns ifindex -> slot. One interface (one-arm) needs no devmap entry:
    every frame leaves by XDP_TX."""
    slots = {}
    for slot in range(cdefs.FASTLB_MAX_IFACES):
        if slot < len(ifaces):
            ifindex, mac = ifaces[slot]
            entry = structs.Iface(ifindex=ifindex)
            ctypes.memmove(entry.mac, structs.mac_bytes(mac), 6)
            maps.update("ifaces", ctypes.c_uint32(slot), entry)
            if len(ifaces) > 1:
                maps.update("tx_ports", ctypes.c_uint32(slot), ctypes.c_int32(ifindex))
            slots[ifindex] = slot
        else:
            maps.update("ifaces", ctypes.c_uint32(slot), structs.Iface())
            maps.delete("tx_ports", ctypes.c_uint32(slot))
    return slots


def _identity(entry: structs.Backend) -> tuple:
    return entry.vip_id, bytes(entry.addr), entry.port


def valid_slots(maps: PinnedMaps) -> set[int]:
    """The backend ids whose slot is valid (takes flows)."""
    return {be_id for be_id, slot in identity.backends(maps).items() if slot.valid}


def _slot_gen(maps: PinnedMaps, be_id: int) -> int:
    """The generation a backend slot holds, in use or not."""
    entry = maps.lookup("backends", ctypes.c_uint32(be_id))
    return entry.gen if entry is not None else 0


def _held_backends(maps: PinnedMaps):
    """Slots that hold a backend: valid ones, and those kept for a backend that is down."""
    return ((be_id, slot.entry) for be_id, slot in identity.backends(maps).items())
