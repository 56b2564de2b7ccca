"""Where a key is in the TOML text: ``tomllib`` gives no positions, so a scanner finds them.

``KeyLines(text).find(("vip", 1, "backend", 0, "port"))`` is that key's
1-based line (or its nearest enclosing table's); ``toml_error`` turns
tomllib's message into a message and a line.
"""

from __future__ import annotations

import re
import tomllib

from fastlb.config.model import KeyPath


def toml_error(text: str, source: str) -> tuple[str, int]:
    """Split tomllib's ``msg (at line 3, column 5)`` into the message and the line."""
    match = re.fullmatch(r"(.*) \(at line (\d+), column (\d+)\)", text, re.DOTALL)
    if match:
        return f"{match[1]} (column {match[3]})", int(match[2])
    return text.removesuffix(" (at end of document)") + " at the end of the file", source.count("\n") + 1


# The line locator. tomllib has already accepted the text, so every line that
# does not start inside a multi-line string or a multi-line array is blank, a
# comment, a table header or a ``key = value`` line.

_BASIC_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
_KEY_PART = re.compile(r"""\s*(?:([A-Za-z0-9_-]+)|("(?:[^"\\]|\\.)*")|'([^']*)')\s*""")


class KeyLines:
    """Maps a key path such as ``("vip", 1, "backend", 0, "port")`` to its 1-based line."""

    def __init__(self, text: str):
        self._lines: dict[KeyPath, int] = {}
        self._aot_counts: dict[KeyPath, int] = {}  # array-of-tables path -> tables seen so far
        table: KeyPath = ()
        multiline: str | None = None  # the open '"""' or "'''", if any
        depth = 0  # open [ and { of a value that spans lines
        for number, line in enumerate(text.split("\n"), 1):
            start = 0
            if multiline is None and depth == 0:
                header = self._header(line, number)
                if header is not None:
                    table, start = header
                else:
                    parsed = _parse_key(line, 0)
                    if parsed and line.startswith("=", parsed[1]):
                        self._record(table + tuple(parsed[0]), number, len(table) + 1)
                        start = parsed[1] + 1
            multiline, depth = _scan(line, start, multiline, depth)

    def find(self, path: KeyPath) -> int:
        """The line of ``path``, else of its nearest enclosing table; line 1 for the top level."""
        for end in range(len(path), 0, -1):
            if path[:end] in self._lines:
                return self._lines[path[:end]]
        return 1

    def _record(self, path: KeyPath, number: int, first: int = 1) -> None:
        for end in range(first, len(path) + 1):
            self._lines.setdefault(path[:end], number)

    def _header(self, line: str, number: int) -> tuple[KeyPath, int] | None:
        """Handle ``[a.b]`` or ``[[a.b]]``: return the table's resolved path and where the header ends."""
        stripped = line.lstrip()
        if not stripped.startswith("["):
            return None
        is_array = stripped.startswith("[[")
        opening = len(line) - len(stripped) + (2 if is_array else 1)
        parsed = _parse_key(line, opening)
        closing = "]]" if is_array else "]"
        if not parsed or not line.startswith(closing, parsed[1]):
            return None
        parts, end = parsed
        path: KeyPath = ()
        for part in parts[:-1]:
            path += (part,)
            if path in self._aot_counts:
                path += (self._aot_counts[path] - 1,)
        path += (parts[-1],)
        if is_array:
            index = self._aot_counts.get(path, 0)
            self._aot_counts[path] = index + 1
            path += (index,)
        self._record(path, number)
        return path, end + len(closing)


def _parse_key(line: str, pos: int) -> tuple[list[str], int] | None:
    """Parse a dotted key (bare, "basic" or 'literal' parts) at ``pos``: (parts, end) or None."""
    parts: list[str] = []
    while True:
        match = _KEY_PART.match(line, pos)
        if not match:
            return None
        bare, basic, literal = match.groups()
        if basic is not None:
            parts.append(tomllib.loads(f"k = {basic}")["k"])
        else:
            parts.append(bare if bare is not None else literal)
        pos = match.end()
        if not line.startswith(".", pos):
            return parts, pos
        pos += 1


def _scan(line: str, pos: int, multiline: str | None, depth: int) -> tuple[str | None, int]:
    """Skip strings and comments from ``pos``; return the open multi-line string and bracket depth."""
    i = pos
    while i < len(line):
        char = line[i]
        if multiline:
            if char == "\\" and multiline == '"""':
                i += 2
            elif line.startswith(multiline, i):
                run = len(line) - i - len(line[i:].lstrip(multiline[0]))
                i += run  # the delimiter plus up to two quotes of content
                multiline = None
            else:
                i += 1
        elif char == "#":
            break
        elif line.startswith('"""', i) or line.startswith("'''", i):
            multiline = line[i:i + 3]
            i += 3
        elif char == '"':
            match = _BASIC_STRING.match(line, i)
            i = match.end() if match else len(line)
        elif char == "'":
            end = line.find("'", i + 1)
            i = end + 1 if end >= 0 else len(line)
        else:
            depth += (char in "[{") - (char in "]}")
            i += 1
    return multiline, depth

class NoLines:
    """A config built in code has no text: every key is at line 0 (errors name no line)."""

    def find(self, path: KeyPath) -> int:
        return 0
