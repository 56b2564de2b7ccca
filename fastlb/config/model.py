"""The config's model: frozen dataclasses, the names of things, the schema's keys and limits.

No parsing, no I/O: fastlb.config.load builds these from TOML (or checks one
built in code), fastlb.config.render writes them back.
"""

from __future__ import annotations

import dataclasses
import functools
import ipaddress
import re
from dataclasses import dataclass, field

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
KeyPath = tuple[str | int, ...]

PROTOCOLS = {"tcp": 6, "udp": 17, "http": 6, "https": 6}
L7_PROTOCOLS = ("http", "https")   # served by the HAProxy tier (fastlb.controller.l7), not forwarded by XDP
ALGORITHMS = ("rr", "wrr", "lc", "lrt", "maglev")
FORWARDING = ("dsr", "tunnel", "nat")
HASHES = ("5tuple", "src")
L7_HASHES = ("src", "uri")         # http maglev's key, besides "header:NAME"
CLIENT_IP = ("xff", "proxy", "none")
HEALTH_KINDS = ("none", "tcp", "http", "udp", "exec", "agent")
ALL_DOWN = ("drop", "keep")
ANNOUNCE = ("none", "arp", "bgp")
# [bgp]: the BGP speaker fastlb drives (fastlb.controller.bgp).
SPEAKERS = ("bird",)


def hostport(address: IPAddress, port: int) -> str:
    """``198.18.0.11:80`` or ``[2001:db8::11]:80``: a backend's key, a flow's ends."""
    return f"[{address}]:{port}" if address.version == 6 else f"{address}:{port}"


def vip_name(address: IPAddress, port: int, protocol: str) -> str:
    """``198.19.0.100:80/tcp`` or ``[2001:db8::1]:80/udp``: the one VIP-name format (``parse_vip_spec`` reads it)."""
    return f"{hostport(address, port)}/{protocol}"


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
    # Conntrack timeouts, decided by the data plane where an entry is read: a UDP flow
    # idle this long, a TCP flow idle this long in its state (SYN seen, established,
    # FIN or RST seen), counts as absent. IPVS's defaults.
    udp_timeout: float = 300.0
    tcp_syn_timeout: float = 60.0
    tcp_timeout: float = 900.0
    tcp_fin_timeout: float = 120.0
    # The controller's housekeeping timer (BGP retries); it walks no table.
    sweep_interval: float = 2.0
    # The new-flow guard: new flows per CPU per second that conntrack records; the
    # rest are forwarded by their ring slot, unrecorded (0 turns the guard off).
    # None: guard_rate() derives it from conntrack_size.
    new_flow_rate: int | None = None
    # ICMP errors fastlb generates (frag-needed / packet-too-big), per CPU: at most
    # icmp_rate a second in bursts of icmp_burst (RFC 1812 4.3.2.8, RFC 4443 2.4(f)).
    icmp_rate: int = 1000
    icmp_burst: int = 50
    # Multi-port VIPs: room in the vips map for the ports of their `ports` lists.
    max_vip_ports: int = 1024

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
    command: str = ""


@dataclass(frozen=True)
class Backend:
    """One ``[[vip.backend]]``. ``line`` is its header's line; it takes no part in ``==``."""

    address: IPAddress
    weight: int
    port: int
    line: int = field(default=0, compare=False)
    health: HealthCheck | None = None   # None: the VIP's check

    @functools.cached_property     # computed once: the controller asks for it for every health result
    def key(self) -> bytes:
        """The backend's Maglev identity: ``b"198.18.0.11:80"``, ``b"[2001:db8::11]:80"``."""
        return hostport(self.address, self.port).encode("ascii")


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
    ports: tuple[tuple[int, int], ...] = ()   # `ports`: its ranges, lowest first; () for a `port` VIP
    persistence: int = 0                # seconds a client keeps its backend after its last packet; 0: off
    persistence_prefix: int = 32        # clients grouped by this prefix (/32 IPv4, /128 IPv6 unless set)
    slow_start: int = 0                 # seconds over which an added or recovered backend ramps up; 0: off

    @property
    def is_l7(self) -> bool:
        """Served by the HAProxy tier: XDP passes its packets to the local stack."""
        return self.protocol in L7_PROTOCOLS

    @property
    def multi_port(self) -> bool:
        return bool(self.ports)

    def listens(self) -> list[int]:
        """Every port the VIP serves: ``port``, or each port of its ``ports`` ranges."""
        return [p for lo, hi in self.ports for p in range(lo, hi + 1)] if self.ports else [self.port]

    def serves(self, port: int) -> bool:
        return any(lo <= port <= hi for lo, hi in self.ports) if self.ports else port == self.port

    def check_of(self, backend: Backend) -> HealthCheck:
        """The health check that applies to ``backend``: its own, else the VIP's."""
        return backend.health if backend.health is not None else self.health

    @property
    def family(self) -> int:
        return self.address.version

    @property
    def proto_number(self) -> int:
        return PROTOCOLS[self.protocol]

    @functools.cached_property
    def name(self) -> str:
        """``198.19.0.100:80/tcp`` or ``[2001:db8::1]:80/udp``; ``parse_vip_spec`` reads it back."""
        return vip_name(self.address, self.port, self.protocol)


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
            if (vip.address, vip.protocol) == (address, protocol) and vip.serves(port):
                return vip   # a multi-port VIP answers to any of its ports
        return None


