"""Live changes to a config, as pure functions: Config in, (Config, message) out.

These are the control socket's ``backend.*`` and ``vip.*`` commands
(``fastlb backend add ...``). Each finds its VIP and backend, refuses what
cannot be done with a FastlbError that says what to type instead, and returns
the changed config with the sentence the CLI prints. None validates the
result as a whole, touches a map or a file: the controller validates
(fastlb.config.validate) and applies.

``ifname`` only names the interface in messages. ``route`` (the backend
commands' ``--route N``) picks route N's pool of an http VIP instead of the
VIP's default pool.
"""

from __future__ import annotations

import dataclasses
import ipaddress

from fastlb.config.model import Backend, Config, Vip, parse_vip_spec
from fastlb.errors import FastlbError

Edit = tuple[Config, str]
VIP_FIX = "write the VIP as ADDR:PORT/PROTO, e.g. 198.19.0.100:80/tcp"


def parse_backend_spec(text: str) -> tuple[object, int | None]:
    """``198.18.0.11``, ``198.18.0.11:80`` or ``[2001:db8::11]:80`` -> (address, port or None)."""
    text = text.strip()
    try:
        return ipaddress.ip_address(text), None
    except ValueError:
        pass
    try:
        address, port, _ = parse_vip_spec(text)
    except ValueError as exc:
        raise FastlbError(f"bad backend {text!r}",
                          fix="write ADDR or ADDR:PORT, e.g. 198.18.0.11 or [2001:db8::11]:80") from exc
    return address, port


def check_weight(weight: object) -> int:
    if not isinstance(weight, int) or isinstance(weight, bool) or not 0 <= weight <= 65535:
        raise FastlbError(f"weight must be an integer from 0 to 65535, got {weight!r}",
                          fix="give a weight such as 1")
    return weight


def find_vip(config: Config, spec: object, ifname: str) -> Vip:
    try:
        vip = config.find_vip(str(spec))
    except ValueError as exc:
        raise FastlbError(str(exc), fix=VIP_FIX) from exc
    if vip is None:
        raise FastlbError(f"no VIP {spec} runs on {ifname}",
                          fix="use one of: " + ", ".join(v.name for v in config.vips))
    return vip


def find_backend(vip: Vip, spec: object, route: int | None = None) -> Backend:
    backends, what = pool_of(vip, route)
    address, port = parse_backend_spec(str(spec))
    found = [b for b in backends if b.address == address and (port is None or b.port == port)]
    if not found:
        raise FastlbError(f"{what} has no backend {spec}",
                          fix="use one of: " + ", ".join(b.key.decode() for b in backends))
    if len(found) > 1:
        raise FastlbError(f"{what} has several backends at {address}",
                          fix="add the port: " + ", ".join(b.key.decode() for b in found))
    return found[0]


def pool_of(vip: Vip, route: object = None) -> tuple[tuple[Backend, ...], str]:
    """The backends of the VIP's default pool (``route`` None) or of route ``route``, and how to name it."""
    if route is None:
        return vip.backends, f"VIP {vip.name}"
    if not isinstance(route, int) or isinstance(route, bool) or not 0 <= route < len(vip.routes):
        routes = (f"it has routes 0 to {len(vip.routes) - 1}" if vip.routes else
                  "it has no routes (only http/https VIPs have them)")
        raise FastlbError(f"VIP {vip.name} has no route {route}: {routes}",
                          fix="give --route the route's number in the file, from 0, or leave it out "
                              "for the VIP's default pool")
    return vip.routes[route].backends, f"VIP {vip.name} route[{route}]"


def _replace_vip(config: Config, vip: Vip, new_vip: Vip | None) -> Config:
    vips = [new_vip if v is vip else v for v in config.vips]
    return dataclasses.replace(config, vips=tuple(v for v in vips if v is not None))


def _with_pool(config: Config, vip: Vip, route: int | None, backends: tuple[Backend, ...]) -> Config:
    """``config`` with the pool ``pool_of(vip, route)`` names holding ``backends``."""
    if route is None:
        new_vip = dataclasses.replace(vip, backends=backends)
    else:
        routes = list(vip.routes)
        routes[route] = dataclasses.replace(routes[route], backends=backends)
        new_vip = dataclasses.replace(vip, routes=tuple(routes))
    return _replace_vip(config, vip, new_vip)


def backend_add(config: Config, vip_spec: object, backend_spec: object, weight: object = 1, *,
                ifname: str, route: int | None = None) -> Edit:
    vip = find_vip(config, vip_spec, ifname)
    backends, what = pool_of(vip, route)
    address, port = parse_backend_spec(str(backend_spec))
    port = vip.port if port is None else port
    weight = check_weight(weight)
    if any(b.address == address and b.port == port for b in backends):
        raise FastlbError(f"{what} has backend {address} already",
                          fix="change its weight with: fastlb backend weight")
    backend = Backend(address=address, weight=weight, port=port)
    return (_with_pool(config, vip, route, backends + (backend,)),
            f"added backend {backend.key.decode()} (weight {weight}) to {what.removeprefix('VIP ')}")


