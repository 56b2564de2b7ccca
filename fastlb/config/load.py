"""Load and validate: TOML text or a Config in, a validated Config out.

``load_config(path)`` and ``parse_config(text)`` read TOML; ``validate(config)``
checks a Config built in code (a live change) by the very same rules, with no
round trip through text. One function per table builds its dataclass, and
every problem is one ConfigError that names the key (fastlb.config.table).
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import tomllib
from typing import Any

from fastlb.config.lines import KeyLines, NoLines, toml_error
from fastlb.config.model import (_BACKEND_KEYS, _BGP_KEYS, _HEALTH_KEYS, _HEALTH_RANGES, _KIND_ONLY, _L7_ONLY,
                                 _PEER_KEYS, _ROUTE_KEYS, _SETTINGS_ADDRESSES, _SETTINGS_KEYS, _SETTINGS_NETWORKS,
                                 _SETTINGS_RANGES, _SETTINGS_SECONDS, _VIP_HEALTH_KEYS, _VIP_KEYS, ALGORITHMS,
                                 ALL_DOWN, ANNOUNCE, CLIENT_IP,
                                 FORWARDING, HASHES, HEALTH_KINDS, L7_HASHES, L7_PROTOCOLS, MAX_PAYLOAD,
                                 MAX_PERSISTENCE, MAX_SLOW_START, PROTOCOLS, SPEAKERS, Backend, Bgp, BgpPeer, Config,
                                 HealthCheck, IPAddress, Route, Settings, Vip)
from fastlb.config.render import config_data
from fastlb.config.table import _MISSING, _Source, _Table, _show
from fastlb.errors import ConfigError, os_error


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
        message, line = toml_error(str(exc), text)
        raise ConfigError(f"invalid TOML: {message}", path=path, line=line) from exc
    return _config(_Table(data, (), _Source(path, KeyLines(text))))


def validate(config: Config) -> Config:
    """``config`` checked by the rules a file is checked by, without text: the validated Config.

    Defaults are filled in as for a file; errors name the key but no line.
    """
    return _config(_Table(config_data(config), (), _Source(config.path, NoLines())))


FTP_CONTROL = 21


def warnings(config: Config) -> list[str]:
    """What a valid config still does badly, for check and attach to print."""
    out = []
    if config.settings.hash_seed == 0:
        out.append("settings.hash_seed is 0: anyone can compute which backend (and which of its RSS "
                   "queues) a flow lands on, and aim a flood at one. Fix: set hash_seed to one secret "
                   "random u32, the same on every box behind the same ECMP route "
                   "(python3 -c 'import secrets; print(secrets.randbits(32))')")
    for vip in config.vips:
        if vip.protocol != "tcp" or not vip.serves(FTP_CONTROL):
            continue
        if vip.forwarding == "nat":
            out.append(f"{vip.name}: nat forwarding on FTP's port 21: fastlb does not rewrite FTP payloads, so the "
                       "server's PASV/EPSV answers name the backend's address and its data connections miss the "
                       "VIP; use dsr or tunnel with ports = [21, \"PASV range\"] and persistence (docs/FTP.md)")
        elif not vip.multi_port or not vip.persistence:
            out.append(f"{vip.name}: FTP's port 21 without ports = [21, \"PASV range\"] and persistence: passive "
                       "data connections may reach another backend than their control connection (docs/FTP.md)")
    return out


def _config(root: _Table) -> Config:
    path = root.source.path
    root.check_keys(("settings", "vip", "bgp"))
    settings = _settings(root.table("settings"))
    bgp = _bgp(root.table("bgp")) if "bgp" in root.data else None
    vip_tables = root.tables("vip")
    if not vip_tables:
        raise root.error(("vip",), "no VIPs defined",
                         fix="add a [[vip]] with an address, a port and at least one [[vip.backend]]")
    vips: list[Vip] = []
    seen: dict[tuple[IPAddress, int, int], tuple[Vip, _Table]] = {}
    backend_count = 0
    vip_ports = 0
    for index, table in enumerate(vip_tables):
        if index >= settings.max_vips:
            raise table.error((), f"VIP number {index + 1} is over settings.max_vips = {settings.max_vips}",
                              fix=f"raise settings.max_vips (at most {_SETTINGS_RANGES['max_vips'][1]})")
        vip = _vip(table, settings, backend_count)
        if vip.announce == "bgp":
            _check_bgp_vip(table, vip, bgp)
        for port in vip.listens():
            other, first = seen.setdefault((vip.address, port, vip.proto_number), (vip, table))
            if first is table:
                continue
            if not vip.multi_port and not other.multi_port:
                raise table.error((), f"duplicate VIP {vip.name}: already defined as {first.where()}",
                                  fix="remove one of them or change its address, port or protocol")
            raise table.error(("ports" if vip.multi_port else "port",),
                              f"port {port} of VIP {vip.name} is also a port of VIP {other.name} "
                              f"({first.where()})", fix="a port of an address and protocol belongs to one VIP: "
                                                        "take it out of one of them")
        if vip.multi_port:
            vip_ports += len(vip.listens())
            if vip_ports > settings.max_vip_ports:
                raise table.error(("ports",), f"the multi-port VIPs list {vip_ports} ports, over "
                                              f"settings.max_vip_ports = {settings.max_vip_ports}",
                                  fix=f"raise settings.max_vip_ports to at least {vip_ports} (each port is one "
                                      "entry of the vips map)")
        backend_count += len(vip.backends)
        vips.append(vip)
    return Config(settings=settings, vips=tuple(vips), path=path, bgp=bgp)



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
    speaker = t.choice("speaker", SPEAKERS, _MISSING)
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
    if "ports" in t.data:
        if "port" in t.data:
            raise t.error(("ports",), "a VIP has port or ports, not both",
                          fix="remove port, or remove ports and keep the single port")
        ports = _port_ranges(t)
        port = ports[0][0]
    else:
        ports, port = (), t.integer("port", 1, 65535)
    protocol = t.choice("protocol", tuple(PROTOCOLS), "tcp")
    persistence = t.integer("persistence", 0, MAX_PERSISTENCE, default=0)
    bits = address.max_prefixlen
    prefix = t.integer("persistence_prefix", 0, bits, default=bits)
    if "persistence_prefix" in t.data and not persistence:
        raise t.error(("persistence_prefix",), "persistence_prefix without persistence",
                      fix="set persistence = SECONDS (e.g. 600), or remove persistence_prefix")
    slow_start = t.integer("slow_start", 0, MAX_SLOW_START, default=0)
    if protocol in L7_PROTOCOLS:
        if ports:
            raise t.error(("ports",), f"'ports' is for tcp and udp VIPs, and this VIP is {protocol}",
                          fix="use one port; an http VIP listens on one port")
        return _l7_vip(t, address, port, protocol, persistence=persistence, persistence_prefix=prefix,
                       slow_start=slow_start)
    for key in _L7_ONLY:
        if key in t.data:
            raise t.error((key,), f"'{key}' is only read on http and https VIPs, and this VIP is {protocol}",
                          fix='remove it, or set protocol = "http"')
    algorithm = t.choice("algorithm", ALGORITHMS, "maglev")
    forwarding = t.choice("forwarding", FORWARDING, "dsr")
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
        if ports and "port" in table.data:
            raise table.error(("port",), "a backend of a multi-port VIP takes the port each client used",
                              fix="remove the backend's port (port remapping is for single-port VIPs)")
        backend = _backend(table, address, port, forwarding, health)
        if forwarding == "tunnel" and backend.address.version == 4 and address.version == 6:
            raise table.error(("address",), "IPv4 backend on an IPv6 tunnel VIP: fastlb tunnels IPv4 in IPv4 "
                                            "or IPv6, and IPv6 only in IPv6",
                              fix="use an IPv6 backend address for an IPv6 VIP")
        if forwarding == "tunnel" and backend.address.version == 6 and settings.tunnel_source6 is None:
            raise table.error(("address",), "an IPv6 tunnel backend needs settings.tunnel_source6",
                              fix='add tunnel_source6 = "2001:db8:200::/64" (a prefix of yours) to [settings]')
        _check_unique_backend(seen, backend, table)
        backends.append(backend)
    return Vip(address=address, port=port, protocol=protocol, algorithm=algorithm, forwarding=forwarding,
               hash=hash_, backends=tuple(backends), line=t.line, announce=announce, health=health,
               all_down=all_down, expire_nodest_conn=expire, ports=ports, persistence=persistence,
               persistence_prefix=prefix, slow_start=slow_start)


def _range(lo: int, hi: int) -> str:
    return str(lo) if lo == hi else f"{lo}-{hi}"


def _port_ranges(t: _Table) -> tuple[tuple[int, int], ...]:
    """``ports = [21, "30000-30100"]`` -> ((21, 21), (30000, 30100)), sorted; overlaps are errors."""
    items = t.get("ports", list)
    if not items:
        raise t.error(("ports",), "ports is empty", fix='list ports or ranges, e.g. ports = [21, "30000-30100"]')
    ranges = []
    for item in items:
        text = str(item) if isinstance(item, (int, str)) and not isinstance(item, bool) else None
        match = re.fullmatch(r"\s*([0-9]{1,5})\s*(?:-\s*([0-9]{1,5})\s*)?", text) if text is not None else None
        lo, hi = (int(match.group(1)), int(match.group(2) or match.group(1))) if match else (0, 0)
        if match is None or isinstance(item, int) and match.group(2) or not 1 <= lo <= hi <= 65535:
            raise t.error(("ports",), f"bad port or range {_show(item)}",
                          fix='write a port (21) or a range "LOW-HIGH" with 1 <= LOW <= HIGH <= 65535, '
                              'e.g. "30000-30100"')
        ranges.append((lo, hi))
    ranges.sort()
    for (lo1, hi1), (lo2, hi2) in zip(ranges, ranges[1:]):
        if lo2 <= hi1:
            raise t.error(("ports",), f"ports {_range(lo1, hi1)} and {_range(lo2, hi2)} overlap",
                          fix="list each port once")
    return tuple(ranges)


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
    command = t.get("command", str, base.command if kind == "exec" else "")
    if kind == "exec":
        _exec_command(t, command)
    if kind == "agent" and not values["port"]:
        raise t.error(("port",), "an agent check needs the agent's port",
                      fix="add port = N, the TCP port the backend's agent listens on")
    return HealthCheck(path=path, payload=payload, command=command, **values)


def _exec_command(t: _Table, command: str) -> None:
    """An exec check's command must split into words and name a program that exists and runs."""
    try:
        argv = shlex.split(command)
    except ValueError as exc:
        raise t.error(("command",), f"command {_show(command)} does not split into words: {exc}",
                      fix="balance the quotes, e.g. command = \"/usr/local/bin/replica-lag-check --max 5\"") from None
    if not argv:
        raise t.error(("command",), "an exec check needs a command",
                      fix='add command = "/usr/local/bin/replica-lag-check" (exit 0 = up)')
    if shutil.which(argv[0]) is None:
        raise t.error(("command",), f"{argv[0]} is not an executable file here (nor on PATH)",
                      fix="give the full path of an existing program, and make it executable (chmod +x)")


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


