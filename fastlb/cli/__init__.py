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

from fastlb import __version__
from fastlb.errors import FastlbError, require_root

XDP_MODES = ("auto", "native", "generic")
STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}
CONTROLLER_SIGNALS = STOP_SIGNALS | {signal.SIGHUP}


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
      sudo fastlb stats --watch                   # per VIP and backend, with health
      sudo fastlb backend drain 198.19.0.100:80/tcp 198.18.0.11
      sudo fastlb status                          # attachments, VIPs, counters
      sudo fastlb detach eth0                     # remove program and pins
    """


def _load_config(path: str):
    from fastlb.config import load_config
    return load_config(path)


@main.command()
@click.option("-c", "--config", "config_path", required=True, metavar="FILE", envvar="FASTLB_CONFIG",
              type=click.Path(dir_okay=False), help="TOML config to validate.")
def check(config_path):
    """Validate a config without touching anything."""
    config = _load_config(config_path)
    backends = sum(len(v.backends) for v in config.vips)
    click.echo(f"{config_path}: ok ({len(config.vips)} VIPs, {backends} backends)")
    _warn(config)


def _warn(config) -> None:
    from fastlb.config import warnings
    for text in warnings(config):
        click.echo(f"fastlb: warning: {text}", err=True)


def _distinct_ifaces(ctx, param, value):
    if len(set(value)) != len(value):
        raise click.BadParameter(f"{' '.join(value)} names an interface twice; give each once")
    return value


@main.command()
@click.argument("iface", metavar="IFACE")
@click.argument("more_ifaces", metavar="[IFACE]...", nargs=-1, callback=_distinct_ifaces)
@click.option("-c", "--config", "config_path", required=True, metavar="FILE", envvar="FASTLB_CONFIG",
              type=click.Path(dir_okay=False), help="TOML config with the VIPs and backends.")
@click.option("--xdp-mode", type=click.Choice(XDP_MODES), default="auto", show_default=True,
              envvar="FASTLB_XDP_MODE",
              help="native, generic, or auto (native, falling back to generic with a note).")
@click.option("--keep", is_flag=True, help="On exit, leave the data plane attached (hitless restarts).")
@click.option("--metrics", "metrics_listen", default="127.0.0.1:9469", show_default=True, metavar="ADDR:PORT|off",
              envvar="FASTLB_METRICS", callback=lambda ctx, param, value: _parse_listen(value),
              help="Where to serve Prometheus metrics, or off.")
def attach(iface, more_ifaces, config_path, xdp_mode, keep, metrics_listen):
    """Attach the balancer to IFACE and run its controller in the foreground.

    Two-arm: with more interfaces (fastlb attach eth0 eth1), clients arrive on
    the first and backends are reached through the others, as their routes
    say; frames cross by XDP_REDIRECT. fastlb detach takes the first name.

    The controller runs the health checks and keeps the maps current; it
    takes live changes on its control socket (fastlb backend/vip) and
    reloads the config on SIGHUP (a config that does not validate is logged
    and ignored). On SIGINT/SIGTERM it detaches, unless --keep: then the
    data plane stays and the next attach adopts it (maps, conntrack, health).

    \b
    Examples:
      sudo fastlb attach eth0 -c /etc/fastlb/fastlb.toml
      sudo fastlb attach eth0 -c fastlb.toml --keep --metrics off
      sudo fastlb attach eth0 eth1 -c fastlb.toml      # two-arm
    """
    from fastlb.controller.loop import Controller
    config = _load_config(config_path)
    # Block the signals before attaching: one that arrives while attaching (or
    # just after the banner) is then taken by the controller's signal thread.
    signal.pthread_sigmask(signal.SIG_BLOCK, CONTROLLER_SIGNALS)
    ctl = Controller(iface, config_path, config, xdp_mode=xdp_mode, keep=keep, metrics=metrics_listen,
                     extra_ifaces=more_ifaces)
    result = ctl.start()
    _warn(config)   # after the attach: a refused attach says one thing, its error
    for note in result.notes:
        click.echo(f"fastlb: note: {note}", err=True)
    vips = ", ".join(v.name for v in config.vips)
    click.echo(f"fastlb: attached to {' '.join((iface, *more_ifaces))} ({result.mode} mode, "
               f"prog id {result.prog_id}); "
               f"VIPs: {vips}; pins: {result.pin_dir}", nl=True)
    sys.stdout.flush()
    try:
        ctl.run()
    finally:
        detached = ctl.stop()
    if not detached:
        click.echo(f"fastlb: leaving {iface} attached (--keep); remove with: fastlb detach {iface}")
        return
    click.echo(f"fastlb: detached from {iface}")


def _parse_listen(value):
    from fastlb.controller.metrics import parse_listen
    try:
        return parse_listen(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--metrics") from exc


def _parse_src(ctx, param, value):
    from fastlb.config import parse_vip_spec
    try:
        addr, port, _ = parse_vip_spec(value)
    except ValueError as exc:
        raise click.BadParameter(f"{value!r} is not ADDR:PORT; write e.g. 198.18.0.1:40000 "
                                 "or [2001:db8::1]:40000") from exc
    return str(addr), port


@main.command()
@click.option("--vip", "vip_spec", required=True, metavar="ADDR:PORT/PROTO",
              help="The VIP, e.g. 198.19.0.100:80/tcp or [2001:db8::100]:53/udp.")
@click.option("--src", metavar="ADDR:PORT", callback=lambda ctx, param, value: value and _parse_src(ctx, param, value),
              help="The client's address and source port (tcp/udp VIPs).")
@click.option("--host", metavar="HOST", help="http/https VIPs: the request's Host header.")
@click.option("--path", "req_path", default="/", show_default=True, metavar="PATH",
              help="http/https VIPs: the request's path.")
@click.option("-c", "--config", "config_path", required=True, metavar="FILE", envvar="FASTLB_CONFIG",
              type=click.Path(dir_okay=False), help="The config the balancer runs.")
@click.option("--no-live", is_flag=True, help="lc/lrt: use zero counts instead of the attached maps'.")
@click.option("--json", "as_json", is_flag=True, help="Print the same as JSON.")
def explain(vip_spec, src, host, req_path, config_path, no_live, as_json):
    """Say which backend a new flow would get, and why.

    Computed from the config and the selection core (the same hash and tables
    as the XDP program); lc/lrt read the live per-backend counts of the
    attachment that serves the VIP, if any. Conntrack is never read.

    \b
    Example:
      fastlb explain -c fastlb.toml --vip 198.19.0.100:80/tcp --src 198.18.0.1:40000
      fastlb explain -c fastlb.toml --vip 198.19.0.100:80/http --host api.example.com --path /v1/users
    """
    import dataclasses

    from fastlb.dataplane import explain as model
    from fastlb.controller.l7.render import server_name as render_name
    config = _load_config(config_path)
    try:
        vip = config.find_vip(vip_spec)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--vip") from exc
    if vip is None:
        known = ", ".join(v.name for v in config.vips)
        raise FastlbError(f"{config_path} has no VIP {vip_spec}", fix=f"use one of: {known}")
    if vip.is_l7:
        from fastlb.controller.l7 import route
        found = route.match(vip, host, req_path)
        if as_json:
            click.echo(json.dumps({"vip": vip.name, "route": found.route, "pool": found.pool.name,
                                   "algorithm": found.pool.algorithm, "why": found.why,
                                   "backends": [render_name(b) for b in found.pool.backends]}, indent=2))
        else:
            click.echo("\n".join(found.lines(vip)))
        return
    if src is None:
        raise click.BadParameter("a tcp/udp VIP needs the client's ADDR:PORT", param_hint="--src")
    if vip.multi_port:   # the flow's own port goes into its hash
        from fastlb.config import parse_vip_spec
        vip = dataclasses.replace(vip, port=parse_vip_spec(vip_spec)[1])
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
    bound = None if no_live else model.binding(vip, src[0])
    if as_json:
        click.echo(json.dumps(dataclasses.asdict(result) | ({"persistence": bound} if bound else {}), indent=2))
    else:
        click.echo("\n".join(([bound] if bound else []) + result.lines()))


@main.command()
@click.argument("iface", metavar="IFACE")
def detach(iface):
    """Remove fastlb's program and pins from IFACE."""
    from fastlb.controller import attachment
    if not attachment.detach(iface, say=lambda line: click.echo(f"fastlb: {line}")):
        raise FastlbError(f"fastlb is not attached to {iface} in this network namespace",
                          fix="see 'fastlb status' for what is attached")
    click.echo(f"fastlb: detached from {iface}")


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print the same as JSON.")
def status(as_json):
    """List attachments, VIPs, backends and counters."""
    from fastlb.controller import attachment
    data = attachment.status()
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
        if att.get("bgp"):
            _echo_bgp(att["bgp"])
        for vip in att.get("vips", []):
            click.echo(f"  VIP {vip['vip']}  {vip['algorithm']}/{vip['forwarding']}  "
                       f"packets {vip['packets']}  bytes {vip['bytes']}  new flows {vip['new_flows']}")
            if vip.get("bgp"):
                a = vip["bgp"]
                seen = (f"to {a['to_peers']} of {a['peers']} peer(s)" if a.get("in_bird")
                        else "not in BIRD" if "in_bird" in a else "BIRD not asked")
                click.echo(f"    bgp: {a['state']} {a['route']} ({a['why']}; {seen})")
            for be in vip["backends"]:
                click.echo(f"    backend {be['backend']}:{be['port']}  weight {be['weight']}  mac {be['mac']}  "
                           f"packets {be['packets']}  new flows {be['new_flows']}")
        if att.get("verdicts"):
            click.echo("  verdicts: " + "  ".join(f"{k} {v}" for k, v in sorted(att["verdicts"].items())))
            moved = {k: r["packets"] for k, r in att["reasons"].items() if r["packets"]}
            if moved:
                click.echo("  reasons: " + "  ".join(f"{k} {v}" for k, v in moved.items()))



