"""Per-VIP and per-backend figures from an attachment's maps, with the controller's health view.

:func:`collect` reads the counters the kernel keeps (packets, bytes, new
flows per VIP and backend, active TCP connections per backend, one counter
per verdict reason) and merges in what only the controller knows (health
state, last probe latency). ``fastlb stats`` asks the running controller,
which calls :func:`collect` itself; with no controller running, it reads
the maps alone and says so. :func:`render` is the text form.
"""

from __future__ import annotations

from fastlb.dataplane import flows, identity
from fastlb.kernel import cdefs, structs
from fastlb.kernel.maps import PinnedMaps


def reasons(maps: PinnedMaps) -> tuple[dict, dict]:
    """({reason: {verdict, packets, bytes}}, {verdict: packets}) over every reason counter."""
    out = {}
    counters = maps.counters("reason_stats", cdefs.FL_REASON_MAX)
    for name, idx in cdefs.enum("fl_reason").items():
        if name == "FL_REASON_MAX":
            continue
        c = counters[idx]
        out[name.removeprefix("FL_").lower()] = {"verdict": cdefs.reason_verdict(name), "packets": c.packets,
                                                 "bytes": c.bytes}
    verdicts: dict[str, int] = {}
    for r in out.values():
        verdicts[r["verdict"]] = verdicts.get(r["verdict"], 0) + r["packets"]
    return out, verdicts


def events(maps: PinnedMaps) -> dict:
    """{event: packets} over every event counter (enum fl_event): what the data plane
    did that no verdict shows (a new flow the guard did not record, ...)."""
    counters = maps.counters("event_stats", cdefs.FL_EVENT_MAX)
    return {name.removeprefix("FL_EV_").lower(): counters[idx].packets
            for name, idx in cdefs.enum("fl_event").items() if name != "FL_EVENT_MAX"}


def collect(maps: PinnedMaps, health: dict | None = None, count_flows: bool = True) -> dict:
    """Everything ``fastlb stats`` shows for one attachment.

    ``health`` maps (VIP name, backend key) to the controller's view of a
    backend (state, weight, latency, ...); None when no controller answers.
    ``count_flows`` counts conntrack's entries (batch lookups into one buffer:
    kernel work per entry, none in Python).
    """
    vips: dict[int, dict] = {}
    vip_slots = identity.vips(maps)
    vip_counters = maps.counters("vip_stats", max(vip_slots, default=-1) + 1)
    for vip_id, slot in vip_slots.items():
        c = vip_counters[vip_id]
        vips[vip_id] = {"vip": slot.name, "algorithm": slot.algorithm,
                        "packets": c.packets, "bytes": c.bytes, "new_flows": c.new_flows, "active": 0,
                        "healthy_backends": 0, "backends": []}
    be_slots = identity.backends(maps)
    active = flows.active_counts(maps)
    be_counters = maps.counters("backend_stats", max(be_slots, default=-1) + 1)
    for be_id, slot in be_slots.items():
        entry = slot.entry
        if entry.vip_id not in vips:
            continue
        vip = vips[entry.vip_id]
        name = slot.name
        c = be_counters[be_id]
        valid = slot.valid
        be = {"backend": name, "backend_id": be_id, "weight": entry.weight, "valid": valid,
              "in_table": valid and entry.weight > 0, "mac": structs.mac_str(entry.mac), "rtt_us": entry.rtt_us,
              "packets": c.packets, "bytes": c.bytes, "new_flows": c.new_flows,
              "active": active[be_id] if valid else 0}
        view = (health or {}).get((vip["vip"], name.encode()))
        be.update(view if view is not None else {"health": None, "latency_ms": None})
        vip["active"] += be["active"]
        vip["healthy_backends"] += be["health"] == "up"
        vip["backends"].append(be)
    reason_table, verdicts = reasons(maps)
    out = {"vips": sorted(vips.values(), key=lambda v: v["vip"]), "reasons": reason_table, "verdicts": verdicts,
           "events": events(maps), "conntrack": {"size": maps.info("conntrack").max_entries}}
    if count_flows:
        out["conntrack"]["entries"] = flows.count(maps)
    return out


def render(att: dict) -> list[str]:
    """Text lines for one attachment's stats (as ``fastlb stats`` prints them)."""
    head = f"{att['interface']}: controller {'running' if att.get('controller') else 'NOT running'}"
    ct = att.get("conntrack", {})
    if "entries" in ct:
        head += f"; conntrack {ct['entries']}/{ct['size']}"
    lines = [head]
    for vip in att.get("vips", []):
        lines.append(f"  VIP {vip['vip']}  {vip['algorithm']}  packets {vip['packets']}  bytes {vip['bytes']}  "
                     f"new flows {vip['new_flows']}  active {vip['active']}")
        for be in vip["backends"]:
            health = be["health"] or "?"
            latency = f"{be['latency_ms']:.2f} ms" if be.get("latency_ms") is not None else "-"
            lines.append(f"    {be['backend']:<24} {health:<8} weight {be['weight']:<5} packets {be['packets']}  "
                         f"bytes {be['bytes']}  new flows {be['new_flows']}  active {be['active']}  "
                         f"latency {latency}")
    lines += render_l7(att.get("l7"))
    verdicts = att.get("verdicts", {})
    if verdicts:
        lines.append("  verdicts: " + "  ".join(f"{k} {v}" for k, v in sorted(verdicts.items())))
        moved = {k: r["packets"] for k, r in att["reasons"].items() if r["packets"]}
        if moved:
            lines.append("  reasons: " + "  ".join(f"{k} {v}" for k, v in moved.items()))
    happened = {k: n for k, n in att.get("events", {}).items() if n}
    if happened:
        lines.append("  events: " + "  ".join(f"{k} {v}" for k, v in happened.items()))
    return lines


def render_l7(l7: dict | None) -> list[str]:
    """Text lines for the http VIPs (fastlb.controller.l7.tier.Tier.stats)."""
    if not l7:
        return []
    proc = l7.get("haproxy", {})
    lines = [f"  HAProxy master {proc.get('master_pid')} worker {proc.get('worker_pid')}  "
             f"reloads {proc.get('reloads')}  restarts {proc.get('restarts')}"
             + ("  (adopted)" if proc.get("adopted") else "")]
    if "error" in l7:
        lines.append(f"  HAProxy: {l7['error']}")
    for vip in l7.get("vips", []):
        classes = "  ".join(f"{c} {n}" for c, n in vip["responses"].items())
        lines.append(f"  VIP {vip['vip']}  {vip['algorithm']}  requests {vip['requests']}  {classes}")
        for pool in vip["pools"]:
            lines.append(f"    pool {pool['route']}  {pool['algorithm']}  requests {pool['requests']}  "
                         f"response {pool['response_ms']} ms")
            for s in pool["backends"]:
                est = s.get("latency_estimate_ms")
                steer = f"  estimate {est:.1f} ms  effective weight {s.get('effective_weight')}" if est is not None else ""
                lines.append(f"      {s['backend']:<24} {s['status']:<8} weight {s['weight']:<4} active {s['active']}  "
                             f"requests {s['requests']}  response {s['response_ms']} ms{steer}")
    return lines
