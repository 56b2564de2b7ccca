"""``fastlb lab``: the namespace lab from the command line.

A click group, added to fastlb's command line by ``fastlb/cli/__init__.py``. Every
command needs root. Nothing heavy is imported until a command runs: BCC,
pyroute2, rich and matplotlib load inside the commands that use them.
"""

from __future__ import annotations

import json
from collections.abc import Callable

import click

from fastlb import errors

MAX_BACKENDS = 100  # fastlb.lab.topology.MAX_BACKENDS, repeated so that --help stays light


class LabChoice(click.ParamType):
    """A value the config knows (fastlb.config.ALGORITHMS, say), read when the option is
    parsed so that what the config accepts is what this command accepts, and of those
    only the ones the lab's wiring hosts (``lab_hosts``; None: every one)."""

    name = "choice"

    def __init__(self, what: str, known: Callable[[], tuple[str, ...]],
                 lab_hosts: Callable[[], tuple[str, ...]] | None = None):
        self.what = what
        self.known = known
        self.lab_hosts = lab_hosts

    def listing(self) -> list[str]:
        hosted = self.known() if self.lab_hosts is None else self.lab_hosts()
        return [v for v in self.known() if v in hosted]

    def get_metavar(self, param, ctx=None) -> str:
        return "[" + "|".join(self.listing()) + "]"

    def convert(self, value, param, ctx):
        listing = self.listing()
        if value in listing:
            return value
        if value in self.known():
            self.fail(f"{self.what} {value!r} works in fastlb, but the lab cannot host it yet: its backends "
                      f"hold the VIPs on lo and answer the client directly; use one of: {', '.join(listing)}",
                      param, ctx)
        self.fail(f"unknown {self.what} {value!r}; use one of: {', '.join(listing)}", param, ctx)


def _algorithms() -> tuple[str, ...]:
    from fastlb import config
    return config.ALGORITHMS


def _forwarding() -> tuple[str, ...]:
    from fastlb import config
    return config.FORWARDING


def _lab_forwarding() -> tuple[str, ...]:
    from fastlb.lab.topology import LAB_FORWARDING
    return LAB_FORWARDING


def require_root(command: str) -> None:
    errors.require_root(f"lab {command}", needs="network namespaces, BPF")


def _console():
    from rich.console import Console
    return Console(highlight=False)


@click.group("lab")
def lab():
    """A namespace lab on this host: a client, fastlb and backends (needs root).

    Everything lives in network namespaces named flb-<runid>-*, with addresses
    in 198.18.0.0/15 and 2001:db8::/32; the host's own interfaces are never
    touched.

    \b
    Examples:
      sudo fastlb lab demo                 # the whole story in about a minute
      sudo fastlb lab up                   # a lab that stays up, fastlb attached
      sudo fastlb lab traffic              # real connections through it
      sudo fastlb lab traffic --line-rate  # a bounded line-rate UDP burst
      sudo fastlb lab status
      sudo fastlb lab down
    """


@lab.command()
@click.option("-n", "--backends", type=click.IntRange(1, MAX_BACKENDS), default=3, show_default=True,
              metavar="N", help="Backends (b1..bN), each with an HTTP and a UDP echo server.")
@click.option("--ipv6/--no-ipv6", default=True, show_default=True, help="IPv6 addresses and VIPs too.")
@click.option("--algorithm", type=LabChoice("algorithm", _algorithms), default="maglev",
              show_default=True, help="Algorithm of every VIP.")
@click.option("--forwarding", type=LabChoice("forwarding", _forwarding, _lab_forwarding),
              default="dsr", show_default=True,
              help="Forwarding of every VIP (only those the lab can host).")
def up(backends, ipv6, algorithm, forwarding):
    """Build a lab, attach fastlb in it, and leave it running.

    The lab stays until 'fastlb lab down'; its config and logs are in
    /run/fastlb/lab/<runid>/.

    \b
    Example:
      sudo fastlb lab up --backends 4 --no-ipv6
    """
    require_root("up")
    from fastlb.lab import runs

    lab_, bal = runs.up(backends=backends, ipv6=ipv6, algorithm=algorithm, forwarding=forwarding)
    _print_up(lab_, bal, algorithm, forwarding)


