"""Interfaces and next-hop MAC addresses, through netlink (pyroute2).

Under DSR a backend shares the LB's L2 segment, so its next hop is itself.
Under tunnel and NAT a backend may sit behind a router: its next hop is the
gateway of the route to it. Either way the MAC comes from the neighbour
table of the attach interface, and when the table has no usable entry the
kernel is asked to resolve it (a neighbour entry with NTF_USE starts an ARP
or neighbour-solicitation probe).
"""

from __future__ import annotations

import ipaddress
import time
from dataclasses import dataclass

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from .errors import InterfaceError, NeighbourError

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
        mode = xdp.get_attr("IFLA_XDP_ATTACHED") or 0
        prog_id = xdp.get_attr("IFLA_XDP_PROG_ID") or 0
    return Interface(name=name, index=idx[0], mac=link.get_attr("IFLA_ADDRESS") or "",
                     mtu=link.get_attr("IFLA_MTU") or 0, xdp_prog_id=prog_id, xdp_mode=mode)


def _usable_mac(ipr: IPRoute, ifindex: int, dst: str) -> str | None:
    family = 2 if ipaddress.ip_address(dst).version == 4 else 10
    for msg in ipr.get_neighbours(family=family, ifindex=ifindex):
        if msg.get_attr("NDA_DST") == dst and msg["state"] & NUD_USABLE:
            mac = msg.get_attr("NDA_LLADDR")
            if mac and mac != "00:00:00:00:00:00":
                return mac
    return None


def next_hop(ipr: IPRoute, iface: Interface, address, on_link: bool) -> str:
    """The address whose MAC a packet to ``address`` leaves with: the address
    itself when it is on ``iface``'s segment, else the route's gateway.

    ``on_link`` (DSR) refuses a backend behind a gateway. A route out of
    another interface is refused either way: the program sends frames back
    out of the interface they came in on.
    """
    try:
        routes = ipr.route("get", dst=str(address))
    except NetlinkError as exc:
        raise NeighbourError(f"backend {address}: no route from this host ({exc})",
                             fix=f"add a route to it via {iface.name}") from exc
    route = routes[0]
    oif = route.get_attr("RTA_OIF")
    gateway = route.get_attr("RTA_GATEWAY")
    if oif != iface.index:
        raise NeighbourError(f"backend {address} is routed out of ifindex {oif}, not {iface.name}",
                             fix=f"route the backends via {iface.name}, the interface fastlb is attached to")
    if gateway and on_link:
        raise NeighbourError(
            f"backend {address} is not on the L2 segment of {iface.name} (route via {gateway})",
            fix=f"DSR needs backends reachable directly on {iface.name}; give {iface.name} an address in "
                "the backends' subnet, or use forwarding = \"tunnel\" or \"nat\" for routed backends")
    return str(gateway or address)


def resolve_macs(iface: Interface, addresses, timeout: float = 3.0, on_link=()) -> dict[str, str]:
    """The next-hop MAC for every address on ``iface``, probing the ones not in the table.

    Addresses in ``on_link`` must be on the segment (DSR backends). Raises
    NeighbourError naming the next hops that stay unresolved.
    """
    on_link = {str(a) for a in on_link}
    found: dict[str, str] = {}
    with IPRoute() as ipr:
        hops = {str(a): next_hop(ipr, iface, a, str(a) in on_link) for a in addresses}
        wanted = sorted(set(hops.values()))
        for hop in wanted:
            mac = _usable_mac(ipr, iface.index, hop)
            if mac:
                found[hop] = mac
                continue
            try:
                ipr.neigh("replace", dst=hop, ifindex=iface.index, flags=NTF_USE, state=NUD_INCOMPLETE)
            except NetlinkError:
                pass  # an entry in a state the kernel won't restart; polling decides
        deadline = time.monotonic() + timeout
        pending = [h for h in wanted if h not in found]
        while pending and time.monotonic() < deadline:
            time.sleep(0.05)
            for hop in list(pending):
                mac = _usable_mac(ipr, iface.index, hop)
                if mac:
                    found[hop] = mac
                    pending.remove(hop)
    if pending:
        via = {h: [a for a, n in hops.items() if n == h and a != h] for h in pending}
        names = ", ".join(f"{h} (next hop of {', '.join(v)})" if v else h for h, v in via.items())
        raise NeighbourError(f"no MAC address for {names} on {iface.name} after {timeout:g} s",
                             fix="check that the backends (or their gateway) are up and answer ARP/ND "
                                 "on this segment")
    return {addr: found[hop] for addr, hop in hops.items()}
