"""Announcing VIPs to routers over BGP, through BIRD running beside fastlb.

fastlb does not speak BGP itself. The box runs BIRD (Debian's ``bird2``),
and fastlb owns one file that BIRD includes, ``bgp.bird_include``
(``/run/fastlb-bird/IFACE.conf`` by default; ``bird.conf`` says
``include "/run/fastlb-bird/*.conf";``). The file holds, all named
``fastlb_<IFACE>_...``:

- a routing table of fastlb's own per address family, so nothing fastlb
  announces reaches the box's main table or its kernel;
- a static protocol with one blackhole route per announced VIP address
  (``/32`` or ``/128``): the routes exist only to be exported;
- one BGP protocol per ``[[bgp.peer]]``, exporting that table (next hop
  self, nothing imported), without graceful restart, so that a box whose
  sessions go down is withdrawn at once rather than kept as stale;
- with ``bfd = true``, a BFD protocol, and ``bfd on`` in each session.

To announce or withdraw, fastlb rewrites the file (atomically, only when it
changed) and runs ``birdc configure``: BIRD reconfigures the static
protocol in place and sends the UPDATE at once; the sessions, whose
configuration did not change, are not touched. The state of the
announcements therefore lives in a file, not in the controller process:

- a controller that dies (``kill -9``) withdraws nothing, and BIRD keeps
  announcing what the file says while the pinned data plane forwards;
- the next controller computes the same announcements from the same
  health, finds the file unchanged, and BIRD sees no change either;
- ``/run`` is empty after a reboot, so a box that boots announces nothing
  until fastlb has attached and its checks pass.

An address is announced while fastlb is attached to the interface and at
least one ``announce = "bgp"`` VIP on that address has a healthy backend.
``fastlb detach`` and a controller's clean exit without ``--keep`` withdraw
everything first (the sessions stay up), wait ``detach_delay`` and then
detach (fastlb.controller.attachment.detach).

What the status needs after the controller is gone is in a small state
file next to the health state, ``/run/fastlb/state/net<inode>/IFACE.bgp.json``.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from fastlb.config import Bgp, BgpPeer, Config
from fastlb.controller import state
from fastlb.controller.files import write_atomic
from fastlb.errors import FastlbError
from fastlb.kernel import pins

DEFAULT_INCLUDE_DIR = "/run/fastlb-bird"
BIRDC = "birdc"
BIRDC_TIMEOUT = 5.0
STATE_VERSION = 1

ANNOUNCED = "announced"
WITHDRAWN = "withdrawn"
KEPT = "kept"            # this VIP has no healthy backend, but another VIP on its address keeps the route


class SpeakerError(FastlbError):
    """BIRD did not take a change, or could not be asked."""


# ---- names and paths -------------------------------------------------------------------


def include_path(bgp: Bgp, ifname: str) -> str:
    return bgp.bird_include or f"{DEFAULT_INCLUDE_DIR}/{ifname}.conf"


def prefix(ifname: str) -> str:
    """BIRD symbol prefix of an interface's objects: ``fastlb_eth0``."""
    return "fastlb_" + re.sub(r"[^A-Za-z0-9_]", "_", ifname)


def route_of(address) -> str:
    address = ipaddress.ip_address(address)
    return f"{address}/{address.max_prefixlen}"


def peer_name(ifname: str, index: int) -> str:
    return f"{prefix(ifname)}_peer{index}"


def state_path(ifname: str) -> Path:
    return state.path(ifname).with_name(f"{ifname}.bgp.json")


# ---- what to announce ------------------------------------------------------------------


@dataclass(frozen=True)
class VipAnnouncement:
    route: str
    state: str          # announced, withdrawn or kept
    why: str


def plan(config: Config, healthy: set[str], attached: bool = True) -> tuple[list[str], dict[str, VipAnnouncement]]:
    """The routes to announce, and each ``announce = "bgp"`` VIP's state.

    A route is announced while attached and while at least one of the
    VIPs on its address has a healthy backend (``healthy`` names them).
    """
    by_route: dict[str, list[str]] = {}
    for vip in config.vips:
        if vip.announce == "bgp":
            by_route.setdefault(route_of(vip.address), []).append(vip.name)
    routes = sorted((r for r, names in by_route.items() if attached and any(n in healthy for n in names)),
                    key=lambda r: (ipaddress.ip_network(r).version, ipaddress.ip_network(r)))
    vips = {}
    for route, names in by_route.items():
        for name in names:
            if not attached:
                vips[name] = VipAnnouncement(route, WITHDRAWN, "fastlb is not attached")
            elif name in healthy:
                vips[name] = VipAnnouncement(route, ANNOUNCED, "it has a healthy backend")
            elif route in routes:
                keepers = ", ".join(n for n in names if n in healthy)
                vips[name] = VipAnnouncement(route, KEPT, f"no healthy backend; the route stays for {keepers}")
            else:
                vips[name] = VipAnnouncement(route, WITHDRAWN, "no healthy backend")
    return routes, vips


