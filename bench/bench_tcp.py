"""End-to-end TCP with wrk: fastlb's forwarding modes against HAProxy, nginx stream and no balancer.

One lab (IPv4, three backends, each running nginx as its HTTP server), one
run. The paths, each with wrk keep-alive and then connection-per-request:

- *direct*: the client straight to one backend, no balancer;
- *HAProxy* ``mode tcp`` roundrobin, and *nginx stream*, in the LB namespace
  (started for their turn only);
- *fastlb* DSR, NAT and tunnel, one ``fastlb attach`` with a VIP per mode.
  NAT backends answer on port 8080, and a policy rule sends what leaves port
  8080 back through the LB (their gateway, as in any NAT set-up) while DSR
  and direct replies go straight to the client. Tunnel backends run
  ``fastlb decap`` for their turn only (an XDP program on a veth slows every
  other path that crosses it).

The paths take turns in each round. CPU: *lab CPU* is everything the lab's
namespaces ran (all tasks, wrk, and ksoftirqd: bench/cputime.py) per
request; *LB CPU* is the peer's processes for HAProxy and nginx, and
fastlb's XDP program run time (the kernel's BPF run-time stats) for fastlb.

Run alone: sudo .venv/bin/python bench/bench_tcp.py [--quick]
"""

from __future__ import annotations

import resource
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, "") and __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    sys.path.insert(0, str(Path(__file__).resolve().parent))

import cputime  # noqa: E402
import peers  # noqa: E402
import wrkrun  # noqa: E402

from fastlb.lab import lb_process  # noqa: E402
from fastlb.lab.netns import LabError  # noqa: E402
from fastlb.lab.topology import Lab, python_env  # noqa: E402

DSR_VIP, TUNNEL_VIP, NAT_VIP = "198.19.0.100", "198.19.0.101", "198.19.0.102"
NAT_TABLE = 100
PATHS = ("direct", "haproxy", "nginx", "fastlb-dsr", "fastlb-nat", "fastlb-tunnel")
LABELS = {"direct": "direct to one backend", "haproxy": "HAProxy mode tcp", "nginx": "nginx stream",
          "fastlb-dsr": "fastlb DSR", "fastlb-nat": "fastlb NAT", "fastlb-tunnel": "fastlb tunnel"}


@dataclass(frozen=True)
class Row:
    wrk: wrkrun.Result
    lab_cpu_ns: int
    lb_cpu_ns: int | None


def fastlb_config(lab: Lab) -> str:
    def vip(address: str, mode: str, port: int = 80) -> str:
        text = f'[[vip]]\naddress = "{address}"\nport = 80\nprotocol = "tcp"\nforwarding = "{mode}"\n'
        return text + "".join(f'[[vip.backend]]\naddress = "{lab.addr(b)}"\nport = {port}\n'
                              for b in lab.backend_names)
    return ('[settings]\ntunnel_source = "198.18.200.0/24"\n\n' + vip(DSR_VIP, "dsr") + "\n"
            + vip(NAT_VIP, "nat", peers.NAT_PORT) + "\n" + vip(TUNNEL_VIP, "tunnel"))


def route_nat_replies(lab: Lab) -> None:
    """On each backend: what leaves TCP port NAT_PORT goes back through the LB."""
    for b in lab.backend_names:
        lab.run(b, ["ip", "route", "add", f"{lab.addr('client')}/32", "via", lab.addr("lb"),
                    "table", str(NAT_TABLE)])
        lab.run(b, ["ip", "rule", "add", "ipproto", "tcp", "sport", str(peers.NAT_PORT),
                    "lookup", str(NAT_TABLE)])


def _children_cpu_ns() -> int:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return int((ru.ru_utime + ru.ru_stime) * 1e9)


def measure(lab: Lab, url: str, mode: str, seconds: float, lb_cpu: Callable[[], int] | None) -> Row:
    lab0, child0 = cputime.namespace_ns(lab.namespaces), _children_cpu_ns()
    lb0 = lb_cpu() if lb_cpu else 0
    result = wrkrun.run(lab, url, mode, seconds)
    lb1 = lb_cpu() if lb_cpu else 0
    lab_ns = cputime.namespace_ns(lab.namespaces) - lab0 + _children_cpu_ns() - child0   # wrk has exited
    return Row(result, lab_ns, lb1 - lb0 if lb_cpu else None)


