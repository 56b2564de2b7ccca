"""Which route and pool an HTTP request gets: the model of the frontend fastlb.controller.l7.render writes.

HAProxy tries the routes in order; a route matches when each key it has
matches: ``host`` against the Host header without its port, lower-cased
(exact, or ``*.domain`` for any name ending in ``.domain``, not ``domain``
itself), ``path_prefix`` against the start of the path (the query string
excluded). No match: the VIP's default pool. Pure; ``fastlb explain`` prints it.
"""

from __future__ import annotations

from dataclasses import dataclass

from fastlb.config import Vip
from fastlb.controller.l7 import render


@dataclass(frozen=True)
class Match:
    route: int | None            # index in vip.routes; None: the default pool
    pool: render.Pool
    why: str

    def lines(self, vip: Vip) -> list[str]:
        where = "the default pool" if self.route is None else f"route[{self.route}] ({self.pool.what})"
        out = [f"request -> VIP {vip.name}: {where} ({self.why})",
               f"pool: HAProxy backend {self.pool.name}, algorithm {self.pool.algorithm}, backends "
               + ", ".join(f"{render.server_name(b)} (weight {b.weight})" for b in self.pool.backends)]
        if self.pool.algorithm == "maglev":
            out.append(f"backend: chosen by HAProxy's consistent hash of {vip.hash} (hash-type consistent); "
                       "fastlb does not model HAProxy's hash, so it cannot name the backend (docs/L7.md)")
        elif self.pool.algorithm in ("lc", "lrt"):
            out.append("backend: the least loaded at the time of the request "
                       + ("(active requests / weight)" if self.pool.algorithm == "lc"
                          else "(active requests / weight, with weights steered by response time: see fastlb stats)"))
        else:
            out.append("backend: the next in HAProxy's weighted round robin")
        return out


def host_only(host: str) -> str:
    """The Host header as HAProxy's ``host_only,lower`` gives it: without the port, lower case."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[:host.find("]") + 1] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def match(vip: Vip, host: str | None, path: str) -> Match:
    name = host_only(host) if host else ""
    path = path.split("?", 1)[0]
    pools = render.pools(vip)
    for i, route in enumerate(vip.routes):
        if route.host is not None:
            ok = name.endswith(route.host[1:]) if route.host.startswith("*.") else name == route.host
            if not ok:
                continue
        if route.path_prefix is not None and not path.startswith(route.path_prefix):
            continue
        return Match(i, pools[i + 1], "the first route that matches")
    return Match(None, pools[0], "no route matches" if vip.routes else "the VIP has no routes")
