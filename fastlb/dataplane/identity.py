"""The one reader of the maps' VIP and backend identity.

The ``vips`` map holds real VIPs (value: a vip id) beside address markers
(port 0, protocol 0: ``FL_VIP_ID_ADDR_ONLY``, and ``FL_VIP_ID_ANNOUNCE`` for an
``announce = "arp"`` VIP, whose address fastlb answers ARP/ND for). The
``backends`` map holds a backend in every slot whose family is not 0. Every
reader of the maps' identity (status, stats, flows, explain, metrics, the
controller's adoption, the table writer) goes through :func:`vips` and
:func:`backends` here, so that none can skip one marker and not the other.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from fastlb.config.model import L7_PROTOCOLS, PROTOCOLS, IPAddress, hostport, vip_name
from fastlb.kernel import cdefs, structs
from fastlb.kernel.maps import PinnedMaps

# The maps know L4 protocols only (an http VIP has a TCP key: fastlb.config.l4_view).
PROTO_NAMES = {number: name for name, number in PROTOCOLS.items() if name not in L7_PROTOCOLS}
L7_FORWARDING = "l7"     # an http/https VIP's "forwarding": XDP passes it to the local HAProxy
MARKERS = frozenset({cdefs.FL_VIP_ID_ADDR_ONLY, cdefs.FL_VIP_ID_ANNOUNCE})


def _names(enum: str, prefix: str) -> dict[int, str]:
    return {v: k.removeprefix(prefix).lower() for k, v in cdefs.enum(enum).items()}


def is_marker(vip_id: int) -> bool:
    """True for a ``vips`` value that marks an address, not a VIP."""
    return vip_id in MARKERS


def key_name(key: structs.VipKey) -> str:
    """The name of a ``vips`` key, as ``Vip.name`` writes it."""
    proto = PROTO_NAMES.get(key.proto, str(key.proto))
    return vip_name(structs.unpack_addr(key.addr, key.family), structs.port_host(key.port), proto)


@dataclass(frozen=True)
class VipSlot:
    vip_id: int
    name: str                   # 198.19.0.100:80/tcp
    key: structs.VipKey
    meta: structs.VipMeta | None    # its vip_table entry
    algorithm: str              # "maglev", ...; "?" for a value this build does not name
    forwarding: str             # "dsr", "tunnel", "nat", or "l7" (an http/https VIP)


@dataclass(frozen=True)
class BackendSlot:
    be_id: int
    address: IPAddress
    port: int
    entry: structs.Backend

    @property
    def name(self) -> str:
        """``198.18.0.11:80``: the backend's key in the config."""
        return _hostport(self.address, self.port)

    @property
    def valid(self) -> bool:
        return bool(self.entry.flags & cdefs.FL_BE_F_VALID)


def vips(maps: PinnedMaps) -> dict[int, VipSlot]:
    """The attachment's VIPs by vip id (address markers left out). vip_table is
    read with one batch lookup."""
    algorithms = _names("fl_algorithm", "FL_ALG_")
    forwarding = _names("fl_forwarding", "FL_FWD_")
    metas = maps.array("vip_table")
    keys: dict[int, structs.VipKey] = {}
    for key, vip_id in maps.items("vips"):
        vid = vip_id.value
        if is_marker(vid):
            continue
        if vid not in keys or structs.port_host(key.port) < structs.port_host(keys[vid].port):
            keys[vid] = key      # a multi-port VIP has a key per port: its lowest port names it
    out = {}
    for vid, key in keys.items():
        meta = metas[vid] if vid < len(metas) else None
        out[vid] = VipSlot(vid, _key_name(bytes(key)), key, meta,
                           algorithms.get(meta.algorithm, "?") if meta is not None else "?",
                           _forwarding(meta, forwarding))
    return out


def _forwarding(meta: structs.VipMeta | None, names: dict[int, str]) -> str:
    """How the VIP's packets leave: an L4 mode, or ``l7`` for an http/https VIP (passed to HAProxy)."""
    if meta is None:
        return "?"
    if meta.flags & cdefs.FL_VIP_F_L7:
        return L7_FORWARDING
    return names.get(meta.forwarding, "?")


def backends(maps: PinnedMaps) -> dict[int, BackendSlot]:
    """Every slot that holds a backend (valid, or kept for one that is down), by
    backend id. The backends map is read with batch lookups.

    A multi-port VIP's backends hold port 0 (the kernel's "the port the client
    used"): their ``port`` is the VIP's lowest, as the config names them."""
    out, vip_ports = {}, None
    for be_id, entry in enumerate(maps.array("backends")):
        if entry.family:
            port = structs.port_host(entry.port)
            if not port:
                if vip_ports is None:
                    vip_ports = {vid: structs.port_host(slot.key.port) for vid, slot in vips(maps).items()}
                port = vip_ports.get(entry.vip_id, 0)
            out[be_id] = BackendSlot(be_id, _address(bytes(entry.addr), entry.family), port, entry)
    return out


# Names are pure functions of a slot's bytes: cached between reads, so a scrape
# formats no address it has formatted before.
@functools.lru_cache(maxsize=8192)
def _key_name(raw_key: bytes) -> str:
    return key_name(structs.VipKey.from_buffer_copy(raw_key))


@functools.lru_cache(maxsize=65536)
def _hostport(address: IPAddress, port: int) -> str:
    return hostport(address, port)


@functools.lru_cache(maxsize=65536)
def _address(addr: bytes, family: int) -> IPAddress:
    return structs.unpack_addr(structs.U32x4.from_buffer_copy(addr), family)