# ---- the include file ---------------------------------------------------------------------


def _families(bgp: Bgp) -> list[int]:
    return sorted({p.address.version for p in bgp.peers})


def render(bgp: Bgp, ifname: str, routes: list[str], note: str = "") -> str:
    """The BIRD include that announces ``routes`` (prefix strings) to ``bgp.peers``."""
    p = prefix(ifname)
    out = [f"# Written by fastlb for {ifname}; do not edit: fastlb rewrites it (fastlb/controller/bgp.py).",
           f"# bird.conf includes it: include \"{os.path.dirname(include_path(bgp, ifname))}/*.conf\";"]
    if note:
        out.append(f"# {note}")
    for family in _families(bgp):
        out.append(f"ipv{family} table {p}_{family};")
    for family in _families(bgp):
        out += ["", f"protocol static {p}_vips{family} {{", f"    ipv{family} {{ table {p}_{family}; }};"]
        out += [f"    route {r} blackhole;" for r in routes if ipaddress.ip_network(r).version == family]
        out.append("}")
    if bgp.bfd:
        ms = max(1, round(bgp.bfd_interval * 1000))
        out += ["", f"protocol bfd {p}_bfd {{",
                f'    interface "*" {{ interval {ms} ms; multiplier {bgp.bfd_multiplier}; }};', "}"]
    for index, peer in enumerate(bgp.peers):
        family = peer.address.version
        out += ["", f"protocol bgp {peer_name(ifname, index)} {{",
                f'    description "fastlb {ifname}: peer {peer.address} AS{peer.asn}";']
        if bgp.router_id is not None:
            out.append(f"    router id {bgp.router_id};")
        out += [f"    local as {bgp.local_as};", f"    neighbor {peer.address} as {peer.asn};"]
        if peer.address.is_link_local:
            out.append(f'    interface "{ifname}";')
        out += [f"    hold time {bgp.hold_time};", f"    keepalive time {max(1, bgp.hold_time // 3)};",
                "    connect retry time 5;", "    error wait time 5, 30;",
                "    graceful restart off;", "    long lived graceful restart off;"]
        if bgp.bfd:
            out.append("    bfd on;")
        out += [f"    ipv{family} {{", f"        table {p}_{family};", "        import none;",
                "        export all;", "        next hop self;", "    };", "}"]
    return "\n".join(out) + "\n"


def render_empty(ifname: str, why: str) -> str:
    """An include that declares nothing: BIRD removes fastlb's protocols (sessions closed)."""
    return f"# Written by fastlb for {ifname}: nothing here ({why}).\n"


def write_include(path: str, text: str) -> bool:
    """Write ``text`` to ``path`` atomically; False when it held that already."""
    try:
        if Path(path).read_text() == text:
            return False
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise SpeakerError(f"cannot read {path}: {exc.strerror or exc}",
                           fix="check bgp.bird_include and its folder's permissions") from exc
    directory = os.path.dirname(path)
    try:
        os.makedirs(directory, mode=0o755, exist_ok=True)
        write_atomic(path, text, 0o644)   # BIRD reads it as its own user
    except OSError as exc:
        raise SpeakerError(f"cannot write {path}: {exc.strerror or exc}",
                           fix="check bgp.bird_include and its folder's permissions") from exc
    return True


# ---- talking to BIRD ----------------------------------------------------------------------------