def _echo_bgp(data: dict) -> None:
    """The BGP part of ``fastlb status``: the speaker, what fastlb announces, each session."""
    routes = ", ".join(data["routes"]) or "nothing"
    click.echo(f"  bgp: {data['speaker']} at {data['socket']}, include {data['include']}; announcing {routes}")
    if data.get("problem"):
        click.echo(f"    problem: {data['problem']}")
    for peer in data["peers"]:
        extra = f", {peer['exported']} route(s) exported" if peer.get("exported") is not None else ""
        error = f", last error: {peer['last_error']}" if peer.get("last_error") else ""
        click.echo(f"    peer {peer['address']} AS{peer['as']} ({peer['name']}): {peer['state']}{extra}{error}")


# ---- the running controller: stats, live changes, flows -------------------------------

iface_option = click.option("-i", "--iface", metavar="IFACE", envvar="FASTLB_IFACE", default=None,
                            help="The attachment to talk to; needed only when several run in this namespace.")
save_option = click.option("--save", is_flag=True,
                           help="Also write the running config back to the config file (comments are not "
                                "kept); without it the change is lost at the next restart or reload.")


route_option = click.option("--route", type=click.IntRange(0), default=None, metavar="N",
                            help="http/https VIPs: change route N's pool (vip.route[N], counted from 0 in "
                                 "file order) instead of the VIP's default pool.")


