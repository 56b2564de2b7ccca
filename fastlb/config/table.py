"""Typed access to one TOML table's keys, with errors that point at them.

``_Table(data, path, source)`` wraps one table of the parsed document; its
getters check type and range and raise a ConfigError that names the dotted
key path (``vip[1].backend[0].port``) and, through ``source.lines``, its line.
"""

from __future__ import annotations

import difflib
import ipaddress
import re
from dataclasses import dataclass
from typing import Any

from fastlb.config.lines import KeyLines, NoLines
from fastlb.config.model import _KEY_HOMES, _TABLE_KEYS, IPAddress, KeyPath
from fastlb.errors import ConfigError

_MISSING: Any = object()
_TYPE_NAMES = {bool: "a boolean", int: "an integer", float: "a float", str: "a string",
               list: "an array", dict: "a table"}


def _type_name(value: object) -> str:
    return _TYPE_NAMES.get(type(value), "a date/time")


def _show(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _did_you_mean(word: str, valid: tuple[str, ...] | list[str], otherwise: str) -> str:
    """``did you mean 'weight'? Valid: ...`` for a near miss, else ``otherwise``."""
    close = difflib.get_close_matches(word.lower(), valid, n=1)
    return f"did you mean '{close[0]}'? Valid: {', '.join(valid)}" if close else otherwise


def _unknown_key_fix(key: str, is_table: bool, allowed: list[str]) -> str:
    """Say where a misplaced key belongs, else the nearest allowed key of the same kind."""
    homes = [header for header, keys in _KEY_HOMES if key in keys]
    if homes:
        return f"'{key}' belongs in {' or '.join(homes)}"
    same_kind = [k for k in allowed if (k in _TABLE_KEYS) == is_table]
    return _did_you_mean(key, same_kind, otherwise=f"remove it; valid here: {', '.join(allowed)}")


def _dotted(path: KeyPath) -> str:
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in path).lstrip(".")


def _header(path: KeyPath) -> str:
    """The TOML header of the table at ``path``: ``[settings]``, ``[[vip.backend]]``."""
    name = ".".join(p for p in path if isinstance(p, str))
    return f"[[{name}]]" if path and isinstance(path[-1], int) else f"[{name}]"


@dataclass(frozen=True)
class _Source:
    path: str | None
    lines: KeyLines | NoLines


