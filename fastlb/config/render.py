"""A Config as data and as TOML text (``fastlb ... --save``).

``config_data(config)`` is the TOML document's data: what tomllib would read
from the file, with settings and health keys only where they differ from
their defaults. ``render_config`` writes it as text; fastlb.config.load's
``validate`` checks it without any text.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import fields

from fastlb.config.model import Backend, Bgp, Config, HealthCheck, Settings, Vip

def config_data(config: Config) -> dict:
    """The TOML document of ``config``, as the data tomllib reads from it (no defaults written)."""
    doc: dict = {}
    settings = _changed(config.settings, Settings())
    if settings:
        doc["settings"] = settings
    doc["vip"] = [_vip(vip) for vip in config.vips]
    if config.bgp is not None:
        bgp = config.bgp
        doc["bgp"] = {"speaker": bgp.speaker, "local_as": bgp.local_as,
                      **_changed(dataclasses.replace(bgp, peers=()), Bgp(bgp.speaker, bgp.local_as, ()))}
        if bgp.peers:
            doc["bgp"]["peer"] = [{"address": str(p.address), "as": p.asn} for p in bgp.peers]
    return doc


def _vip(vip: Vip) -> dict:
    out = {"address": str(vip.address)}
    if vip.ports:
        out["ports"] = [lo if lo == hi else f"{lo}-{hi}" for lo, hi in vip.ports]
    else:
        out["port"] = vip.port
    out.update(protocol=vip.protocol, algorithm=vip.algorithm)
    if vip.is_l7:
        if vip.algorithm == "maglev":
            out["hash"] = vip.hash
        out["client_ip"] = vip.client_ip
        if vip.certificate is not None:
            out["certificate"] = vip.certificate
    else:
        out.update(forwarding=vip.forwarding, hash=vip.hash)
    if vip.announce != "none":
        out["announce"] = vip.announce
    if vip.slow_start:
        out["slow_start"] = vip.slow_start
    if vip.persistence:
        out["persistence"] = vip.persistence
        if vip.persistence_prefix != vip.address.max_prefixlen:
            out["persistence_prefix"] = vip.persistence_prefix
    health = _changed(vip.health, HealthCheck())
    if vip.all_down != "drop":
        health["all_down"] = vip.all_down
    if not vip.expire_nodest_conn:
        health["expire_nodest_conn"] = False
    if health:
        out["health"] = health
    if vip.backends:
        out["backend"] = [_backend(b, vip) for b in vip.backends]
    if vip.routes:
        out["route"] = [{"algorithm": r.algorithm,
                         **{k: getattr(r, k) for k in ("host", "path_prefix") if getattr(r, k) is not None},
                         "backend": [_backend(b, vip, health=False) for b in r.backends]} for r in vip.routes]
    return out


def _backend(b: Backend, vip: Vip, health: bool = True) -> dict:
    out = {"address": str(b.address), "weight": b.weight}
    if b.port != vip.port:
        out["port"] = b.port
    if health and b.health is not None:
        out["health"] = _changed(b.health, vip.health)
    return out


def _changed(obj: object, base: object) -> dict:
    """The fields of ``obj`` that differ from ``base``'s, as TOML values (addresses as strings)."""
    return {f.name: _value(getattr(obj, f.name)) for f in fields(obj)
            if getattr(obj, f.name) != getattr(base, f.name) and getattr(obj, f.name) is not None}


def _value(value: object) -> object:
    return value if isinstance(value, (bool, int, float, str)) else str(value)


def render_config(config: Config) -> str:
    """``config`` as TOML that ``parse_config`` reads back to an equal Config.

    Settings and health keys are written only where they differ from their
    defaults (a backend's check: where it differs from its VIP's). Comments
    and the layout of the original file are not kept.
    """
    out: list[str] = []
    for key, value in config_data(config).items():
        _table(out, (key,), value)
    return "\n".join(out) + "\n"


def _table(out: list[str], path: tuple[str, ...], value: dict | list) -> None:
    """Append the table (or array of tables) at ``path``: a blank line, its header, its keys, its tables."""
    for data, header in ([(value, f"[{'.'.join(path)}]")] if isinstance(value, dict)
                         else [(v, f"[[{'.'.join(path)}]]") for v in value]):
        out += [""] if out else []
        out.append(header)
        out += [f"{k} = {_toml(v)}" for k, v in data.items() if not _is_table(v)]
        for k, v in data.items():
            if _is_table(v):
                _table(out, path + (k,), v)


def _is_table(value: object) -> bool:
    """A table, or an array of tables (a list of plain values, like ``ports``, is a value)."""
    return isinstance(value, dict) or isinstance(value, list) and any(isinstance(v, dict) for v in value)


def _toml(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return json.dumps(str(value))  # strings, addresses, prefixes: a JSON string is a TOML basic string
