"""An HAProxy configuration from fastlb's config: a pure function, no files touched.

``render(config, paths)`` returns a :class:`Rendered`: the text of
haproxy.cfg and, for each of its lines, the fastlb key it came from, so that a
line HAProxy refuses is reported as that key (``fastlb.controller.l7.haproxy.check``).
Only the http/https VIPs are rendered; each gets a ``frontend`` and one
``backend`` per pool (the default pool, then each route's), named after the
VIP so that the runtime API and the server-state file find them again after
a reload. docs/L7.md lists what each key becomes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from fastlb.config import Backend, Config, HealthCheck, Route, Vip

LOG_FORMAT = "fastlb %b %s %Tr %Ta %ST"   # parsed by fastlb.controller.l7.logstream
BALANCE = {"rr": "roundrobin", "wrr": "roundrobin", "lc": "leastconn", "lrt": "leastconn"}
LRT_START_WEIGHT = 128     # lrt's weights before fastlb has measured anything (fastlb.controller.l7.steering)
HARD_STOP_AFTER = "30s"    # old workers left after a reload finish their requests within this
MAXCONN = 8000             # the machine's hard fd limit is 20000 (two fds per proxied connection)
STICK_TABLE_SIZE = "1m"    # persistence: clients per pool (about 50 bytes each, allocated as they come)


@dataclass(frozen=True)
class Paths:
    """Files of one attachment's HAProxy, all under one folder (``fastlb.controller.l7.haproxy.run_dir``)."""

    root: str

    @property
    def config(self) -> str:
        return f"{self.root}/haproxy.cfg"

    @property
    def admin_socket(self) -> str:
        return f"{self.root}/admin.sock"

    @property
    def master_socket(self) -> str:
        return f"{self.root}/master.sock"

    @property
    def pid_file(self) -> str:
        return f"{self.root}/haproxy.pid"

    @property
    def state_file(self) -> str:
        return f"{self.root}/server-state"

    @property
    def log_socket(self) -> str:
        return f"{self.root}/log.sock"

    @property
    def output(self) -> str:
        return f"{self.root}/haproxy.out"


@dataclass(frozen=True)
class Rendered:
    text: str
    fields: dict[int, str] = field(default_factory=dict)   # 1-based line -> fastlb key (dotted path)

    def field_of(self, line: int) -> str | None:
        """The fastlb key of ``line``, else of the nearest line above it that has one."""
        for n in range(line, 0, -1):
            if n in self.fields:
                return self.fields[n]
        return None


def frontend_name(vip: Vip) -> str:
    return f"{_host(vip)}:{vip.port}"


def pool_name(vip: Vip, route: int | None = None) -> str:
    """The HAProxy backend of the VIP's default pool (``route`` None) or of route ``route``."""
    base = f"{_host(vip)}:{vip.port}"
    return base if route is None else f"{base}_route{route}"


def server_name(backend: Backend) -> str:
    """``198.18.0.11:8080``; IPv6 ``2001:db8::11.8080`` (HAProxy names take no brackets)."""
    if backend.address.version == 6:
        return f"{backend.address}.{backend.port}"
    return f"{backend.address}:{backend.port}"


@dataclass(frozen=True)
class Pool:
    """One HAProxy backend: the VIP's default pool or a route's."""

    name: str                       # the HAProxy backend's name
    key: str                        # its fastlb key: vip[0].backend, vip[0].route[1]
    algorithm: str
    backends: tuple[Backend, ...]
    what: str

    def backend_key(self, index: int) -> str:
        return f"{self.key}[{index}]" if self.key.endswith(".backend") else f"{self.key}.backend[{index}]"

    @property
    def algorithm_key(self) -> str:
        return f"{self.key}.algorithm" if not self.key.endswith(".backend") else f"{self.key[:-8]}.algorithm"


