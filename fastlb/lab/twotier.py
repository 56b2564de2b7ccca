"""Two tiers across boxes: an L4 fastlb box in front of two L7 fastlb boxes (issue 15 item 7).

::

    client .1 ──┐
    lb     .2 ──┤   L4 fastlb: tcp VIPs, tunnel (to the L7 boxes' eth1) and DSR (to their eth0)
    l7a    .5 ──┤   eth0: fastlb attach, http VIPs on lo, HAProxy → the application servers
           .245 ┤   eth1: fastlb decap (the tunnel arrives here)
    l7b    .6 ──┤
           .246 ┤
    b1    .11 ──┤   application servers (fastlb.lab.servers)
    ...        ─┘   one bridge, 198.18.0.0/24

The shape of Katran + Proxygen and GLB + HAProxy. The client reaches the
VIPs (198.19.0.0/24) by a route via ``lb``. The L4 box spreads connections
over the L7 boxes; each L7 box terminates TCP in HAProxy, routes by host and
path to the application servers, and answers the client directly.

Each L7 box has two NICs on the segment because an interface takes one XDP
program: ``fastlb decap`` on ``eth1`` strips the tunnel, ``fastlb attach``
owns ``eth0`` (its XDP tier passes the DSR'd packets of the http VIPs to the
stack). The box holds the VIPs on ``lo`` (fastlb puts them there) and, like
any DSR or tunnel backend, does not answer ARP for them
(``arp_ignore=1``, ``arp_announce=2``), with ``rp_filter`` off (a
decapsulated packet arrives on ``eth1``; the way back to its client is
``eth0``). ``eth1``'s address has no prefix route, so the box's own traffic
(HAProxy to the servers, answers to the client) leaves through ``eth0``.

This is :class:`fastlb.lab.topology.Lab` with other wiring: the same
namespaces, state file, servers and clean-up.
"""

from __future__ import annotations

import os

from fastlb.lab import netns
from fastlb.lab.topology import Lab

L7_BOXES = ("l7a", "l7b")
TUNNEL_OFFSET = 240          # eth1 of the box at .N is at .(N + 240)
TUNNEL_IFACE = "eth1"
IFA_F_NOPREFIXROUTE = 0x200


class TwoTierLab(Lab):
    """A client, an L4 box (``lb``), two L7 boxes (``l7a``, ``l7b``) and N application servers (IPv4)."""

    def __init__(self, backends: int = 3, runid: str | None = None):
        super().__init__(backends=backends, ipv6=False, runid=runid, run_dir=True)
        self.hosts = ["client", "lb", *L7_BOXES, *self.backend_names]
        self.roles = ["switch", *self.hosts]

    # ---- names and addresses --------------------------------------------------------

    def _host_number(self, role: str) -> int:
        if role in L7_BOXES:
            return 5 + L7_BOXES.index(role)
        return super()._host_number(role)

    def tunnel_addr(self, box: str) -> str:
        """The address of an L7 box's ``eth1``, where the L4 box's tunnel arrives."""
        return f"198.18.0.{self._host_number(box) + TUNNEL_OFFSET}"

    def tunnel_mac(self, box: str) -> str:
        return f"02:00:c6:12:01:{self._host_number(box):02x}"

    def tunnel_port(self, box: str) -> str:
        """The switch-side end of the box's ``eth1`` (link names are 15 bytes at most)."""
        return self.link_name(f"{box}t")

    # ---- build ------------------------------------------------------------------------

    def _build_switch(self) -> None:
        super()._build_switch()
        with self.ipr("switch") as sw:
            br = sw.link_lookup(ifname=self.bridge)[0]
            for box in L7_BOXES:
                fd = netns.open_fd(self.ns(box))
                try:
                    sw.link("add", ifname=self.tunnel_port(box), kind="veth",
                            peer={"ifname": TUNNEL_IFACE, "net_ns_fd": fd, "address": self.tunnel_mac(box)})
                finally:
                    os.close(fd)
                port = sw.link_lookup(ifname=self.tunnel_port(box))[0]
                sw.link("set", index=port, master=br, state="up")

    def _sysctls(self, role: str) -> None:
        super()._sysctls(role)
        if role in L7_BOXES:
            values: dict[str, int | str] = {"net.ipv6.conf.eth1.disable_ipv6": 1, "net.ipv4.conf.lo.rp_filter": 0}
            for dev in ("all", "default", "eth0", TUNNEL_IFACE):
                values[f"net.ipv4.conf.{dev}.arp_ignore"] = 1
                values[f"net.ipv4.conf.{dev}.arp_announce"] = 2
                values[f"net.ipv4.conf.{dev}.rp_filter"] = 0
            netns.sysctl(self.ns(role), values)

    def _configure_host(self, role: str) -> None:
        super()._configure_host(role)
        if role in L7_BOXES:
            with self.ipr(role) as ipr:
                eth1 = ipr.link_lookup(ifname=TUNNEL_IFACE)[0]
                ipr.addr("add", index=eth1, address=self.tunnel_addr(role), prefixlen=24,
                         flags=IFA_F_NOPREFIXROUTE)
                ipr.link("set", index=eth1, state="up")
