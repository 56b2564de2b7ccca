"""Health checks at scale: CPU of the controller checking 1,000 backends every second.

A namespace of this run holds 1,000 backend addresses (198.18.100.1 and up,
on its ``lo``), each with a TCP listener on port 80, served by one separate
process that accepts and closes. In the same namespace, a second process
runs the controller's real loop (``Controller.run``: the prober thread, the
event queue, each result's rise/fall verdict, the snapshot for stats) over a
config of one VIP with those 1,000 backends and a TCP check, without
attaching (no maps: results that change nothing write nothing anyway). Its
CPU is user + system time of that whole process (``os.times``, every
thread) over the measured window after a warm-up, in % of one core; the
pace is results per second over the same window.

Loopback hands each connect's whole handshake, the listener's half included,
to the connecting task, so the system time charged to the controller here
is more than a real network would charge it: the user time is the part that
is fastlb's own.
"""

from __future__ import annotations

import json
import os
import resource
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fastlb.lab import netns  # noqa: E402

PORT = 80


def address(i: int) -> str:
    return f"198.18.{100 + i // 250}.{1 + i % 250}"


def _raise_fd_limit() -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def serve(count: int) -> None:
    """The backends: ``count`` listeners; say "ready", then accept and close until stdin closes."""
    _raise_fd_limit()
    sel = selectors.DefaultSelector()
    for i in range(count):
        s = socket.create_server((address(i), PORT), backlog=64)
        s.setblocking(False)
        sel.register(s, selectors.EVENT_READ)
    sel.register(sys.stdin, selectors.EVENT_READ)
    print("ready", flush=True)
    while True:
        for key, _ in sel.select():
            if key.fileobj is sys.stdin:
                return
            try:
                conn, _ = key.fileobj.accept()
                conn.close()
            except BlockingIOError:
                pass


def config_text(count: int, kind: str, interval: float) -> str:
    check = 'command = "/bin/true"\n' if kind == "exec" else ""
    lines = ["[settings]", "sweep_interval = 3600", "max_backends = 1024", "",
             "[[vip]]", 'address = "198.19.0.100"', f"port = {PORT}", 'protocol = "tcp"', "",
             "[vip.health]", f'kind = "{kind}"', f"interval = {interval}", f"timeout = {min(0.5, interval)}", check]
    for i in range(count):
        lines += ["[[vip.backend]]", f'address = "{address(i)}"']
    return "\n".join(lines) + "\n"


def measure(count: int, kind: str, interval: float, warmup: float, window: float) -> dict:
    """In the namespace: the controller's loop over ``count`` backends; CPU and pace of the window."""
    from fastlb.controller import health
    from fastlb.config import parse_config
    from fastlb.controller.loop import Controller
    _raise_fd_limit()
    config = parse_config(config_text(count, kind, interval), "bench.toml")
    ctl = Controller("lo", "bench.toml", config, out=open(os.devnull, "w"))
    ctl._sync_views({key: health.UP for _, _, key in ctl._backends()})   # known up: no first table to build
    ctl.prober = health.Prober(ctl._on_results)
    ctl.prober.start()
    ctl.prober.set_targets(ctl._targets())
    out: dict = {}

    def counts() -> tuple[int, int]:
        views = list(ctl.views.values())
        return sum(v.passed for v in views), sum(v.failed for v in views)

    def watch() -> None:
        time.sleep(warmup)
        t0, c0, (p0, f0) = os.times(), time.monotonic(), counts()
        time.sleep(window)
        t1, c1, (p1, f1) = os.times(), time.monotonic(), counts()
        wall = c1 - c0
        out.update(cpu=100 * (t1.user - t0.user + t1.system - t0.system) / wall,
                   user=100 * (t1.user - t0.user) / wall, per_s=(p1 + f1 - p0 - f0) / wall, failed=f1 - f0)
        ctl.events.put(("signal", signal.SIGTERM))
    threading.Thread(target=watch, daemon=True).start()
    try:
        ctl.run()
    finally:
        ctl.prober.stop()
    return out


def row(ns: str, count: int, kind: str, interval: float, warmup: float, window: float) -> str:
    argv = [sys.executable, __file__, "measure", str(count), kind, str(interval), str(warmup), str(window)]
    res = subprocess.run(netns.exec_argv(ns, argv), capture_output=True, text=True, timeout=warmup + window + 60)
    if res.returncode:
        raise RuntimeError(f"bench_health measure failed: {res.stderr.strip()[-500:]}")
    m = json.loads(res.stdout)
    expected = count / interval / (1 - netns_jitter_mean())
    what = "`tcp`" if kind == "tcp" else "`exec` (`/bin/true`)"
    return (f"| {what} | {count:,} | {interval:g} s | {m['per_s']:.0f} ({m['per_s'] / expected:.2f}× the "
            f"expected {expected:.0f}) | {m['failed']} | **{m['cpu']:.1f} %** | {m['user']:.1f} % |")


def netns_jitter_mean() -> float:
    from fastlb.controller.health import JITTER
    return JITTER / 2     # intervals are shortened by up to JITTER, uniformly: by JITTER/2 on average


def run(quick: bool = False) -> str:
    warmup, window = (2.0, 3.0) if quick else (4.0, 30.0)
    ns = netns.ns_name(netns.new_runid(), "hc")
    netns.create(ns)
    server = None
    try:
        subprocess.run(["ip", "-n", ns, "link", "set", "lo", "up"], check=True)
        batch = "".join(f"address add {address(i)}/32 dev lo\n" for i in range(1000))
        subprocess.run(["ip", "-n", ns, "-batch", "-"], input=batch, text=True, check=True)
        server = subprocess.Popen(netns.exec_argv(ns, [sys.executable, __file__, "serve", "1000"]),
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert server.stdout.readline().strip() == "ready"
        rows = [row(ns, 100, "tcp", 1.0, warmup, window), row(ns, 1000, "tcp", 1.0, warmup, window),
                row(ns, 100, "exec", 1.0, warmup, window)]
    finally:
        if server is not None:
            server.stdin.close()
            server.wait(10)
        netns.destroy(ns)
    return "\n".join([
        "## Health checks at scale",
        "",
        "The controller's own loop (`Controller.run`: the prober's asyncio thread, the event queue, each "
        "result's rise/fall verdict, the stats snapshot), not attached, over one VIP whose N backends are "
        "listeners on addresses of a namespace's `lo`, served by a separate process. CPU: user + system of "
        f"the controller's process (`os.times`, all its threads) over {window:g} s after a {warmup:g} s "
        "warm-up, in % of one core. Loopback runs the listener's half of each handshake in the connecting "
        "task, so the system share is more than a real network would charge; the user share is fastlb's own. "
        "Exec checks fork a command per check: they are for the few backends that need one.",
        "",
        "| check | backends | interval | results/s | failed | CPU (user + sys) | of it user |",
        "|---|---|---|---|---|---|---|",
        *rows,
        "",
        "Goal (issue 14): 1,000 backends × 1 s at ≤ 5 % of one core.",
    ])


if __name__ == "__main__":
    if sys.argv[1:2] == ["serve"]:
        serve(int(sys.argv[2]))
    elif sys.argv[1:2] == ["measure"]:
        n, kind, interval, warmup, window = sys.argv[2:7]
        print(json.dumps(measure(int(n), kind, float(interval), float(warmup), float(window))))
    else:
        print(run(quick="--quick" in sys.argv))