def _call(request: dict, iface: str | None) -> dict:
    from fastlb.controller import control_socket
    return control_socket.call(request, iface)


def _stats(iface: str | None) -> list[dict]:
    """The controller's stats, or the maps' alone when no controller runs."""
    from fastlb.controller import control_socket
    from fastlb.dataplane import stats
    from fastlb.kernel import pins
    from fastlb.kernel.maps import PinnedMaps
    try:
        return [_call({"cmd": "stats"}, iface)["stats"]]
    except control_socket.NoController as exc:
        why = exc.message
    require_root("stats")
    base = pins.ensure_bpffs()
    names = [iface] if iface else pins.attachments(base)
    if not names or not pins.attachment_dir(names[0], base).exists():
        raise FastlbError(f"fastlb is not attached {'to ' + iface if iface else 'to any interface'} in this "
                          "network namespace", fix="attach it: fastlb attach IFACE -c CONFIG")
    out = []
    for name in names:
        with PinnedMaps(pins.attachment_dir(name, base)) as maps:
            data = stats.collect(maps)
        data.update(interface=name, controller=False, note=f"{why}: health unknown, counters from the maps")
        out.append(data)
    return out


@main.command("stats")
@click.option("--json", "as_json", is_flag=True, help="Print JSON (with --watch: one object per line).")
@click.option("--watch", is_flag=True, help="Print again every --every seconds until Ctrl-C.")
@click.option("--every", default=2.0, show_default=True, type=click.FloatRange(0.1, 3600), metavar="SECONDS",
              help="Interval of --watch.")
