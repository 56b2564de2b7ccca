"""The L7 tier against the same HAProxy configured by hand, side by side in one run.

One lab (IPv4, three backends running nginx). The paths take turns in each round:

- *hand HAProxy*: ``haproxy -db`` in the LB namespace with a hand-written
  ``mode http`` config (roundrobin, X-Forwarded-For, no logging) on the LB's
  own address;
- *fastlb http rr*: ``fastlb attach`` with an http VIP (XDP passes it to the
  stack, fastlb's HAProxy with its rendered config and its per-request log
  stream);
- *fastlb http lrt*: the same VIP with ``algorithm = "lrt"`` (log stream read,
  weights steered every 0.25 s).

wrk keep-alive and connection-per-request. *LB CPU*: every task in the LB
namespace (HAProxy, and fastlb's controller for the fastlb rows) per request.
*controller CPU*: fastlb's controller process alone, as a share of one core:
the cost of reading the log stream and, for lrt, of the steering.

The lrt steering's cost at about 10k req/s (issue 15 item 8): with each
fastlb attachment, wrk runs once more with a Lua ``delay()`` that paces every
connection (:func:`wrkrun.pace_script`), so that rr and lrt serve about the
same rate, near :data:`STEER_TARGET`. The controller's CPU is its process'
utime + stime (``/proc/PID/stat``) over the run, and over an idle stretch
before it (no requests: health checks, stats, its loops). rr reads the same
log stream as lrt, so lrt − rr is the steering itself: a peak-EWMA update per
logged request and a weight pass every 0.25 s.

Run alone: sudo .venv/bin/python bench/bench_l7.py [--quick] [--steering]
(``--steering``: only the steering-cost table, about a minute)
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, "") and __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    sys.path.insert(0, str(Path(__file__).resolve().parent))

import cputime  # noqa: E402
import peers  # noqa: E402
import wrkrun  # noqa: E402

from fastlb.lab import lb_process  # noqa: E402
from fastlb.lab.topology import Lab  # noqa: E402

PATHS = ("hand", "fastlb-rr", "fastlb-lrt")
LABELS = {"hand": "hand HAProxy (mode http)", "fastlb-rr": "fastlb http VIP, rr", "fastlb-lrt": "fastlb http VIP, lrt"}
HAND_PORT = 8003
STEER_TARGET = 10_000          # req/s at which the lrt steering's cost is measured
STEER_CONNECTIONS = 100        # paced wrk: 100 connections × 1000 / (9 ms + response time) ≤ 10k req/s
STEER_DELAY_MS = 9
STEER_IDLE_S = 2.0


def hand_config(lab: Lab) -> str:
    servers = "\n".join(f"    server {b} {lab.addr(b)}:80" for b in lab.backend_names)
    return f"""global
    maxconn 8000
defaults
    mode http
    option forwardfor
    timeout connect 2s
    timeout client 30s
    timeout server 30s
    timeout http-keep-alive 10s
frontend bench
    bind {lab.addr("lb")}:{HAND_PORT}
    default_backend servers
backend servers
    balance roundrobin
{servers}
"""


def fastlb_config(lab: Lab, algorithm: str) -> str:
    pool = "".join(f'[[vip.backend]]\naddress = "{lab.addr(b)}"\n' for b in lab.backend_names)
    return f'[[vip]]\naddress = "{lab.vip4}"\nport = 80\nprotocol = "http"\nalgorithm = "{algorithm}"\n{pool}'


def _proc_cpu_ns(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) * (10**9 // os.sysconf("SC_CLK_TCK"))


def measure(lab: Lab, url: str, mode: str, seconds: float, controller: int | None) -> dict:
    lb0 = cputime.namespace_ns([lab.ns("lb")], ksoftirqd=False)
    c0 = _proc_cpu_ns(controller) if controller else 0
    result = wrkrun.run(lab, url, mode, seconds)
    lb_ns = cputime.namespace_ns([lab.ns("lb")], ksoftirqd=False) - lb0
    out = {"wrk": result, "lb_us": lb_ns / max(1, result.requests) / 1e3, "ctl_pct": None}
    if controller:
        out["ctl_pct"] = 100.0 * (_proc_cpu_ns(controller) - c0) / 1e9 / result.seconds
    return out


def steering(lab: Lab, folder: Path, pid: int, seconds: float, idle_s: float) -> dict:
    """The controller's CPU idle, then under wrk paced to about STEER_TARGET req/s (keep-alive)."""
    script = folder / "pace.lua"
    script.write_text(wrkrun.pace_script(STEER_DELAY_MS))
    time.sleep(0.5)                        # past the attach's own work
    c0, t0 = _proc_cpu_ns(pid), time.monotonic()
    time.sleep(idle_s)
    idle = 100.0 * (_proc_cpu_ns(pid) - c0) / 1e9 / (time.monotonic() - t0)
    c0 = _proc_cpu_ns(pid)
    result = wrkrun.run(lab, f"http://{lab.vip4}/", "keepalive", seconds, str(script), STEER_CONNECTIONS)
    used = _proc_cpu_ns(pid) - c0
    return {"wrk": result, "ctl_pct": 100.0 * used / 1e9 / result.seconds, "idle_pct": idle,
            "ctl_us": used / 1e3 / max(1, result.requests)}


