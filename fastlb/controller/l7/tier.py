"""The L7 tier of one attachment: what the controller calls for http/https VIPs.

- ``start(config)``: render and check haproxy.cfg, put the VIPs on ``lo``, start
  (or adopt) HAProxy, read its log stream, steer lrt pools.
- ``check(config)``: render and ``haproxy -c`` a candidate config, touching nothing.
- ``apply(config, reload)``: make HAProxy serve ``config``: through the runtime
  API when only backends changed (no reload), else a seamless reload.
- ``stats()``: per VIP and per backend, from ``show stat`` and the steering.
- ``serving_vips()``: the http VIPs with a server up, for BGP (``announce = "bgp"``):
  read every :data:`HEALTH_POLL` s; ``on_health`` is called when the set changes.
- ``stop(keep)``; ``remove(ifname)`` cleans up after a ``--keep`` run from ``fastlb detach``.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import shutil
import threading
import time
from pathlib import Path

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from fastlb.config import Config, Vip
from fastlb.controller.files import write_atomic
from fastlb.controller.l7 import haproxy, logstream, render
from fastlb.controller.l7.haproxy import HaproxyError
from fastlb.controller.l7.steering import Steering

STEER_INTERVAL = 0.25
HEALTH_POLL = 0.5          # how often the servers of bgp-announced http VIPs are read (show stat)
DRAIN_WAIT = 10.0          # a removed server's requests get this long to finish
LO_FILE = "lo-addresses"   # the VIP addresses this tier put on lo (so detach removes only those)


def l7_vips(config: Config) -> list[Vip]:
    return [v for v in config.vips if v.is_l7]


def _up(status: str | None) -> bool:
    """An HAProxy server status that takes requests: UP (also "UP 1/2", going down) or unchecked."""
    return bool(status) and (status.startswith("UP") or status == "no check")


def serving(config: Config, rows: list[dict[str, str]]) -> set[str]:
    """The http VIPs of ``config`` that have a server up in one of their pools, from ``show stat`` rows."""
    up_pools = {r.get("pxname") for r in rows if r.get("svname") not in ("FRONTEND", "BACKEND")
                and _up(r.get("status"))}
    return {v.name for v in l7_vips(config) if any(p.name in up_pools for p in render.pools(v))}


def _shape(config: Config) -> str:
    """The rendered config without servers: equal shapes differ only in backends and weights.

    Line numbers are left out too: a Config changed live and validated without
    text has none, and the same VIPs must still compare equal."""
    bare = dataclasses.replace(config, path=None, vips=tuple(
        dataclasses.replace(v, line=0, backends=(),
                            routes=tuple(dataclasses.replace(r, line=0, backends=()) for r in v.routes))
        for v in config.vips))
    return render.render(bare, render.Paths("/")).text


class Tier:
    def __init__(self, ifname: str, log, on_health=None):
        self.ifname = ifname
        self.log = log
        self.on_health = on_health         # called (from the steering thread) when serving_vips() changes
        self.down: set[str] = set()        # http VIPs whose servers were all down at the last poll
        self.dir = haproxy.run_dir(ifname)
        self.paths = render.Paths(str(self.dir))
        self.supervisor = haproxy.Supervisor(self.paths, log)
        self.runtime = self.supervisor.runtime
        self.steering = Steering()
        self.lock = threading.Lock()       # steering: the log thread, the steering thread, stats
        self.config: Config | None = None
        self.reader: logstream.Reader | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ---- start, check, apply ------------------------------------------------------

    def check(self, config: Config) -> render.Rendered:
        """Render ``config`` and have ``haproxy -c`` accept it (a ConfigError names the fastlb key)."""
        rendered = render.render(config, self.paths)
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        Path(self.paths.state_file).touch(exist_ok=True)
        candidate = f"{self.paths.config}.check"
        Path(candidate).write_text(rendered.text)
        try:
            haproxy.check(rendered, candidate, config.path)
        finally:
            Path(candidate).unlink(missing_ok=True)
        return rendered

    def start(self, config: Config) -> None:
        rendered = self.check(config)
        self._write(rendered)
        self._set_lo(config)
        self.reader = logstream.Reader(self.paths.log_socket, self._on_request)
        self.config = config
        self._steer_pools(config)
        self.supervisor.start()
        self._thread = threading.Thread(target=self._steer_loop, name="fastlb-l7-steer", daemon=True)
        self._thread.start()

    def apply(self, config: Config, reload: bool) -> str:
        """Serve ``config``; returns "unchanged", "runtime" or "reloaded"."""
        old = self.config
        rendered = self.check(config)
        if old is not None and rendered.text == render.render(old, self.paths).text and not reload:
            self.config = config
            return "unchanged"
        if old is not None and not reload and _shape(old) == _shape(config):
            self._runtime_changes(old, config)
            self._write(rendered)
            self.config = config
            self._steer_pools(config)
            return "runtime"
        self._write(rendered)
        self._set_lo(config, keep_old=True)
        self.supervisor.reload()
        self.config = config
        self._steer_pools(config)
        self._set_lo(config)
        return "reloaded"

    def _write(self, rendered: render.Rendered) -> None:
        write_atomic(self.paths.config, rendered.text)

    # ---- live backend changes through the runtime API ---------------------------------

    def _runtime_changes(self, old: Config, new: Config) -> None:
        old_pools = {p.name: (v, p) for v in l7_vips(old) for p in render.pools(v)}
        for vip in l7_vips(new):
            for pool in render.pools(vip):
                _, was = old_pools[pool.name]
                before = {render.server_name(b): b for b in was.backends}
                after = {render.server_name(b): b for b in pool.backends}
                for name in before.keys() - after.keys():
                    self._del_server(pool.name, name)
                for name, b in after.items():
                    if name not in before:
                        self._add_server(vip, pool, b)
                    elif b.weight != before[name].weight:
                        weight = render.server_weight(pool.algorithm, b.weight)
                        self.runtime.checked(f"set server {pool.name}/{name} weight {weight}")
                        self.log("l7_server_weight", pool=pool.name, server=name, weight=weight)

    def _add_server(self, vip: Vip, pool: render.Pool, b) -> None:
        name = f"{pool.name}/{render.server_name(b)}"
        self.runtime.checked(f"add server {name} {render.server_address(b)}"
                             f"{render.server_options(vip, b, pool.algorithm)}")
        if vip.check_of(b).kind != "none":
            self.runtime.checked(f"enable health {name}")
        self.runtime.checked(f"enable server {name}")
        self.log("l7_server_added", server=name)

    def _del_server(self, pool: str, server: str) -> None:
        """Drain (no new requests), let the held ones finish, then delete."""
        name = f"{pool}/{server}"
        self.runtime.checked(f"set server {name} state drain")
        deadline = time.monotonic() + DRAIN_WAIT
        while time.monotonic() < deadline and self._current(pool, server) > 0:
            time.sleep(0.05)
        self.runtime.checked(f"set server {name} state maint")
        self.runtime("shutdown sessions server " + name)
        for _ in range(40):
            answer = self.runtime(f"del server {name}").strip()
            if answer == "Server deleted.":
                self.log("l7_server_removed", server=name)
                return
            time.sleep(0.05)
        raise HaproxyError(f"HAProxy would not delete server {name}: {answer}", fix="see docs/L7.md")

    def _current(self, pool: str, server: str) -> int:
        for row in self.runtime.stat():
            if row.get("pxname") == pool and row.get("svname") == server:
                return int(row.get("scur") or 0)
        return 0

    # ---- lrt ----------------------------------------------------------------------------

    def _steer_pools(self, config: Config) -> None:
        pools = {p.name: [render.server_name(b) for b in p.backends if b.weight > 0]
                 for v in l7_vips(config) for p in render.pools(v) if p.algorithm == "lrt"}
        with self.lock:
            self.steering.set_pools(pools)

    def _on_request(self, request: logstream.Request, now: float) -> None:
        with self.lock:
            self.steering.observe(request.backend, request.server, request.tr_ms, now)

    def _steer_loop(self) -> None:
        next_poll = 0.0
        while not self._stop.wait(STEER_INTERVAL):
            if time.monotonic() >= next_poll:
                next_poll = time.monotonic() + HEALTH_POLL
                self._poll_health()
            with self.lock:
                changes = self.steering.changes(time.monotonic())
            for (pool, server), weight in changes.items():
                try:
                    self.runtime.checked(f"set server {pool}/{server} weight {weight}")
                except HaproxyError:
                    continue      # reloading or restarting: the next round writes it
                with self.lock:
                    self.steering.written(pool, server, weight)

    # ---- health, for BGP ------------------------------------------------------------------

    def serving_vips(self) -> set[str]:
        """The http VIPs to announce: all but those whose servers were all down at the last poll."""
        config = self.config
        return {v.name for v in l7_vips(config)} - self.down if config else set()

    def _poll_health(self) -> None:
        config = self.config
        if config is None or not any(v.announce == "bgp" for v in l7_vips(config)):
            return
        try:
            rows = self.runtime.stat()
        except HaproxyError:
            return             # reloading or restarting: the next poll reads it
        down = {v.name for v in l7_vips(config)} - serving(config, rows)
        if down != self.down:
            self.log("l7_serving_changed", down=",".join(sorted(down)) or "none",
                     up=",".join(sorted({v.name for v in l7_vips(config)} - down)) or "none")
            self.down = down
            if self.on_health is not None:
                self.on_health()

    # ---- VIPs on lo ----------------------------------------------------------------------

    def _set_lo(self, config: Config, keep_old: bool = False) -> None:
        """Put the http VIPs' addresses on lo; drop the ones this tier added that are gone (unless keep_old)."""
        wanted = {str(v.address) for v in l7_vips(config)}
        ours = _read_lo(self.dir)
        with IPRoute() as ipr:
            lo = ipr.link_lookup(ifname="lo")[0]
            for addr in sorted(wanted - ours):
                ip = ipaddress.ip_address(addr)
                try:
                    ipr.addr("add", index=lo, address=addr, prefixlen=ip.max_prefixlen)
                except NetlinkError as exc:
                    if exc.code != 17:   # EEXIST: someone else's address; not ours to remove
                        raise
                    continue
                ours.add(addr)
                _write_lo(self.dir, ours)
            if not keep_old:
                for addr in sorted(ours - wanted):
                    _del_lo(ipr, lo, addr)
                    ours.discard(addr)
                    _write_lo(self.dir, ours)

    # ---- stats ---------------------------------------------------------------------------

    def stats(self) -> dict:
        """Per http VIP: requests, responses by class, response time; per backend: health, weight, latency."""
        config = self.config
        try:
            rows = self.runtime.stat()
        except HaproxyError as exc:
            return {"error": str(exc), "haproxy": self._process()}
        by = {(r.get("pxname"), r.get("svname")): r for r in rows}
        now = time.monotonic()
        vips = []
        for vip in l7_vips(config) if config else []:
            fe = by.get((render.frontend_name(vip), "FRONTEND"), {})
            out = {"vip": vip.name, "algorithm": vip.algorithm, "requests": _int(fe.get("req_tot")),
                   "responses": {c: _int(fe.get(f"hrsp_{c}")) for c in ("2xx", "3xx", "4xx", "5xx")},
                   "pools": []}
            for pool in render.pools(vip):
                be = by.get((pool.name, "BACKEND"), {})
                with self.lock:
                    steer = self.steering.view(pool.name, now) if pool.algorithm == "lrt" else {}
                servers = []
                for name, row in ((k[1], r) for k, r in by.items() if k[0] == pool.name
                                  and k[1] not in ("BACKEND", "FRONTEND")):
                    servers.append({"backend": name, "status": row.get("status"), "weight": _int(row.get("weight")),
                                    "active": _int(row.get("scur")), "requests": _int(row.get("stot")),
                                    "response_ms": _int(row.get("rtime")),
                                    **steer.get(name, {})})
                out["pools"].append({"pool": pool.name, "route": pool.what, "algorithm": pool.algorithm,
                                     "requests": _int(be.get("stot")), "response_ms": _int(be.get("rtime")),
                                     "backends": servers})
            vips.append(out)
        return {"haproxy": self._process(), "vips": vips}

    def _process(self) -> dict:
        s = self.supervisor
        return {"master_pid": s.pid, "worker_pid": s.worker_pid(), "restarts": s.restarts, "reloads": s.reloads,
                "adopted": s.adopted, "log_lines": self.reader.lines if self.reader else 0}

    # ---- stop ------------------------------------------------------------------------------

    def stop(self, keep: bool) -> None:
        self._stop.set()
        if self.reader is not None:
            self.reader.close()
        self.supervisor.stop(keep)
        if not keep:
            remove(self.ifname)


