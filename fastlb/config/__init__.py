"""Load and validate the fastlb TOML config.

``load_config(path)`` and ``parse_config(text)`` return a frozen ``Config``;
``render_config(config)`` writes one back as TOML (``--save``).
Every problem is one ``ConfigError`` that names the key as a dotted path with
0-based indices in file order (``vip[1].backend[0].address``) and its 1-based
line. ``tomllib`` gives no positions, so ``_KeyLines`` scans the text for
table headers and ``key =`` lines to find them. docs/CONFIG.md lists every key.
"""

from __future__ import annotations

import dataclasses
import difflib
import ipaddress
import json
import os
import re
import tomllib
from dataclasses import dataclass, field, fields
from typing import Any

from fastlb.errors import ConfigError, os_error

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
KeyPath = tuple[str | int, ...]

PROTOCOLS = {"tcp": 6, "udp": 17, "http": 6, "https": 6}
L7_PROTOCOLS = ("http", "https")   # served by the HAProxy tier (fastlb.controller.l7), not forwarded by XDP
ALGORITHMS = ("rr", "wrr", "lc", "lrt", "maglev")
FORWARDING = ("dsr", "tunnel", "nat")
HASHES = ("5tuple", "src")
L7_HASHES = ("src", "uri")         # http maglev's key, besides "header:NAME"
CLIENT_IP = ("xff", "proxy", "none")
HEALTH_KINDS = ("none", "tcp", "http", "udp")
ALL_DOWN = ("drop", "keep")

# What this build can run. Other values are known but rejected as "not built yet".
BUILT_ALGORITHMS = frozenset({"maglev", "rr", "wrr", "lc", "lrt"})
BUILT_FORWARDING = frozenset({"dsr", "tunnel", "nat"})
ANNOUNCE = ("none", "arp", "bgp")
# [bgp]: the BGP speaker fastlb drives (fastlb.controller.bgp). Other values are known but not built yet.
SPEAKERS = ("exabgp", "bird")
BUILT_SPEAKERS = frozenset({"bird"})


def _hostport(address: IPAddress, port: int) -> str:
    return f"[{address}]:{port}" if address.version == 6 else f"{address}:{port}"