def steering_alone(rate: int = STEER_TARGET, seconds: float = 1.0, repeats: int = 5) -> float:
    """CPU seconds per second that the steering code alone spends at ``rate`` req/s, as % of one core.

    In this process, the controller's calls for ``seconds`` of simulated time: per request, the
    log thread's locked ``Steering.observe`` (three servers in turn); every 0.25 s, the steering
    thread's ``changes`` and ``written``. CPU time from ``time.process_time``; median of ``repeats``."""
    import threading

    from fastlb.controller.l7.steering import Steering
    servers = ["198.18.0.11:80", "198.18.0.12:80", "198.18.0.13:80"]
    samples = []
    for _ in range(repeats):
        steer, lock = Steering(), threading.Lock()
        steer.set_pools({"198.19.0.100:80": servers})
        n = int(rate * seconds)
        step, every = 1.0 / rate, int(rate * 0.25)
        start = time.process_time()
        for i in range(n):
            with lock:
                steer.observe("198.19.0.100:80", servers[i % 3], 1.0 + (i % 3), i * step)
            if i % every == every - 1:
                with lock:
                    changes = steer.changes(i * step)
                for (pool, server), weight in changes.items():
                    with lock:
                        steer.written(pool, server, weight)
        samples.append(100.0 * (time.process_time() - start) / seconds)
    return statistics.median(samples)


def one_round(lab: Lab, folder: Path, seconds: float, rows: dict, steer_rows: dict, full: bool = True,
              idle_s: float = STEER_IDLE_S) -> None:
    """The paths in turn; ``full`` False: only fastlb rr and lrt, paced (the steering table)."""
    def record(path: str, url: str, controller: int | None = None) -> None:
        for mode in wrkrun.MODES:
            rows.setdefault((path, mode), []).append(measure(lab, url, mode, seconds, controller))

    if full:
        conf = folder / "hand-haproxy.cfg"
        conf.write_text(hand_config(lab))
        with peers._start(lab, "hand-haproxy", "lb", conf.read_text(), folder,
                          ["haproxy", "-db", "-f", str(conf)], [(lab.addr("lb"), HAND_PORT)]):
            record("hand", f"http://{lab.addr('lb')}:{HAND_PORT}/")
    for algorithm in ("rr", "lrt"):
        config = folder / f"fastlb-{algorithm}.toml"
        config.write_text(fastlb_config(lab, algorithm))
        bal = lb_process.start(lab, config, folder / "fastlb-attach.log")
        try:
            steer_rows.setdefault(algorithm, []).append(steering(lab, folder, bal.pid, seconds, idle_s))
            if full:
                record(f"fastlb-{algorithm}", f"http://{lab.vip4}/", bal.pid)
        finally:
            lb_process.stop(lab, bal)


def run(quick: bool = False, full: bool = True) -> str:
    seconds, rounds = (1, 1) if quick else (4, 3) if full else (5, 3)
    rows: dict = {}
    steer_rows: dict = {}
    with Lab(backends=3, ipv6=False, servers=False) as lab, tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        backends = [peers.nginx_http(lab, b, folder) for b in lab.backend_names]
        try:
            for _ in range(rounds):
                one_round(lab, folder, seconds, rows, steer_rows, full, idle_s=0.5 if quick else STEER_IDLE_S)
        finally:
            for b in backends:
                b.stop()
        configs = {"hand": hand_config(lab), "fastlb": fastlb_config(lab, "lrt")}
    out = render(rows, configs, seconds, rounds, quick) if full else ""
    return out + render_steering(steer_rows, seconds, rounds, quick, steering_alone(repeats=1 if quick else 5))


