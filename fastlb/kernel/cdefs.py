"""The C constants, read from ``bpf/fastlb_consts.h`` (the one source of truth).

Userspace never repeats a number the BPF program uses: it reads the header.
Every ``#define NAME <integer literal>`` and every enum member (explicit values
and implicit increments) becomes a read-only name -> int mapping::

    from fastlb.kernel import cdefs
    cdefs.FL_RING_EMPTY               # 4294967295
    cdefs.enum("fl_algorithm")        # {'FL_ALG_MAGLEV': 0, 'FL_ALG_RR': 1, ...}
    cdefs.reason_verdict("FL_DROP_FRAGMENT")   # 'drop'
    cdefs.defs()["FASTLB_RING_SIZE"]  # the header's default; the loader may -D it

Size limits in the header sit inside ``#ifndef`` so the loader can override
them with ``-D``; this module reports the header's default values. A
``#define`` whose value is not an integer literal (an expression, a string,
a function-like macro) is skipped. An enum member's value may be an integer
literal (optionally negative) or the name of a member or define seen before
it; anything else is an error, because every implicit value after it would
be wrong.

The header's directory is fastlb's package data ``bpf/`` (in a checkout, the
symlink ``fastlb/bpf`` -> ``../bpf``), or ``$FASTLB_BPF_DIR``.
``tests/unit/test_cdefs.py`` compiles a C program against the same header and
compares every value.
"""

from __future__ import annotations

import functools
import importlib.resources
import os
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import MappingProxyType

from fastlb.errors import FastlbError

HEADER = "fastlb_consts.h"
ENV_BPF_DIR = "FASTLB_BPF_DIR"

# The reason enum's prefixes name the XDP verdict (see the header's comment).
REASON_ENUM = "fl_reason"
REASON_SENTINEL = "FL_REASON_MAX"
VERDICT_PREFIXES = (
    ("FL_PASS_", "pass"),
    ("FL_DROP_", "drop"),
    ("FL_TX_", "tx"),
    ("FL_REDIRECT_", "redirect"),
)

_COMMENT = re.compile(r"/\*.*?\*/|//[^\n]*", re.S)
_DEFINE = re.compile(r"^[ \t]*#[ \t]*define[ \t]+([A-Za-z_]\w*)(\(?)[ \t]*(.*?)[ \t]*$", re.M)
_INT_LITERAL = re.compile(r"(0[xX][0-9a-fA-F]+|0[0-7]*|[1-9][0-9]*)[uUlL]*")
_ENUM = re.compile(r"\benum\s+([A-Za-z_]\w*)?\s*\{(.*?)\}", re.S)
_MEMBER = re.compile(r"^([A-Za-z_]\w*)\s*(?:=\s*(.+))?$", re.S)


class CdefsError(FastlbError):
    """The constants header is missing or holds something this parser cannot read."""


def bpf_dir() -> Path:
    """The directory holding the BPF sources: ``$FASTLB_BPF_DIR``, else fastlb's package data ``bpf/``.

    ``importlib.resources`` finds the package data wherever fastlb is installed:
    in a checkout ``fastlb/bpf`` is a symlink to the top-level ``bpf/``, and a
    wheel carries the files themselves. BCC needs a real directory, which each
    of those is.
    """
    env = os.environ.get(ENV_BPF_DIR)
    if env:
        return Path(env).resolve()
    return Path(str(importlib.resources.files("fastlb") / "bpf")).resolve()


def _int_literal(text: str) -> int | None:
    """The value of a C integer literal (decimal, hex, octal, u/l suffixes), else None."""
    m = _INT_LITERAL.fullmatch(text.strip())
    if not m:
        return None
    digits = m.group(1)
    if digits[:2] in ("0x", "0X"):
        return int(digits, 16)
    if len(digits) > 1 and digits[0] == "0":
        return int(digits, 8)
    return int(digits, 10)