def _print_up(lab_, bal, algorithm: str, forwarding: str) -> None:
    from rich.table import Table

    console = _console()
    t = Table(title=f"fastlb lab {lab_.runid} is up: {len(lab_.backend_names)} backends, "
                    f"{'IPv4 + IPv6' if lab_.ipv6 else 'IPv4 only'}, {algorithm}/{forwarding}")
    t.add_column("role")
    t.add_column("namespace")
    t.add_column("eth0")
    t.add_column("runs")
    families = (4, 6) if lab_.ipv6 else (4,)
    for role in lab_.hosts:
        runs_here = {"client": "", "lb": f"fastlb attach eth0 (pid {bal.pid})"}.get(
            role, f"HTTP :{lab_.http_port}, UDP echo :{lab_.udp_port}; VIPs on lo")
        t.add_row(role, lab_.ns(role), ", ".join(lab_.addr(role, f) for f in families), runs_here)
    t.add_row("switch", lab_.ns("switch"), f"bridge {lab_.bridge}", "")
    console.print(t)
    from fastlb.lab.topology import HEALTH_HTTP

    console.print(f"VIPs: {', '.join(lab_.vips)}, TCP {lab_.http_port} (HTTP) and UDP {lab_.udp_port} "
                  f"(echo), routed by the client via the LB")
    console.print(f"Health checks: HTTP GET {HEALTH_HTTP['path']} every {HEALTH_HTTP['interval']:g} s; "
                  f"all backends are up")
    console.print(f"Files: {lab_.run_dir}/ (fastlb.toml, fastlb.log, b1.log, ...)")
    client, lb = lab_.ns("client"), lab_.ns("lb")
    examples = [f"sudo ip netns exec {client} curl http://{lab_.vip4}/"]
    if lab_.ipv6:
        examples.append(f"sudo ip netns exec {client} curl -g 'http://[{lab_.vip6}]/'")
    examples += [
        f"sudo ip netns exec {lb} fastlb stats",
        f"sudo fastlb lab traffic --lab {lab_.runid}",
        f"sudo fastlb lab traffic --lab {lab_.runid} --line-rate",
        f"sudo fastlb lab down {lab_.runid}",
    ]
    console.print("Try:")
    for line in examples:
        console.print(f"  {line}", markup=False, soft_wrap=True)


@lab.command()
@click.argument("runid", required=False, metavar="[RUNID]")
@click.option("--all", "all_", is_flag=True,
              help="Every lab made by 'lab up', and every stale one left by a crash.")
def down(runid, all_):
    """Remove a lab: fastlb detaches first, then everything else goes.

    Without RUNID, the only lab made by 'lab up'.
    """
    if runid and all_:
        raise click.UsageError("give a RUNID or --all, not both")
    require_root("down")
    from fastlb.lab import runs

    if all_:
        todo = [r for r in runs.runs() if r.state.persistent or r.kind == "stale"]
        if not todo:
            click.echo("fastlb lab: no lab to remove")
            return
    else:
        todo = [runs.find(runid)]
    for run in todo:
        removed = runs.down(run)
        click.echo(f"fastlb lab: removed lab {run.runid} ({len(removed)} namespaces)")


@lab.command()
@click.option("--json", "as_json", is_flag=True, help="Print the same as JSON.")
def status(as_json):
    """List the labs: made by 'lab up', owned by a running process, or stale."""
    require_root("status")
    from fastlb.lab import runs

    found = [r.describe() for r in runs.runs()]
    if as_json:
        click.echo(json.dumps(found, indent=2))
        return
    if not found:
        click.echo("fastlb lab: no labs")
        return
    from rich.table import Table

    t = Table(title="fastlb labs")
    for col in ("runid", "made by", "backends", "IPv6", "algorithm", "namespaces", "fastlb", "folder"):
        t.add_column(col)
    for d in found:
        fastlb = f"pid {d['fastlb_pid']}, " + ("running" if d["fastlb_running"] else "NOT running") \
            if d["fastlb_pid"] else "-"
        t.add_row(d["runid"], d["kind"], str(d["backends"] or "?"), {True: "yes", False: "no"}.get(d["ipv6"], "?"),
                  f"{d['algorithm']}/{d['forwarding']}" if d["algorithm"] else "-",
                  f"{d['namespaces_present']}/{len(d['namespaces'])}", fastlb, d["run_dir"] or "-")
    _console().print(t)


