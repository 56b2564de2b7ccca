"""Interfaces and next-hop MAC addresses, through netlink (pyroute2).

Under DSR a backend shares the LB's L2 segment, so its next hop is itself.
Under tunnel and NAT a backend may sit behind a router: its next hop is the
gateway of the route to it. Either way the MAC comes from the neighbour
table of the attach interface, and when the table has no usable entry the
kernel is asked to resolve it (a neighbour entry with NTF_USE starts an ARP
or neighbour-solicitation probe).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from fastlb.errors import InterfaceError, NeighbourError

# include/uapi/linux/neighbour.h
NUD_INCOMPLETE = 0x01
NUD_REACHABLE = 0x02
NUD_STALE = 0x04
NUD_DELAY = 0x08
NUD_PROBE = 0x10
NUD_FAILED = 0x20
NUD_NOARP = 0x40
NUD_PERMANENT = 0x80
NTF_USE = 0x01
NUD_USABLE = NUD_REACHABLE | NUD_STALE | NUD_DELAY | NUD_PROBE | NUD_PERMANENT | NUD_NOARP


@dataclass(frozen=True)
class Interface:
    name: str
    index: int
    mac: str
    mtu: int
    xdp_prog_id: int          # 0 when no XDP program is attached
    xdp_mode: int             # IFLA_XDP_ATTACHED: 0 none, 1 drv, 2 skb, 3 hw, 4 multi


# pyroute2 decodes IFLA_XDP_ATTACHED to its own names; the kernel's values are XDP_ATTACHED_*.
_XDP_ATTACHED = {None: 0, "xdp": 1, "xdpgeneric": 2, "xdpoffload": 3, "xdpmulti": 4}


def xdp_attached(value) -> int:
    """IFLA_XDP_ATTACHED as the kernel's number (0 none, 1 drv, 2 skb, 3 hw, 4 multi), however pyroute2 gives it."""
    if isinstance(value, int):
        return value
    return _XDP_ATTACHED.get(value, 0)


def interface(name: str) -> Interface:
    """Look an interface up in this network namespace."""
    with IPRoute() as ipr:
        idx = ipr.link_lookup(ifname=name)
        if not idx:
            names = sorted(link.get_attr("IFLA_IFNAME") for link in ipr.get_links())
            raise InterfaceError(f"interface {name!r} does not exist in this network namespace",
                                 fix=f"use one of: {', '.join(names)}")
        link = ipr.get_links(idx[0])[0]
    xdp = link.get_attr("IFLA_XDP")
    prog_id, mode = 0, 0
    if xdp is not None:
        mode = xdp_attached(xdp.get_attr("IFLA_XDP_ATTACHED"))
        prog_id = xdp.get_attr("IFLA_XDP_PROG_ID") or 0
    return Interface(name=name, index=idx[0], mac=link.get_attr("IFLA_ADDRESS") or "",
                     mtu=link.get_attr("IFLA_MTU") or 0, xdp_prog_id=prog_id, xdp_mode=mode)


def as_list(ifaces) -> list[Interface]:
    """One interface or several (a two-arm attachment), as a list."""
    return [ifaces] if isinstance(ifaces, Interface) else list(ifaces)


def _route(ipr: IPRoute, address, ifaces: list[Interface]) -> tuple[int, str | None]:
    """(outgoing ifindex, gateway or None) of the route to ``address``."""
    try:
        route = ipr.route("get", dst=str(address))[0]
    except NetlinkError as exc:
        raise NeighbourError(f"backend {address}: no route from this host ({exc})",
                             fix=f"add a route to it via {ifaces[-1].name}") from exc
    return route.get_attr("RTA_OIF"), route.get_attr("RTA_GATEWAY")