class Birdc:
    """``birdc -v -s SOCKET ...``: each reply line carries BIRD's 4-digit code."""

    def __init__(self, socket_path: str):
        self.socket = socket_path

    def call(self, *command: str) -> list[tuple[int, str]]:
        argv = [BIRDC, "-v", "-s", self.socket, *command]
        try:
            res = subprocess.run(argv, capture_output=True, text=True, timeout=BIRDC_TIMEOUT)
        except FileNotFoundError as exc:
            raise SpeakerError("birdc is not installed", fix="apt-get install bird2 (sudo make setup)") from exc
        except subprocess.TimeoutExpired as exc:
            raise SpeakerError(f"birdc {' '.join(command)} got no answer within {BIRDC_TIMEOUT:g} s from "
                               f"{self.socket}", fix="check that BIRD is running and not stuck") from exc
        lines, code = [], 0
        for raw in res.stdout.splitlines():
            m = re.match(r"^(\d{4})[ -](.*)$", raw)
            if m:
                code = int(m[1])
                lines.append((code, m[2]))
            else:  # a continuation line: same code as the line before
                lines.append((code, raw[1:] if raw.startswith(" ") else raw))
        errors = [text for c, text in lines if c >= 8000]
        if res.returncode != 0 or errors:
            text = "; ".join(errors) or res.stderr.strip() or res.stdout.strip() or f"exit {res.returncode}"
            if "Unable to connect" in text or "control socket" in text:
                raise SpeakerError(f"cannot reach BIRD at {self.socket}: {text}",
                                   fix="start BIRD, or set bgp.bird_socket to its control socket (birdc -s)")
            raise SpeakerError(f"BIRD refused 'birdc {' '.join(command)}': {text}",
                               fix="see BIRD's log; the include fastlb writes is in bgp.bird_include")
        return lines

    def configure(self) -> None:
        """Re-read bird.conf (and fastlb's include). Raises SpeakerError when BIRD refuses it."""
        self.call("configure")

    def protocol(self, name: str) -> dict | None:
        """``show protocols all NAME``, parsed: None when BIRD has no such protocol."""
        try:
            lines = self.call("show", "protocols", "all", f'"{name}"')   # a pattern: an unknown name is no error
        except SpeakerError as exc:
            if "No protocols match" in exc.message:
                return None
            raise
        rows = [text for code, text in lines if code == 1002]
        if not rows:
            return None
        cols = rows[0].split()
        out = {"name": cols[0], "proto": cols[1], "state": cols[3], "info": ""}
        if len(cols) > 5:  # Since is one token with BIRD's default time format
            out["info"] = " ".join(cols[5:])
        for code, text in lines:
            key, sep, value = text.strip().partition(":")
            if not sep:
                continue
            key, value = key.strip(), value.strip()
            if key == "BGP state":
                out["bgp_state"] = value
            elif key == "Neighbor address":
                out["neighbor"] = value
            elif key == "Last error":
                out["last_error"] = value
            elif key == "Hold timer":
                out["hold_timer"] = value
            elif key == "Routes":
                m = re.search(r"(\d+) exported", value)
                if m:
                    out["exported"] = int(m[1])
        return out

    def table_routes(self, table: str) -> set[str]:
        """The prefixes in a BIRD table (empty when the table does not exist)."""
        try:
            lines = self.call("show", "route", "table", table)
        except SpeakerError as exc:
            if "CF_SYM_UNDEFINED" in exc.message:   # BIRD knows no such table
                return set()
            raise
        out = set()
        for code, text in lines:
            first = text.split(maxsplit=1)[0] if text.strip() else ""
            if "/" in first:
                try:
                    out.add(str(ipaddress.ip_network(first)))
                except ValueError:
                    pass
        return out


# ---- the state file --------------------------------------------------------------------------


def _bgp_to_json(bgp: Bgp) -> dict:
    data = asdict(bgp)
    data["router_id"] = str(bgp.router_id) if bgp.router_id else None
    data["peers"] = [{"address": str(p.address), "as": p.asn} for p in bgp.peers]
    return data


def _bgp_from_json(data: dict) -> Bgp:
    peers = tuple(BgpPeer(ipaddress.ip_address(p["address"]), int(p["as"])) for p in data["peers"])
    router_id = ipaddress.IPv4Address(data["router_id"]) if data.get("router_id") else None
    rest = {k: v for k, v in data.items() if k not in ("peers", "router_id")}
    return Bgp(peers=peers, router_id=router_id, **rest)