def render_steering(rows: dict, seconds: float, rounds: int, quick: bool, alone_pct: float) -> str:
    def med(algorithm, key):
        values = [s[key] if key != "rps" else s["wrk"].rps for s in rows[algorithm]]
        return statistics.median(values)

    out = [f"### lrt steering: the controller's CPU at about {STEER_TARGET // 1000}k req/s", ""]
    if quick:
        out += ["*Quick run: tiny runs, the figures mean nothing.*", ""]
    out += [f"The fastlb http VIP above, rr and then lrt, each attached in turn; `wrk -t{wrkrun.THREADS} "
            f"-c{STEER_CONNECTIONS} -d{max(1, round(seconds))}s` keep-alive with a Lua `delay()` of "
            f"{STEER_DELAY_MS} ms before each request, which holds the rate under about "
            f"{STEER_TARGET:,} req/s so that both serve about the same rate. *controller*: fastlb's "
            "controller process, utime + stime from `/proc/PID/stat` (10 ms ticks) over the wrk run, as % "
            f"of one core and per request; *idle*: the same over {STEER_IDLE_S:g} s without requests just "
            f"before. Median of {rounds} round(s), rr and lrt taking turns. rr reads the same per-request log "
            "stream as lrt: lrt − rr is the steering (a peak-EWMA update per request, a weight pass every "
            "0.25 s).", "",
            "| algorithm | req/s | errors | controller % core | controller µs/req | idle % core |",
            "|---|---:|---:|---:|---:|---:|"]
    for algorithm in ("rr", "lrt"):
        errors = sum(s["wrk"].errors for s in rows[algorithm])
        out.append(f"| {algorithm} | {med(algorithm, 'rps'):,.0f} | {errors} | {med(algorithm, 'ctl_pct'):.1f} | "
                   f"{med(algorithm, 'ctl_us'):.2f} | {med(algorithm, 'idle_pct'):.1f} |")
    out += ["", f"lrt − rr: {med('lrt', 'ctl_pct') - med('rr', 'ctl_pct'):+.1f} points of one core, "
            f"{med('lrt', 'ctl_us') - med('rr', 'ctl_us'):+.2f} µs per request.", "",
            f"The steering code alone, at exactly {STEER_TARGET:,} req/s of simulated time (one second: "
            f"{STEER_TARGET:,} locked `Steering.observe` calls over three servers and a weight pass every "
            f"0.25 s, run in the bench's process, CPU by `time.process_time`, median of "
            f"{1 if quick else 5}): {alone_pct:.1f} % of one core.", ""]
    return "\n".join(out)


def render(rows, configs, seconds: float, rounds: int, quick: bool) -> str:
    def med(samples, f):
        values = [f(s) for s in samples if f(s) is not None]
        return statistics.median(values) if values else None

    m = {k: {"rps": med(v, lambda s: s["wrk"].rps), "p50": med(v, lambda s: s["wrk"].p50_ms),
             "p99": med(v, lambda s: s["wrk"].p99_ms), "errors": sum(s["wrk"].errors for s in v),
             "lb_us": med(v, lambda s: s["lb_us"]), "ctl": med(v, lambda s: s["ctl_pct"])}
         for k, v in rows.items()}
    out = ["## The L7 tier against the same HAProxy configured by hand", ""]
    if quick:
        out += ["*Quick run: tiny runs, the figures mean nothing.*", ""]
    out += [f"`wrk -t{wrkrun.THREADS} -c{wrkrun.CONNECTIONS} -d{max(1, round(seconds))}s --latency` from the "
            "client namespace, keep-alive and connection-per-request. Three backends, each nginx answering "
            f"`GET /` with 3 bytes. Median of {rounds} run(s) per row, the paths taking turns; everything "
            "shares this machine's cores (and other sessions' load): read the ratios. *LB CPU*: every task in "
            "the LB namespace per request. *controller*: fastlb's controller process as % of one core "
            "(log stream, and for lrt the steering).", "",
            "| path | mode | req/s | ÷ hand | p50 ms | p99 ms | errors | LB CPU µs/req | controller % core |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for path in PATHS:
        for mode in wrkrun.MODES:
            v = m[(path, mode)]
            ctl = "-" if v["ctl"] is None else f"{v['ctl']:.1f}"
            out.append(f"| {LABELS[path]} | {mode} | {v['rps']:,.0f} | {v['rps'] / m[('hand', mode)]['rps']:.2f} | "
                       f"{v['p50']:.2f} | {v['p99']:.2f} | {v['errors']} | {v['lb_us']:.1f} | {ctl} |")
    out += ["", "Configs, as run:", "", "Hand HAProxy:", "", "```", configs["hand"].rstrip(), "```", "",
            "fastlb (lrt; rr the same with algorithm = \"rr\"; the haproxy.cfg it renders is in docs/L7.md's "
            "mapping):", "", "```", configs["fastlb"].rstrip(), "```", ""]
    return "\n".join(out)


if __name__ == "__main__":
    print(run(quick="--quick" in sys.argv, full="--steering" not in sys.argv))
