"""Attach, detach and inspect fastlb on an interface.

The order of ``attach`` keeps the host safe and leaves nothing half-applied:
everything that can be checked is checked before the first change (root,
the interface, a foreign XDP program, the backends' MACs); the program is
compiled and the maps filled before the program is attached; and a failure
after the first change removes what this attach created.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from fastlb.controller import state
from fastlb.dataplane import identity, stats
from fastlb.dataplane.tables import apply
from fastlb.errors import FastlbError, require_root
from fastlb.kernel import neighbours, pins, structs, xdp
from fastlb.kernel.layout import Sizes
from fastlb.kernel.loader import Program
from fastlb.kernel.maps import PinnedMaps


@dataclass
class AttachResult:
    ifname: str
    mode: str
    pin_dir: Path
    prog_id: int
    written: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def attach(ifname: str, config, xdp_mode: str = "auto", *, macs: dict[str, str] | None = None,
           down: frozenset = frozenset(), extra_ifaces=()) -> AttachResult:
    """Compile, fill the maps and attach to ``ifname`` (or update fastlb's own attachment).

    ``macs`` (backend address -> MAC) skips the resolution, and ``down``
    names backends that fail their checks (fastlb.dataplane.tables.apply); the
    controller passes both. When fastlb is attached already, its maps are
    adopted (pinned maps, conntrack and all) and its program is replaced
    atomically through its link.

    ``extra_ifaces`` makes a two-arm attachment: clients arrive on
    ``ifname``; backends are reached through whichever of the interfaces
    the route to each leads, and frames for them leave by XDP_REDIRECT. The
    program is attached to every interface, the maps pinned once.
    """
    require_root("attach")
    ifaces = [neighbours.interface(n) for n in (ifname, *extra_ifaces)]
    iface = ifaces[0]
    base = pins.ensure_bpffs()
    pin_dir = pins.attachment_dir(ifname, base)
    for i, each in enumerate(ifaces):
        xdp.refuse_foreign(each, pin_dir, primary=i == 0)
    addresses = {b.address for v in config.vips for b in v.backends}
    if macs is None:
        macs = neighbours.resolve_macs(ifaces, addresses,
                                  on_link={b.address for v in config.vips if v.forwarding == "dsr"
                                           for b in v.backends})
    two_arm = len(ifaces) > 1
    slots = [(i.index, i.mac) for i in ifaces] if two_arm else None
    egress = neighbours.egress(ifaces, addresses) if two_arm else None
    sizes = Sizes.from_settings(config.settings)

    created = not pin_dir.exists()
    prog = Program(pin_dir, sizes)
    try:
        prog.load()
        with PinnedMaps(pin_dir) as maps:
            written = apply(maps, config, macs, sizes, lb_mac=iface.mac, down=down, ifaces=slots, egress=egress)
        prog.pin()
        modes = [xdp.attach(prog.fd, each, pin_dir, xdp_mode, primary=i == 0) for i, each in enumerate(ifaces)]
        prog_id = neighbours.interface(ifname).xdp_prog_id
    except BaseException:
        prog.close()
        if created:
            xdp.detach(pin_dir)
            pins.remove_dir(pin_dir)
        raise
    prog.close()
    result = AttachResult(ifname=ifname, mode=modes[0], pin_dir=pin_dir, prog_id=prog_id, written=written)
    for each, mode in zip(ifaces, modes):
        if xdp_mode == "auto" and mode == "generic":
            result.notes.append(f"{each.name}'s driver has no native XDP; attached in generic mode (slower)")
    return result


def detach(ifname: str, say=None) -> bool:
    """Detach fastlb from ``ifname`` and remove its pins. False when it was not attached.

    VIPs announced over BGP are withdrawn first, and the program stays
    attached for ``bgp.detach_delay`` more seconds, so that packets the
    routers sent before they saw the withdrawal are still balanced
    (fastlb.controller.bgp). ``say`` gets one line about it, if anything was withdrawn.
    """
    from fastlb.controller import bgp
    from fastlb.controller.l7 import tier
    require_root("detach")
    tier.remove(ifname)   # http VIPs: HAProxy stopped, VIPs off lo, /run/fastlb/l7 files gone
    base = pins.ensure_bpffs()
    pin_dir = pins.attachment_dir(ifname, base)
    if not pin_dir.exists():
        return False
    delay, note = bgp.withdraw_for_detach(ifname)
    if note and say is not None:
        say(note)
    if delay:
        time.sleep(delay)
    xdp.detach(pin_dir)
    pins.remove_dir(pin_dir)
    state.remove(ifname)
    bgp.remove_state(ifname)
    return True


def _read_vips(maps: PinnedMaps) -> list[dict]:
    vips = []
    for vip_id, slot in identity.vips(maps).items():
        c = maps.counter("vip_stats", vip_id)
        vips.append({"vip": slot.name, "vip_id": vip_id, "algorithm": slot.algorithm,
                     "forwarding": slot.forwarding, "ring_size": slot.meta.ring_size if slot.meta else 0,
                     "packets": c.packets, "bytes": c.bytes, "new_flows": c.new_flows, "backends": []})
    return sorted(vips, key=lambda v: v["vip_id"])


def _read_backends(maps: PinnedMaps, vips: list[dict]) -> None:
    by_id = {v["vip_id"]: v for v in vips}
    for be_id, slot in identity.backends(maps).items():
        vip = by_id.get(slot.entry.vip_id)
        if vip is None or not slot.valid:
            continue
        c = maps.counter("backend_stats", be_id)
        vip["backends"].append({
            "backend": str(slot.address), "backend_id": be_id, "port": slot.port, "weight": slot.entry.weight,
            "mac": structs.mac_str(slot.entry.mac), "packets": c.packets, "bytes": c.bytes,
            "new_flows": c.new_flows})


def status() -> list[dict]:
    """Every fastlb attachment in this netns, with its VIPs, backends and counters."""
    require_root("status")
    base = pins.ensure_bpffs()
    out = []
    for ifname in pins.attachments(base):
        pin_dir = pins.attachment_dir(ifname, base)
        entry: dict = {"interface": ifname, "pin_dir": str(pin_dir), "attached": False, "mode": None,
                       "prog_id": None}
        try:
            iface = neighbours.interface(ifname)
        except FastlbError:
            iface = None
            entry["problem"] = "interface is gone; run fastlb detach to remove the pins"
        if iface is not None and xdp.is_ours(iface, pin_dir):
            entry.update(attached=True, mode=xdp.MODE_NAMES.get(iface.xdp_mode, "?"), prog_id=iface.xdp_prog_id)
        entry["interfaces"] = [ifname] + [p.name.removeprefix(pins.LINK_PIN + "-")
                                          for p in xdp.links(pin_dir) if p.name != pins.LINK_PIN]
        try:
            with PinnedMaps(pin_dir) as maps:
                vips = _read_vips(maps)
                _read_backends(maps, vips)
                reasons, verdicts = stats.reasons(maps)
                events = stats.events(maps)
                conntrack = maps.info("conntrack").max_entries
        except FastlbError as exc:
            entry["problem"] = str(exc)
            out.append(entry)
            continue
        entry.update(vips=vips, reasons=reasons, verdicts=verdicts, events=events, conntrack_size=conntrack)
        from fastlb.controller import bgp
        announced = bgp.status(ifname)
        if announced is not None:
            entry["bgp"] = announced
            for vip in vips:
                names = [vip["vip"]]
                if vip["forwarding"] == identity.L7_FORWARDING:   # the maps know an http VIP by its TCP key
                    base = vip["vip"].rsplit("/", 1)[0]
                    names += [f"{base}/http", f"{base}/https"]
                found = next((n for n in names if n in announced["vips"]), None)
                if found is not None:
                    vip["bgp"] = announced["vips"][found]
        out.append(entry)
    return out