def backend_remove(config: Config, vip_spec: object, backend_spec: object, *, ifname: str,
                   route: int | None = None) -> Edit:
    vip = find_vip(config, vip_spec, ifname)
    backends, what = pool_of(vip, route)
    backend = find_backend(vip, backend_spec, route)
    rest = tuple(b for b in backends if b is not backend)
    if not rest:
        fix = (f"remove the VIP instead: fastlb vip remove {vip.name}" if route is None else
               "add another backend to the route first, or remove the route from the file and reload")
        raise FastlbError(f"{backend.key.decode()} is the last backend of {what.removeprefix('VIP ')}", fix=fix)
    return (_with_pool(config, vip, route, rest),
            f"removed backend {backend.key.decode()} from {what.removeprefix('VIP ')}; its flows move to "
            "live backends")


def _set_weight(config: Config, vip_spec: object, backend_spec: object, weight: int, verb: str,
                ifname: str, route: int | None) -> Edit:
    vip = find_vip(config, vip_spec, ifname)
    backends, what = pool_of(vip, route)
    backend = find_backend(vip, backend_spec, route)
    changed = tuple(dataclasses.replace(b, weight=weight) if b is backend else b for b in backends)
    return (_with_pool(config, vip, route, changed),
            f"{verb} backend {backend.key.decode()} of {what.removeprefix('VIP ')}")


def backend_weight(config: Config, vip_spec: object, backend_spec: object, weight: object, *,
                   ifname: str, route: int | None = None) -> Edit:
    weight = check_weight(weight)
    return _set_weight(config, vip_spec, backend_spec, weight, f"weight {weight} for", ifname, route)


def backend_drain(config: Config, vip_spec: object, backend_spec: object, *, ifname: str,
                  route: int | None = None) -> Edit:
    return _set_weight(config, vip_spec, backend_spec, 0,
                       "drained (weight 0: no new flows, established ones go on)", ifname, route)


def vip_add(config: Config, vip_spec: object, backend_specs, algorithm: str | None = None, *,
            ifname: str) -> Edit:
    try:
        address, port, protocol = parse_vip_spec(str(vip_spec))
    except ValueError as exc:
        raise FastlbError(str(exc), fix=VIP_FIX) from exc
    if config.find_vip(str(vip_spec)) is not None:
        raise FastlbError(f"VIP {vip_spec} runs already", fix="change its backends with: fastlb backend")
    if not backend_specs:
        raise FastlbError("a VIP needs at least one backend", fix="add --backend ADDR (repeatable)")
    backends = []
    for spec in backend_specs:
        b_addr, b_port = parse_backend_spec(str(spec))
        backends.append(Backend(address=b_addr, weight=1, port=port if b_port is None else b_port))
    vip = Vip(address=address, port=port, protocol=protocol, algorithm=algorithm or "maglev",
              forwarding="dsr", hash="5tuple", backends=tuple(backends))
    return (dataclasses.replace(config, vips=config.vips + (vip,)),
            f"added VIP {vip.name} with {len(backends)} backend(s)")


def vip_remove(config: Config, vip_spec: object, *, ifname: str) -> Edit:
    vip = find_vip(config, vip_spec, ifname)
    if len(config.vips) == 1:
        raise FastlbError(f"{vip.name} is the last VIP", fix=f"detach instead: fastlb detach {ifname}")
    return _replace_vip(config, vip, None), f"removed VIP {vip.name}"


# The control socket's commands, each with the request's fields it reads.
COMMANDS = {
    "backend.add": lambda c, r, i: backend_add(c, r.get("vip"), r.get("backend"), r.get("weight", 1), ifname=i,
                                               route=r.get("route")),
    "backend.remove": lambda c, r, i: backend_remove(c, r.get("vip"), r.get("backend"), ifname=i,
                                                     route=r.get("route")),
    "backend.weight": lambda c, r, i: backend_weight(c, r.get("vip"), r.get("backend"), r.get("weight"), ifname=i,
                                                     route=r.get("route")),
    "backend.drain": lambda c, r, i: backend_drain(c, r.get("vip"), r.get("backend"), ifname=i,
                                                   route=r.get("route")),
    "vip.add": lambda c, r, i: vip_add(c, r.get("vip"), r.get("backends") or [], r.get("algorithm"), ifname=i),
    "vip.remove": lambda c, r, i: vip_remove(c, r.get("vip"), ifname=i),
}
