"""Two fastlb boxes behind a router that spreads flows over them by ECMP, with BGP.

::

    client 198.18.1.1 ── eth1 ┐
                              router (BIRD, AS 65000; 198.18.1.254, 198.18.0.254)
                              eth0
                                │ bridge (switch namespace), 198.18.0.0/24
       ┌────────────┬───────────┼────────────┬─────────────┐
     lba .2       lbb .3      b1 .11       b2 .12  ...   (DSR backends)
     fastlb+BIRD  fastlb+BIRD
     AS 65001     AS 65001

The router learns the VIP (198.19.0.100/32) from both boxes over BGP and
installs it as a two-way multipath route (``merge paths on``), hashing on
the L4 ports (``fib_multipath_hash_policy = 1``). Each box runs fastlb and
its own BIRD, whose ``bird.conf`` includes what fastlb writes
(``<run_dir>/<box>.d/*.conf``). The boxes rewrite the destination MAC to
a backend's (DSR); the backends hold the VIP on ``lo`` and answer the
client through their default route, the router.

This is :class:`fastlb.lab.topology.Lab` with other wiring: the same
namespaces, state file, servers and clean-up; the client sits behind the
router instead of on the bridge, and two LB roles replace ``lb``. Every
BIRD runs in the lab's namespaces with its config and control socket in the
run's folder (:mod:`fastlb.lab.bird`).
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Callable

from fastlb.lab import netns
from fastlb.lab.bird import Bird
from fastlb.lab.netns import LabError
from fastlb.lab.topology import Lab

BOXES = ("lba", "lbb")
ROUTER_AS = 65000
BOX_AS = 65001
CLIENT_NET = "198.18.1"      # client ── router
HOLD_TIME = 9
BFD_INTERVAL_MS = 100
BFD_MULTIPLIER = 3


class EcmpLab(Lab):
    """A client, a router, two fastlb boxes and N backends (IPv4 only).

    ``lab.birds["router"]``, ``["lba"]`` and ``["lbb"]`` are the BIRDs,
    started by :meth:`up`. :meth:`bgp_table` writes a box's ``[bgp]`` table;
    :meth:`router_nexthops` reads the router's kernel route to a VIP.
    """

    xdp_pass_roles = BOXES

    def __init__(self, backends: int = 3, runid: str | None = None, bfd: bool = True):
        super().__init__(backends=backends, ipv6=False, runid=runid, static_neighbours=False, run_dir=True)
        self.hosts = ["client", "router", *BOXES, *self.backend_names]
        self.roles = ["switch", *self.hosts]
        self.bfd = bfd
        self.birds: dict[str, Bird] = {}

    # ---- names and addresses --------------------------------------------------------

    def _host_number(self, role: str) -> int:
        if role == "router":
            return 254
        if role in BOXES:
            return 2 + BOXES.index(role)
        if role == "lb":
            raise LabError("an ECMP lab has no role 'lb'", fix=f"use one of {', '.join(BOXES)}")
        return super()._host_number(role)

    def addr(self, role: str, family: int = 4) -> str:
        """eth0's address; the client's is on the client ── router link (198.18.1.1)."""
        if family != 4:
            raise LabError("the ECMP lab is IPv4 only", fix="use family 4")
        if role == "client":
            return f"{CLIENT_NET}.1"
        return super().addr(role, 4)

    def switch_port(self, role: str) -> str:
        """The switch-side end of ``role``'s veth (link names are 15 bytes at most)."""
        return self.link_name("rtr") if role == "router" else super().switch_port(role)

    @property
    def bridged_hosts(self) -> list[str]:
        return [h for h in self.hosts if h != "client"]

    def include_dir(self, box: str) -> str:
        """Where the box's BIRD looks for fastlb's include (``*.conf``)."""
        return f"{self.run_dir}/{box}.d"

    # ---- build ------------------------------------------------------------------------

    def up(self) -> EcmpLab:
        super().up()
        try:
            self._start_birds()
        except BaseException:
            try:
                self.down()
            except LabError:
                pass
            raise
        return self

    def down(self) -> None:
        for bird in self.birds.values():
            try:
                bird.stop()
            except OSError:
                pass
        self.birds.clear()
        super().down()

    def _build_switch(self) -> None:
        super()._build_switch()
        # The client's link: a veth made in the router's namespace, its peer moved into the client's.
        with self.ipr("router") as r:
            fd = netns.open_fd(self.ns("client"))
            try:
                r.link("add", ifname="eth1", kind="veth",
                       peer={"ifname": "eth0", "net_ns_fd": fd, "address": self.mac("client")})
            finally:
                os.close(fd)

    def _sysctls(self, role: str) -> None:
        super()._sysctls(role)
        if role == "router":
            netns.sysctl(self.ns(role), {
                "net.ipv4.ip_forward": 1,
                "net.ipv4.fib_multipath_hash_policy": 1,      # L4: flows, not host pairs, spread
                "net.ipv4.conf.all.rp_filter": 0, "net.ipv4.conf.default.rp_filter": 0,
                "net.ipv4.conf.eth0.rp_filter": 0, "net.ipv4.conf.eth1.rp_filter": 0,
                "net.ipv6.conf.eth1.disable_ipv6": 1})

    def _configure_host(self, role: str) -> None:
        if role == "client":
            with self.ipr("client") as ipr:
                lo, eth0 = ipr.link_lookup(ifname="lo")[0], ipr.link_lookup(ifname="eth0")[0]
                ipr.link("set", index=lo, state="up")
                ipr.addr("add", index=eth0, address=self.addr("client"), prefixlen=24)
                ipr.link("set", index=eth0, state="up")
                ipr.route("add", dst="0.0.0.0/0", gateway=f"{CLIENT_NET}.254")
            # Complete checksums from the client: the boxes forward its frames by XDP (LAB-NOTES).
            netns.ethtool(self.ns("client"), "eth0", "tx", "off")
            return
        if role == "router":
            with self.ipr("router") as ipr:
                lo = ipr.link_lookup(ifname="lo")[0]
                eth0, eth1 = ipr.link_lookup(ifname="eth0")[0], ipr.link_lookup(ifname="eth1")[0]
                ipr.link("set", index=lo, state="up")
                ipr.addr("add", index=eth0, address=self.addr("router"), prefixlen=24)
                ipr.addr("add", index=eth1, address=f"{CLIENT_NET}.254", prefixlen=24)
                ipr.link("set", index=eth0, state="up")
                ipr.link("set", index=eth1, state="up")
            return
        super()._configure_host(role)
        if role in self.backend_names:
            with self.ipr(role) as ipr:   # DSR answers go back through the router
                ipr.route("add", dst="0.0.0.0/0", gateway=self.addr("router"))

    # ---- BIRD ---------------------------------------------------------------------------

    def _start_birds(self) -> None:
        self.birds["router"] = Bird(self.ns("router"), self.run_dir, "router")
        self.birds["router"].start(self.router_conf())
        for box in BOXES:
            (self.run_dir / f"{box}.d").mkdir(mode=0o755)
            self.birds[box] = Bird(self.ns(box), self.run_dir, box)
            self.birds[box].start(self.box_conf(box))

    def router_conf(self) -> str:
        """The router: BGP to both boxes, multipath into its kernel table, BFD."""
        neighbours = "\n".join(
            f"protocol bgp {box} from boxes {{ neighbor {self.addr(box)} as {BOX_AS}; }}" for box in BOXES)
        bfd = (f'protocol bfd {{ interface "eth0" {{ interval {BFD_INTERVAL_MS} ms; '
               f"multiplier {BFD_MULTIPLIER}; }}; }}\n") if self.bfd else ""
        return f"""log stderr all;
router id {self.addr("router")};
protocol device {{ scan time 10; }}
protocol kernel {{
    ipv4 {{ import none; export all; }};
    merge paths on;       # equal BGP routes from several boxes: one multipath kernel route (ECMP)
}}
{bfd}template bgp boxes {{
    local as {ROUTER_AS};
    hold time {HOLD_TIME};
    keepalive time {HOLD_TIME // 3};
    connect retry time 1;
    error wait time 1, 5;
    {"bfd on;" if self.bfd else ""}
    ipv4 {{ import all; export none; }};
}}
{neighbours}
"""

    def box_conf(self, box: str) -> str:
        """A box's bird.conf: its router id, and fastlb's include."""
        return f"""log stderr all;
router id {self.addr(box)};
protocol device {{ }}
include "{self.include_dir(box)}/*.conf";
"""

    def bgp_table(self, box: str, detach_delay: float = 1.0) -> str:
        """The ``[bgp]`` table of ``box``'s fastlb config: the part that differs between boxes."""
        lines = ["[bgp]", 'speaker = "bird"', f"local_as = {BOX_AS}", f'router_id = "{self.addr(box)}"',
                 f"hold_time = {HOLD_TIME}", f"detach_delay = {detach_delay}",
                 f'bird_socket = "{self.birds[box].socket}"', f'bird_include = "{self.include_dir(box)}/eth0.conf"']
        if self.bfd:
            lines += ["bfd = true", f"bfd_interval = {BFD_INTERVAL_MS / 1000}", f"bfd_multiplier = {BFD_MULTIPLIER}"]
        lines += ["", "[[bgp.peer]]", f'address = "{self.addr("router")}"', f"as = {ROUTER_AS}", ""]
        return "\n".join(lines)

    # ---- the router's view --------------------------------------------------------------

    def router_nexthops(self, vip: str) -> set[str]:
        """The next hops of the router's kernel route to ``vip`` (empty: no route), from ``ip -j route``."""
        res = subprocess.run(["ip", "-n", self.ns("router"), "-j", "route", "show", "exact", f"{vip}/32"],
                             capture_output=True, text=True, timeout=10)
        if res.returncode != 0:
            raise LabError(f"ip route in {self.ns('router')} failed: {res.stderr.strip()}")
        hops: set[str] = set()
        for route in json.loads(res.stdout or "[]"):
            if route.get("gateway"):
                hops.add(route["gateway"])
            hops.update(nh["gateway"] for nh in route.get("nexthops", []) if nh.get("gateway"))
        return hops

    def wait_nexthops(self, vip: str, want: set[str], timeout: float = 15.0,
                      explain: Callable[[], str] | None = None) -> float:
        """Wait until the router's route to ``vip`` goes via ``want`` (empty: no route); return how long it took.

        Raises AssertionError after ``timeout`` seconds, with ``explain()`` appended."""
        start = time.monotonic()
        while True:
            hops = self.router_nexthops(vip)
            if hops == want:
                return time.monotonic() - start
            if time.monotonic() - start > timeout:
                raise AssertionError(f"the router's route to {vip} goes via {hops or 'nothing'}, not "
                                     f"{want or 'nothing'}, after {timeout:g} s"
                                     + (f"\n{explain()}" if explain else ""))
            time.sleep(0.005)