def l4_view(config):
    """``config`` as the XDP tier sees it: http/https VIPs (fastlb.controller.l7) keep a VIP slot, flagged
    FL_VIP_F_L7 so their packets go to the local HAProxy, and have no backends here."""
    if not any(v.is_l7 for v in config.vips):
        return config
    return dataclasses.replace(config, vips=tuple(
        dataclasses.replace(v, backends=(), routes=()) if v.is_l7 else v for v in config.vips))


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


# The schema: each table's keys and limits (fastlb.config.load checks them).

# setting: (min, max); defaults live on Settings.
_SETTINGS_RANGES = {
    "ring_size": (3, 1_048_573),
    "conntrack_size": (1, 16_777_216),
    "max_vips": (1, 4096),
    "max_backends": (1, 65536),
    "hash_seed": (0, 2**32 - 1),
    "swrr_size": (1, 65536),
    "udp_timeout": (1.0, 86400.0),
    "tcp_syn_timeout": (1.0, 86400.0),
    "tcp_timeout": (1.0, 86400.0 * 7),
    "tcp_fin_timeout": (1.0, 86400.0),
    "sweep_interval": (0.1, 3600.0),
    "new_flow_rate": (0, 2**32 - 1),
    "max_vip_ports": (0, 1_048_576),
    "icmp_rate": (0, 2**32 - 1),
    "icmp_burst": (1, 2**32 - 1),
}
_SETTINGS_SECONDS = frozenset({"udp_timeout", "tcp_syn_timeout", "tcp_timeout", "tcp_fin_timeout",
                               "sweep_interval"})  # numbers, not only integers
_SETTINGS_NETWORKS = {"tunnel_source": 4, "tunnel_source6": 6}
_SETTINGS_ADDRESSES = {"icmp_source": 4, "icmp_source6": 6}
_SETTINGS_KEYS = (*_SETTINGS_RANGES, *_SETTINGS_NETWORKS, *_SETTINGS_ADDRESSES)
_VIP_KEYS = ("address", "port", "ports", "protocol", "algorithm", "forwarding", "hash", "announce", "persistence",
             "persistence_prefix", "slow_start", "health", "backend", "certificate", "client_ip", "route")
_L7_ONLY = ("certificate", "client_ip", "route")  # keys only http/https VIPs read
_ROUTE_KEYS = ("host", "path_prefix", "algorithm", "backend")
_BACKEND_KEYS = ("address", "weight", "port", "health")
_HEALTH_KEYS = ("kind", "interval", "timeout", "rise", "fall", "port", "path", "expect", "payload", "command")
_VIP_HEALTH_KEYS = _HEALTH_KEYS + ("all_down", "expire_nodest_conn")
_HEALTH_RANGES = {"interval": (0.05, 3600.0), "timeout": (0.01, 60.0), "rise": (1, 100), "fall": (1, 100),
                  "port": (1, 65535), "expect": (100, 599)}
_KIND_ONLY = {"path": "http", "expect": "http", "payload": "udp", "command": "exec"}  # keys that only one kind reads
MAX_PAYLOAD = 1400
MAX_PERSISTENCE = 7 * 86400   # seconds: a week
MAX_SLOW_START = 3600
_BGP_KEYS = ("speaker", "local_as", "router_id", "hold_time", "bfd", "bfd_interval", "bfd_multiplier",
             "detach_delay", "bird_socket", "bird_include", "peer")
_PEER_KEYS = ("address", "as")
_TABLE_KEYS = frozenset({"settings", "vip", "backend", "health", "bgp", "peer", "route"})
_KEY_HOMES = (("[settings]", _SETTINGS_KEYS), ("[[vip]]", _VIP_KEYS), ("[bgp]", _BGP_KEYS),
              ("[[vip.backend]]", _BACKEND_KEYS), ("[[vip.route]]", _ROUTE_KEYS),
              ("[vip.health]", _VIP_HEALTH_KEYS))  # where a misplaced key belongs
