"""wrk in the lab's client namespace: one bounded run, its output parsed.

Two modes: ``keepalive`` (HTTP/1.1 connections reused) and ``close``
(``Connection: close``: one TCP connection per request). The lab's client
namespace has ``tcp_tw_reuse=1`` and ``ip_local_port_range = 1024 65535``
(fastlb.lab.topology), without which connection-per-request collapses
after the first run.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from fastlb.lab.netns import LabError

if TYPE_CHECKING:
    from fastlb.lab.topology import Lab

THREADS = 1
CONNECTIONS = 50
MODES = ("keepalive", "close")
_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3}


@dataclass(frozen=True)
class Result:
    requests: int
    seconds: float
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int            # socket errors of all kinds, and non-2xx/3xx answers


def argv(url: str, mode: str, seconds: float, script: str | None = None,
         connections: int = CONNECTIONS) -> list[str]:
    """``script``: a wrk Lua script (e.g. :func:`pace_script`'s); ``connections``: wrk's -c."""
    if mode not in MODES:
        raise ValueError(f"wrk mode {mode!r}: use one of {', '.join(MODES)}")
    out = ["wrk", f"-t{THREADS}", f"-c{connections}", f"-d{max(1, round(seconds))}s", "--latency"]
    if mode == "close":
        out += ["-H", "Connection: close"]
    if script is not None:
        out += ["-s", script]
    return out + [url]


def method(seconds: float) -> str:
    """The wrk command line of a bench section, in words (Markdown)."""
    return (f"`wrk -t{THREADS} -c{CONNECTIONS} -d{max(1, round(seconds))}s --latency` from the client namespace, "
            "keep-alive and connection-per-request (`-H 'Connection: close'`")


def pace_script(delay_ms: int) -> str:
    """A wrk Lua script that waits ``delay_ms`` before each request of a connection.

    With C connections the rate is at most C × 1000 / (delay_ms + response time)
    requests per second: a ceiling, to run two paths at about the same rate."""
    return f"function delay()\n    return {int(delay_ms)}\nend\n"


def _ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text)
    if not m:
        raise ValueError(f"not a wrk duration: {text!r}")
    return float(m.group(1)) * _UNITS[m.group(2)]


def parse(text: str) -> Result:
    """Requests, req/s, p50 and p99 from ``wrk --latency`` output."""
    try:
        done = re.search(r"(\d+) requests in ([\d.]+)(us|ms|s|m)", text)
        rps = float(re.search(r"Requests/sec:\s+([\d.]+)", text).group(1))
        p50 = _ms(re.search(r"^\s+50%\s+(\S+)", text, re.M).group(1))
        p99 = _ms(re.search(r"^\s+99%\s+(\S+)", text, re.M).group(1))
    except (AttributeError, ValueError) as exc:
        raise LabError(f"cannot read wrk's output ({exc}): {text.strip()[-400:]}") from None
    errors = 0
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    if sock:
        errors += sum(int(g) for g in sock.groups())
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    if bad:
        errors += int(bad.group(1))
    return Result(requests=int(done.group(1)), seconds=_ms(done.group(2) + done.group(3)) / 1e3,
                  rps=rps, p50_ms=p50, p99_ms=p99, errors=errors)


def run(lab: Lab, url: str, mode: str, seconds: float, script: str | None = None,
        connections: int = CONNECTIONS) -> Result:
    """One wrk run from the client namespace, bounded by ``seconds`` (plus a margin)."""
    res = lab.run("client", argv(url, mode, seconds, script, connections), timeout=seconds + 30)
    return parse(res.stdout)
