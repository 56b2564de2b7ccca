"""The namespace lab: a client, a load balancer and N backends on one bridge.

::

    client (198.18.0.1)  ─┐
    lb     (198.18.0.2)  ─┤  switch namespace: one Linux bridge,
    b1     (198.18.0.11) ─┤  one veth pair per host
    ...                  ─┘

Each host is a network namespace whose end of the veth is ``eth0``; the other
end is a port of the bridge in the ``switch`` namespace. No link is ever
created in the host's own namespace: each veth pair is made inside the switch
namespace with its peer placed straight into the host's namespace.

The client reaches the VIP prefixes (198.19.0.0/24, 2001:db8:ffff::/64) by a
route via the LB, where the VIP is *not* a local address. The backends hold
the VIPs on ``lo`` and answer the client directly (DSR). The LB's switch port
carries the XDP_PASS program from bpf/xdp_pass.c, without which XDP_TX frames
from the LB's ``eth0`` are dropped by veth.

Usage::

    with Lab(backends=3) as lab:
        lab.run("client", ["ping", "-c1", lab.addr("b1")])
        print(tcp_requests(lab, lab.addr("b1"), 80, count=10))
"""

from __future__ import annotations

import ipaddress
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from fastlb.errors import AttachError, FastlbError, PrivilegeError, os_error
from fastlb.kernel.cdefs import bpf_dir
from fastlb.lab import netns
from fastlb.lab.netns import LabError

VIP4 = "198.19.0.100"
VIP6 = "2001:db8:ffff::100"
VIP_NET4 = ipaddress.ip_network("198.19.0.0/24")
VIP_NET6 = ipaddress.ip_network("2001:db8:ffff::/64")
HTTP_PORT = 80
UDP_PORT = 9000
# The forwarding modes this wiring hosts: the backends hold the VIPs on lo and
# answer the client directly. Tunnel (decapsulating backends) and NAT (replies
# back through the LB) need wiring the lab does not have yet.
LAB_FORWARDING = ("dsr",)
# A [vip.health] table for Lab.config_text(health=...): HTTP GET /health on the
# servers' port 80 (for the UDP VIPs too: the same process serves both).
HEALTH_HTTP = {"kind": "http", "port": HTTP_PORT, "path": "/health", "interval": 0.5, "timeout": 0.3,
               "rise": 2, "fall": 2}
MAX_BACKENDS = 100
XDP_PASS_SRC = bpf_dir() / "xdp_pass.c"
PKG_ROOT = Path(__file__).resolve().parents[2]

IFA_F_NODAD = 0x02
NUD_PERMANENT = 0x80


def python_argv(module: str, *args: object) -> list[str]:
    """argv that runs ``python -m module args...`` with this interpreter."""
    return [sys.executable, "-m", module, *map(str, args)]


def python_env() -> dict[str, str]:
    """The environment for our own modules run in a namespace: fastlb importable."""
    path = os.environ.get("PYTHONPATH")
    return dict(os.environ, PYTHONPATH=f"{PKG_ROOT}{os.pathsep}{path}" if path else str(PKG_ROOT))