def load_state(ifname: str) -> dict | None:
    try:
        data = json.loads(state_path(ifname).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("version") != STATE_VERSION:
        return None
    try:
        data["bgp"] = _bgp_from_json(data["bgp"])
    except (KeyError, TypeError, ValueError):
        return None
    return data


def save_state(ifname: str, bgp: Bgp, include: str, routes: list[str], vips: dict[str, VipAnnouncement]) -> None:
    p = state_path(ifname)
    p.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    body = {"version": STATE_VERSION, "interface": ifname, "bgp": _bgp_to_json(bgp), "include": include,
            "routes": routes, "vips": {name: asdict(a) for name, a in sorted(vips.items())}}
    write_atomic(p, json.dumps(body, indent=1) + "\n")


def remove_state(ifname: str) -> None:
    try:
        state_path(ifname).unlink()
    except FileNotFoundError:
        pass


# ---- the controller's side ----------------------------------------------------------------------


class Announcer:
    """Keeps BIRD's view of one interface's VIPs in step with the controller's health.

    ``update`` is called after every table build; it writes the include
    and runs ``birdc configure`` only when the announcements changed (and
    once at the start, so that BIRD has surely read the file). A file that
    cannot be written or a BIRD that cannot be reached is retried by
    ``retry`` (the controller's sweep timer); meanwhile BIRD keeps
    announcing what it last read.
    """

    def __init__(self, ifname: str, log: Callable[..., None], attached: Callable[[], bool] | None = None):
        self.ifname = ifname
        self.log = log
        # Announce only while the data plane is attached (a `fastlb detach` from another shell withdraws).
        self.attached = attached or (lambda: pins.attachment_dir(ifname, pins.root()).exists())
        self.routes: list[str] | None = None     # what the include announces, as last decided
        self.writes: list[tuple[str, str]] = []  # files still to write: (path, text)
        self.socket: str | None = None            # the BIRD to tell
        self.pending = False                      # BIRD has not taken the last change yet
        self.error: str | None = None
        self.checked = False                      # BIRD was seen to hold fastlb's protocols
        self.bgp: Bgp | None = None
        self.include: str | None = None
        previous = load_state(ifname)             # a controller before this one (even one killed)
        if previous is not None:
            self.bgp, self.include = previous["bgp"], previous["include"]
            self.routes = list(previous["routes"])
            self.socket = self.bgp.bird_socket

    def update(self, config: Config, healthy: set[str]) -> None:
        """Announce what ``config`` and the healthy VIPs say (``healthy``: VIP names)."""
        bgp = config.bgp
        if bgp is None:
            if self.bgp is not None:   # [bgp] was removed: close fastlb's sessions
                self._log_routes([], {}, "[bgp] removed from the config")
                self.writes = [(self.include, render_empty(self.ifname, "no [bgp] in the config"))]
                self.bgp, self.routes = None, None
                remove_state(self.ifname)
                self._sync(force=True)
            return
        routes, vips = plan(config, healthy, attached=self.attached())
        include = include_path(bgp, self.ifname)
        first = self.bgp is None or self.include != include or not self.checked
        writes = []
        if self.include is not None and self.include != include:
            writes.append((self.include, render_empty(self.ifname, f"moved to {include}")))
        writes.append((include, render(bgp, self.ifname, routes)))
        self._log_routes(routes, vips, "")
        self.bgp, self.include, self.routes, self.socket = bgp, include, routes, bgp.bird_socket
        self.writes = writes
        try:
            save_state(self.ifname, bgp, include, routes, vips)
        except OSError as exc:
            self.log("bgp_state_not_saved", error=f"{exc.strerror or exc}", path=state_path(self.ifname),
                     effect="fastlb status and fastlb detach cannot see the announcements")
        self._sync(force=first)

    def retry(self) -> None:
        if self.pending:
            self._sync(force=True)

    def _log_routes(self, routes: list[str], vips: dict[str, VipAnnouncement], why: str) -> None:
        before = set(self.routes or [])
        for route in routes:
            if route not in before:
                names = [n for n, a in vips.items() if a.route == route]
                self.log("route_announced", route=route, vips=",".join(names))
        for route in sorted(before - set(routes)):
            names = [n for n, a in vips.items() if a.route == route]
            reason = why or next((a.why for a in vips.values() if a.route == route), "no VIP uses it")
            self.log("route_withdrawn", route=route, vips=",".join(names), why=reason)

    def _sync(self, force: bool) -> None:
        """Write the files still to write; if any changed (or ``force``), have BIRD read them."""
        try:
            changed = False
            while self.writes:
                path, text = self.writes[0]
                changed = write_include(path, text) or changed
                self.writes.pop(0)
            if not (changed or force or self.pending):
                return
            self.pending = True
            birdc = Birdc(self.socket)
            birdc.configure()
            if self.bgp is not None and not self.checked:
                if birdc.protocol(f"{prefix(self.ifname)}_vips{_families(self.bgp)[0]}") is None:
                    raise SpeakerError(
                        f"BIRD at {self.socket} took 'configure' but has no {prefix(self.ifname)}_* "
                        f"protocols: its bird.conf does not include {self.include}",
                        fix=f'add include "{os.path.dirname(self.include)}/*.conf"; to bird.conf, then '
                            "birdc configure")
                self.checked = True
        except SpeakerError as exc:
            self.pending = True
            text = str(exc)
            if text != self.error:  # once per distinct error, not at every retry
                self.log("bgp_speaker_error", error=text,
                         effect="BIRD keeps announcing what it last read; retried at every sweep")
                self.error = text
            return
        self.pending = False
        if self.error is not None:
            self.log("bgp_speaker_ok", socket=self.socket, include=self.include)
            self.error = None


# ---- detach and status (no controller needed) -------------------------------------------------------


def withdraw_for_detach(ifname: str) -> tuple[float, str | None]:
    """Withdraw everything fastlb announces for ``ifname`` (the sessions stay up).

    Returns (seconds to wait before detaching, a line saying what was done),
    (0, None) when nothing is announced through BGP here.
    """
    st = load_state(ifname)
    if st is None:
        return 0.0, None
    bgp, include, routes = st["bgp"], st["include"], st["routes"]
    vips = {n: VipAnnouncement(v["route"], WITHDRAWN, "fastlb detached") for n, v in st["vips"].items()}
    try:
        write_include(include, render(bgp, ifname, [], note=f"{ifname} detached: nothing announced"))
        save_state(ifname, bgp, include, [], vips)
        Birdc(bgp.bird_socket).configure()
    except SpeakerError as exc:
        return 0.0, (f"could not withdraw {', '.join(routes) or 'the VIPs'} through BIRD: {exc} "
                     f"(the include {include} now announces nothing; BIRD reads it when it next configures)")
    if not routes:
        return 0.0, None
    return bgp.detach_delay, (f"withdrew {', '.join(routes)} (BIRD at {bgp.bird_socket}); detaching in "
                              f"{bgp.detach_delay:g} s so that packets already sent here are still balanced")


def status(ifname: str) -> dict | None:
    """What fastlb announces for ``ifname`` and how BIRD's sessions are, for ``fastlb status``."""
    st = load_state(ifname)
    if st is None:
        return None
    bgp: Bgp = st["bgp"]
    out: dict = {"speaker": bgp.speaker, "socket": bgp.bird_socket, "include": st["include"],
                 "routes": st["routes"], "peers": [], "vips": st["vips"], "problem": None}
    birdc = Birdc(bgp.bird_socket)
    try:
        in_bird = set()
        for family in _families(bgp):
            in_bird |= birdc.table_routes(f"{prefix(ifname)}_{family}")
        for index, peer in enumerate(bgp.peers):
            proto = birdc.protocol(peer_name(ifname, index)) or {}
            out["peers"].append({"name": peer_name(ifname, index), "address": str(peer.address), "as": peer.asn,
                                 "state": proto.get("bgp_state") or proto.get("state") or "not in BIRD",
                                 "info": proto.get("info", ""), "last_error": proto.get("last_error"),
                                 "exported": proto.get("exported"), "family": peer.address.version})
    except SpeakerError as exc:
        out["problem"] = str(exc)
        return out
    established = {p["family"]: 0 for p in out["peers"]}
    for p in out["peers"]:
        if p["state"] == "Established":
            established[p["family"]] += 1
    for name, vip in out["vips"].items():
        family = ipaddress.ip_network(vip["route"]).version
        vip["in_bird"] = vip["route"] in in_bird
        vip["to_peers"] = established.get(family, 0) if vip["in_bird"] else 0
        vip["peers"] = sum(1 for p in out["peers"] if p["family"] == family)
    missing = sorted(set(st["routes"]) - in_bird)
    if missing:
        out["problem"] = (f"BIRD does not hold {', '.join(missing)} that {st['include']} announces: it has not "
                          "read the file (is it included by bird.conf? see the controller's bgp_speaker_error)")
    return out