@iface_option
def stats_cmd(as_json, watch, every, iface):
    """Packets, bytes, new flows, active connections and health, per VIP and backend.

    Also the global verdict and drop-reason counters. Asks the running
    controller; with none running, reads the maps (health then unknown).

    \b
    Examples:
      sudo fastlb stats
      sudo fastlb stats --json --watch --every 1
    """
    import time

    from fastlb.dataplane import stats
    while True:
        data = _stats(iface)
        if as_json:
            click.echo(json.dumps(data if not watch else {"time": time.time(), "attachments": data},
                                  indent=None if watch else 2))
        else:
            for att in data:
                click.echo("\n".join(stats.render(att)))
        if not watch:
            return
        sys.stdout.flush()
        time.sleep(every)


@main.group()
def backend():
    """Add, remove, reweight or drain a backend of a running VIP (no restart).

    \b
    Examples:
      sudo fastlb backend add 198.19.0.100:80/tcp 198.18.0.14 --weight 2
      sudo fastlb backend drain 198.19.0.100:80/tcp 198.18.0.11
      sudo fastlb backend weight 198.19.0.100:80/tcp 198.18.0.11 1 --save
      sudo fastlb backend remove 198.19.0.100:80/tcp 198.18.0.11
      sudo fastlb backend add 198.19.0.100:80/http 198.18.0.21:8080 --route 0
    """


def _change(request: dict, iface, save: bool, route: int | None = None) -> None:
    if route is not None:
        request = {**request, "route": route}
    reply = _call({**request, "save": save}, iface)
    click.echo(f"fastlb: {reply['message']}")


@backend.command("add")
@click.argument("vip", metavar="VIP")
@click.argument("address", metavar="BACKEND")
@click.option("--weight", default=1, show_default=True, type=click.IntRange(0, 65535), help="Its weight.")
@route_option
@iface_option
@save_option
def backend_add(vip, address, weight, route, iface, save):
    """Add BACKEND (ADDR or ADDR:PORT) to VIP (ADDR:PORT/PROTO)."""
    _change({"cmd": "backend.add", "vip": vip, "backend": address, "weight": weight}, iface, save, route)


@backend.command("remove")
@click.argument("vip", metavar="VIP")
@click.argument("address", metavar="BACKEND")
@route_option
@iface_option
@save_option
def backend_remove(vip, address, route, iface, save):
    """Remove BACKEND from VIP: its flows' next packets go to a live backend (expect resets)."""
    _change({"cmd": "backend.remove", "vip": vip, "backend": address}, iface, save, route)


@backend.command("weight")
@click.argument("vip", metavar="VIP")
@click.argument("address", metavar="BACKEND")
@click.argument("weight", type=click.IntRange(0, 65535))
@route_option
@iface_option
@save_option
def backend_weight(vip, address, weight, route, iface, save):
    """Set the weight of BACKEND (0 drains it)."""
    _change({"cmd": "backend.weight", "vip": vip, "backend": address, "weight": weight}, iface, save, route)