class Lab:
    """A namespace lab; a context manager that builds it on entry and removes it on exit.

    Roles: ``"switch"``, ``"client"``, ``"lb"`` and the backends ``"b1"``..``"bN"``.
    Nothing exists until :meth:`up`; :meth:`down` removes everything, also after
    a partial ``up()``. A run that dies without ``down()`` is removed by the next
    lab's ``up()`` (see :func:`fastlb.lab.netns.cleanup_stale`).

    Attributes: ``runid``; ``backend_names`` (``["b1", ...]``); ``hosts`` (client,
    lb, backends) and ``roles`` (switch + hosts); ``vip4``, ``vip6`` and ``vips``;
    ``lb_iface`` (where the balancer attaches, in the LB's namespace);
    ``http_port`` (80) and ``udp_port`` (9000) of the servers; ``run_dir``, the
    lab's own folder, or None.

    A lab can outlive this process: :meth:`release` hands it over (``fastlb lab
    up``), :meth:`existing` describes it again later, and
    :func:`fastlb.lab.netns.remove_lab` removes it (``fastlb lab down``).
    """

    lb_iface = "eth0"
    # The LB roles whose switch port carries XDP_PASS (XDP_TX into a veth needs it on the peer).
    xdp_pass_roles: tuple[str, ...] = ("lb",)
    vip4 = VIP4
    vip6 = VIP6
    http_port = HTTP_PORT
    udp_port = UDP_PORT

    def __init__(self, backends: int = 3, ipv6: bool = True, runid: str | None = None,
                 servers: bool = True, latency_ms: float = 0.0, static_neighbours: bool = True,
                 run_dir: bool = False):
        """Describe a lab; nothing is created until :meth:`up`.

        ``servers``: start the HTTP/UDP servers on the backends in ``up()``.
        ``latency_ms``: their initial HTTP latency. ``static_neighbours``: give the
        LB permanent neighbour entries for the backends (their MACs are fixed).
        ``run_dir``: give the lab a folder, ``/run/fastlb/lab/<runid>/``, made in
        ``up()`` and removed with the lab; the servers log there
        (``b1.log``, ...) instead of to unlinked files.
        """
        if not isinstance(backends, int) or not 1 <= backends <= MAX_BACKENDS:
            raise LabError(f"lab backends={backends!r} is out of range",
                           fix=f"use 1 to {MAX_BACKENDS} backends")
        self.runid = netns.check_runid(runid) if runid is not None else netns.new_runid()
        self.ipv6 = ipv6
        self.backend_names = [f"b{i}" for i in range(1, backends + 1)]
        self.hosts = ["client", "lb", *self.backend_names]
        self.roles = ["switch", *self.hosts]
        self.with_servers = servers
        self.latency_ms = latency_ms
        self.static_neighbours = static_neighbours
        self.run_dir = netns.run_dir_of(self.runid) if run_dir else None
        self._state: netns.State | None = None
        self._created: list[str] = []  # namespaces this object made: down() removes these only
        self._servers: dict[str, tuple[subprocess.Popen, object]] = {}
        self._bpf = None
        self._extra_vips: list[str] = []

    # ---- names and addresses -----------------------------------------------------

    def _host_number(self, role: str) -> int:
        if role == "client":
            return 1
        if role == "lb":
            return 2
        if role in self.backend_names:
            return 10 + int(role[1:])
        raise LabError(f"lab role {role!r} is not a host",
                       fix=f"use one of {', '.join(self.hosts)}")

    def ns(self, role: str) -> str:
        """The network namespace name of ``role``, e.g. ``flb-1a2b3c-b1``."""
        if role not in self.roles:
            raise LabError(f"lab role {role!r} is unknown", fix=f"use one of {', '.join(self.roles)}")
        return netns.ns_name(self.runid, role)

    @property
    def namespaces(self) -> list[str]:
        """All namespace names of this lab."""
        return [self.ns(r) for r in self.roles]

    def addr(self, role: str, family: int = 4) -> str:
        """The address of ``role``'s eth0: 198.18.0.N (family 4) or 2001:db8::N (family 6)."""
        n = self._host_number(role)
        if family == 4:
            return f"198.18.0.{n}"
        if family == 6:
            return f"2001:db8::{n}"
        raise LabError(f"address family {family!r} is unknown", fix="use 4 or 6")

    def mac(self, role: str) -> str:
        """The MAC address of ``role``'s eth0, fixed: ``02:00:c6:12:00:NN``.

        NN is the last byte of the role's IPv4 address, in hex (b1: 198.18.0.11, ``0b``).
        """
        return f"02:00:c6:12:00:{self._host_number(role):02x}"

    def vip(self, family: int = 4) -> str:
        """The lab's default VIP of the family."""
        return {4: self.vip4, 6: self.vip6}[family]

    @property
    def vips(self) -> list[str]:
        """The default VIPs: IPv4, and IPv6 unless the lab is IPv4-only."""
        return [self.vip4, self.vip6] if self.ipv6 else [self.vip4]

    def link_name(self, tag: str) -> str:
        """A link name in the switch namespace, unique per run: ``flb-<runid>-<tag>``."""
        return f"{netns.PREFIX}{self.runid}-{tag}"

    def switch_port(self, role: str) -> str:
        """The switch-side end of ``role``'s veth."""
        self._host_number(role)
        return self.link_name({"client": "cli"}.get(role, role))

    @property
    def bridge(self) -> str:
        """The bridge's name in the switch namespace."""
        return self.link_name("br")

    @property
    def bridged_hosts(self) -> list[str]:
        """The hosts whose eth0 is a port of the bridge: all of them here (a subclass may wire others)."""
        return self.hosts

    # ---- running programs ----------------------------------------------------------

    def exec(self, role: str, argv: list[str], **popen_kwargs) -> subprocess.Popen:
        """Start ``argv`` inside ``role``'s namespace (``ip netns exec``); return the Popen."""
        return subprocess.Popen(netns.exec_argv(self.ns(role), argv), **popen_kwargs)

    def exec_python(self, role: str, module: str, *args: object, **popen_kwargs) -> subprocess.Popen:
        """Start ``python -m module args...`` (this interpreter, fastlb importable) in ``role``."""
        return self.exec(role, python_argv(module, *args), env=python_env(), **popen_kwargs)

    def run_python(self, role: str, module: str, *args: object, timeout: float = 30.0,
                   check: bool = True) -> subprocess.CompletedProcess:
        """Run ``python -m module args...`` in ``role`` to the end, like :meth:`run`."""
        return self.run(role, python_argv(module, *args), timeout=timeout, check=check,
                        env=python_env())

    def run(self, role: str, argv: list[str], timeout: float = 30.0, check: bool = True,
            **run_kwargs) -> subprocess.CompletedProcess:
        """Run ``argv`` inside ``role``'s namespace to the end, capturing text output.

        Raises LabError when it times out, or (with ``check``) exits non-zero.
        """
        full = netns.exec_argv(self.ns(role), argv)
        try:
            res = subprocess.run(full, capture_output=True, text=True, timeout=timeout, **run_kwargs)
        except subprocess.TimeoutExpired as exc:
            raise LabError(f"{' '.join(full)} timed out after {timeout:g} s") from exc
        if check and res.returncode != 0:
            raise LabError(f"{' '.join(full)} exited with {res.returncode}: "
                           f"{(res.stderr or res.stdout).strip()[-500:]}")
        return res

    # ---- build and remove ------------------------------------------------------------

    def __enter__(self) -> Lab:
        return self.up()

    def __exit__(self, *exc) -> None:
        self.down()

    def up(self) -> Lab:
        """Build the lab (and start the servers); on any failure remove what was built."""
        if self._state is not None:
            raise LabError(f"lab {self.runid} is up already")
        if os.geteuid() != 0:
            raise PrivilegeError("the namespace lab needs root (it creates network namespaces)",
                                 fix="run it with sudo")
        netns.cleanup_stale()
        state = netns.new_state(self.runid, self.namespaces, run_dir=self.run_dir,
                                params={"backends": len(self.backend_names), "ipv6": self.ipv6})
        state.save(exclusive=True)  # refuses a run id that another lab holds
        self._state = state
        step = "creating the lab folder"
        try:
            if self.run_dir is not None:
                try:
                    self.run_dir.mkdir(mode=0o755)
                except FileExistsError:
                    state.run_dir = None  # not ours: down() must leave it alone
                    state.save()
                    raise LabError(f"the lab folder {self.run_dir} exists already",
                                   fix="pick another run id, or remove the folder") from None
            step = "creating the namespaces"
            for role in self.roles:
                netns.create(self.ns(role))
                self._created.append(self.ns(role))
            step = "building the switch"
            self._build_switch()
            for role in self.hosts:
                step = f"configuring {role}"
                self._sysctls(role)
                self._configure_host(role)
            step = "attaching xdp_pass to the LB's switch port"
            self._attach_xdp_pass()
            if self.with_servers:
                step = "starting the servers"
                self.start_servers()
        except BaseException as exc:
            try:
                self.down()
            except LabError as cleanup:
                exc.add_note(f"and the clean-up failed too: {cleanup}")
            if isinstance(exc, FastlbError) or not isinstance(exc, Exception):
                raise
            # pyroute2's NetlinkError and friends: say what the lab was doing
            raise LabError(f"lab {self.runid}: {step} failed: {netns.describe(exc)}") from exc
        return self

    def down(self) -> None:
        """Stop the servers, detach XDP and remove every namespace of this lab.

        Safe to call twice, and after a failed ``up()``. Tries every step and
        raises one LabError at the end if any failed; the state file is kept
        then, so that a later ``cleanup_stale()`` retries.
        """
        if self._state is None:
            return
        errors = []
        for name in list(self._servers):
            try:
                self.stop_server(name)
            except LabError as exc:
                errors.append(str(exc))
        try:
            self._detach_xdp_pass()
        except LabError as exc:
            errors.append(str(exc))
        for name in reversed(list(self._created)):
            try:
                netns.destroy(name)
                self._created.remove(name)
            except LabError as exc:
                errors.append(str(exc))
        if not errors:
            try:
                netns.remove_run_dir(self._state)
            except LabError as exc:
                errors.append(str(exc))
        if errors:
            raise LabError(f"lab {self.runid} clean-up failed: " + "; ".join(errors),
                           fix="run fastlb.lab.cleanup_stale() after this process exits")
        self._state.remove()
        self._state = None

    def release(self) -> None:
        """Hand the running lab over: it stays up after this process exits.

        The state file is marked persistent, so no ``cleanup_stale()`` removes
        the lab; :func:`fastlb.lab.netns.remove_lab` does (``fastlb lab down``).
        Afterwards this object no longer owns the lab: ``down()`` does nothing.
        The servers keep running (they have their own session, so a closing
        terminal does not end them) and the XDP_PASS program stays attached.
        """
        if self._state is None:
            raise LabError(f"lab {self.runid} is not up", fix="call up() first")
        self._state.persistent = True
        self._state.save()
        for _proc, log in self._servers.values():
            log.close()
        self._servers.clear()
        self._created.clear()
        if self._bpf is not None:
            self._bpf.cleanup()  # closes our fds; the attachment keeps the program loaded
            self._bpf = None
        self._state = None

    @classmethod
    def existing(cls, runid: str) -> Lab:
        """Describe the running lab ``runid`` (made by another process) from its state file.

        The result runs programs in the lab, reads its addresses and writes
        configs; it does not own the lab (``is_up`` is False, ``down()`` does nothing).
        """
        state = netns.read_state(runid)
        if state is None:
            raise LabError(f"there is no lab {runid} (no {netns.STATE_DIR / runid}.json)",
                           fix="see the running labs with: fastlb lab status")
        try:
            lab = cls(backends=int(state.params["backends"]), ipv6=bool(state.params["ipv6"]),
                      runid=state.runid, servers=False)
        except (KeyError, TypeError, ValueError) as exc:
            raise LabError(f"lab {runid}'s state file does not say how it was built ({exc!r})",
                           fix=f"remove it with: fastlb lab down {runid}") from exc
        if state.run_dir:
            lab.run_dir = Path(state.run_dir)
        missing = set(lab.namespaces) - set(netns.list_namespaces())
        if missing:
            raise LabError(f"lab {runid} is broken: namespaces {', '.join(sorted(missing))} are gone",
                           fix=f"remove it with: fastlb lab down {runid}")
        return lab

    @property
    def is_up(self) -> bool:
        """True between a successful ``up()`` and ``down()``."""
        return self._state is not None

    def ipr(self, role: str) -> IPRoute:
        """A pyroute2 IPRoute bound to ``role``'s namespace. Close it (use ``with``)."""
        try:
            return IPRoute(netns=self.ns(role), flags=0)
        except TypeError as exc:  # pyroute2 0.7.2, Debian 12's, has no IPRoute(netns=...)
            raise LabError("the lab needs pyroute2 0.7.3 or later (IPRoute(netns=...)); this is "
                           f"{_pyroute2_version()}. fastlb itself runs on 0.7.2",
                           fix="run the lab from make setup's venv (.venv/bin/fastlb lab ...) "
                               "or pip install 'pyroute2>=0.7.3'") from exc

    def _build_switch(self) -> None:
        # No IPv6 on the bridge itself: it only forwards frames.
        values = {"net.ipv6.conf.all.disable_ipv6": 1, "net.ipv6.conf.default.disable_ipv6": 1}
        # With br_netfilter in the kernel, every bridged frame also passes the
        # iptables hooks: about a tenth of the forwarding cost in a line-rate
        # burst, for nothing (the lab has no rules). Per namespace, when present.
        for table in ("iptables", "ip6tables", "arptables"):
            if Path(f"/proc/sys/net/bridge/bridge-nf-call-{table}").exists():
                values[f"net.bridge.bridge-nf-call-{table}"] = 0
        netns.sysctl(self.ns("switch"), values)
        with self.ipr("switch") as sw:
            sw.link("add", ifname=self.bridge, kind="bridge", br_stp_state=0,
                    br_forward_delay=0, br_mcast_snooping=0)
            br = sw.link_lookup(ifname=self.bridge)[0]
            sw.link("set", index=br, state="up")
            for role in self.bridged_hosts:
                fd = netns.open_fd(self.ns(role))
                try:
                    sw.link("add", ifname=self.switch_port(role), kind="veth",
                            peer={"ifname": "eth0", "net_ns_fd": fd, "address": self.mac(role)})
                finally:
                    os.close(fd)
                port = sw.link_lookup(ifname=self.switch_port(role))[0]
                sw.link("set", index=port, master=br, state="up")

    def _sysctls(self, role: str) -> None:
        values: dict[str, int | str] = {}
        if self.ipv6:
            # No duplicate address detection: addresses are usable at once.
            for dev in ("all", "default", "eth0"):
                values[f"net.ipv6.conf.{dev}.accept_dad"] = 0
        else:
            for dev in ("all", "default", "eth0"):
                values[f"net.ipv6.conf.{dev}.disable_ipv6"] = 1
        if role == "client":
            # Connection-per-request loads need quick port reuse (LAB-NOTES).
            values["net.ipv4.tcp_tw_reuse"] = 1
            values["net.ipv4.ip_local_port_range"] = "1024 65535"
        if role in self.backend_names:
            # DSR backends: hold the VIP on lo but never answer ARP for it,
            # and accept packets whose source is not routed back via eth0.
            for dev in ("all", "default", "eth0"):
                values[f"net.ipv4.conf.{dev}.arp_ignore"] = 1
                values[f"net.ipv4.conf.{dev}.arp_announce"] = 2
                values[f"net.ipv4.conf.{dev}.rp_filter"] = 0
            values["net.ipv4.conf.lo.rp_filter"] = 0
        netns.sysctl(self.ns(role), values)

    def _configure_host(self, role: str) -> None:
        with self.ipr(role) as ipr:
            lo = ipr.link_lookup(ifname="lo")[0]
            eth0 = ipr.link_lookup(ifname="eth0")[0]
            ipr.link("set", index=lo, state="up")
            ipr.addr("add", index=eth0, address=self.addr(role, 4), prefixlen=24)
            if self.ipv6:
                ipr.addr("add", index=eth0, address=self.addr(role, 6), prefixlen=64,
                         flags=IFA_F_NODAD)
            ipr.link("set", index=eth0, state="up")
            if role == "client":
                ipr.route("add", dst=str(VIP_NET4), gateway=self.addr("lb", 4))
                if self.ipv6:
                    ipr.route("add", dst=str(VIP_NET6), gateway=self.addr("lb", 6))
            if role in self.backend_names:
                for vip in self.vips + self._extra_vips:
                    self._add_lo_address(ipr, lo, vip)
            if role == "lb" and self.static_neighbours:
                for backend in self.backend_names:
                    for family in (4, 6) if self.ipv6 else (4,):
                        ipr.neigh("add", dst=self.addr(backend, family), lladdr=self.mac(backend),
                                  ifindex=eth0, state=NUD_PERMANENT)
        if role == "client" or role in self.backend_names:
            # veth hands partial checksums over, and frames forwarded by XDP keep
            # them: the receiver then drops them as bad (LAB-NOTES).
            netns.ethtool(self.ns(role), "eth0", "tx", "off")

    @staticmethod
    def _add_lo_address(ipr: IPRoute, lo: int, vip: str) -> None:
        ip = ipaddress.ip_address(vip)
        ipr.addr("add", index=lo, address=vip, prefixlen=ip.max_prefixlen,
                 **({"flags": IFA_F_NODAD} if ip.version == 6 else {}))

    def add_vip(self, vip: str) -> None:
        """Put another VIP (in 198.19.0.0/24 or 2001:db8:ffff::/64) on every backend's lo."""
        ip = ipaddress.ip_address(vip)
        if ip not in VIP_NET4 and ip not in VIP_NET6:
            raise LabError(f"VIP {vip} is outside the lab's VIP prefixes",
                           fix=f"use an address in {VIP_NET4} or {VIP_NET6}")
        if ip.version == 6 and not self.ipv6:
            raise LabError(f"VIP {vip} is IPv6 but the lab is IPv4-only", fix="use Lab(ipv6=True)")
        if vip in self.vips or vip in self._extra_vips:
            return
        self._extra_vips.append(vip)
        if self.is_up:
            for backend in self.backend_names:
                with self.ipr(backend) as ipr:
                    self._add_lo_address(ipr, ipr.link_lookup(ifname="lo")[0], vip)

    # ---- the XDP_PASS program on the LB's switch port --------------------------------

    def _attach_xdp_pass(self) -> None:
        from fastlb.kernel.bcc_load import load_xdp
        self._bpf, fn, _ = load_xdp(XDP_PASS_SRC, "xdp_pass")
        for role in self.xdp_pass_roles:
            dev = self.switch_port(role)
            with self.ipr("switch") as sw:
                try:
                    sw.link("set", index=sw.link_lookup(ifname=dev)[0], xdp_fd=fn.fd)
                except (OSError, NetlinkError) as exc:
                    raise AttachError(f"cannot attach xdp_pass to {dev} in {self.ns('switch')}: "
                                      f"{netns.describe(exc)}") from exc
            netns.ethtool(self.ns("switch"), dev, "gro", "on")

    def _detach_xdp_pass(self) -> None:
        if self._bpf is None:
            return
        try:
            for role in self.xdp_pass_roles:
                dev = self.switch_port(role)
                try:
                    if self.ns("switch") in netns.list_namespaces():
                        with self.ipr("switch") as sw:
                            idx = sw.link_lookup(ifname=dev)
                            if idx:
                                sw.link("set", index=idx[0], xdp_fd=-1)
                except (OSError, NetlinkError) as exc:
                    if netns.errno_of(exc) not in netns.GONE:
                        raise LabError(f"cannot detach xdp_pass from {dev}: {netns.describe(exc)}") from exc
        finally:
            self._bpf.cleanup()
            self._bpf = None

    # ---- servers ---------------------------------------------------------------------

    def start_servers(self) -> None:
        """Start the HTTP and UDP servers on every backend not running them; wait until they answer."""
        todo = [b for b in self.backend_names if b not in self._servers]
        for backend in todo:
            self._spawn_server(backend)
        self._wait_ready(todo)

    def start_server(self, backend: str, latency_ms: float | None = None) -> None:
        """Start the servers on one backend (after :meth:`stop_server`) and wait until they answer."""
        if backend in self._servers:
            raise LabError(f"the servers on {backend} are running already")
        self._spawn_server(backend, latency_ms)
        self._wait_ready([backend])

    def stop_server(self, backend: str) -> None:
        """Stop the servers on one backend (SIGTERM, then SIGKILL after 3 s)."""
        proc, log = self._servers.pop(backend)
        try:
            proc.terminate()
            try:
                proc.wait(3)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(3)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise LabError(f"cannot stop the servers on {backend} (pid {proc.pid}): {exc}") from exc
        finally:
            log.close()

    def server_pid(self, backend: str) -> int | None:
        """PID of the servers' process on ``backend``, None if not running."""
        entry = self._servers.get(backend)
        return entry[0].pid if entry else None

    def set_latency(self, backend: str, ms: float) -> None:
        """Change the HTTP latency of ``backend``'s server at run time."""
        from fastlb.lab.clients import http_get

        body = http_get(self, self.addr(backend), self.http_port, f"/latency?ms={ms:g}")
        if float(body) != float(ms):
            raise LabError(f"{backend} did not take latency {ms:g} ms (answered {body!r})")

    def _spawn_server(self, backend: str, latency_ms: float | None = None) -> None:
        self._host_number(backend)
        if self.run_dir is not None:
            log = open(self.run_dir / f"{backend}.log", "ab+")
        else:
            log = tempfile.TemporaryFile()  # unlinked at once: nothing is left on disk
        args = ("--name", backend, "--http-port", self.http_port, "--udp-port", self.udp_port,
                "--latency-ms", self.latency_ms if latency_ms is None else latency_ms)
        try:
            # A session of their own: a terminal's Ctrl-C or hang-up is not for them,
            # and a released lab's servers must outlive the terminal that built it.
            proc = self.exec_python(backend, "fastlb.lab.servers", *args,
                                    stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                    start_new_session=True)
        except OSError as exc:
            log.close()
            raise LabError(f"cannot start the servers on {backend}: {os_error(exc)}") from exc
        self._servers[backend] = (proc, log)

    def _wait_ready(self, backends: list[str], timeout: float = 15.0) -> None:
        from fastlb.lab.clients import wait_tcp

        targets = [(self.addr(b, f), self.http_port) for b in backends
                   for f in ((4, 6) if self.ipv6 else (4,))]
        try:
            wait_tcp(self, targets, timeout)
        except LabError as exc:
            dead = []
            for b in backends:
                proc, log = self._servers[b]
                if proc.poll() is not None:
                    log.seek(0)
                    dead.append(f"{b} exited with {proc.returncode}: "
                                f"{log.read().decode(errors='replace').strip()[-300:]}")
            raise LabError(f"the lab servers did not come up: {exc}"
                           + (f" ({'; '.join(dead)})" if dead else "")) from exc

    # ---- config ----------------------------------------------------------------------

    def config_text(self, vips: list[str] | None = None, algorithm: str = "maglev",
                    services: tuple[tuple[str, int], ...] = (("tcp", HTTP_PORT), ("udp", UDP_PORT)),
                    backends: list[str] | None = None, weights: dict[str, int] | None = None,
                    forwarding: str = "dsr", health: dict[str, str | int | float] | None = None) -> str:
        """A fastlb TOML config for this lab: one [[vip]] per VIP address and service.

        ``vips`` defaults to the lab's VIPs, ``services`` to TCP 80 and UDP 9000,
        ``backends`` to all backends (each with its address of the VIP's family),
        ``weights`` (backend name -> weight) to 1 each. ``health``: the keys of
        every VIP's ``[vip.health]`` table (:data:`HEALTH_HTTP` checks the
        servers' ``GET /health``); None leaves the table out (no checks).
        """
        vips = self.vips if vips is None else vips
        backends = self.backend_names if backends is None else backends
        weights = weights or {}
        lines = []
        for vip in vips:
            family = ipaddress.ip_address(vip).version
            for protocol, port in services:
                lines += ["[[vip]]", f'address = "{vip}"', f"port = {int(port)}",
                          f'protocol = "{protocol}"', f'algorithm = "{algorithm}"',
                          f'forwarding = "{forwarding}"']
                if health is not None:
                    lines.append("[vip.health]")
                    lines += [f'{k} = "{v}"' if isinstance(v, str) else f"{k} = {v}" for k, v in health.items()]
                for b in backends:
                    lines += ["[[vip.backend]]", f'address = "{self.addr(b, family)}"',
                              f"weight = {int(weights.get(b, 1))}"]
                lines.append("")
        return "\n".join(lines)

    def write_config(self, path: str | os.PathLike, **kwargs) -> Path:
        """Write :meth:`config_text` (same arguments) to ``path``; return the path."""
        path = Path(path)
        path.write_text(self.config_text(**kwargs))
        return path

    def __repr__(self) -> str:
        return (f"Lab(runid={self.runid!r}, backends={len(self.backend_names)}, "
                f"ipv6={self.ipv6}, up={self.is_up})")


def _pyroute2_version() -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return f"pyroute2 {version('pyroute2')}"
    except PackageNotFoundError:
        return "an unknown pyroute2"
