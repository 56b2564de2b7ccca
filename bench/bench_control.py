"""Control plane: time to the first forwarded request, health failure to map update, slots per change.

Three measurements, each next to a peer or a floor from the same run:

1. *Start to first forwarded request*: a probe in the client namespace
   (bench/probe.py) tries an HTTP GET every millisecond; the clock starts
   when ``fastlb attach`` (or HAProxy, or nginx stream) is started in the LB
   namespace and stops at the probe's first answer.
2. *Health failure to the maps*: fastlb and HAProxy run side by side in the
   LB namespace with the same HTTP check (``GET /health``, interval 0.2 s,
   fall 2, rise 2). A backend's server is stopped; a loop polls fastlb's
   backend entry (its VALID flag, the first thing the controller writes)
   and HAProxy's stats socket every millisecond. The floor is the check
   settings' own bound (fall × interval).
3. *Slots written per single-backend change* (a failure, a removal, a weight
   change), from ``fastlb.dataplane.tables.apply``'s counts on a loaded program
   (fastlb.testing.testbed), next to M/N (one backend's share of the ring), the
   selection core's minimal delta and M (a full rewrite).

Maglev build times, Cython against the pure-Python twin, are in the
"Selection core" section (bench/bench_core.py).

Run alone: sudo .venv/bin/python bench/bench_control.py [--quick]
"""

from __future__ import annotations

import ctypes
import json
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import replace
from datetime import datetime
from pathlib import Path

HERE = Path(__file__).resolve().parent
if __package__ in (None, "") and __name__ == "__main__":
    sys.path.insert(0, str(HERE.parent))
    sys.path.insert(0, str(HERE))

import cputime  # noqa: E402
import peers  # noqa: E402

from fastlb import core  # noqa: E402
from fastlb.dataplane import tables  # noqa: E402
from fastlb.kernel import cdefs, structs  # noqa: E402
from fastlb.kernel.layout import Sizes  # noqa: E402
from fastlb.kernel.maps import PinnedMaps  # noqa: E402
from fastlb.lab import lb_process  # noqa: E402
from fastlb.lab.netns import LabError  # noqa: E402
from fastlb.lab.topology import Lab  # noqa: E402
from fastlb.testing.testbed import LB_MAC, Testbed, fake_mac  # noqa: E402

INTERVAL, FALL, RISE = 0.2, 2, 2
HEALTH = {"kind": "http", "port": 80, "path": "/health", "interval": INTERVAL, "timeout": INTERVAL,
          "rise": RISE, "fall": FALL}
HAPROXY_CHECK = f"inter {int(INTERVAL * 1000)} fall {FALL} rise {RISE}"
RING = 65537
POLL = 0.001
WAIT = 10.0


# ---- 1. start to first forwarded request ------------------------------------------


