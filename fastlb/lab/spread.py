"""How one VIP spreads real connections over the lab's backends, seen from both ends.

:func:`measure` makes ``tcp`` HTTP requests (a TCP connection each) and
``udp`` UDP exchanges (a socket, so a flow, each) from the client namespace
to a VIP, and reads fastlb's per-backend counters (``fastlb status --json``
in the LB namespace) before and after. Every request is made to the end: a
failure is counted, not fatal, so a table can show it and the caller can
exit non-zero.

The client side runs as ``python -m fastlb.lab.spread ...`` in the client
namespace and prints one JSON object, like :mod:`fastlb.lab.client_worker` (whose
single requests it repeats).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fastlb.lab.lb_process import Counters
    from fastlb.lab.topology import Lab

MAX_COUNT = 100_000
MAX_ERRORS = 3  # failure messages kept (all failures are counted)


@dataclass(frozen=True)
class Tally:
    """Requests of one kind made to the end: answers per backend, failures."""

    counts: Counter
    failed: int = 0
    errors: list[str] = field(default_factory=list)

    @property
    def answered(self) -> int:
        return sum(self.counts.values())

    @property
    def made(self) -> int:
        return self.answered + self.failed


@dataclass(frozen=True)
class Spread:
    """One phase: what the client saw and what fastlb counted, per backend."""

    name: str
    vip: str
    algorithm: str
    weights: dict[str, int]
    tcp: Tally
    udp: Tally
    fastlb_tcp: dict[str, Counters]     # per backend, this phase only
    fastlb_udp: dict[str, Counters]
    note: str = ""

    @property
    def failed(self) -> int:
        return self.tcp.failed + self.udp.failed

    def share(self, backend: str) -> float:
        """The backend's share of the TCP connections answered, in percent."""
        return 100.0 * self.tcp.counts.get(backend, 0) / self.tcp.answered if self.tcp.answered else 0.0


def measure(lab: Lab, name: str, algorithm: str, weights: dict[str, int], vip: str | None = None,
            tcp: int = 300, udp: int = 300, timeout: float = 2.0, note: str = "") -> Spread:
    """Make the requests to ``vip`` (the lab's IPv4 VIP by default) and count at both ends.

    fastlb must be attached and serve the VIP on the lab's HTTP and UDP ports.
    """
    from fastlb.lab import lb_process
    from fastlb.lab.netns import LabError

    vip = vip or lab.vip4
    before = lb_process.status(lab)
    res = lab.run_python("client", "fastlb.lab.spread", "--host", vip, "--tcp-port", lab.http_port,
                         "--tcp", tcp, "--udp-port", lab.udp_port, "--udp", udp, "--timeout", timeout,
                         timeout=30 + (tcp + udp) * timeout, check=False)
    try:
        out = json.loads(res.stdout)
        tallies = {k: Tally(Counter(out[k]["counts"]), out[k]["failed"], out[k]["errors"])
                   for k in ("tcp", "udp")}
    except (ValueError, KeyError, TypeError):
        raise LabError(f"the client helper failed (exit {res.returncode}): "
                       f"{res.stderr.strip()[-500:]}") from None
    after = lb_process.status(lab)

    def delta(port: int, protocol: str) -> dict[str, Counters]:
        old = lb_process.backend_counters(lab, before, vip, port, protocol)
        new = lb_process.backend_counters(lab, after, vip, port, protocol)
        return {b: new[b] - old[b] for b in lab.backend_names}

    return Spread(name=name, vip=vip, algorithm=algorithm, weights=dict(weights),
                  tcp=tallies["tcp"], udp=tallies["udp"], fastlb_tcp=delta(lab.http_port, "tcp"),
                  fastlb_udp=delta(lab.udp_port, "udp"), note=note)


def _pct(part: int, whole: int) -> str:
    return f"{100 * part / whole:.1f} %" if whole else "-"