@backend.command("drain")
@click.argument("vip", metavar="VIP")
@click.argument("address", metavar="BACKEND")
@route_option
@iface_option
@save_option
def backend_drain(vip, address, route, iface, save):
    """Give BACKEND no new flows; its established flows go on until they end (weight 0)."""
    _change({"cmd": "backend.drain", "vip": vip, "backend": address}, iface, save, route)


@main.group()
def vip():
    """Add or remove a VIP of the running controller (no restart).

    \b
    Examples:
      sudo fastlb vip add 198.19.0.101:80/tcp --backend 198.18.0.11 --backend 198.18.0.12
      sudo fastlb vip remove 198.19.0.101:80/tcp --save
    """


@vip.command("add")
@click.argument("spec", metavar="VIP")
@click.option("-b", "--backend", "backends", multiple=True, required=True, metavar="BACKEND",
              help="A backend, ADDR or ADDR:PORT (repeat for more), weight 1.")
@click.option("--algorithm", type=click.Choice(["maglev", "rr", "wrr", "lc", "lrt"]), default="maglev",
              show_default=True, help="How new flows pick a backend.")
@iface_option
@save_option
def vip_add(spec, backends, algorithm, iface, save):
    """Add VIP (ADDR:PORT/PROTO) with its backends (no health check: add one in the file)."""
    _change({"cmd": "vip.add", "vip": spec, "backends": list(backends), "algorithm": algorithm}, iface, save)


@vip.command("remove")
@click.argument("spec", metavar="VIP")
@iface_option
@save_option
def vip_remove(spec, iface, save):
    """Remove VIP: its packets are no longer balanced."""
    _change({"cmd": "vip.remove", "vip": spec}, iface, save)


@main.command()
@iface_option
def reload(iface):
    """Reload the config file now (as SIGHUP does), and say whether it took."""
    click.echo(f"fastlb: {_call({'cmd': 'reload'}, iface)['message']}")


@main.group()
def flows():
    """Show or clear conntrack entries (works with or without a running controller).

    \b
    Examples:
      sudo fastlb flows list --vip 198.19.0.100:80/tcp
      sudo fastlb flows flush --backend 198.18.0.11
    """


def _flow_filter(maps, vip_spec, backend_spec):
    """Slot ids for --vip and --backend (None: any)."""
    from fastlb.dataplane import flows as ct
    names = ct.Names.read(maps)
    vip_ids = backend_ids = None
    if vip_spec:
        from fastlb.config import parse_vip_spec, vip_name
        try:
            want = vip_name(*parse_vip_spec(vip_spec))
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--vip") from exc
        vip_ids = {i for i, n in names.vips.items() if n == want}
        if not vip_ids:
            raise FastlbError(f"no VIP {want} in the maps", fix="use one of: " + ", ".join(sorted(
                names.vips.values())))
    if backend_spec:
        from fastlb.config.edits import parse_backend_spec
        addr, port = parse_backend_spec(backend_spec)
        backend_ids = {i for i, n in names.backends.items()
                       if n.rpartition(":")[0].strip("[]") == str(addr) and
                       (port is None or n.endswith(f":{port}"))}
        if not backend_ids:
            raise FastlbError(f"no backend {backend_spec} in the maps", fix="use one of: " + ", ".join(sorted(
                set(names.backends.values()))))
    return names, vip_ids, backend_ids


def _open_attachment(iface):
    from fastlb.kernel import pins
    from fastlb.kernel.maps import PinnedMaps
    require_root("flows")
    base = pins.ensure_bpffs()
    names = [iface] if iface else pins.attachments(base)
    if not names or not pins.attachment_dir(names[0], base).exists():
        raise FastlbError("fastlb is not attached" + (f" to {iface}" if iface else "") +
                          " in this network namespace", fix="attach it: fastlb attach IFACE -c CONFIG")
    if len(names) > 1:
        raise FastlbError(f"fastlb is attached to several interfaces here: {', '.join(names)}",
                          fix="say which with --iface")
    return PinnedMaps(pins.attachment_dir(names[0], base))


