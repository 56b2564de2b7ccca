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

Run alone: sudo .venv/bin/python bench/bench_l7.py [--quick]
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
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


def one_round(lab: Lab, folder: Path, seconds: float, rows: dict) -> None:
    def record(path: str, url: str, controller: int | None = None) -> None:
        for mode in wrkrun.MODES:
            rows.setdefault((path, mode), []).append(measure(lab, url, mode, seconds, controller))

    conf = folder / "hand-haproxy.cfg"
    conf.write_text(hand_config(lab))
    with peers._start(lab, "hand-haproxy", "lb", conf.read_text(), folder, ["haproxy", "-db", "-f", str(conf)],
                      [(lab.addr("lb"), HAND_PORT)]):
        record("hand", f"http://{lab.addr('lb')}:{HAND_PORT}/")
    for algorithm in ("rr", "lrt"):
        config = folder / f"fastlb-{algorithm}.toml"
        config.write_text(fastlb_config(lab, algorithm))
        bal = lb_process.start(lab, config, folder / "fastlb-attach.log")
        try:
            record(f"fastlb-{algorithm}", f"http://{lab.vip4}/", bal.pid)
        finally:
            lb_process.stop(lab, bal)


def run(quick: bool = False) -> str:
    seconds, rounds = (1, 1) if quick else (4, 3)
    rows: dict = {}
    with Lab(backends=3, ipv6=False, servers=False) as lab, tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        backends = [peers.nginx_http(lab, b, folder) for b in lab.backend_names]
        try:
            for _ in range(rounds):
                one_round(lab, folder, seconds, rows)
        finally:
            for b in backends:
                b.stop()
        configs = {"hand": hand_config(lab), "fastlb": fastlb_config(lab, "lrt")}
    return render(rows, configs, seconds, rounds, quick)


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
    print(run(quick="--quick" in sys.argv))
