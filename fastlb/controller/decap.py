"""The backends' side of tunnel mode: attach, detach and inspect bpf/fastlb_decap.c.

A backend behind a tunnel VIP runs ``fastlb decap attach IFACE --vip VIP``:
IP-in-IP packets to one of the interface's addresses, for a configured VIP,
lose their outer header in XDP and reach the stack as plain packets to the
VIP (which sits on ``lo``). No ipip/ip6_tunnel kernel module is needed.
The interface's addresses are read at attach; attach again after changing
them.
"""

from __future__ import annotations

import ctypes
import ipaddress
from dataclasses import dataclass

from pyroute2 import IPRoute

from fastlb.errors import FastlbError, require_root
from fastlb.kernel import cdefs, neighbours, pins, structs, xdp
from fastlb.kernel.layout import DECAP_MAP_SPECS, Sizes
from fastlb.kernel.loader import Program
from fastlb.kernel.maps import PinnedMaps

KIND = "decap"
SOURCE = "fastlb_decap.c"
FUNCTION = "xdp_fastlb_decap"


@dataclass
class DecapResult:
    ifname: str
    mode: str
    prog_id: int
    locals: list[str]
    vips: list[str]
    sources: list[str]


def interface_addresses(ifindex: int) -> list[str]:
    """The unicast addresses of an interface (the outer destinations to accept)."""
    with IPRoute() as ipr:
        out = []
        for msg in ipr.get_addr(index=ifindex):
            addr = msg.get_attr("IFA_ADDRESS")
            if addr and not ipaddress.ip_address(addr).is_link_local:
                out.append(addr)
    return out


def _addr_key(address) -> structs.VipKey:
    return structs.addr_marker_key(ipaddress.ip_address(address))


ANY_SOURCE = ("0.0.0.0/0", "::/0")


def source_key(prefix) -> structs.SrcKey:
    """The sources trie's key of an outer source prefix (the family word, then the prefix)."""
    net = ipaddress.ip_network(str(prefix))
    return structs.SrcKey(prefixlen=32 + net.prefixlen, family=structs.family_of(net.network_address),
                          addr=structs.pack_addr(net.network_address))


def write_sources(maps, prefixes) -> None:
    """Accept tunnels only from ``prefixes`` (every source when empty)."""
    want = {bytes(source_key(p)) for p in (prefixes or ANY_SOURCE)}
    for key in list(maps.keys("sources")):
        if bytes(key) not in want:
            maps.delete("sources", key)
    for raw in want:
        maps.update("sources", structs.SrcKey.from_buffer_copy(raw), ctypes.c_uint32(1))


def attach(ifname: str, vips, xdp_mode: str = "auto", sources=()) -> DecapResult:
    """Attach (or update) the decap program on ``ifname`` for ``vips``, accepting
    tunnels from the ``sources`` prefixes only (every source when empty)."""
    require_root("decap attach")
    vips = [ipaddress.ip_address(str(v)) for v in vips]
    sources = [ipaddress.ip_network(str(p)) for p in sources]
    if len(sources) > cdefs.FASTLB_DECAP_MAX_SOURCES:
        raise FastlbError(f"{len(sources)} --from prefixes; decap takes at most {cdefs.FASTLB_DECAP_MAX_SOURCES}",
                          fix="give the balancers' tunnel_source prefixes, aggregated")
    if not vips:
        raise FastlbError("decap needs at least one VIP", fix="give --vip ADDR, once per VIP")
    if len(vips) > cdefs.FASTLB_DECAP_MAX_ADDRS // 2:
        raise FastlbError(f"{len(vips)} VIPs; decap takes at most {cdefs.FASTLB_DECAP_MAX_ADDRS // 2}",
                          fix="split them over several interfaces")
    iface = neighbours.interface(ifname)
    base = pins.ensure_bpffs()
    pin_dir = pins.attachment_dir(ifname, base, kind=KIND)
    xdp.refuse_foreign(iface, pin_dir)
    local = interface_addresses(iface.index)
    if not local:
        raise FastlbError(f"{ifname} has no address for tunnelled packets to arrive at",
                          fix=f"give {ifname} the address the load balancer tunnels to")
    created = not pin_dir.exists()
    prog = Program(pin_dir, Sizes(), source=SOURCE, function=FUNCTION, specs=DECAP_MAP_SPECS)
    try:
        prog.load()
        with PinnedMaps(pin_dir, DECAP_MAP_SPECS) as maps:
            flags: dict[bytes, int] = {}
            for a in local:
                k = bytes(_addr_key(a))
                flags[k] = flags.get(k, 0) | cdefs.FL_DECAP_ADDR_LOCAL
            for v in vips:
                k = bytes(_addr_key(v))
                flags[k] = flags.get(k, 0) | cdefs.FL_DECAP_ADDR_VIP
            for key in list(maps.keys("addrs")):
                if bytes(key) not in flags:
                    maps.delete("addrs", key)
            for raw, value in flags.items():
                maps.update("addrs", structs.VipKey.from_buffer_copy(raw), ctypes.c_uint32(value))
            write_sources(maps, sources)
        prog.pin()
        mode = xdp.attach(prog.fd, iface, pin_dir, xdp_mode)
        prog_id = neighbours.interface(ifname).xdp_prog_id
    except BaseException:
        prog.close()
        if created:
            pins.remove_dir(pin_dir)
        raise
    prog.close()
    return DecapResult(ifname=ifname, mode=mode, prog_id=prog_id, locals=local, vips=[str(v) for v in vips],
                       sources=[str(p) for p in sources] or list(ANY_SOURCE))


def detach(ifname: str) -> bool:
    """Detach the decap program from ``ifname``; False when it was not attached."""
    require_root("decap detach")
    pin_dir = pins.attachment_dir(ifname, pins.ensure_bpffs(), kind=KIND)
    if not pin_dir.exists():
        return False
    xdp.detach(pin_dir)
    pins.remove_dir(pin_dir)
    return True


def status() -> list[dict]:
    """Every decap attachment in this netns: addresses and counters."""
    require_root("decap status")
    base = pins.ensure_bpffs()
    reasons = {v: k.removeprefix("FL_DECAP_").lower() for k, v in cdefs.enum("fl_decap_reason").items()
               if k != "FL_DECAP_REASON_MAX"}
    out = []
    for ifname in pins.attachments(base, kind=KIND):
        pin_dir = pins.attachment_dir(ifname, base, kind=KIND)
        entry: dict = {"interface": ifname, "attached": False}
        try:
            entry["attached"] = xdp.is_ours(neighbours.interface(ifname), pin_dir)
        except FastlbError:
            entry["problem"] = "interface is gone; run fastlb decap detach to remove the pins"
        with PinnedMaps(pin_dir, DECAP_MAP_SPECS) as maps:
            entry["vips"], entry["locals"] = [], []
            for key, value in maps.items("addrs"):
                addr = str(structs.unpack_addr(key.addr, key.family))
                if value.value & cdefs.FL_DECAP_ADDR_VIP:
                    entry["vips"].append(addr)
                if value.value & cdefs.FL_DECAP_ADDR_LOCAL:
                    entry["locals"].append(addr)
            entry["sources"] = sorted(str(ipaddress.ip_network(
                (structs.unpack_addr(k.addr, k.family), k.prefixlen - 32))) for k in maps.keys("sources"))
            entry["counters"] = {name: maps.counter("decap_stats", idx).packets for idx, name in reasons.items()}
        out.append(entry)
    return out