@dataclass(frozen=True)
class _Table:
    data: dict[str, Any]
    path: KeyPath
    source: _Source

    @property
    def line(self) -> int:
        return self.source.lines.find(self.path)

    def where(self) -> str:
        """``vip[0] (line 3)``: how another error names this table (``vip[0]`` without text)."""
        return f"{_dotted(self.path)} (line {self.line})" if self.line else _dotted(self.path)

    def error(self, sub: KeyPath, message: str, fix: str | None = None) -> ConfigError:
        path = self.path + sub
        return ConfigError(message, path=self.source.path, field=_dotted(path) or None,
                           line=self.source.lines.find(path) or None, fix=fix)

    def check_keys(self, allowed: tuple[str, ...] | dict[str, Any]) -> None:
        for key, value in self.data.items():
            if key not in allowed:
                is_table = isinstance(value, dict) or (
                    isinstance(value, list) and bool(value) and all(isinstance(v, dict) for v in value))
                raise self.error((key,), f"unknown {'table' if is_table else 'key'} '{key}'",
                                 fix=_unknown_key_fix(key, is_table, list(allowed)))

    def get(self, key: str, kind: type, default: Any = _MISSING) -> Any:
        if key not in self.data:
            if default is _MISSING:
                raise self.error((key,), f"missing required key '{key}'",
                                 fix=f"add '{key} = ...' to this {_header(self.path)}")
            return default
        value = self.data[key]
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            fix = None
            if kind is int and isinstance(value, str) and re.fullmatch(r"\s*[0-9]+\s*", value):
                fix = f"write the number without quotes: {key} = {value.strip()}"
            elif kind is str and isinstance(value, (int, float)) and not isinstance(value, bool):
                fix = f'quote it: {key} = "{value}"'
            raise self.error((key,), f"expected {_TYPE_NAMES[kind]}, got {_type_name(value)} {_show(value)}", fix=fix)
        return value

    def number(self, key: str, low: float, high: float, default: Any = _MISSING) -> float:
        """An integer or float (seconds), as a float."""
        if key in self.data and isinstance(self.data[key], int) and not isinstance(self.data[key], bool):
            value = float(self.data[key])
        else:
            value = float(self.get(key, float, default))
        if not low <= value <= high:
            hint = f"; the default is {default:g}" if default is not _MISSING else ""
            raise self.error((key,), f"{key} must be {low:g}..{high:g}, got {value:g}",
                             fix=f"use a number from {low:g} to {high:g}{hint}")
        return value

    def integer(self, key: str, low: int, high: int, default: Any = _MISSING) -> int:
        value = self.get(key, int, default)
        if not low <= value <= high:
            hint = f"; the default is {default}" if default is not _MISSING else ""
            raise self.error((key,), f"{key} must be {low}..{high}, got {value}",
                             fix=f"use a value from {low} to {high}{hint}")
        return value

    def choice(self, key: str, valid: tuple[str, ...], default: str) -> str:
        value = self.get(key, str, default)
        if value not in valid:
            raise self.error((key,), f"unknown {key} {_show(value)}",
                             fix=_did_you_mean(value, valid, otherwise=f"use one of: {', '.join(valid)}"))
        return value

    def file_path(self, key: str, default: str | None) -> str | None:
        """An absolute file path (it may not exist yet) without quotes or control characters."""
        if key not in self.data:
            return default
        text = self.get(key, str)
        if not text.startswith("/") or any(c in text for c in '"\\') or not text.isprintable():
            raise self.error((key,), f"{_show(text)} is not an absolute path without quotes, backslashes "
                                     "or control characters", fix='write it like "/run/fastlb-bird/eth0.conf"')
        return text

    def network(self, key: str, version: int) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
        """A prefix of IP version ``version``, with at least one host bit (outer sources vary in them)."""
        text = self.get(key, str)
        example = "198.18.200.0/24" if version == 4 else "2001:db8:200::/64"
        try:
            net = ipaddress.ip_network(text, strict=True)
        except ValueError as exc:
            raise self.error((key,), f"{_show(text)} is not an IPv{version} prefix",
                             fix=f'write a prefix such as "{example}" (host bits zero)') from exc
        if net.version != version:
            raise self.error((key,), f"{text} is an IPv{net.version} prefix; {key} takes IPv{version}",
                             fix=f'write a prefix such as "{example}"')
        if net.num_addresses < 2:
            raise self.error((key,), f"{text} has no host bits to vary per flow",
                             fix=f'use a shorter prefix, such as "{example}"')
        return net

    def address(self, key: str, role: str, *, loopback_ok: bool, version: int | None = None) -> IPAddress:
        text = self.get(key, str)
        try:
            address = ipaddress.ip_address(text)
        except ValueError as exc:
            raise self.error((key,), f"{_show(text)} is not an IPv4 or IPv6 address",
                             fix='write a plain address such as "198.18.0.11" or "2001:db8::11"') from exc
        if version is not None and address.version != version:
            raise self.error((key,), f"{text} is an IPv{address.version} address; {key} takes IPv{version}",
                             fix=f"give an IPv{version} address")
        problem = None
        if getattr(address, "scope_id", None):
            problem = "has a zone index (%), which fastlb does not support"
        elif address.is_unspecified:
            problem = "is the unspecified address"
        elif address.is_multicast:
            problem = "is a multicast address"
        elif address == ipaddress.IPv4Address("255.255.255.255"):
            problem = "is the broadcast address"
        elif address.is_loopback and not loopback_ok:
            problem = "is a loopback address, which other hosts cannot reach"
        if problem:
            raise self.error((key,), f"{role} address {text} {problem}",
                             fix=f"use a unicast address of a real {'host' if role == 'backend' else 'service'}")
        return address

    def table(self, key: str) -> _Table:
        """The sub-table ``key`` (empty when absent)."""
        value = self.data.get(key, {})
        if not isinstance(value, dict):
            raise self.error((key,), f"expected a table, got {_type_name(value)} {_show(value)}",
                             fix=f"write it as a {_header(self.path + (key,))} table")
        return _Table(value, self.path + (key,), self.source)

    def tables(self, key: str) -> list[_Table]:
        """The array of tables ``key`` (empty when absent)."""
        value = self.data.get(key, [])
        if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
            what = _type_name(value) if not isinstance(value, list) else "an array of non-tables"
            raise self.error((key,), f"expected an array of tables, got {what}",
                             fix=f"write each one as {_header(self.path + (key, 0))}")
        return [_Table(v, self.path + (key, i), self.source) for i, v in enumerate(value)]
