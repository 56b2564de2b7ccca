"""The fastlb command line.

Every FastlbError becomes one line on stderr, ``fastlb: error: ...``, naming
the object and the fix, with a non-zero exit code. Commands that compile BPF
import the loader lazily, so ``fastlb --help`` and ``fastlb check`` stay fast.
"""

from __future__ import annotations

import json
import signal
import sys

import click

from . import __version__
from .errors import FastlbError

XDP_MODES = ("auto", "native", "generic")
STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}


class FastlbGroup(click.Group):
    """Turns FastlbError into one line and its exit code."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except FastlbError as exc:
            click.echo(f"fastlb: error: {exc}", err=True)
            ctx.exit(exc.exit_code)


@click.group(cls=FastlbGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="fastlb")
def main():
    """fastlb: a kernel-assisted Layer 4 load balancer (XDP).

    \b
    Examples:
      sudo fastlb attach eth0 -c fastlb.toml     # balance, in the foreground
      sudo fastlb status                          # attachments, VIPs, counters
      sudo fastlb detach eth0                     # remove program and pins
    """


def _load_config(path: str):
    from .config import load_config
    return load_config(path)


@main.command()
@click.option("-c", "--config", "config_path", required=True, metavar="FILE", envvar="FASTLB_CONFIG",
              type=click.Path(dir_okay=False), help="TOML config to validate.")
def check(config_path):
    """Validate a config without touching anything."""
    config = _load_config(config_path)
    backends = sum(len(v.backends) for v in config.vips)
    click.echo(f"{config_path}: ok ({len(config.vips)} VIPs, {backends} backends)")


@main.command()
@click.argument("iface", metavar="IFACE")
@click.option("-c", "--config", "config_path", required=True, metavar="FILE", envvar="FASTLB_CONFIG",
              type=click.Path(dir_okay=False), help="TOML config with the VIPs and backends.")
@click.option("--xdp-mode", type=click.Choice(XDP_MODES), default="auto", show_default=True,
              envvar="FASTLB_XDP_MODE",
              help="native, generic, or auto (native, falling back to generic with a note).")
@click.option("--keep", is_flag=True, help="On exit, leave the data plane attached (hitless restarts).")
def attach(iface, config_path, xdp_mode, keep):
    """Attach the balancer to IFACE and stay in the foreground.

    The program and its maps stay until SIGINT/SIGTERM, when fastlb detaches
    cleanly (unless --keep).

    \b
    Example:
      sudo fastlb attach eth0 -c /etc/fastlb/fastlb.toml
    """
    from . import balancer
    config = _load_config(config_path)
    # Block the stop signals before attaching: one that arrives while attaching
    # (or just after the banner) is then taken by sigwait and detaches cleanly.
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    result = balancer.attach(iface, config, xdp_mode=xdp_mode)
    for note in result.notes:
        click.echo(f"fastlb: note: {note}", err=True)
    vips = ", ".join(v.name for v in config.vips)
    click.echo(f"fastlb: attached to {iface} ({result.mode} mode, prog id {result.prog_id}); "
               f"VIPs: {vips}; pins: {result.pin_dir}", nl=True)
    sys.stdout.flush()
    _wait_for_signal()
    if keep:
        click.echo(f"fastlb: leaving {iface} attached (--keep); remove with: fastlb detach {iface}")
        return
    balancer.detach(iface)
    click.echo(f"fastlb: detached from {iface}")


def _wait_for_signal() -> None:
    signal.sigwait(STOP_SIGNALS)


def _parse_src(ctx, param, value):
    from .config import parse_vip_spec
    try:
        addr, port, _ = parse_vip_spec(value)
    except ValueError as exc:
        raise click.BadParameter(f"{value!r} is not ADDR:PORT; write e.g. 198.18.0.1:40000 "
                                 "or [2001:db8::1]:40000") from exc
    return str(addr), port


@main.command()
@click.option("--vip", "vip_spec", required=True, metavar="ADDR:PORT/PROTO",
              help="The VIP, e.g. 198.19.0.100:80/tcp or [2001:db8::100]:53/udp.")
@click.option("--src", required=True, metavar="ADDR:PORT", callback=_parse_src,
              help="The client's address and source port.")
@click.option("-c", "--config", "config_path", required=True, metavar="FILE", envvar="FASTLB_CONFIG",
              type=click.Path(dir_okay=False), help="The config the balancer runs.")
@click.option("--no-live", is_flag=True, help="lc/lrt: use zero counts instead of the attached maps'.")
@click.option("--json", "as_json", is_flag=True, help="Print the same as JSON.")
def explain(vip_spec, src, config_path, no_live, as_json):
    """Say which backend a new flow would get, and why.

    Computed from the config and the selection core (the same hash and tables
    as the XDP program); lc/lrt read the live per-backend counts of the
    attachment that serves the VIP, if any. Conntrack is never read.

    \b
    Example:
      fastlb explain -c fastlb.toml --vip 198.19.0.100:80/tcp --src 198.18.0.1:40000
    """
    import dataclasses

    from . import explain as model
    config = _load_config(config_path)
    try:
        vip = config.find_vip(vip_spec)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--vip") from exc
    if vip is None:
        known = ", ".join(v.name for v in config.vips)
        raise FastlbError(f"{config_path} has no VIP {vip_spec}", fix=f"use one of: {known}")
    active = rtt = None
    source = "no attachment serves this VIP here: counts taken as 0"
    if vip.algorithm in ("lc", "lrt") and not no_live:
        live = model.live_counts(vip)
        if live is not None:
            active, rtt, source = live
    elif no_live:
        source = "--no-live: counts taken as 0"
    try:
        result = model.explain(config, vip, src[0], src[1], active, rtt, counts_source=source)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--src") from exc
    if as_json:
        click.echo(json.dumps(dataclasses.asdict(result), indent=2))
    else:
        click.echo("\n".join(result.lines()))


@main.command()
@click.argument("iface", metavar="IFACE")
def detach(iface):
    """Remove fastlb's program and pins from IFACE."""
    from . import balancer
    if not balancer.detach(iface):
        raise FastlbError(f"fastlb is not attached to {iface} in this network namespace",
                          fix="see 'fastlb status' for what is attached")
    click.echo(f"fastlb: detached from {iface}")


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print the same as JSON.")
def status(as_json):
    """List attachments, VIPs, backends and counters."""
    from . import balancer
    data = balancer.status()
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    if not data:
        click.echo("fastlb: not attached to any interface in this network namespace")
        return
    for att in data:
        state = f"attached, {att['mode']} mode, prog id {att['prog_id']}" if att["attached"] else "NOT attached"
        click.echo(f"{att['interface']}: {state}")
        if "problem" in att:
            click.echo(f"  problem: {att['problem']}")
        for vip in att.get("vips", []):
            click.echo(f"  VIP {vip['vip']}  {vip['algorithm']}/{vip['forwarding']}  "
                       f"packets {vip['packets']}  bytes {vip['bytes']}  new flows {vip['new_flows']}")
            for be in vip["backends"]:
                click.echo(f"    backend {be['backend']}:{be['port']}  weight {be['weight']}  mac {be['mac']}  "
                           f"packets {be['packets']}  new flows {be['new_flows']}")
        if att.get("verdicts"):
            click.echo("  verdicts: " + "  ".join(f"{k} {v}" for k, v in sorted(att["verdicts"].items())))
            moved = {k: r["packets"] for k, r in att["reasons"].items() if r["packets"]}
            if moved:
                click.echo("  reasons: " + "  ".join(f"{k} {v}" for k, v in moved.items()))


from .decap_cli import decap as _decap_group  # noqa: E402
from .lab.cli import lab as _lab_group  # noqa: E402
main.add_command(_decap_group)
main.add_command(_lab_group)


if __name__ == "__main__":
    main()