def _l7_vip(t: _Table, address: IPAddress, port: int, protocol: str, **stateful: int) -> Vip:
    """``stateful``: persistence, persistence_prefix and slow_start, read as for any VIP."""
    if "forwarding" in t.data:
        raise t.error(("forwarding",), f"'forwarding' has no meaning on an {protocol} VIP: HAProxy proxies "
                                       "its requests to the backends", fix="remove it")
    algorithm = t.choice("algorithm", ALGORITHMS, "rr")
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
    if health.kind in ("udp", "exec", "agent"):
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
        route_alg = table.choice("algorithm", ALGORITHMS, algorithm)
        pool = _l7_pool(table, address, port, health, "the route has no backends",
                        "add at least one [[vip.route.backend]] under this [[vip.route]]")
        routes.append(Route(algorithm=route_alg, backends=pool, host=host.lower() if host else None,
                            path_prefix=prefix, line=table.line))
    return Vip(address=address, port=port, protocol=protocol, algorithm=algorithm, forwarding="proxy",
               hash=hash_, backends=backends, line=t.line, announce=announce, health=health,
               certificate=certificate, client_ip=client_ip, routes=tuple(routes), **stateful)


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
        _check_unique_backend(seen, backend, table)
        backends.append(backend)
    return tuple(backends)


def _check_unique_backend(seen: dict, backend: Backend, table) -> None:
    """A pool lists each address and port once; ``seen`` maps them to their first table."""
    first = seen.setdefault((backend.address, backend.port), table)
    if first is not table:
        raise table.error((), f"duplicate backend {backend.key.decode()}: already defined as {first.where()}",
                          fix="remove one of them")


def _is_prime(n: int) -> bool:
    if n < 2:
        return False
    return all(n % d for d in range(2, int(n**0.5) + 1))


def _nearest_primes(n: int) -> tuple[int, int]:
    below = next(p for p in range(n - 1, 1, -1) if _is_prime(p))
    above = next(p for p in range(n + 1, 2 * n + 2) if _is_prime(p))
    return below, above