def on_backends(lab: Lab, *args: str) -> None:
    """``fastlb ARGS`` on every backend at once (each decap attach compiles its program)."""
    procs = {b: lab.exec(b, lb_process.fastlb_argv(*args), env=python_env(), stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True) for b in lab.backend_names}
    failed = []
    for b, proc in procs.items():
        try:
            output, _ = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            output, _ = proc.communicate()
        if proc.returncode != 0:
            failed.append(f"{b}: {output.strip()[-300:]}")
    if failed:
        raise LabError(f"fastlb {' '.join(args)} failed on " + "; ".join(failed))


def one_round(lab: Lab, folder: Path, config: Path, seconds: float, rows: dict) -> None:
    def record(path: str, url: str, lb_cpu=None) -> None:
        for mode in wrkrun.MODES:
            rows.setdefault((path, mode), []).append(measure(lab, url, mode, seconds, lb_cpu))

    def lb_processes() -> int:
        return cputime.namespace_ns([lab.ns("lb")], ksoftirqd=False)

    record("direct", f"http://{lab.addr('b1')}/")
    with peers.haproxy(lab, folder):
        record("haproxy", f"http://{lab.addr('lb')}:{peers.HAPROXY_PORT}/", lb_processes)
    with peers.nginx_stream(lab, folder):
        record("nginx", f"http://{lab.addr('lb')}:{peers.NGINX_PORT}/", lb_processes)
    bal = lb_process.start(lab, config, folder / "fastlb-attach.log")
    try:
        with cputime.XdpRunTime(cputime.attachment_prog(lab.ns("lb"))) as xdp:
            def xdp_ns() -> int:
                return xdp.read()[0]

            record("fastlb-dsr", f"http://{DSR_VIP}/", xdp_ns)
            record("fastlb-nat", f"http://{NAT_VIP}/", xdp_ns)
            on_backends(lab, "decap", "attach", "eth0", "--vip", TUNNEL_VIP)
            try:
                record("fastlb-tunnel", f"http://{TUNNEL_VIP}/", xdp_ns)
            finally:
                on_backends(lab, "decap", "detach", "eth0")
    finally:
        lb_process.stop(lab, bal)


def run(quick: bool = False) -> str:
    seconds, rounds = (1, 1) if quick else (4, 3)
    rows: dict[tuple[str, str], list[Row]] = {}
    with Lab(backends=3, ipv6=False, servers=False) as lab, tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        lab.add_vip(TUNNEL_VIP)
        backends = [peers.nginx_http(lab, b, folder) for b in lab.backend_names]
        try:
            route_nat_replies(lab)
            config = folder / "fastlb.toml"
            config.write_text(fastlb_config(lab))
            for _ in range(rounds):
                one_round(lab, folder, config, seconds, rows)
            configs = {"haproxy": peers.haproxy_config(lab, folder),
                       "nginx": peers.nginx_stream_config(lab, folder),
                       "backend": peers.nginx_http_config("b1", folder),
                       "fastlb": config.read_text()}
        finally:
            for b in backends:
                b.stop()
    return render(rows, configs, seconds, rounds, quick)


def median_row(samples: list[Row]) -> dict:
    def med(f):
        return statistics.median(f(r) for r in samples)
    out = {"rps": med(lambda r: r.wrk.rps), "p50": med(lambda r: r.wrk.p50_ms),
           "p99": med(lambda r: r.wrk.p99_ms), "errors": sum(r.wrk.errors for r in samples),
           "lab_us": med(lambda r: r.lab_cpu_ns / max(1, r.wrk.requests) / 1e3)}
    lb = [r.lb_cpu_ns / max(1, r.wrk.requests) / 1e3 for r in samples if r.lb_cpu_ns is not None]
    out["lb_us"] = statistics.median(lb) if lb else None
    return out


def heading(title: str, quick: bool) -> list[str]:
    """A wrk section's title, and the quick run's warning."""
    return [f"## {title}", ""] + (["*Quick run: tiny runs, the figures mean nothing.*", ""] if quick else [])