class Cdefs(Mapping[str, int]):
    """Name -> value for every integer ``#define`` and enum member of one header."""

    def __init__(self, path: Path, values: dict[str, int], enums: dict[str, dict[str, int]]):
        self.path = path
        self._values = MappingProxyType(values)
        self._enums = MappingProxyType({k: MappingProxyType(v) for k, v in enums.items()})

    def __getitem__(self, name: str) -> int:
        return self._values[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __getattr__(self, name: str) -> int:
        if name.startswith("_"):
            raise AttributeError(name)
        try:
            return self._values[name]
        except KeyError:
            raise AttributeError(f"{self.path} defines no integer constant {name}") from None

    def __repr__(self) -> str:
        return f"<Cdefs {self.path}: {len(self)} names, {len(self._enums)} enums>"

    def enum_names(self) -> tuple[str, ...]:
        """The names of the header's named enums, in file order."""
        return tuple(self._enums)

    def enum(self, name: str) -> Mapping[str, int]:
        """The members of ``enum name`` in declaration order (read-only)."""
        try:
            return self._enums[name]
        except KeyError:
            known = ", ".join(self._enums) or "none"
            raise KeyError(f"{self.path} declares no enum {name} (known: {known})") from None

    def reason_verdict(self, name: str) -> str:
        """The XDP verdict ("pass", "drop", "tx", "redirect") a reason counter belongs to."""
        reasons = self.enum(REASON_ENUM)
        if name not in reasons or name == REASON_SENTINEL:
            raise ValueError(f"{name} is not a member of enum {REASON_ENUM} in {self.path}")
        for prefix, verdict in VERDICT_PREFIXES:
            if name.startswith(prefix):
                return verdict
        wanted = ", ".join(p for p, _ in VERDICT_PREFIXES)
        raise ValueError(f"reason {name} has no verdict prefix; name it {wanted}...")

    def reason_verdicts(self) -> dict[str, str]:
        """Every reason (without the sentinel) -> its verdict, in counter order."""
        return {n: self.reason_verdict(n) for n in self.enum(REASON_ENUM) if n != REASON_SENTINEL}


def parse(text: str, path: Path | str = "<string>") -> Cdefs:
    """Parse header text. Exposed for tests; most callers want :func:`load`."""
    path = Path(path)
    src = _COMMENT.sub(" ", text)
    values: dict[str, int] = {}
    enums: dict[str, dict[str, int]] = {}

    def put(name: str, value: int) -> None:
        if name in values and values[name] != value:
            raise CdefsError(f"{path}: {name} is defined twice, as {values[name]} and {value}",
                             fix="give each constant one value; this parser does not follow #if branches")
        values[name] = value

    for m in _DEFINE.finditer(src):
        name, paren, body = m.groups()
        if paren:  # a function-like macro
            continue
        value = _int_literal(body)
        if value is not None:
            put(name, value)

    for m in _ENUM.finditer(src):
        enum_name, body = m.group(1), m.group(2)
        members: dict[str, int] = {}
        nxt = 0
        for item in body.split(","):
            item = item.strip()
            if not item:
                continue
            mm = _MEMBER.match(item)
            if not mm:
                raise CdefsError(f"{path}: cannot read enum {enum_name or '(anonymous)'} member {item!r}",
                                 fix="write members as NAME or NAME = <integer literal or earlier name>")
            member, expr = mm.group(1), mm.group(2)
            if expr is not None:
                expr = expr.strip()
                value = _int_literal(expr)
                if value is None and expr.startswith("-"):
                    value = _int_literal(expr[1:])
                    value = -value if value is not None else None
                if value is None:
                    value = members.get(expr, values.get(expr))
                if value is None:
                    raise CdefsError(
                        f"{path}: enum {enum_name or '(anonymous)'} member {member} = {expr!r} "
                        "is not an integer literal or an earlier name",
                        fix="give it a literal value, or teach fastlb/kernel/cdefs.py the expression")
                nxt = value
            members[member] = nxt
            put(member, nxt)
            nxt += 1
        if enum_name:
            enums[enum_name] = members
    return Cdefs(path, values, enums)


@functools.lru_cache(maxsize=8)
def _load(path: Path) -> Cdefs:
    try:
        text = path.read_text()
    except OSError as exc:
        raise CdefsError(f"cannot read the constants header {path}: {exc.strerror or exc}",
                         fix=f"set {ENV_BPF_DIR} to the directory holding {HEADER}") from exc
    return parse(text, path)


def load(directory: Path | str | None = None) -> Cdefs:
    """The parsed header (cached per path): ``directory/fastlb_consts.h`` or :func:`bpf_dir`'s."""
    base = Path(directory).resolve() if directory is not None else bpf_dir()
    return _load(base / HEADER)


def defs() -> Cdefs:
    """The read-only name -> value mapping of the default header."""
    return load()


def enum(name: str) -> Mapping[str, int]:
    """The members of ``enum name`` in the default header, in order."""
    return load().enum(name)


def reason_verdict(name: str) -> str:
    """The verdict of reason ``name``, from its FL_PASS_/FL_DROP_/FL_TX_/FL_REDIRECT_ prefix."""
    return load().reason_verdict(name)


def reason_verdicts() -> dict[str, str]:
    """Every reason of the default header -> its verdict."""
    return load().reason_verdicts()


def __getattr__(name: str) -> int:
    # PEP 562: cdefs.FL_RING_EMPTY reads the default header.
    if name.startswith("_"):
        raise AttributeError(name)
    return getattr(load(), name)