def pools(vip: Vip, key: str = "vip") -> list[Pool]:
    """The VIP's pools: the default one, then one per route in order. ``key`` is the VIP's fastlb key."""
    out = [Pool(pool_name(vip), f"{key}.backend", vip.algorithm, vip.backends, "the default pool")]
    for i, route in enumerate(vip.routes):
        out.append(Pool(pool_name(vip, i), f"{key}.route[{i}]", route.algorithm, route.backends, _describe(route)))
    return out


def render(config: Config, paths: Paths) -> Rendered:
    out = _Out()
    out.add("# Written by fastlb from " + (config.path or "its config") + ": do not edit, it is rewritten.")
    out.add("global")
    out.add("    master-worker")
    out.add(f"    stats socket {paths.admin_socket} mode 600 level admin expose-fd listeners")
    out.add(f"    pidfile {paths.pid_file}")
    out.add(f"    server-state-file {paths.state_file}")
    out.add(f"    hard-stop-after {HARD_STOP_AFTER}")
    out.add(f"    maxconn {MAXCONN}")
    out.add(f"    log {paths.log_socket} len 1024 format raw local0 info")
    out.add("")
    out.add("defaults")
    out.add("    mode http")
    out.add("    log global")
    out.add(f'    log-format "{LOG_FORMAT}"')
    out.add("    option dontlognull")
    # a reload closes an idle keep-alive connection only after answering its next request, with
    # "Connection: close": clients that do not retry (wrk, many libraries) see no error
    out.add("    option idle-close-on-response")
    out.add("    load-server-state-from-file global")
    out.add("    timeout connect 2s")
    out.add("    timeout client 30s")
    out.add("    timeout server 30s")
    out.add("    timeout http-keep-alive 10s")
    out.add("    timeout http-request 10s")
    out.add("    retries 2")
    out.add("    option redispatch 1")
    for index, vip in enumerate(config.vips):
        if vip.is_l7:
            _vip(out, vip, f"vip[{index}]")
    out.add("")
    return Rendered("\n".join(out.lines), out.fields)


class _Out:
    def __init__(self):
        self.lines: list[str] = []
        self.fields: dict[int, str] = {}

    def add(self, line: str, key: str | None = None) -> None:
        self.lines.append(line)
        if key is not None:
            self.fields[len(self.lines)] = key


def _host(vip: Vip) -> str:
    return str(vip.address)


def _at(line: int) -> str:
    """Where in the file a section came from; nothing for a Config changed live (it has no lines)."""
    return f" (line {line})" if line else ""


def _describe(route: Route) -> str:
    parts = []
    if route.host is not None:
        parts.append(f"host {route.host}")
    if route.path_prefix is not None:
        parts.append(f"path {route.path_prefix}*")
    return ", ".join(parts)


def _bind_address(vip: Vip) -> str:
    return f"[{vip.address}]:{vip.port}" if vip.address.version == 6 else f"{vip.address}:{vip.port}"


def _vip(out: _Out, vip: Vip, key: str) -> None:
    out.add("")
    out.add(f"# {key}: {vip.name}{_at(vip.line)}, algorithm {vip.algorithm}", key)
    out.add(f"frontend {frontend_name(vip)}", key)
    bind = f"    bind {_bind_address(vip)}"
    if vip.protocol == "https":
        out.add(f"{bind} ssl crt {vip.certificate} alpn h2,http/1.1", f"{key}.certificate")
    else:
        out.add(bind, f"{key}.address")
    if vip.client_ip == "xff":
        out.add("    option forwardfor", f"{key}.client_ip")
    for i, route in enumerate(vip.routes):
        rkey = f"{key}.route[{i}]"
        out.add(f"    # {rkey}{_at(route.line)}: {_describe(route)}", rkey)
        conditions = []
        if route.host is not None:
            if route.host.startswith("*."):
                out.add(f"    acl route{i}_host req.hdr(host),host_only,lower -m end {route.host[1:]}", f"{rkey}.host")
            else:
                out.add(f"    acl route{i}_host req.hdr(host),host_only,lower -m str {route.host}", f"{rkey}.host")
            conditions.append(f"route{i}_host")
        if route.path_prefix is not None:
            out.add(f"    acl route{i}_path path -m beg {route.path_prefix}", f"{rkey}.path_prefix")
            conditions.append(f"route{i}_path")
        out.add(f"    use_backend {pool_name(vip, i)} if {' '.join(conditions)}", rkey)
    out.add(f"    default_backend {pool_name(vip)}", f"{key}.backend")
    for pool in pools(vip, key):
        _pool(out, vip, pool, key)