@flows.command("list")
@click.option("--vip", "vip_spec", metavar="VIP", help="Only this VIP's flows (ADDR:PORT/PROTO).")
@click.option("--backend", "backend_spec", metavar="BACKEND", help="Only this backend's (ADDR or ADDR:PORT).")
@click.option("--limit", default=0, type=click.IntRange(0), help="Show at most this many (0: all).")
@click.option("--persistent", is_flag=True, help="List persistence bindings (client prefix -> backend) instead.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@iface_option
def flows_list(vip_spec, backend_spec, limit, persistent, as_json, iface):
    """List conntrack entries: client, VIP, backend, state and age (TCP) or idle time (UDP).

    With --persistent: the persistence bindings of VIPs with `persistence`,
    each client prefix with its backend, idle time and time left.
    """
    from fastlb.dataplane import flows as ct
    with _open_attachment(iface) as maps:
        names, vip_ids, backend_ids = _flow_filter(maps, vip_spec, backend_spec)
        slots = ct.Slots.read(maps)
        now = ct.now_ns()
        if persistent:
            conf = ct.persistence(maps)
            rows = [ct.describe_binding(k, v, names, slots, conf, now) for k, v in ct.bindings(maps)
                    if (vip_ids is None or k.vip_id in vip_ids) and (backend_ids is None or v.backend_id in backend_ids)]
            _print_bindings(rows, limit, as_json)
            return
        rows = [ct.describe(k, v, names, slots, now) for k, v in ct.select(ct.read(maps), vip_ids, backend_ids)]
    rows.sort(key=lambda r: (r["vip"], r["backend"], r["client"]))
    total = len(rows)
    if limit:
        rows = rows[:limit]
    if as_json:
        click.echo(json.dumps({"total": total, "flows": rows}, indent=2))
        return
    for r in rows:
        clock = f"idle {r['idle_s']:.1f} s"
        state = ",".join(r["flags"]) or "-"
        live = "" if r["live"] else "  (stale: its next packet picks again)"
        click.echo(f"{r['proto']} {r['client']} -> {r['vip']}  backend {r['backend']}  {state}  {clock}{live}")
    click.echo(f"{total} flow(s)" + (f", {len(rows)} shown" if len(rows) < total else ""))


def _print_bindings(rows: list[dict], limit: int, as_json: bool) -> None:
    rows.sort(key=lambda r: (r["vip"], r["client"]))
    total = len(rows)
    rows = rows[:limit] if limit else rows
    if as_json:
        click.echo(json.dumps({"total": total, "bindings": rows}, indent=2))
        return
    for r in rows:
        live = "" if r["live"] else "  (ended: the next connection picks again)"
        click.echo(f"{r['client']} -> {r['vip']}  backend {r['backend']}  idle {r['idle_s']:.1f} s  "
                   f"expires in {r['expires_in_s']:.0f} s{live}")
    click.echo(f"{total} binding(s)" + (f", {len(rows)} shown" if len(rows) < total else ""))


@flows.command("flush")
@click.option("--vip", "vip_spec", metavar="VIP", help="Only this VIP's flows (ADDR:PORT/PROTO).")
@click.option("--backend", "backend_spec", metavar="BACKEND", help="Only this backend's (ADDR or ADDR:PORT).")
@iface_option
def flows_flush(vip_spec, backend_spec, iface):
    """Delete conntrack entries: their next packets pick a backend as new flows do.

    Under maglev most go back where they were; a TCP connection whose
    packet reaches another backend is reset by it. Active counts are
    recounted afterwards.
    """
    from fastlb.dataplane import flows as ct
    with _open_attachment(iface) as maps:
        _, vip_ids, backend_ids = _flow_filter(maps, vip_spec, backend_spec)
        gone = ct.delete(maps, [k for k, _ in ct.select(ct.read(maps), vip_ids, backend_ids)])
        ct.reconcile_active(maps)
    click.echo(f"fastlb: flushed {gone} flow(s)")


from fastlb.cli.decap import decap as _decap_group  # noqa: E402
from fastlb.lab.cli import lab as _lab_group  # noqa: E402

main.add_command(_decap_group)
main.add_command(_lab_group)