@lab.command()
@click.option("--lab", "runid", metavar="RUNID", help="The lab (default: the only one made by 'lab up').")
@click.option("--family", type=click.Choice(["4", "6"]), default="4", show_default=True,
              help="IPv4 or IPv6 VIP.")
@click.option("--connections", type=click.IntRange(1, 100_000), default=300, show_default=True, metavar="N",
              help="TCP connections (HTTP GETs), and as many UDP exchanges.")
@click.option("--line-rate", is_flag=True,
              help="Instead: a line-rate UDP burst to the VIP's UDP port (BPF_PROG_TEST_RUN live frames).")
@click.option("--scapy", is_flag=True,
              help="--line-rate: send scapy-built frames, paced at --rate, instead of live frames.")
@click.option("--rate", type=click.IntRange(1, 20_000), default=None, metavar="N",
              help="--scapy: frames a second.  [default: 1000]")
@click.option("--flows", type=click.IntRange(1, 64512), default=None, metavar="N",
              help="--line-rate: source ports to cycle through.  [default: 1000]")
@click.option("--seconds", type=click.FloatRange(0, 30, min_open=True), default=None, metavar="S",
              help="--line-rate: stop after S seconds.  [default: 2]")
@click.option("--packets", type=click.IntRange(1, 1 << 31), default=None, metavar="N",
              help="--line-rate: stop after N frames (whichever comes first).")
def traffic(runid, family, connections, line_rate, scapy, rate, flows, seconds, packets):
    """Send traffic through a lab made by 'lab up', counted at both ends.

    By default: N TCP connections and N UDP exchanges to the VIP, with the
    backend that answered each (client side) next to fastlb's own counters.
    With --line-rate: a bounded UDP burst, with what the generator sent, what
    fastlb forwarded and what the backends' eth0 received. With --scapy too,
    the burst is scapy's frames at --rate a second: slow, but in the lab every
    frame arrives, so the three counts agree.

    \b
    Examples:
      sudo fastlb lab traffic --connections 1000
      sudo fastlb lab traffic --line-rate --flows 10000 --seconds 3
      sudo fastlb lab traffic --line-rate --scapy --rate 2000 --packets 5000
    """
    if not line_rate and (scapy or (rate, flows, seconds, packets) != (None, None, None, None)):
        raise click.UsageError("--scapy, --rate, --flows, --seconds and --packets go with --line-rate")
    if rate is not None and not scapy:
        raise click.UsageError("--rate goes with --scapy")
    require_root("traffic")
    from fastlb.lab import runs
    from fastlb.lab.topology import Lab

    run = runs.find(runid)
    lab_ = Lab.existing(run.runid)
    vip = lab_.vip(int(family))
    console = _console()
    if line_rate:
        from fastlb.lab import linerate

        result = linerate.line_rate(lab_, flows=1000 if flows is None else flows,
                                    seconds=2.0 if seconds is None else seconds, packets=packets, vip=vip,
                                    scapy=scapy, rate=linerate.DEFAULT_RATE if rate is None else rate)
        console.print(linerate.table(result))
        console.print(linerate.summary(result))
        return
    from fastlb.lab import spread

    result = spread.measure(lab_, f"lab {run.runid}", run.info.get("algorithm", "?"), {}, vip=vip,
                            tcp=connections, udp=connections)
    console.print(spread.table(result))
    if result.failed:
        raise click.exceptions.Exit(1)


@lab.command()
@click.option("--quick", is_flag=True, help="The short version (at most 30 s): one attach for all algorithms.")
@click.option("-o", "--output", default="fastlb-demo.png", show_default=True, metavar="FILE",
              type=click.Path(dir_okay=False), help="Where to write the chart (PNG).")
def demo(quick, output):
    """Show fastlb balancing real connections, start to finish.

    Builds a lab, runs every algorithm this build has with real TCP and UDP
    traffic (client counts next to fastlb's own counters), a line-rate burst
    and a failover, removes everything and writes a chart. Exits 1 if any
    connection failed.

    \b
    Example:
      sudo make demo        # or: sudo fastlb lab demo --quick
    """
    require_root("demo")
    from fastlb.lab.demo import Demo

    code = Demo(quick=quick, chart_path=output).run()
    if code:
        raise click.exceptions.Exit(code)
