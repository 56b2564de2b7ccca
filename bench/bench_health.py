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
import select
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


def floor(count: int, interval: float, warmup: float, window: float) -> dict:
    """No fastlb: the same connects as ``count`` TCP checks every ``interval`` (non-blocking, ended
    through an epoll, closed with a reset), from the barest loop waking as often as the prober
    (every health.TICK), in % of one core: what the kernel charges for the handshakes over
    loopback, the part of the checks' cost that is not fastlb's."""
    from fastlb.controller.health import TICK
    _raise_fd_limit()
    targets = [(address(i), PORT) for i in range(count)]
    ep = select.epoll()
    pending: dict[int, socket.socket] = {}
    linger = b"\x01\x00\x00\x00\x00\x00\x00\x00"
    step, nxt, i, done = interval / count, time.monotonic(), 0, 0
    start, stop = time.monotonic() + warmup, time.monotonic() + warmup + window
    t0 = n0 = None
    while True:
        now = time.monotonic()
        if t0 is None and now >= start:
            t0, n0 = (os.times(), now), done
        if now >= stop:
            break
        while nxt <= now:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
            s.connect_ex(targets[i % count])
            pending[s.fileno()] = s
            ep.register(s.fileno(), select.EPOLLOUT | select.EPOLLONESHOT)
            i, nxt = i + 1, nxt + step
        for fd, _ in ep.poll(0):
            s = pending.pop(fd)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
            s.close()
            done += 1
        time.sleep(max(0.0, min(now + TICK, stop) - time.monotonic()))
    t1 = os.times()
    wall = time.monotonic() - t0[1]
    return {"cpu": 100 * (t1.user - t0[0].user + t1.system - t0[0].system) / wall,
            "user": 100 * (t1.user - t0[0].user) / wall, "per_s": (done - n0) / wall, "failed": 0}


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


def row(ns: str, count: int, kind: str, interval: float, warmup: float, window: float,
        tree: Path | None = None) -> str:
    """One table row; ``tree``: measure the controller of that source tree instead (its own bench script)."""
    mode = "floor" if kind == "floor" else "measure"
    script = str(tree / "bench" / "bench_health.py") if tree else __file__
    argv = [sys.executable, script, mode, str(count), kind, str(interval), str(warmup), str(window)]
    res = subprocess.run(netns.exec_argv(ns, argv), capture_output=True, text=True, timeout=warmup + window + 60)
    if res.returncode:
        raise RuntimeError(f"bench_health measure failed: {res.stderr.strip()[-500:]}")
    m = json.loads(res.stdout)
    expected = count / interval / (1 - netns_jitter_mean()) if kind != "floor" else count / interval
    what = {"tcp": "`tcp`", "exec": "`exec` (`/bin/true`)",
            "floor": "floor: the same connects from a bare loop, no fastlb"}[kind]
    if tree:
        what += f" (before: {_describe(tree)})"
    return (f"| {what} | {count:,} | {interval:g} s | {m['per_s']:.0f} ({m['per_s'] / expected:.2f}× the "
            f"expected {expected:.0f}) | {m['failed']} | **{m['cpu']:.1f} %** | {m['user']:.1f} % |")


def _describe(tree: Path) -> str:
    """The commit a source tree was taken from (a `git archive` has none: its folder's name then)."""
    stamp = tree / "COMMIT"
    return stamp.read_text().strip() if stamp.exists() else tree.name


def netns_jitter_mean() -> float:
    from fastlb.controller.health import JITTER
    return JITTER / 2     # intervals are shortened by up to JITTER, uniformly: by JITTER/2 on average


def run(quick: bool = False, before: Path | None = None) -> str:
    """``before``: a source tree of an earlier fastlb whose 1,000-backend row is measured in turns with
    this one's (bench_health.py --before DIR), for a before/after in one run."""
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
        rows = [row(ns, 100, "tcp", 1.0, warmup, window), row(ns, 1000, "floor", 1.0, warmup, window)]
        for _ in range(2 if before else 1):
            if before:
                rows.append(row(ns, 1000, "tcp", 1.0, warmup, window, tree=before))
            rows.append(row(ns, 1000, "tcp", 1.0, warmup, window))
        rows.append(row(ns, 100, "exec", 1.0, warmup, window))
    finally:
        if server is not None:
            server.stdin.close()
            server.wait(10)
        netns.destroy(ns)
    load = os.getloadavg()[0]
    return "\n".join([
        "## Health checks at scale",
        "",
        "The controller's own loop (`Controller.run`: the prober's asyncio thread, the event queue, each "
        "result's rise/fall verdict; the stats snapshot is built only when stats or metrics ask), not "
        "attached, over one VIP whose N backends are listeners on addresses of a namespace's `lo`, served by "
        "a separate process. CPU: user + system of the controller's process (`os.times`, all its threads) "
        f"over {window:g} s after a {warmup:g} s warm-up, in % of one core. Loopback runs the listener's half "
        "of each handshake in the connecting task, so the system share is more than a real network would "
        "charge. The floor row measures that: the same 1,000 connects a second (non-blocking, ended through "
        "an epoll, closed with a reset) from the barest loop, waking as often as the prober, with no fastlb "
        "in it; a `tcp` row less the floor is what fastlb's own work costs. Exec checks fork a command per "
        "check: they are for the few backends that need one."
        + (" Rows marked *before* run an earlier tree's controller in turns with this one, in the same "
           "namespace and run." if before else ""),
        "",
        "| check | backends | interval | results/s | failed | CPU (user + sys) | of it user |",
        "|---|---|---|---|---|---|---|",
        *rows,
        "",
        f"Load average (1 min) at the end: {load:.1f} on {os.cpu_count()} CPUs. "
        "Goal (issue 14): 1,000 backends × 1 s at ≤ 5 % of one core.",
    ])


if __name__ == "__main__":
    if sys.argv[1:2] == ["serve"]:
        serve(int(sys.argv[2]))
    elif sys.argv[1:2] == ["measure"]:
        n, kind, interval, warmup, window = sys.argv[2:7]
        print(json.dumps(measure(int(n), kind, float(interval), float(warmup), float(window))))
    elif sys.argv[1:2] == ["floor"]:
        n, _, interval, warmup, window = sys.argv[2:7]
        print(json.dumps(floor(int(n), float(interval), float(warmup), float(window))))
    else:
        tree = Path(sys.argv[sys.argv.index("--before") + 1]).resolve() if "--before" in sys.argv else None
        print(run(quick="--quick" in sys.argv, before=tree))