def table(spread: Spread):
    """A rich Table: per backend, the client's counts next to fastlb's, for TCP and UDP."""
    from rich.table import Table

    ok = "all answered" if not spread.failed else f"[bold red]{spread.failed} FAILED[/]"
    caption = ("client: who answered; fastlb: new flows it sent there (a UDP exchange that reuses a "
               "recent source port is the same flow to it)")
    t = Table(title=f"{spread.name}: {spread.tcp.made} TCP connections and {spread.udp.made} UDP "
                    f"exchanges to {spread.vip}, {ok}",
              caption=f"{spread.note}. {caption}" if spread.note else caption)
    t.add_column("backend")
    t.add_column("weight", justify="right")
    t.add_column("TCP\nclient / fastlb", justify="right")
    t.add_column("TCP\nshare", justify="right")
    t.add_column("UDP\nclient / fastlb", justify="right")
    t.add_column("UDP\nshare", justify="right")
    t.add_column("fastlb\npackets", justify="right")
    for b in sorted(spread.fastlb_tcp, key=lambda b: int(b[1:])):
        tcp_n, udp_n = spread.tcp.counts.get(b, 0), spread.udp.counts.get(b, 0)
        t.add_row(b, str(spread.weights.get(b, 1)),
                  f"{tcp_n:,} / {spread.fastlb_tcp[b].new_flows:,}", _pct(tcp_n, spread.tcp.answered),
                  f"{udp_n:,} / {spread.fastlb_udp[b].new_flows:,}", _pct(udp_n, spread.udp.answered),
                  f"{spread.fastlb_tcp[b].packets + spread.fastlb_udp[b].packets:,}")
    if spread.failed:
        t.add_row("[red]failed[/]", "", f"[red]{spread.tcp.failed}[/]", "", f"[red]{spread.udp.failed}[/]", "", "")
    return t


# ---- the client namespace's side ----------------------------------------------------


def run_requests(kind: str, host: str, port: int, count: int, timeout: float) -> dict:
    """``count`` single requests of ``kind`` (tcp or udp), each on its own connection or socket."""
    from fastlb.lab import client_worker

    counts: Counter = Counter()
    errors: list[str] = []
    failed = 0
    for i in range(count):
        if kind == "tcp":
            out = client_worker.cmd_tcp(host, port, 1, timeout, "/")
        else:
            out = client_worker.cmd_udp(host, port, 1, timeout, None)
        if out.get("error"):
            failed += 1
            if len(errors) < MAX_ERRORS:
                errors.append(f"{kind} request {i + 1}/{count}: {out['error']}")
        else:
            counts.update(out["counts"])
    return {"counts": counts, "failed": failed, "errors": errors}


def main(argv: list[str] | None = None) -> int:
    """Command line entry point: runs in the client namespace and prints one JSON object."""
    p = argparse.ArgumentParser(prog="python -m fastlb.lab.spread",
                                description="fastlb lab: TCP and UDP requests made to the end, JSON out.",
                                epilog="example: ip netns exec flb-1a2b3c-client python -m fastlb.lab.spread "
                                       "--host 198.19.0.100 --tcp 300 --udp 300")
    p.add_argument("--host", required=True, help="address to send to (the VIP)")
    p.add_argument("--tcp-port", type=int, default=80, help="HTTP port (80)")
    p.add_argument("--udp-port", type=int, default=9000, help="UDP echo port (9000)")
    p.add_argument("--tcp", type=int, default=100, metavar="N", help="HTTP requests, one connection each")
    p.add_argument("--udp", type=int, default=100, metavar="N", help="UDP exchanges, one socket each")
    p.add_argument("--timeout", type=float, default=2.0, help="seconds per request (2)")
    a = p.parse_args(argv)
    for n in (a.tcp, a.udp):
        if not 0 <= n <= MAX_COUNT:
            p.error(f"counts must be 0 to {MAX_COUNT}")
    out = {"tcp": run_requests("tcp", a.host, a.tcp_port, a.tcp, a.timeout),
           "udp": run_requests("udp", a.host, a.udp_port, a.udp, a.timeout)}
    json.dump(out, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