def first_request(lab: Lab, host: str, port: int, start) -> tuple[float, object]:
    """Seconds from ``start()`` (which starts a balancer and returns it) to the probe's first answer."""
    probe = lab.exec("client", [sys.executable, str(HERE / "probe.py"), host, port, 90],
                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        if probe.stdout.readline().strip() != "ready":
            raise LabError(f"the probe did not start: {probe.stdout.read()[-300:]}")
        t0 = time.monotonic()
        started = start()
        out = json.loads(probe.stdout.readline() or '{"error": "the probe said nothing"}')
    finally:
        if probe.poll() is None:
            probe.kill()
        probe.wait(5)
    if "error" in out:
        raise LabError(f"first request to {host}:{port}: {out['error']}")
    return out["answered_at"] - t0, started


# ---- 2. health failure to the maps --------------------------------------------------


def backend_slot(maps: PinnedMaps, address: str) -> int:
    for be_id in range(maps.info("backends").max_entries):
        entry = maps.lookup("backends", ctypes.c_uint32(be_id))
        if entry is not None and entry.family and str(structs.unpack_addr(entry.addr, entry.family)) == address:
            return be_id
    raise LabError(f"fastlb's maps hold no backend {address}")


def valid(maps: PinnedMaps, be_id: int) -> bool:
    entry = maps.lookup("backends", ctypes.c_uint32(be_id))
    return bool(entry.flags & cdefs.FL_BE_F_VALID)


def watch(maps: PinnedMaps, be_id: int, folder: Path, backend: str, want_up: bool) -> dict[str, float]:
    """Poll both balancers until each shows ``backend`` in the wanted state; monotonic times."""
    seen: dict[str, float] = {}
    deadline = time.monotonic() + WAIT
    while len(seen) < 2 and time.monotonic() < deadline:
        now = time.monotonic()
        if "fastlb" not in seen and valid(maps, be_id) == want_up:
            seen["fastlb"] = now
        if "haproxy" not in seen and peers.haproxy_servers(folder).get(backend, "").startswith(
                "UP" if want_up else "DOWN"):
            seen["haproxy"] = now
        time.sleep(POLL)
    if len(seen) < 2:
        raise LabError(f"{backend} was not seen {'up' if want_up else 'down'} within {WAIT:g} s by "
                       f"{', '.join({'fastlb', 'haproxy'} - set(seen))}")
    return seen


def _log_time(line: str) -> float:
    ts = line.split("ts=", 1)[1].split()[0]
    return datetime.fromisoformat(ts.replace("Z", "+00:00")).timestamp()


def rebuilt_at(bal: lb_process.Balancer, address: str, after_wall: float) -> float:
    """Wall-clock time of the table_rebuilt that follows the controller's backend_down for
    ``address`` logged after ``after_wall`` (waits for it).

    The log's timestamps have millisecond resolution, so ``after_wall`` is
    rounded down to the millisecond before the comparison.
    """
    floor = int(after_wall * 1000) / 1000
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        down = False
        for line in bal.output().splitlines():
            if not down:
                down = ("event=backend_down " in line and f"backend={address}:" in line
                        and _log_time(line) >= floor)
            elif "event=table_rebuilt" in line:
                return _log_time(line)
        time.sleep(0.01)
    raise LabError(f"fastlb logged no table_rebuilt after {address} went down within {WAIT:g} s")


def failures(lab: Lab, bal: lb_process.Balancer, folder: Path, trials: int) -> list[dict[str, float]]:
    backend = "b1"
    out = []
    with PinnedMaps(cputime.attachment_dir(lab.ns("lb"))) as maps:
        be_id = backend_slot(maps, lab.addr(backend))
        watch(maps, be_id, folder, backend, want_up=True)
        for _ in range(trials):
            lab.stop_server(backend)
            failed, failed_wall = time.monotonic(), time.time()
            seen = watch(maps, be_id, folder, backend, want_up=False)
            rebuilt = rebuilt_at(bal, lab.addr(backend), failed_wall)
            lab.start_server(backend)
            back = time.monotonic()
            seen_up = watch(maps, be_id, folder, backend, want_up=True)
            out.append({"fastlb": seen["fastlb"] - failed, "haproxy": seen["haproxy"] - failed,
                        "rebuilt": rebuilt - failed_wall,
                        "fastlb_up": seen_up["fastlb"] - back, "haproxy_up": seen_up["haproxy"] - back})
    return out


def lab_part(quick: bool) -> tuple[dict[str, list[float]], list[dict[str, float]], dict[str, str]]:
    starts: dict[str, list[float]] = {"fastlb": [], "haproxy": [], "nginx": []}
    trials_start, trials_fail = (1, 1) if quick else (2, 5)
    with Lab(backends=3, ipv6=False) as lab, tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        config = folder / "fastlb.toml"
        lab.write_config(config, vips=[lab.vip4], services=(("tcp", 80),), health=HEALTH)
        for _ in range(trials_start):
            for name, port, make in (("haproxy", peers.HAPROXY_PORT, lambda: peers.haproxy(lab, folder)),
                                     ("nginx", peers.NGINX_PORT, lambda: peers.nginx_stream(lab, folder))):
                took, peer = first_request(lab, lab.addr("lb"), port, make)
                peer.stop()
                starts[name].append(took)
        bal = None
        try:
            for _ in range(trials_start):
                if bal is not None:
                    lb_process.stop(lab, bal)
                    bal = None
                took, bal = first_request(lab, lab.vip4, 80,
                                          lambda: lb_process.start(lab, config, folder / "attach.log"))
                starts["fastlb"].append(took)
            with peers.haproxy(lab, folder, check=HAPROXY_CHECK):
                fails = failures(lab, bal, folder, trials_fail)
        finally:
            if bal is not None:
                lb_process.stop(lab, bal)
        configs = {"fastlb": config.read_text(), "haproxy": peers.haproxy_config(lab, folder, HAPROXY_CHECK)}
    return starts, fails, configs


# ---- 3. slots per single-backend change ---------------------------------------------


def vip_text(n: int) -> str:
    text = '[[vip]]\naddress = "198.19.0.100"\nport = 80\nprotocol = "tcp"\n'
    return text + "".join(f'[[vip.backend]]\naddress = "198.18.{i // 250}.{i % 250 + 1}"\n' for i in range(n))


def _ids(config) -> list[int]:
    """The VIP's ring as indexes into the full backend list (-1: empty)."""
    vip = config.vips[0]
    return list(tables.ring_positions(vip, Sizes(ring_size=RING)))


def slot_changes(quick: bool) -> list[tuple[int, str, int, int, int | None, float]]:
    """(N, change, slots written, the core's minimal delta, the backend's own slots or None, apply ms)."""
    sizes = Sizes(max_vips=2, max_backends=1024, ring_size=RING, conntrack_size=1024)
    rows = []
    with Testbed(sizes, name=f"bench-ctl-{uuid.uuid4().hex[:6]}") as bed:
        for n in ((3, 100) if quick else (3, 10, 100, 1000)):
            full = bed.apply(vip_text(n))
            vip = full.vips[0]
            first = vip.backends[0]
            macs = {str(b.address): fake_mac(b.address) for b in vip.backends}
            before = _ids(full)
            remaining = replace(full, vips=(replace(vip, backends=vip.backends[1:]),))
            heavier = replace(full, vips=(replace(vip, backends=(replace(first, weight=2),) + vip.backends[1:]),))
            down = frozenset({(vip.name, first.key)})
            changes = (("fails its health check", full, down,
                        _ids(replace(full, vips=(tables.without_down(vip, down),)))),
                       ("removed", remaining, frozenset(), [p + 1 if p >= 0 else p for p in _ids(remaining)]),
                       ("weight 1 → 2", heavier, frozenset(), _ids(heavier)))
            own = before.count(0)
            for name, config, down_set, after in changes:
                t = time.perf_counter()
                written = tables.apply(bed.maps, config, macs, sizes, lb_mac=LB_MAC, down=down_set)
                ms = (time.perf_counter() - t) * 1e3
                minimal = len(core.table_delta(before, after)[0])
                rows.append((n, name, written["ring_slots"], minimal, None if name.startswith("weight") else own,
                             ms))
                bed.apply(vip_text(n))          # back to all N, equal weights
    return rows


# ---- the section ------------------------------------------------------------------------


def run(quick: bool = False) -> str:
    starts, fails, configs = lab_part(quick)
    slots = slot_changes(quick)
    return render(starts, fails, slots, configs, quick)


def _med(values) -> float:
    return statistics.median(values)


def render(starts, fails, slots, configs, quick: bool) -> str:
    out = ["## Control plane", ""]
    if quick:
        out += ["*Quick run: one trial each, the figures mean little.*", ""]
    f = {name: _med(v) for name, v in starts.items()}
    out += ["### Start to the first forwarded request", "",
            "From starting the balancer in the LB namespace to the first answered `GET /` of a probe that "
            f"tries every millisecond from the client (median of {len(starts['fastlb'])}). fastlb's figure is "
            "`fastlb attach` with HTTP health checks: BCC compiles the program at every attach, then the "
            "controller probes every backend once before the first table.", "",
            "| balancer | seconds | × HAProxy |", "|---|---:|---:|"]
    for name, label in (("fastlb", "fastlb attach"), ("haproxy", "HAProxy"), ("nginx", "nginx stream")):
        out.append(f"| {label} | {f[name]:.3f} | {f[name] / f['haproxy']:.1f} |")
    budget = FALL * INTERVAL
    out += ["", "### Health failure to the maps", "",
            f"The same check on both balancers: HTTP `GET /health`, interval {INTERVAL:g} s, fall {FALL}, "
            f"rise {RISE}. The clock starts once b1's server has exited; the bound the settings allow is about "
            f"fall × interval = {budget:.1f} s (the failing probe starts up to one interval after the failure). "
            f"fastlb: its backend entry losing the VALID flag (the data plane stops picking b1 from then on), "
            f"and the controller's `table_rebuilt` log line (ring rewritten; wall clock, ms). "
            f"HAProxy: its stats socket saying DOWN. Median of {len(fails)}, polled every millisecond.", "",
            "| | fastlb: entry invalid | fastlb: table rebuilt | HAProxy: DOWN | fastlb ÷ HAProxy | "
            "fastlb: back in | HAProxy: back UP |", "|---|---:|---:|---:|---:|---:|---:|"]
    m = {k: _med([t[k] for t in fails]) for k in fails[0]}
    out.append(f"| seconds after the failure | {m['fastlb']:.3f} | {m['rebuilt']:.3f} | {m['haproxy']:.3f} | "
               f"{m['fastlb'] / m['haproxy']:.2f} | {m['fastlb_up']:.3f} | {m['haproxy_up']:.3f} |")
    out.append(f"| ÷ fall × interval ({budget:.1f} s) | {m['fastlb'] / budget:.2f} | {m['rebuilt'] / budget:.2f} | "
               f"{m['haproxy'] / budget:.2f} | | | |")
    out += ["", "\"Back in\" starts when the restarted server answers; both need rise successes in a row.", "",
            "### Ring slots written per single-backend change", "",
            f"One VIP, N backends of weight 1, M = {RING:,} ring slots. `fastlb.dataplane.tables.apply` writes only the "
            "slots that differ from what the map holds; *minimal* is the selection core's `table_delta` "
            "between the two Maglev tables, and M/N is one backend's share. A full rewrite would be M. "
            "The apply time includes reading the ring back to compare.", "",
            "| N | change | slots written | minimal (core delta) | its own slots | M/N | written ÷ (M/N) | "
            "÷ full rewrite | apply ms |", "|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for n, name, written, minimal, own, ms in slots:
        share = RING / n
        out.append(f"| {n:,} | {name} | {written:,} | {minimal:,} | {'-' if own is None else f'{own:,}'} | "
                   f"{share:,.0f} | {written / share:.2f} | {written / RING:.4f} | {ms:.1f} |")
    exact = all(written == minimal for _, _, written, minimal, _, _ in slots)
    out += ["", ("In every row fastlb wrote exactly the slots the two Maglev tables differ in. "
                 if exact else "In some rows fastlb wrote more slots than the two Maglev tables differ in. ")
            + "Slots beyond the backend's own are Maglev's: its tables move a few other slots when one "
            "backend leaves (see *Disruption* in the Selection core section). Maglev build times (Cython "
            "against the pure-Python twin) are in that section too.", "",
            "fastlb's config here:", "", "```", configs["fastlb"].rstrip(), "```", "",
            "HAProxy's:", "", "```", configs["haproxy"].rstrip(), "```", ""]
    return "\n".join(out)


if __name__ == "__main__":
    print(run(quick="--quick" in sys.argv[1:]))