def _int(value) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return 0


def _read_lo(folder: Path) -> set[str]:
    try:
        return set((folder / LO_FILE).read_text().split())
    except OSError:
        return set()


def _write_lo(folder: Path, addrs: set[str]) -> None:
    (folder / LO_FILE).write_text("".join(f"{a}\n" for a in sorted(addrs)))


def _del_lo(ipr, lo: int, addr: str) -> None:
    ip = ipaddress.ip_address(addr)
    try:
        ipr.addr("del", index=lo, address=addr, prefixlen=ip.max_prefixlen)
    except NetlinkError as exc:
        if exc.code not in (99, 19):   # EADDRNOTAVAIL, ENODEV: gone already
            raise


def remove(ifname: str) -> bool:
    """Stop this attachment's HAProxy (also one a --keep run left), take its VIPs off lo, remove its files."""
    folder = haproxy.run_dir(ifname)
    if not folder.exists():
        return False
    paths = render.Paths(str(folder))
    pid = haproxy.master_pid(paths)
    if pid is not None:
        haproxy.stop_master(pid)
    addrs = _read_lo(folder)
    if addrs:
        with IPRoute() as ipr:
            lo = ipr.link_lookup(ifname="lo")[0]
            for addr in addrs:
                _del_lo(ipr, lo, addr)
    shutil.rmtree(folder, ignore_errors=True)
    try:
        folder.parent.rmdir()      # the namespace's folder, when this was its last attachment
    except OSError:
        pass
    return True
