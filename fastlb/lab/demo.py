"""``fastlb lab demo``: fastlb balancing real connections in a namespace lab, start to finish.

What it does (``sudo make demo``; under a minute here, at most 90 s)::

    1. a lab: a client, the LB and three backends (HTTP on TCP 80, UDP echo on 9000)
    2. for each algorithm (fastlb.config.ALGORITHMS): a fresh
       fastlb attach serving two VIPs, 198.19.0.100 with weights 1:1:1 and
       198.19.0.101 with 3:2:1; to each, 300 TCP connections and 300 UDP
       exchanges, counted by the client (who answered) and by fastlb (its
       per-backend counters, fastlb status --json)
    3. a line-rate UDP burst (BPF_PROG_TEST_RUN live frames, 1 s) through the
       last attach, counted by fastlb and at the backends' eth0
    4. failover: b3's servers stop, fastlb's health checks (HTTP GET /health,
       on from the start) take it out; 300 more connections, none may reach b3
    5. the L7 tier (full run only): an http VIP on 198.19.0.100:8080 served by
       fastlb's HAProxy, requests routed by Host (api.example.com -> b2), and
       lrt steering away from b3 made 50 ms slower, then back when it is fast
    6. everything removed; a chart of each backend's share per phase, as a PNG

``--quick`` (at most 30 s) makes one attach serve one VIP per algorithm
(198.19.0.100, .101, ... with weights 3:2:1), 60 connections and exchanges
per phase, and a 0.5 s burst.

The exit code is 1 if any connection or exchange failed, or if the failover
sent a new flow to the backend that went down.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from fastlb.lab import chart, lb_process, linerate, spread
from fastlb.lab.lb_process import Balancer
from fastlb.lab.topology import HEALTH_HTTP, Lab

EQUAL = (1, 1, 1)
WEIGHTED = (3, 2, 1)


@dataclass(frozen=True)
class Plan:
    """How much the demo does."""

    connections: int        # TCP connections per phase (and as many UDP exchanges)
    burst_seconds: float
    flows: int              # flows in the burst
    attach_per_algorithm: bool

    @classmethod
    def for_mode(cls, quick: bool) -> Plan:
        if quick:
            return cls(connections=60, burst_seconds=0.5, flows=1000, attach_per_algorithm=False)
        return cls(connections=300, burst_seconds=1.0, flows=1000, attach_per_algorithm=True)


@dataclass
class Outcome:
    """What the demo saw: the phases, the burst, the problems; the exit code follows."""

    phases: list[spread.Spread] = field(default_factory=list)
    burst: linerate.LineRate | None = None
    problems: list[str] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        return 1 if self.problems else 0


def lab_forwarding() -> str:
    """The first forwarding mode, in the config's order, that the lab's wiring hosts (DSR today)."""
    from fastlb import config
    from fastlb.lab.netns import LabError
    from fastlb.lab.topology import LAB_FORWARDING

    usable = [f for f in config.FORWARDING if f in LAB_FORWARDING]
    if not usable:
        raise LabError(f"the lab hosts none of fastlb's forwarding modes ({', '.join(LAB_FORWARDING)})")
    return usable[0]


def weights_of(lab: Lab, values: tuple[int, ...]) -> dict[str, int]:
    return dict(zip(lab.backend_names, values))


def ratio(weights: dict[str, int]) -> str:
    return ":".join(str(w) for w in weights.values())


class Demo:
    """One run of the demo; :meth:`run` returns the exit code."""

    def __init__(self, quick: bool = False, chart_path: str | os.PathLike = "fastlb-demo.png",
                 console=None):
        from rich.console import Console

        self.quick = quick
        self.plan = Plan.for_mode(quick)
        self.chart_path = Path(chart_path)
        self.console = console or Console(highlight=False)
        self.outcome = Outcome()
        self.forwarding = lab_forwarding()
        self._lab: Lab | None = None
        self._bal: Balancer | None = None
        self._configs = 0
        self._start = 0.0

    # ---- steps --------------------------------------------------------------------

    def say(self, text: str) -> None:
        self.console.print(f"[dim]{time.monotonic() - self._start:5.1f} s[/]  {text}")

    def attach(self, text: str) -> None:
        """Detach what runs, then a fresh fastlb attach with ``text`` as its config.

        Returns once the health checks report every backend up: until its first
        probe, a backend is in no table.
        """
        lab = self._lab
        self.detach()
        self._configs += 1
        path = lab.run_dir / f"fastlb-{self._configs}.toml"
        path.write_text(text)
        self._bal = lb_process.start(lab, path, lab.run_dir / "fastlb.log")
        took = lb_process.wait_health(lab, lab.backend_names, "up")
        self.say(f"[green]{self._bal.banner.split(';')[0]}[/]; health checks report all backends up "
                 f"after {took:.1f} s")

    def detach(self) -> None:
        if self._bal is not None:
            bal, self._bal = self._bal, None
            lb_process.stop(self._lab, bal)

    def phase(self, name: str, algorithm: str, weights: dict[str, int], vip: str, note: str = "") -> spread.Spread:
        n = self.plan.connections
        start = time.monotonic()
        result = spread.measure(self._lab, name, algorithm, weights, vip=vip, tcp=n, udp=n,
                                timeout=1.0, note=note)
        self.outcome.phases.append(result)
        self.say(f"{name}: {result.tcp.made + result.udp.made} requests and fastlb's counters "
                 f"in {time.monotonic() - start:.1f} s")
        self.console.print(spread.table(result))
        if result.failed:
            errors = "; ".join(result.tcp.errors + result.udp.errors)
            self.outcome.problems.append(f"{name}: {result.failed} requests failed ({errors})")
        return result

    def config(self, algorithm: str, weights: dict[str, int], vips: list[str]) -> str:
        return self._lab.config_text(vips=vips, algorithm=algorithm, weights=weights,
                                     forwarding=self.forwarding, health=HEALTH_HTTP)

    def algorithms(self) -> None:
        from fastlb import config

        lab = self._lab
        algorithms = list(config.ALGORITHMS)
        if self.plan.attach_per_algorithm:
            runs = [(weights_of(lab, values), f"198.19.0.{100 + i}") for i, values in enumerate((EQUAL, WEIGHTED))]
            for _, vip in runs:
                lab.add_vip(vip)
            for algorithm in algorithms:
                self.console.rule(f"{algorithm}: " + ", ".join(f"{vip} weights {ratio(w)}" for w, vip in runs))
                self.attach("\n".join(self.config(algorithm, w, [vip]) for w, vip in runs))
                for weights, vip in runs:
                    self.phase(f"{algorithm} {ratio(weights)}", algorithm, weights, vip)
            return
        # Quick: one attach, one VIP per algorithm.
        weights = weights_of(lab, WEIGHTED)
        vips = {a: f"198.19.0.{100 + i}" for i, a in enumerate(algorithms)}
        for vip in vips.values():
            lab.add_vip(vip)
        self.console.rule(f"{', '.join(algorithms)}: one VIP each, weights {ratio(weights)}")
        self.attach("\n".join(self.config(a, weights, [vip]) for a, vip in vips.items()))
        for algorithm, vip in vips.items():
            self.phase(f"{algorithm} {ratio(weights)}", algorithm, weights, vip)

    def burst(self) -> None:
        lab = self._lab
        vip = self.outcome.phases[-1].vip
        self.console.rule(f"line-rate burst: {self.plan.burst_seconds:g} s of UDP to {vip}:{lab.udp_port}")
        result = linerate.line_rate(lab, flows=self.plan.flows, seconds=self.plan.burst_seconds, vip=vip)
        self.outcome.burst = result
        self.console.print(linerate.table(result))
        self.say(linerate.summary(result))

    def failover(self) -> None:
        """One backend's servers stop; fastlb's health checks take it out of the tables."""
        lab = self._lab
        victim = lab.backend_names[-1]
        last = self.outcome.phases[-1]
        check = HEALTH_HTTP
        self.console.rule(f"failover: {victim} goes down")
        lab.stop_server(victim)
        took = lb_process.wait_health(lab, [victim], "down")
        self.say(f"{victim}'s servers are stopped; fastlb's health checks (HTTP GET {check['path']} every "
                 f"{check['interval']:g} s, down after {check['fall']} failures) took it out after {took:.1f} s, "
                 "with no operator action")
        result = self.phase(f"failover {victim} down", last.algorithm, last.weights, last.vip,
                            note=f"{victim}'s servers are stopped; the health checks removed it")
        reached = (result.tcp.counts.get(victim, 0) + result.udp.counts.get(victim, 0)
                   + result.fastlb_tcp[victim].new_flows + result.fastlb_udp[victim].new_flows)
        if reached:
            self.outcome.problems.append(f"failover: {reached} new flows reached {victim} after it went down")
            self.say(f"[bold red]{reached} new flows still reached {victim}[/]")
        else:
            self.say(f"[green]no new connection reached {victim}[/] (client and fastlb agree: 0)")

    def l7(self) -> None:
        """An http VIP through fastlb's HAProxy: routing by Host, and lrt away from a slow backend."""
        lab = self._lab
        vip = f"{lab.vip4}:8080"
        pool = "".join(f'[[vip.backend]]\naddress = "{lab.addr(b)}"\nport = {lab.http_port}\n'
                       for b in lab.backend_names)
        text = (f'[[vip]]\naddress = "{lab.vip4}"\nport = 8080\nprotocol = "http"\nalgorithm = "lrt"\n'
                f'[vip.health]\nkind = "http"\npath = "/health"\ninterval = 0.2\ntimeout = 0.2\n{pool}'
                f'[[vip.route]]\nhost = "api.example.com"\n[[vip.route.backend]]\n'
                f'address = "{lab.addr("b2")}"\nport = {lab.http_port}\n')
        self.console.rule(f"L7: http VIP {vip} through fastlb's HAProxy (routes, lrt)")
        self.detach()
        self._configs += 1
        path = lab.run_dir / f"fastlb-{self._configs}.toml"
        path.write_text(text)
        self._bal = lb_process.start(lab, path, lab.run_dir / "fastlb.log")
        self.say(f"[green]{self._bal.banner.split(';')[0]}[/]; fastlb runs HAProxy for {vip}/http")
        time.sleep(1.0)   # HAProxy's first checks

        def get(count: int, host: str, parallel: int = 1) -> Counter:
            argv = ["curl", "-s", "--max-time", "5", "-H", f"Host: {host}"]
            if parallel > 1:
                argv += ["--parallel", "--parallel-max", str(parallel)]
            res = lab.run("client", argv + [f"http://{vip}/whoami?[1-{count}]"], timeout=120, check=False)
            got = Counter(line.split()[0] for line in res.stdout.splitlines() if line.strip())
            if sum(got.values()) != count:
                self.outcome.problems.append(f"L7: {count - sum(got.values())} of {count} requests failed")
            return got

        def show(label: str, got: Counter) -> None:
            total = sum(got.values()) or 1
            self.say(f"{label}: " + ", ".join(f"{b} {100 * n / total:.0f} %" for b, n in sorted(got.items())))

        show("Host: api.example.com (route to b2), 20 requests", get(20, "api.example.com"))
        show("Host: www.example.com (default pool, lrt), 60 requests", get(60, "www.example.com", 4))
        lab.set_latency(lab.backend_names[-1], 50)
        try:
            get(300, "www.example.com", 16)
            slow = get(600, "www.example.com", 16)
            show(f"{lab.backend_names[-1]} 50 ms slower, 600 requests 16 at a time", slow)
        finally:
            lab.set_latency(lab.backend_names[-1], 0)
        time.sleep(6.0)   # its estimate is pulled back toward the pool's mean; then it is measured fast
        get(300, "www.example.com", 16)
        show(f"{lab.backend_names[-1]} fast again, 600 requests 16 at a time", get(600, "www.example.com", 16))
        self.detach()

    def draw(self) -> None:
        bars = [chart.Bar(p.name, dict(p.tcp.counts)) for p in self.outcome.phases]
        if self.outcome.burst is not None:
            # after the algorithm phases, where it was sent
            bars.insert(len(bars) - 1, chart.Bar("line-rate burst", self.outcome.burst.received))
        subtitle = ("TCP connections as answered at the client; the burst: UDP packets counted "
                    "at the backends' eth0")
        chart.draw(bars, self.chart_path, "fastlb demo: each backend's share of the traffic, by phase",
                   subtitle)

    # ---- the whole run ------------------------------------------------------------

    def run(self) -> int:
        self._start = time.monotonic()
        mode = "quick" if self.quick else "full"
        self.console.rule(f"[bold]fastlb lab demo ({mode})")
        lab = Lab(backends=3, ipv6=True, run_dir=True)
        self._lab = lab
        try:
            lab.up()
            self.say(f"lab {lab.runid} is up: client {lab.addr('client')}, LB {lab.addr('lb')}, "
                     + ", ".join(f"{b} {lab.addr(b)}" for b in lab.backend_names)
                     + f"; VIP {lab.vip4} (TCP {lab.http_port}, UDP {lab.udp_port})")
            self.algorithms()
            self.burst()
            self.failover()
            if not self.quick:
                lab.start_server(lab.backend_names[-1])
                self.l7()
        finally:
            try:
                self.detach()
            finally:
                lab.down()
            self.say(f"lab {lab.runid} removed (namespaces, fastlb, servers)")
        self.draw()
        self.say(f"chart written to {self.chart_path.resolve()}")
        elapsed = time.monotonic() - self._start
        if self.outcome.problems:
            for problem in self.outcome.problems:
                self.console.print(f"[bold red]problem:[/] {problem}")
        total = sum(p.tcp.made + p.udp.made for p in self.outcome.phases)
        failed = sum(p.failed for p in self.outcome.phases)
        verdict = "[green]all answered[/]" if not failed else f"[bold red]{failed} failed[/]"
        self.console.print(f"[bold]demo finished in {elapsed:.1f} s[/]: {len(self.outcome.phases)} phases, "
                           f"{total:,} connections and exchanges, {verdict}")
        return self.outcome.exit_code