def next_hop(ipr: IPRoute, ifaces, address, on_link: bool) -> str:
    """The address whose MAC a packet to ``address`` leaves with: the address
    itself when it is on the segment of an attached interface, else the
    route's gateway.

    ``on_link`` (DSR) refuses a backend behind a gateway. A route out of an
    interface fastlb is not attached to is refused either way: frames leave
    by one of the attachment's interfaces.
    """
    ifaces = as_list(ifaces)
    oif, gateway = _route(ipr, address, ifaces)
    names = " or ".join(i.name for i in ifaces)
    if oif not in {i.index for i in ifaces}:
        raise NeighbourError(f"backend {address} is routed out of ifindex {oif}, not {names}",
                             fix=f"route the backends via {names}, the interface(s) fastlb is attached to")
    if gateway and on_link:
        raise NeighbourError(
            f"backend {address} is not on the L2 segment of {names} (route via {gateway})",
            fix=f"DSR needs backends reachable directly on {names}; give the interface an address in "
                "the backends' subnet, or use forwarding = \"tunnel\" or \"nat\" for routed backends")
    return str(gateway or address)


def egress(ifaces, addresses) -> dict[str, int]:
    """Backend address -> ifindex of the attached interface its route leaves by."""
    ifaces = as_list(ifaces)
    with IPRoute() as ipr:
        return {str(a): _route(ipr, a, ifaces)[0] for a in addresses}


def kick(ipr: IPRoute, ifindex: int, addr: str) -> None:
    """Ask the kernel to resolve ``addr`` on ``ifindex`` (ARP or neighbour solicitation)."""
    try:
        ipr.neigh("replace", dst=addr, ifindex=ifindex, flags=NTF_USE, state=NUD_INCOMPLETE)
    except NetlinkError:
        pass  # an entry in a state the kernel won't restart; polling (or a notification) decides


def find_macs(ifaces, hops: dict[str, str], timeout: float) -> dict[str, str]:
    """Backend address -> its next hop's MAC, for the hops that resolve within
    ``timeout`` on one of ``ifaces`` (probing the missing ones). Unresolved
    ones are left out."""
    ifaces = as_list(ifaces)
    wanted = sorted(set(hops.values()))
    found: dict[str, str] = {}

    def table(ipr) -> dict[str, str]:
        """Usable neighbour entries of the interfaces: one dump per interface, not one per hop."""
        macs: dict[str, str] = {}
        for iface in ifaces:
            for msg in ipr.get_neighbours(ifindex=iface.index):
                mac, dst = msg.get_attr("NDA_LLADDR"), msg.get_attr("NDA_DST")
                if dst and msg["state"] & NUD_USABLE and mac and mac != "00:00:00:00:00:00":
                    macs.setdefault(dst, mac)
        return macs

    with IPRoute() as ipr:
        known = table(ipr)
        for hop in wanted:
            if hop in known:
                found[hop] = known[hop]
            else:
                kick(ipr, _route(ipr, hop, ifaces)[0], hop)
        deadline = time.monotonic() + timeout
        pending = [h for h in wanted if h not in found]
        while pending and time.monotonic() < deadline:
            time.sleep(0.05)
            known = table(ipr)
            for hop in list(pending):
                if hop in known:
                    found[hop] = known[hop]
                    pending.remove(hop)
    return {addr: found[hop] for addr, hop in hops.items() if hop in found}


def resolve_macs(ifaces, addresses, timeout: float = 3.0, on_link=()) -> dict[str, str]:
    """The next-hop MAC for every address, probing the ones not in the table.

    Addresses in ``on_link`` must be on an attached segment (DSR backends).
    Raises NeighbourError naming the next hops that stay unresolved.
    """
    ifaces = as_list(ifaces)
    on_link = {str(a) for a in on_link}
    with IPRoute() as ipr:
        hops = {str(a): next_hop(ipr, ifaces, a, str(a) in on_link) for a in addresses}
    found = find_macs(ifaces, hops, timeout)
    pending = sorted({h for a, h in hops.items() if a not in found})
    if pending:
        via = {h: [a for a, n in hops.items() if n == h and a != h] for h in pending}
        names = ", ".join(f"{h} (next hop of {', '.join(v)})" if v else h for h, v in via.items())
        raise NeighbourError(f"no MAC address for {names} on {' or '.join(i.name for i in ifaces)} after "
                             f"{timeout:g} s",
                             fix="check that the backends (or their gateway) are up and answer ARP/ND "
                                 "on this segment")
    return found