def _pool(out: _Out, vip: Vip, pool: Pool, vkey: str) -> None:
    out.add("")
    out.add(f"# {pool.key}: {pool.what}, algorithm {pool.algorithm}", pool.key)
    out.add(f"backend {pool.name}", pool.key)
    if pool.algorithm == "maglev":
        hash_ = vip.hash
        balance = "source" if hash_ == "src" else "uri" if hash_ == "uri" else f"hdr({hash_[len('header:'):]})"
        out.add(f"    balance {balance}", f"{vkey}.hash")
        out.add("    hash-type consistent", pool.algorithm_key)
    else:
        out.add(f"    balance {BALANCE[pool.algorithm]}", pool.algorithm_key)
    if vip.persistence:
        _stick(out, vip, vkey)
    hkey = f"{vkey}.health"
    check = vip.health
    if check.kind == "http":
        out.add("    option httpchk", hkey)
        out.add(f"    http-check send meth GET uri {check.path} ver HTTP/1.1 hdr Host fastlb-check", f"{hkey}.path")
        out.add(f"    http-check expect status {check.expect}", f"{hkey}.expect")
    if check.kind != "none":
        out.add(f"    timeout check {_ms(check.timeout)}", f"{hkey}.timeout")
    for i, b in enumerate(pool.backends):
        out.add(f"    server {server_name(b)} {server_address(b)}{server_options(vip, b, pool.algorithm)}",
                pool.backend_key(i))


def _stick(out: _Out, vip: Vip, vkey: str) -> None:
    """``persistence``: a stick table of client addresses (masked to ``persistence_prefix``) -> server,
    each entry kept ``persistence`` seconds after its client's last request. Servers are named in it
    (``srvkey name``), so an entry still finds its server when servers are added or removed."""
    kind = "ip" if vip.address.version == 4 else "ipv6"
    out.add(f"    stick-table type {kind} size {STICK_TABLE_SIZE} expire {vip.persistence}s srvkey name",
            f"{vkey}.persistence")
    key = "src"
    if vip.persistence_prefix < vip.address.max_prefixlen:
        key += f",ipmask({vip.persistence_prefix})" if vip.address.version == 4 else \
            f",ipmask(32,{vip.persistence_prefix})"
    out.add(f"    stick on {key}", f"{vkey}.persistence_prefix")


def server_address(b: Backend) -> str:
    return f"[{b.address}]:{b.port}" if b.address.version == 6 else f"{b.address}:{b.port}"


def server_options(vip: Vip, b: Backend, algorithm: str) -> str:
    opts = [f"weight {server_weight(algorithm, b.weight)}"]
    check: HealthCheck = vip.check_of(b)
    if check.kind != "none":
        opts.append(f"check inter {_ms(check.interval)} rise {check.rise} fall {check.fall}")
        if check.port:
            opts.append(f"port {check.port}")
    if vip.slow_start:
        opts.append(f"slowstart {vip.slow_start}s")
    if vip.client_ip == "proxy":
        opts.append("send-proxy-v2")
    return " " + " ".join(opts)


def server_weight(algorithm: str, weight: int) -> int:
    """The HAProxy weight a configured weight starts at: rr and lrt ignore it (0 still means drained)."""
    if weight == 0:
        return 0
    if algorithm == "rr":
        return 1
    if algorithm == "lrt":
        return LRT_START_WEIGHT
    return weight


def _ms(seconds: float) -> str:
    return f"{max(1, round(seconds * 1000))}ms"