@dataclass(frozen=True)
class Settings:
    """The ``[settings]`` table. Limits are in ``_SETTINGS_RANGES``."""

    ring_size: int = 65537
    conntrack_size: int = 65536
    max_vips: int = 16
    max_backends: int = 1024
    hash_seed: int = 0
    swrr_size: int = 1024
    # Tunnel mode's outer source prefixes (the host bits vary per flow), and the
    # source of the ICMP errors fastlb sends (None: it drops instead).
    tunnel_source: ipaddress.IPv4Network | None = None
    tunnel_source6: ipaddress.IPv6Network | None = None
    icmp_source: ipaddress.IPv4Address | None = None
    icmp_source6: ipaddress.IPv6Address | None = None
    # The controller: UDP flows idle this long are expired; conntrack is swept this often.
    udp_timeout: float = 300.0
    sweep_interval: float = 2.0
    # The new-flow guard: new flows per CPU per second that conntrack records; the
    # rest are forwarded by their ring slot, unrecorded (0 turns the guard off).
    # None: guard_rate() derives it from conntrack_size.
    new_flow_rate: int | None = None
    # ICMP errors fastlb generates (frag-needed / packet-too-big), per CPU: at most
    # icmp_rate a second in bursts of icmp_burst (RFC 1812 4.3.2.8, RFC 4443 2.4(f)).
    icmp_rate: int = 1000
    icmp_burst: int = 50

    def guard_rate(self, possible_cpus: int) -> int:
        """The guard's rate per CPU: ``new_flow_rate``, or by default
        conntrack_size new flows per second over the box's possible CPUs, so a
        flood at the guard fills at most the conntrack map's headroom
        (conntrack_size entries beside the established flows) in a second."""
        if self.new_flow_rate is not None:
            return self.new_flow_rate
        return -(-self.conntrack_size // possible_cpus)


@dataclass(frozen=True)
class HealthCheck:
    """A ``[vip.health]`` or ``[vip.backend.health]`` table, defaults filled in.

    ``port`` 0 means the backend's own port. ``path`` and ``expect`` are for
    ``http`` checks, ``payload`` for ``udp`` ones.
    """

    kind: str = "none"
    interval: float = 1.0
    timeout: float = 0.5
    rise: int = 2
    fall: int = 2
    port: int = 0
    path: str = "/"
    expect: int = 200
    payload: str = "fastlb health check\n"


@dataclass(frozen=True)
class Backend:
    """One ``[[vip.backend]]``. ``line`` is its header's line; it takes no part in ``==``."""

    address: IPAddress
    weight: int
    port: int
    line: int = field(default=0, compare=False)
    health: HealthCheck | None = None   # None: the VIP's check

    @property
    def key(self) -> bytes:
        """The backend's Maglev identity: ``b"198.18.0.11:80"``, ``b"[2001:db8::11]:80"``."""
        return _hostport(self.address, self.port).encode("ascii")


@dataclass(frozen=True)
class Route:
    """One ``[[vip.route]]`` of an http VIP: requests matching host and path_prefix go to its pool.

    ``host`` is exact or ``*.domain``; None matches any host (likewise ``path_prefix``).
    """

    algorithm: str
    backends: tuple[Backend, ...]
    host: str | None = None
    path_prefix: str | None = None
    line: int = field(default=0, compare=False)


@dataclass(frozen=True)
class Vip:
    """One ``[[vip]]`` with its backends in file order. ``line`` takes no part in ``==``."""

    address: IPAddress
    port: int
    protocol: str
    algorithm: str
    forwarding: str
    hash: str
    backends: tuple[Backend, ...]
    line: int = field(default=0, compare=False)
    announce: str = "none"
    health: HealthCheck = HealthCheck()
    all_down: str = "drop"              # every backend down: drop new flows, or keep the last table
    expire_nodest_conn: bool = True     # a failed backend's flows move to a live one
    # http/https VIPs only (fastlb.controller.l7): TLS certificate, how backends learn the client, routes in order.
    certificate: str | None = None
    client_ip: str = "xff"
    routes: tuple[Route, ...] = ()

    @property
    def is_l7(self) -> bool:
        """Served by the HAProxy tier: XDP passes its packets to the local stack."""
        return self.protocol in L7_PROTOCOLS

    def check_of(self, backend: Backend) -> HealthCheck:
        """The health check that applies to ``backend``: its own, else the VIP's."""
        return backend.health if backend.health is not None else self.health

    @property
    def family(self) -> int:
        return self.address.version

    @property
    def proto_number(self) -> int:
        return PROTOCOLS[self.protocol]

    @property
    def name(self) -> str:
        """``198.19.0.100:80/tcp`` or ``[2001:db8::1]:80/udp``; ``parse_vip_spec`` reads it back."""
        return f"{_hostport(self.address, self.port)}/{self.protocol}"


@dataclass(frozen=True)
class BgpPeer:
    """One ``[[bgp.peer]]``: a router the VIPs are announced to. ``line`` takes no part in ``==``."""

    address: IPAddress
    asn: int                                 # the key is ``as``
    line: int = field(default=0, compare=False)


@dataclass(frozen=True)
class Bgp:
    """The ``[bgp]`` table: announce ``announce = "bgp"`` VIPs through a BGP speaker (fastlb.controller.bgp).

    ``router_id`` None leaves the speaker's own; ``bird_include`` None means
    ``/run/fastlb-bird/<IFACE>.conf`` (bgp.DEFAULT_INCLUDE_DIR).
    """

    speaker: str
    local_as: int
    peers: tuple[BgpPeer, ...]
    router_id: ipaddress.IPv4Address | None = None
    hold_time: int = 9
    bfd: bool = False
    bfd_interval: float = 0.1
    bfd_multiplier: int = 3
    detach_delay: float = 2.0
    bird_socket: str = "/run/bird/bird.ctl"
    bird_include: str | None = None


@dataclass(frozen=True)
class Config:
    settings: Settings
    vips: tuple[Vip, ...]
    path: str | None = None
    bgp: Bgp | None = None

    def find_vip(self, spec: str) -> Vip | None:
        """The VIP named by ``ADDR:PORT[/PROTO]``, or None. A malformed spec raises ValueError."""
        address, port, protocol = parse_vip_spec(spec)
        for vip in self.vips:
            if (vip.address, vip.port, vip.protocol) == (address, port, protocol):
                return vip
        return None


def parse_vip_spec(spec: str) -> tuple[IPAddress, int, str]:
    """Split ``198.19.0.100:80/tcp`` or ``[2001:db8::1]:80`` into (address, port, protocol).

    The protocol defaults to tcp. Raises ValueError with a message that says what to type.
    """
    usage = "expected ADDR:PORT[/tcp|udp|http|https], e.g. 198.19.0.100:80/tcp or [2001:db8::1]:80/udp"
    rest, slash, protocol = spec.strip().partition("/")
    protocol = protocol.lower() if slash else "tcp"
    if protocol not in PROTOCOLS:
        raise ValueError(f"bad VIP {spec!r}: protocol must be tcp, udp, http or https, got {protocol!r}")
    host, colon, port_text = rest.rpartition(":")
    if not colon or not host:
        raise ValueError(f"bad VIP {spec!r}: {usage}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError(f"bad VIP {spec!r}: put an IPv6 address in brackets, e.g. [2001:db8::1]:80")
    try:
        address = ipaddress.ip_address(host)
    except ValueError as exc:
        raise ValueError(f"bad VIP {spec!r}: {host!r} is not an IPv4 or IPv6 address") from exc
    if not re.fullmatch(r"[0-9]{1,5}", port_text) or not 1 <= int(port_text) <= 65535:
        raise ValueError(f"bad VIP {spec!r}: port must be a number from 1 to 65535, got {port_text!r}")
    return address, int(port_text), protocol


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read and validate the config file at ``path``."""
    name = os.fspath(path)
    try:
        with open(name, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise ConfigError(f"cannot read the config file: {os_error(exc)}", path=name,
                          fix="check the path and its permissions") from exc
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise ConfigError(f"not UTF-8 text: byte 0x{data[exc.start]:02x} cannot be decoded",
                          path=name, line=line, fix="save the file as UTF-8") from exc
    return parse_config(text, name)


def parse_config(text: str, path: str | None = None) -> Config:
    """Validate TOML ``text``; ``path`` only names the file in errors and in ``Config.path``."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        message, line = _toml_error(str(exc), text)
        raise ConfigError(f"invalid TOML: {message}", path=path, line=line) from exc
    source = _Source(path, _KeyLines(text))
    root = _Table(data, (), source)
    root.check_keys(("settings", "vip", "bgp"))
    settings = _settings(root.table("settings"))
    bgp = _bgp(root.table("bgp")) if "bgp" in root.data else None
    vip_tables = root.tables("vip")
    if not vip_tables:
        raise root.error(("vip",), "no VIPs defined",
                         fix="add a [[vip]] with an address, a port and at least one [[vip.backend]]")
    vips: list[Vip] = []
    seen: dict[tuple[IPAddress, int, int], _Table] = {}
    backend_count = 0
    for index, table in enumerate(vip_tables):
        if index >= settings.max_vips:
            raise table.error((), f"VIP number {index + 1} is over settings.max_vips = {settings.max_vips}",
                              fix=f"raise settings.max_vips (at most {_SETTINGS_RANGES['max_vips'][1]})")
        vip = _vip(table, settings, backend_count)
        if vip.announce == "bgp":
            _check_bgp_vip(table, vip, bgp)
        first = seen.setdefault((vip.address, vip.port, vip.proto_number), table)
        if first is not table:
            raise table.error((), f"duplicate VIP {vip.name}: already defined as {first.where()}",
                              fix="remove one of them or change its address, port or protocol")
        backend_count += len(vip.backends)
        vips.append(vip)
    return Config(settings=settings, vips=tuple(vips), path=path, bgp=bgp)


def render_config(config: Config) -> str:
    """``config`` as TOML that ``parse_config`` reads back to an equal Config.

    Settings and health keys are written only where they differ from their
    defaults (a backend's check: where it differs from its VIP's). Comments
    and the layout of the original file are not kept.
    """
    out: list[str] = []
    settings = _changed(config.settings, Settings())
    if settings:
        out += ["[settings]", *settings, ""]
    for vip in config.vips:
        out += ["[[vip]]", f"address = {_toml(vip.address)}", f"port = {vip.port}",
                f"protocol = {_toml(vip.protocol)}", f"algorithm = {_toml(vip.algorithm)}"]
        if vip.is_l7:
            out += [f"hash = {_toml(vip.hash)}"] if vip.algorithm == "maglev" else []
            out.append(f"client_ip = {_toml(vip.client_ip)}")
            if vip.certificate is not None:
                out.append(f"certificate = {_toml(vip.certificate)}")
        else:
            out += [f"forwarding = {_toml(vip.forwarding)}", f"hash = {_toml(vip.hash)}"]
        if vip.announce != "none":
            out.append(f"announce = {_toml(vip.announce)}")
        health = _changed(vip.health, HealthCheck())
        if vip.all_down != "drop":
            health.append(f"all_down = {_toml(vip.all_down)}")
        if not vip.expire_nodest_conn:
            health.append("expire_nodest_conn = false")
        if health:
            out += ["", "[vip.health]", *health]
        for b in vip.backends:
            out += ["", "[[vip.backend]]", f"address = {_toml(b.address)}", f"weight = {b.weight}"]
            if b.port != vip.port:
                out.append(f"port = {b.port}")
            if b.health is not None:
                out += ["[vip.backend.health]", *_changed(b.health, vip.health)]
        for route in vip.routes:
            out += ["", "[[vip.route]]", f"algorithm = {_toml(route.algorithm)}"]
            out += [f"{k} = {_toml(getattr(route, k))}" for k in ("host", "path_prefix")
                    if getattr(route, k) is not None]
            for b in route.backends:
                out += ["[[vip.route.backend]]", f"address = {_toml(b.address)}", f"weight = {b.weight}"]
                if b.port != vip.port:
                    out.append(f"port = {b.port}")
        out.append("")
    if config.bgp is not None:
        bgp = config.bgp
        out += ["[bgp]", f"speaker = {_toml(bgp.speaker)}", f"local_as = {bgp.local_as}",
                *_changed(dataclasses.replace(bgp, peers=()), Bgp(bgp.speaker, bgp.local_as, ()))]
        for peer in bgp.peers:
            out += ["", "[[bgp.peer]]", f"address = {_toml(peer.address)}", f"as = {peer.asn}"]
        out.append("")
    return "\n".join(out)


def _toml(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(str(value))  # strings, addresses, prefixes: a JSON string is a TOML basic string


def _changed(obj: object, base: object) -> list[str]:
    """``key = value`` lines for the fields of ``obj`` that differ from ``base``'s."""
    return [f"{f.name} = {_toml(getattr(obj, f.name))}" for f in fields(obj)
            if getattr(obj, f.name) != getattr(base, f.name) and getattr(obj, f.name) is not None]


def warnings(config: "Config") -> list[str]:
    """What a valid config still does badly, for check and attach to print."""
    out = []
    if config.settings.hash_seed == 0:
        out.append("settings.hash_seed is 0: anyone can compute which backend (and which of its RSS "
                   "queues) a flow lands on, and aim a flood at one. Fix: set hash_seed to one secret "
                   "random u32, the same on every box behind the same ECMP route "
                   "(python3 -c 'import secrets; print(secrets.randbits(32))')")
    return out


# Validation: one function per table.

# setting: (min, max); defaults live on Settings.
_SETTINGS_RANGES = {
    "ring_size": (3, 1_048_573),
    "conntrack_size": (1, 16_777_216),
    "max_vips": (1, 4096),
    "max_backends": (1, 65536),
    "hash_seed": (0, 2**32 - 1),
    "swrr_size": (1, 65536),
    "udp_timeout": (1.0, 86400.0),
    "sweep_interval": (0.1, 3600.0),
    "new_flow_rate": (0, 2**32 - 1),
    "icmp_rate": (0, 2**32 - 1),
    "icmp_burst": (1, 2**32 - 1),
}
_SETTINGS_SECONDS = frozenset({"udp_timeout", "sweep_interval"})  # numbers, not only integers
_SETTINGS_NETWORKS = {"tunnel_source": 4, "tunnel_source6": 6}
_SETTINGS_ADDRESSES = {"icmp_source": 4, "icmp_source6": 6}
_SETTINGS_KEYS = (*_SETTINGS_RANGES, *_SETTINGS_NETWORKS, *_SETTINGS_ADDRESSES)
_VIP_KEYS = ("address", "port", "protocol", "algorithm", "forwarding", "hash", "announce", "health", "backend",
             "certificate", "client_ip", "route")
_L7_ONLY = ("certificate", "client_ip", "route")  # keys only http/https VIPs read
_ROUTE_KEYS = ("host", "path_prefix", "algorithm", "backend")
_BACKEND_KEYS = ("address", "weight", "port", "health")
_HEALTH_KEYS = ("kind", "interval", "timeout", "rise", "fall", "port", "path", "expect", "payload")
_VIP_HEALTH_KEYS = _HEALTH_KEYS + ("all_down", "expire_nodest_conn")
_HEALTH_RANGES = {"interval": (0.05, 3600.0), "timeout": (0.01, 60.0), "rise": (1, 100), "fall": (1, 100),
                  "port": (1, 65535), "expect": (100, 599)}
_KIND_ONLY = {"path": "http", "expect": "http", "payload": "udp"}  # keys that only one kind reads
MAX_PAYLOAD = 1400
_BGP_KEYS = ("speaker", "local_as", "router_id", "hold_time", "bfd", "bfd_interval", "bfd_multiplier",
             "detach_delay", "bird_socket", "bird_include", "peer")
_PEER_KEYS = ("address", "as")
_TABLE_KEYS = frozenset({"settings", "vip", "backend", "health", "bgp", "peer", "route"})
_KEY_HOMES = (("[settings]", _SETTINGS_KEYS), ("[[vip]]", _VIP_KEYS), ("[bgp]", _BGP_KEYS),
              ("[[vip.backend]]", _BACKEND_KEYS), ("[[vip.route]]", _ROUTE_KEYS),
              ("[vip.health]", _VIP_HEALTH_KEYS))  # where a misplaced key belongs


def _settings(t: _Table) -> Settings:
    t.check_keys(_SETTINGS_KEYS)
    defaults = Settings()
    values = {name: (t.number if name in _SETTINGS_SECONDS else t.integer)(
                  name, *_SETTINGS_RANGES[name], default=getattr(defaults, name))
              for name in _SETTINGS_RANGES if name in t.data or getattr(defaults, name) is not None}
    for name, version in _SETTINGS_NETWORKS.items():
        values[name] = t.network(name, version) if name in t.data else None
    for name, version in _SETTINGS_ADDRESSES.items():
        values[name] = t.address(name, "ICMP source", loopback_ok=False, version=version) \
            if name in t.data else None
    ring_size = values["ring_size"]
    if not _is_prime(ring_size):
        below, above = _nearest_primes(ring_size)
        raise t.error(("ring_size",), f"ring_size {ring_size} is not prime, and Maglev needs a prime table size",
                      fix=f"use a nearest prime: {below} or {above}")
    return Settings(**values)


def _bgp(t: _Table) -> Bgp:
    t.check_keys(_BGP_KEYS)
    speaker = t.choice("speaker", SPEAKERS, _MISSING, built=BUILT_SPEAKERS)
    local_as = t.integer("local_as", 1, 2**32 - 1)
    router_id = t.address("router_id", "router id", loopback_ok=True, version=4) if "router_id" in t.data else None
    defaults = Bgp(speaker, local_as, ())
    values: dict[str, Any] = {
        "hold_time": t.integer("hold_time", 3, 65535, default=defaults.hold_time),
        "bfd": t.get("bfd", bool, defaults.bfd),
        "bfd_interval": t.number("bfd_interval", 0.01, 10.0, default=defaults.bfd_interval),
        "bfd_multiplier": t.integer("bfd_multiplier", 1, 255, default=defaults.bfd_multiplier),
        "detach_delay": t.number("detach_delay", 0.0, 60.0, default=defaults.detach_delay),
        "bird_socket": t.file_path("bird_socket", defaults.bird_socket),
        "bird_include": t.file_path("bird_include", None),
    }
    for key in ("bfd_interval", "bfd_multiplier"):
        if key in t.data and not values["bfd"]:
            raise t.error((key,), f"'{key}' is only read with bfd = true", fix="remove it, or set bfd = true")
    peer_tables = t.tables("peer")
    if not peer_tables:
        raise t.error(("peer",), "[bgp] has no peers",
                      fix='add a [[bgp.peer]] with the router\'s address and AS: address = "198.18.1.254", as = 65000')
    peers: list[BgpPeer] = []
    seen: dict[IPAddress, _Table] = {}
    for table in peer_tables:
        table.check_keys(_PEER_KEYS)
        address = table.address("address", "peer", loopback_ok=False)
        first = seen.setdefault(address, table)
        if first is not table:
            raise table.error(("address",), f"duplicate peer {address}: already defined as {first.where()}",
                              fix="remove one of them")
        peers.append(BgpPeer(address=address, asn=table.integer("as", 1, 2**32 - 1), line=table.line))
    return Bgp(speaker=speaker, local_as=local_as, peers=tuple(peers), router_id=router_id, **values)


def _check_bgp_vip(t: _Table, vip: Vip, bgp: Bgp | None) -> None:
    """An ``announce = "bgp"`` VIP needs a [bgp] table with a peer of its family."""
    if bgp is None:
        raise t.error(("announce",), 'announce = "bgp" needs a [bgp] table: the speaker, the local AS and '
                                     "the peers", fix='add [bgp] with speaker = "bird", local_as and a '
                                                      "[[bgp.peer]], or announce the VIP another way")
    if not any(p.address.version == vip.family for p in bgp.peers):
        raise t.error(("announce",), f"IPv{vip.family} VIP {vip.name} is announced over BGP, but no "
                                     f"[[bgp.peer]] is IPv{vip.family}: each session carries its own family",
                      fix=f"add a [[bgp.peer]] with an IPv{vip.family} address")


def _vip(t: _Table, settings: Settings, backends_before: int) -> Vip:
    t.check_keys(_VIP_KEYS)
    address = t.address("address", "VIP", loopback_ok=True)
    port = t.integer("port", 1, 65535)
    protocol = t.choice("protocol", tuple(PROTOCOLS), "tcp")
    if protocol in L7_PROTOCOLS:
        return _l7_vip(t, address, port, protocol)
    for key in _L7_ONLY:
        if key in t.data:
            raise t.error((key,), f"'{key}' is only read on http and https VIPs, and this VIP is {protocol}",
                          fix='remove it, or set protocol = "http"')
    algorithm = t.choice("algorithm", ALGORITHMS, "maglev", built=BUILT_ALGORITHMS)
    forwarding = t.choice("forwarding", FORWARDING, "dsr", built=BUILT_FORWARDING)
    hash_ = t.choice("hash", HASHES, "5tuple")
    announce = t.choice("announce", ANNOUNCE, "none")
    health_table = t.table("health")
    health = _health(health_table, HealthCheck(), _VIP_HEALTH_KEYS)
    all_down = health_table.choice("all_down", ALL_DOWN, "drop")
    expire = health_table.get("expire_nodest_conn", bool, True)
    if forwarding == "tunnel":
        need = "tunnel_source" if address.version == 4 else "tunnel_source6"
        if getattr(settings, need) is None:
            raise t.error(("forwarding",), f"tunnel forwarding needs settings.{need}, the prefix its outer "
                                           "source addresses come from",
                          fix=f'add {need} = "{"198.18.200.0/24" if need == "tunnel_source" else "2001:db8:200::/64"}"'
                              " (any prefix of yours; backends only decapsulate) to [settings]")
    backend_tables = t.tables("backend")
    if not backend_tables:
        raise t.error(("backend",), "the VIP has no backends",
                      fix="add at least one [[vip.backend]] with an address under this [[vip]]")
    backends: list[Backend] = []
    seen: dict[tuple[IPAddress, int], _Table] = {}
    for index, table in enumerate(backend_tables):
        if backends_before + index >= settings.max_backends:
            raise table.error((), f"backend number {backends_before + index + 1} (counting all VIPs) is over "
                                  f"settings.max_backends = {settings.max_backends}",
                              fix=f"raise settings.max_backends (at most {_SETTINGS_RANGES['max_backends'][1]})")
        if algorithm == "maglev" and index >= settings.ring_size:
            raise table.error((), f"backend number {index + 1} does not fit in settings.ring_size = "
                                  f"{settings.ring_size}: Maglev needs at least one ring slot per backend",
                              fix="raise settings.ring_size to a prime at least 100 times the number of backends")
        backend = _backend(table, address, port, forwarding, health)
        if forwarding == "tunnel" and backend.address.version == 4 and address.version == 6:
            raise table.error(("address",), "IPv4 backend on an IPv6 tunnel VIP: fastlb tunnels IPv4 in IPv4 "
                                            "or IPv6, and IPv6 only in IPv6",
                              fix="use an IPv6 backend address for an IPv6 VIP")
        if forwarding == "tunnel" and backend.address.version == 6 and settings.tunnel_source6 is None:
            raise table.error(("address",), "an IPv6 tunnel backend needs settings.tunnel_source6",
                              fix='add tunnel_source6 = "2001:db8:200::/64" (a prefix of yours) to [settings]')
        first = seen.setdefault((backend.address, backend.port), table)
        if first is not table:
            raise table.error((), f"duplicate backend {backend.key.decode()}: already defined as {first.where()}",
                              fix="remove one of them")
        backends.append(backend)
    return Vip(address=address, port=port, protocol=protocol, algorithm=algorithm, forwarding=forwarding,
               hash=hash_, backends=tuple(backends), line=t.line, announce=announce, health=health,
               all_down=all_down, expire_nodest_conn=expire)


def _health(t: _Table, base: HealthCheck, allowed: tuple[str, ...]) -> HealthCheck:
    """A health table over ``base`` (the VIP's check, for a backend's table)."""
    t.check_keys(allowed)
    kind = t.choice("kind", HEALTH_KINDS, base.kind)
    values: dict[str, Any] = {"kind": kind}
    for key in ("interval", "timeout"):
        values[key] = t.number(key, *_HEALTH_RANGES[key], default=getattr(base, key))
    for key in ("rise", "fall", "expect"):
        values[key] = t.integer(key, *_HEALTH_RANGES[key], default=getattr(base, key))
    values["port"] = t.integer("port", *_HEALTH_RANGES["port"]) if "port" in t.data else base.port
    if values["timeout"] > values["interval"]:
        key = "timeout" if "timeout" in t.data else "interval"
        raise t.error((key,), f"timeout {values['timeout']:g} s is longer than interval {values['interval']:g} s",
                      fix="a check must end before the next one starts: make timeout at most interval")
    path = t.get("path", str, base.path)
    if not path.startswith("/") or any(c.isspace() for c in path):
        raise t.error(("path",), f"path {_show(path)} is not an absolute URL path without spaces",
                      fix='write it like path = "/health"')
    payload = t.get("payload", str, base.payload)
    if not payload or len(payload.encode()) > MAX_PAYLOAD:
        raise t.error(("payload",), f"payload must be 1 to {MAX_PAYLOAD} bytes, got {len(payload.encode())}",
                      fix="send a short request your UDP service answers")
    for key, only in _KIND_ONLY.items():
        if key in t.data and kind != only:
            raise t.error((key,), f"'{key}' is only read by {only} checks, and this check is kind '{kind}'",
                          fix=f'remove it, or set kind = "{only}"')
    return HealthCheck(path=path, payload=payload, **values)


def _backend(t: _Table, vip_address: IPAddress, vip_port: int, forwarding: str,
             vip_health: HealthCheck = HealthCheck()) -> Backend:
    t.check_keys(_BACKEND_KEYS)
    address = t.address("address", "backend", loopback_ok=False)
    if address.version != vip_address.version and forwarding not in ("tunnel", "proxy"):
        raise t.error(("address",), f"IPv{address.version} backend on an IPv{vip_address.version} VIP: "
                                    f"{forwarding} forwarding cannot change the address family",
                      fix=f"use an IPv{vip_address.version} backend address (only tunnel forwarding may mix families)")
    weight = t.integer("weight", 0, 65535, default=1)
    port = t.integer("port", 1, 65535, default=vip_port)
    if port != vip_port and forwarding not in ("nat", "proxy"):
        raise t.error(("port",), f"port {port} differs from the VIP's port {vip_port}, "
                                 f"but only nat forwarding remaps ports (this VIP uses {forwarding})",
                      fix=f"remove the port key or set port = {vip_port}")
    health = _health(t.table("health"), vip_health, _HEALTH_KEYS) if "health" in t.data else None
    return Backend(address=address, weight=weight, port=port, line=t.line, health=health)


# http/https VIPs: served by the HAProxy tier (fastlb.controller.l7). Their forwarding is "proxy".

_HOST_LABEL = r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)"
_HOST_PATTERN = re.compile(rf"(\*\.)?{_HOST_LABEL}(\.{_HOST_LABEL})*")


def _l7_vip(t: _Table, address: IPAddress, port: int, protocol: str) -> Vip:
    if "forwarding" in t.data:
        raise t.error(("forwarding",), f"'forwarding' has no meaning on an {protocol} VIP: HAProxy proxies "
                                       "its requests to the backends", fix="remove it")
    algorithm = t.choice("algorithm", ALGORITHMS, "rr", built=BUILT_ALGORITHMS)
    hash_ = _l7_hash(t, algorithm)
    client_ip = t.choice("client_ip", CLIENT_IP, "xff")
    certificate = None
    if protocol == "https":
        certificate = t.file_path("certificate", None)
        if certificate is None:
            raise t.error(("certificate",), "an https VIP needs a certificate to terminate TLS",
                          fix='add certificate = "/etc/fastlb/site.pem" (the certificate and its key in one PEM file)')
        try:
            with open(certificate, "rb") as f:
                pem = f.read(1 << 20)
        except OSError as exc:
            raise t.error(("certificate",), f"cannot read the certificate: {os_error(exc)}",
                          fix="check the path and its permissions") from exc
        if b"-----BEGIN CERTIFICATE-----" not in pem or b"PRIVATE KEY-----" not in pem:
            raise t.error(("certificate",), f"{certificate} is not a PEM file with a certificate and its key",
                          fix="concatenate the certificate and its private key: cat site.crt site.key > site.pem")
    elif "certificate" in t.data:
        raise t.error(("certificate",), "'certificate' is only read on https VIPs",
                      fix='remove it, or set protocol = "https"')
    announce = t.choice("announce", ANNOUNCE, "none")
    health_table = t.table("health")
    health = _health(health_table, HealthCheck(), _VIP_HEALTH_KEYS)
    if health.kind == "udp":
        raise health_table.error(("kind",), "an http VIP's backends are checked by HAProxy over TCP or HTTP",
                                 fix='use kind = "http" or "tcp"')
    for key in ("all_down", "expire_nodest_conn"):
        if key in health_table.data:
            raise health_table.error((key,), f"'{key}' is for L4 VIPs; HAProxy answers 503 when a pool is empty",
                                     fix="remove it")
    backends = _l7_pool(t, address, port, health, "the VIP has no backends (its default pool)",
                        "add at least one [[vip.backend]] with an address under this [[vip]]")
    routes = []
    for table in t.tables("route"):
        table.check_keys(_ROUTE_KEYS)
        host = table.get("host", str, None)
        if host is not None and not _HOST_PATTERN.fullmatch(host):
            raise table.error(("host",), f"host {_show(host)} is not a host name or *.domain pattern",
                              fix='write an exact name such as "api.example.com" or a wildcard "*.example.com"')
        prefix = table.get("path_prefix", str, None)
        if prefix is not None and (not prefix.startswith("/") or not prefix.isprintable()
                                   or any(c.isspace() or c in "\"'#" for c in prefix)):
            raise table.error(("path_prefix",), f"path_prefix {_show(prefix)} is not a URL path starting with /",
                              fix='write it like path_prefix = "/v1/"')
        if host is None and prefix is None:
            raise table.error((), "a route needs host or path_prefix (or both): this one matches every request",
                              fix='add host = "api.example.com" or path_prefix = "/v1/", or move its backends '
                                  "to the VIP's default pool")
        route_alg = table.choice("algorithm", ALGORITHMS, algorithm, built=BUILT_ALGORITHMS)
        pool = _l7_pool(table, address, port, health, "the route has no backends",
                        "add at least one [[vip.route.backend]] under this [[vip.route]]")
        routes.append(Route(algorithm=route_alg, backends=pool, host=host.lower() if host else None,
                            path_prefix=prefix, line=table.line))
    return Vip(address=address, port=port, protocol=protocol, algorithm=algorithm, forwarding="proxy",
               hash=hash_, backends=backends, line=t.line, announce=announce, health=health,
               certificate=certificate, client_ip=client_ip, routes=tuple(routes))


def _l7_hash(t: _Table, algorithm: str) -> str:
    """http maglev's key: "src", "uri" or "header:NAME"."""
    value = t.get("hash", str, "src")
    if value.startswith("header:"):
        if not re.fullmatch(r"[A-Za-z0-9!#$%&'*+.^_`|~-]+", value[len("header:"):]):
            raise t.error(("hash",), f"hash {_show(value)} does not name an HTTP header",
                          fix='write hash = "header:X-User" (a header name: letters, digits and -)')
    elif value not in L7_HASHES:
        raise t.error(("hash",), f"unknown hash {_show(value)} for an http VIP",
                      fix='use "src", "uri" or "header:NAME"')
    if "hash" in t.data and algorithm != "maglev":
        raise t.error(("hash",), f"'hash' is only read by the maglev algorithm, and this VIP uses {algorithm}",
                      fix='remove it, or set algorithm = "maglev"')
    return value


def _l7_pool(t: _Table, address: IPAddress, port: int, health: HealthCheck, empty: str,
             fix: str) -> tuple[Backend, ...]:
    tables = t.tables("backend")
    if not tables:
        raise t.error(("backend",), empty, fix=fix)
    backends: list[Backend] = []
    seen: dict[tuple[IPAddress, int], _Table] = {}
    for table in tables:
        backend = _backend(table, address, port, "proxy", health)
        if backend.weight > 256:
            raise table.error(("weight",), f"weight {backend.weight} is over 256, HAProxy's largest",
                              fix="use a weight from 0 to 256")
        first = seen.setdefault((backend.address, backend.port), table)
        if first is not table:
            raise table.error((), f"duplicate backend {backend.key.decode()}: already defined as {first.where()}",
                              fix="remove one of them")
        backends.append(backend)
    return tuple(backends)


# Typed access to one table's keys, with errors that point at them.

_MISSING: Any = object()
_TYPE_NAMES = {bool: "a boolean", int: "an integer", float: "a float", str: "a string",
               list: "an array", dict: "a table"}


def _type_name(value: object) -> str:
    return _TYPE_NAMES.get(type(value), "a date/time")


def _show(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _did_you_mean(word: str, valid: tuple[str, ...] | list[str], otherwise: str) -> str:
    """``did you mean 'weight'? Valid: ...`` for a near miss, else ``otherwise``."""
    close = difflib.get_close_matches(word.lower(), valid, n=1)
    return f"did you mean '{close[0]}'? Valid: {', '.join(valid)}" if close else otherwise


def _unknown_key_fix(key: str, is_table: bool, allowed: list[str]) -> str:
    """Say where a misplaced key belongs, else the nearest allowed key of the same kind."""
    homes = [header for header, keys in _KEY_HOMES if key in keys]
    if homes:
        return f"'{key}' belongs in {' or '.join(homes)}"
    same_kind = [k for k in allowed if (k in _TABLE_KEYS) == is_table]
    return _did_you_mean(key, same_kind, otherwise=f"remove it; valid here: {', '.join(allowed)}")


def _dotted(path: KeyPath) -> str:
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in path).lstrip(".")


def _header(path: KeyPath) -> str:
    """The TOML header of the table at ``path``: ``[settings]``, ``[[vip.backend]]``."""
    name = ".".join(p for p in path if isinstance(p, str))
    return f"[[{name}]]" if path and isinstance(path[-1], int) else f"[{name}]"


@dataclass(frozen=True)
class _Source:
    path: str | None
    lines: _KeyLines


@dataclass(frozen=True)
class _Table:
    data: dict[str, Any]
    path: KeyPath
    source: _Source

    @property
    def line(self) -> int:
        return self.source.lines.find(self.path)

    def where(self) -> str:
        """``vip[0] (line 3)``: how another error names this table."""
        return f"{_dotted(self.path)} (line {self.line})"

    def error(self, sub: KeyPath, message: str, fix: str | None = None) -> ConfigError:
        path = self.path + sub
        return ConfigError(message, path=self.source.path, field=_dotted(path) or None,
                           line=self.source.lines.find(path), fix=fix)

    def check_keys(self, allowed: tuple[str, ...] | dict[str, Any]) -> None:
        for key, value in self.data.items():
            if key not in allowed:
                is_table = isinstance(value, dict) or (
                    isinstance(value, list) and bool(value) and all(isinstance(v, dict) for v in value))
                raise self.error((key,), f"unknown {'table' if is_table else 'key'} '{key}'",
                                 fix=_unknown_key_fix(key, is_table, list(allowed)))

    def get(self, key: str, kind: type, default: Any = _MISSING) -> Any:
        if key not in self.data:
            if default is _MISSING:
                raise self.error((key,), f"missing required key '{key}'",
                                 fix=f"add '{key} = ...' to this {_header(self.path)}")
            return default
        value = self.data[key]
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            fix = None
            if kind is int and isinstance(value, str) and re.fullmatch(r"\s*[0-9]+\s*", value):
                fix = f"write the number without quotes: {key} = {value.strip()}"
            elif kind is str and isinstance(value, (int, float)) and not isinstance(value, bool):
                fix = f'quote it: {key} = "{value}"'
            raise self.error((key,), f"expected {_TYPE_NAMES[kind]}, got {_type_name(value)} {_show(value)}", fix=fix)
        return value

    def number(self, key: str, low: float, high: float, default: Any = _MISSING) -> float:
        """An integer or float (seconds), as a float."""
        if key in self.data and isinstance(self.data[key], int) and not isinstance(self.data[key], bool):
            value = float(self.data[key])
        else:
            value = float(self.get(key, float, default))
        if not low <= value <= high:
            hint = f"; the default is {default:g}" if default is not _MISSING else ""
            raise self.error((key,), f"{key} must be {low:g}..{high:g}, got {value:g}",
                             fix=f"use a number from {low:g} to {high:g}{hint}")
        return value

    def integer(self, key: str, low: int, high: int, default: Any = _MISSING) -> int:
        value = self.get(key, int, default)
        if not low <= value <= high:
            hint = f"; the default is {default}" if default is not _MISSING else ""
            raise self.error((key,), f"{key} must be {low}..{high}, got {value}",
                             fix=f"use a value from {low} to {high}{hint}")
        return value

    def choice(self, key: str, valid: tuple[str, ...], default: str,
               built: frozenset[str] | None = None) -> str:
        value = self.get(key, str, default)
        if value not in valid:
            raise self.error((key,), f"unknown {key} {_show(value)}",
                             fix=_did_you_mean(value, valid, otherwise=f"use one of: {', '.join(valid)}"))
        if built is not None and value not in built:
            listing = ", ".join(v for v in valid if v in built)
            raise self.error((key,), f"{key} '{value}' is not built yet in this version; built: {listing}",
                             fix=f"use one of: {listing}")
        return value

    def file_path(self, key: str, default: str | None) -> str | None:
        """An absolute file path (it may not exist yet) without quotes or control characters."""
        if key not in self.data:
            return default
        text = self.get(key, str)
        if not text.startswith("/") or any(c in text for c in '"\\') or not text.isprintable():
            raise self.error((key,), f"{_show(text)} is not an absolute path without quotes, backslashes "
                                     "or control characters", fix='write it like "/run/fastlb-bird/eth0.conf"')
        return text

    def network(self, key: str, version: int) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
        """A prefix of IP version ``version``, with at least one host bit (outer sources vary in them)."""
        text = self.get(key, str)
        example = "198.18.200.0/24" if version == 4 else "2001:db8:200::/64"
        try:
            net = ipaddress.ip_network(text, strict=True)
        except ValueError as exc:
            raise self.error((key,), f"{_show(text)} is not an IPv{version} prefix",
                             fix=f'write a prefix such as "{example}" (host bits zero)') from exc
        if net.version != version:
            raise self.error((key,), f"{text} is an IPv{net.version} prefix; {key} takes IPv{version}",
                             fix=f'write a prefix such as "{example}"')
        if net.num_addresses < 2:
            raise self.error((key,), f"{text} has no host bits to vary per flow",
                             fix=f'use a shorter prefix, such as "{example}"')
        return net

    def address(self, key: str, role: str, *, loopback_ok: bool, version: int | None = None) -> IPAddress:
        text = self.get(key, str)
        try:
            address = ipaddress.ip_address(text)
        except ValueError as exc:
            raise self.error((key,), f"{_show(text)} is not an IPv4 or IPv6 address",
                             fix='write a plain address such as "198.18.0.11" or "2001:db8::11"') from exc
        if version is not None and address.version != version:
            raise self.error((key,), f"{text} is an IPv{address.version} address; {key} takes IPv{version}",
                             fix=f"give an IPv{version} address")
        problem = None
        if getattr(address, "scope_id", None):
            problem = "has a zone index (%), which fastlb does not support"
        elif address.is_unspecified:
            problem = "is the unspecified address"
        elif address.is_multicast:
            problem = "is a multicast address"
        elif address == ipaddress.IPv4Address("255.255.255.255"):
            problem = "is the broadcast address"
        elif address.is_loopback and not loopback_ok:
            problem = "is a loopback address, which other hosts cannot reach"
        if problem:
            raise self.error((key,), f"{role} address {text} {problem}",
                             fix=f"use a unicast address of a real {'host' if role == 'backend' else 'service'}")
        return address

    def table(self, key: str) -> _Table:
        """The sub-table ``key`` (empty when absent)."""
        value = self.data.get(key, {})
        if not isinstance(value, dict):
            raise self.error((key,), f"expected a table, got {_type_name(value)} {_show(value)}",
                             fix=f"write it as a {_header(self.path + (key,))} table")
        return _Table(value, self.path + (key,), self.source)

    def tables(self, key: str) -> list[_Table]:
        """The array of tables ``key`` (empty when absent)."""
        value = self.data.get(key, [])
        if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
            what = _type_name(value) if not isinstance(value, list) else "an array of non-tables"
            raise self.error((key,), f"expected an array of tables, got {what}",
                             fix=f"write each one as {_header(self.path + (key, 0))}")
        return [_Table(v, self.path + (key, i), self.source) for i, v in enumerate(value)]


def _is_prime(n: int) -> bool:
    if n < 2:
        return False
    return all(n % d for d in range(2, int(n**0.5) + 1))


def _nearest_primes(n: int) -> tuple[int, int]:
    below = next(p for p in range(n - 1, 1, -1) if _is_prime(p))
    above = next(p for p in range(n + 1, 2 * n + 2) if _is_prime(p))
    return below, above


def _toml_error(text: str, source: str) -> tuple[str, int]:
    """Split tomllib's ``msg (at line 3, column 5)`` into the message and the line."""
    match = re.fullmatch(r"(.*) \(at line (\d+), column (\d+)\)", text, re.DOTALL)
    if match:
        return f"{match[1]} (column {match[3]})", int(match[2])
    return text.removesuffix(" (at end of document)") + " at the end of the file", source.count("\n") + 1


# The line locator. tomllib has already accepted the text, so every line that
# does not start inside a multi-line string or a multi-line array is blank, a
# comment, a table header or a ``key = value`` line.

_BASIC_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
_KEY_PART = re.compile(r"""\s*(?:([A-Za-z0-9_-]+)|("(?:[^"\\]|\\.)*")|'([^']*)')\s*""")


class _KeyLines:
    """Maps a key path such as ``("vip", 1, "backend", 0, "port")`` to its 1-based line."""

    def __init__(self, text: str):
        self._lines: dict[KeyPath, int] = {}
        self._aot_counts: dict[KeyPath, int] = {}  # array-of-tables path -> tables seen so far
        table: KeyPath = ()
        multiline: str | None = None  # the open '"""' or "'''", if any
        depth = 0  # open [ and { of a value that spans lines
        for number, line in enumerate(text.split("\n"), 1):
            start = 0
            if multiline is None and depth == 0:
                header = self._header(line, number)
                if header is not None:
                    table, start = header
                else:
                    parsed = _parse_key(line, 0)
                    if parsed and line.startswith("=", parsed[1]):
                        self._record(table + tuple(parsed[0]), number, len(table) + 1)
                        start = parsed[1] + 1
            multiline, depth = _scan(line, start, multiline, depth)

    def find(self, path: KeyPath) -> int:
        """The line of ``path``, else of its nearest enclosing table; line 1 for the top level."""
        for end in range(len(path), 0, -1):
            if path[:end] in self._lines:
                return self._lines[path[:end]]
        return 1

    def _record(self, path: KeyPath, number: int, first: int = 1) -> None:
        for end in range(first, len(path) + 1):
            self._lines.setdefault(path[:end], number)

    def _header(self, line: str, number: int) -> tuple[KeyPath, int] | None:
        """Handle ``[a.b]`` or ``[[a.b]]``: return the table's resolved path and where the header ends."""
        stripped = line.lstrip()
        if not stripped.startswith("["):
            return None
        is_array = stripped.startswith("[[")
        opening = len(line) - len(stripped) + (2 if is_array else 1)
        parsed = _parse_key(line, opening)
        closing = "]]" if is_array else "]"
        if not parsed or not line.startswith(closing, parsed[1]):
            return None
        parts, end = parsed
        path: KeyPath = ()
        for part in parts[:-1]:
            path += (part,)
            if path in self._aot_counts:
                path += (self._aot_counts[path] - 1,)
        path += (parts[-1],)
        if is_array:
            index = self._aot_counts.get(path, 0)
            self._aot_counts[path] = index + 1
            path += (index,)
        self._record(path, number)
        return path, end + len(closing)


def _parse_key(line: str, pos: int) -> tuple[list[str], int] | None:
    """Parse a dotted key (bare, "basic" or 'literal' parts) at ``pos``: (parts, end) or None."""
    parts: list[str] = []
    while True:
        match = _KEY_PART.match(line, pos)
        if not match:
            return None
        bare, basic, literal = match.groups()
        if basic is not None:
            parts.append(tomllib.loads(f"k = {basic}")["k"])
        else:
            parts.append(bare if bare is not None else literal)
        pos = match.end()
        if not line.startswith(".", pos):
            return parts, pos
        pos += 1


def _scan(line: str, pos: int, multiline: str | None, depth: int) -> tuple[str | None, int]:
    """Skip strings and comments from ``pos``; return the open multi-line string and bracket depth."""
    i = pos
    while i < len(line):
        char = line[i]
        if multiline:
            if char == "\\" and multiline == '"""':
                i += 2
            elif line.startswith(multiline, i):
                run = len(line) - i - len(line[i:].lstrip(multiline[0]))
                i += run  # the delimiter plus up to two quotes of content
                multiline = None
            else:
                i += 1
        elif char == "#":
            break
        elif line.startswith('"""', i) or line.startswith("'''", i):
            multiline = line[i:i + 3]
            i += 3
        elif char == '"':
            match = _BASIC_STRING.match(line, i)
            i = match.end() if match else len(line)
        elif char == "'":
            end = line.find("'", i + 1)
            i = end + 1 if end >= 0 else len(line)
        else:
            depth += (char in "[{") - (char in "]}")
            i += 1
    return multiline, depth
