"""`fastlb decap`: the backends' side of tunnel mode, on the command line."""

from __future__ import annotations

import json

import click

XDP_MODES = ("auto", "native", "generic")


@click.group()
def decap():
    """Strip fastlb's tunnel headers on a backend (tunnel forwarding).

    \b
    Example, on each backend of a tunnel VIP:
      sudo ip addr add 198.19.0.100/32 dev lo
      sudo fastlb decap attach eth0 --vip 198.19.0.100 --from 198.18.200.0/24
    """


def _check_each(values, parse, option: str, problem: str) -> None:
    """One clear error naming the option and the bad value."""
    for value in values:
        try:
            parse(value)
        except ValueError as exc:
            raise click.BadParameter(f"{value!r} {problem}", param_hint=option) from exc


@decap.command("attach")
@click.argument("iface", metavar="IFACE")
@click.option("--vip", "vips", multiple=True, required=True, metavar="ADDR",
              help="A VIP this backend serves (repeat for several).")
@click.option("--from", "sources", multiple=True, metavar="PREFIX",
              help="Accept tunnels only from this outer source prefix: the balancers' tunnel_source "
                   "(repeat for several). Others are dropped (decap status: source_refused). "
                   "Without it, every source is accepted.")
@click.option("--xdp-mode", type=click.Choice(XDP_MODES), default="auto", show_default=True,
              help="native, generic, or auto (native, falling back to generic).")
def decap_attach(iface, vips, sources, xdp_mode):
    """Attach the decap program to IFACE and return (it stays attached)."""
    import ipaddress

    from fastlb.controller import decap as model
    _check_each(vips, ipaddress.ip_address, "--vip", "is not an IP address; write e.g. 198.19.0.100")
    _check_each(sources, ipaddress.ip_network, "--from",
                "is not a prefix without host bits; write e.g. 198.18.200.0/24")
    result = model.attach(iface, vips, xdp_mode=xdp_mode, sources=sources)
    click.echo(f"fastlb: decap attached to {iface} ({result.mode} mode, prog id {result.prog_id}); "
               f"outer destinations: {', '.join(result.locals)}; VIPs: {', '.join(result.vips)}; "
               f"outer sources: {', '.join(result.sources)}")
    if not sources:
        click.echo("fastlb: warning: decap accepts tunnels from any source, so anyone who can route to "
                   "this host reaches its VIPs around the balancer; give --from with the balancers' "
                   "tunnel_source prefixes", err=True)


@decap.command("detach")
@click.argument("iface", metavar="IFACE")
def decap_detach(iface):
    """Remove the decap program and its pins from IFACE."""
    from fastlb.controller import decap as model
    from fastlb.errors import FastlbError
    if not model.detach(iface):
        raise FastlbError(f"fastlb decap is not attached to {iface} in this network namespace",
                          fix="see 'fastlb decap status'")
    click.echo(f"fastlb: decap detached from {iface}")


@decap.command("status")
@click.option("--json", "as_json", is_flag=True, help="Print the same as JSON.")
def decap_status(as_json):
    """List decap attachments, their addresses and counters."""
    from fastlb.controller import decap as model
    data = model.status()
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    if not data:
        click.echo("fastlb: decap is not attached to any interface in this network namespace")
    for att in data:
        state = "attached" if att["attached"] else "NOT attached"
        click.echo(f"{att['interface']}: {state}; VIPs {', '.join(att['vips'])}; "
                   f"outer destinations {', '.join(att['locals'])}; outer sources {', '.join(att['sources'])}")
        click.echo("  " + "  ".join(f"{k} {v}" for k, v in att["counters"].items()))