def render(rows, configs: dict[str, str], seconds: float, rounds: int, quick: bool) -> str:
    m = {key: median_row(s) for key, s in rows.items()}
    out = heading("End-to-end TCP with wrk: fastlb against HAProxy, nginx and no balancer", quick)
    out += [wrkrun.method(seconds) + "; the client namespace has `tcp_tw_reuse=1` and "
            "`ip_local_port_range = 1024 65535`). Three backends, each "
            f"nginx answering `GET /` with 3 bytes. Median of {rounds} run(s) per row, the paths taking turns. "
            "wrk, the balancer and the backends share this machine's "
            f"{peers.CORES} cores (and other sessions' load), so read the ratios. *Lab CPU*: everything the "
            "lab's namespaces ran, per request. *LB CPU*: the peer's processes (softirq work that ran in their "
            "context included), or fastlb's XDP program (kernel BPF run-time stats, which only count the "
            "program itself).", "",
            "| path | mode | req/s | × direct | p50 ms | p99 ms | errors | lab CPU µs/req | LB CPU µs/req |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for path in PATHS:
        for mode in wrkrun.MODES:
            v = m[(path, mode)]
            lb = "-" if v["lb_us"] is None else f"{v['lb_us']:.2f}"
            out.append(f"| {LABELS[path]} | {mode} | {v['rps']:,.0f} | "
                       f"{v['rps'] / m[('direct', mode)]['rps']:.2f} | {v['p50']:.2f} | {v['p99']:.2f} | "
                       f"{v['errors']} | {v['lab_us']:.1f} | {lb} |")
    out += ["", "Ratios two ways: req/s (per wall second, which moves with the other load on this shared "
            "machine) and requests per lab CPU second (the inverse of *lab CPU µs/req*, which does not).", "",
            "| fastlb mode | wrk mode | ÷ HAProxy, req/s | ÷ nginx, req/s | ÷ direct, req/s | "
            "÷ HAProxy, per CPU | ÷ nginx, per CPU | ÷ direct, per CPU |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for path in ("fastlb-dsr", "fastlb-nat", "fastlb-tunnel"):
        for mode in wrkrun.MODES:
            f = m[(path, mode)]
            wall = [f["rps"] / m[(peer, mode)]["rps"] for peer in ("haproxy", "nginx", "direct")]
            cpu = [m[(peer, mode)]["lab_us"] / f["lab_us"] for peer in ("haproxy", "nginx", "direct")]
            out.append(f"| {LABELS[path].split()[1]} | {mode} | "
                       + " | ".join(f"{r:.2f}×" for r in wall + cpu) + " |")
    out += ["", goal_note(m), "", "Configs, as run (paths in a temporary folder):", ""]
    for name, title in (("haproxy", "HAProxy 2.6 (LB namespace)"), ("nginx", "nginx 1.22 stream (LB namespace)"),
                        ("backend", "each backend's nginx (b1 shown)"), ("fastlb", "fastlb")):
        out += [f"{title}:", "", "```", configs[name].rstrip(), "```", ""]
    return "\n".join(out)


def goal_note(m) -> str:
    def worst(key: str, better) -> tuple[float, float]:
        """Worst DSR ratio over both wrk modes against the stronger peer, and against direct."""
        peer = min(better(m[("fastlb-dsr", mode)][key], max(m[("haproxy", mode)][key], m[("nginx", mode)][key])
                          if key == "rps" else min(m[("haproxy", mode)][key], m[("nginx", mode)][key]))
                   for mode in wrkrun.MODES)
        direct = min(better(m[("fastlb-dsr", mode)][key], m[("direct", mode)][key]) for mode in wrkrun.MODES)
        return peer, direct

    wall_peer, wall_direct = worst("rps", lambda f, o: f / o)
    cpu_peer, cpu_direct = worst("lab_us", lambda f, o: o / f)

    def verdict(ratio: float, goal: float) -> str:
        return f"{'met' if ratio >= goal else 'not met'} ({ratio:.2f}×)"

    text = (f"Goals (issue 7), for DSR, worst of the two wrk modes: ≥ 1.5× HAProxy and nginx: by req/s "
            f"{verdict(wall_peer, 1.5)}, per lab CPU second {verdict(cpu_peer, 1.5)}; ≥ 0.9× direct: by req/s "
            f"{verdict(wall_direct, 0.9)}, per lab CPU second {verdict(cpu_direct, 0.9)}.")
    if min(wall_peer, cpu_peer) < 1.5 or min(wall_direct, cpu_direct) < 0.9:
        text += (" What limits fastlb here: every packet to it crosses veth's XDP path twice on the way in "
                 "(the LB's eth0 runs fastlb, its switch port the XDP_PASS program that XDP_TX needs), and "
                 "veth turns each skb into an XDP buffer and back (a NIC with native XDP starts from its own "
                 "buffers). The peers' cost is mostly the backends', wrk's and the kernel's TCP work, which "
                 "every path shares on these two cores: a balancer that cost nothing would gain at most "
                 "what direct gains over them.")
    return text


if __name__ == "__main__":
    print(run(quick="--quick" in sys.argv[1:]))
