"""Health checks: the probes, the rise/fall state machine, and the thread that runs them.

A probe returns a :class:`Result` (seesaw's model): success or failure, a
latency and a one-word-or-so detail. :class:`Verdict` turns results into a
state (``unknown``, ``up``, ``down``) that changes only after ``rise``
successes or ``fall`` failures in a row; the first result of a backend whose
state is unknown decides at once. The controller writes maps only on these
transitions.

Probe kinds (``[vip.health] kind``):

- ``tcp``: connect; the latency is the connect time.
- ``http``: ``GET path`` over HTTP/1.0, the status must be ``expect``; the
  latency is the time from the request to the first response byte, so a
  slow application shows (a connect time does not).
- ``udp``: send ``payload``, any datagram back is a success; the latency is
  the time to the reply. An ICMP port unreachable fails it at once.
- ``none``: no probe; the backend is always up.

:class:`Prober` runs every probe in one asyncio loop on its own thread.
Each backend's first probe starts at a random point of its first interval
(starts are staggered), later ones every interval less up to 5 % jitter,
so probes spread out and a failure is seen within ``fall`` intervals of the
first failing probe.
"""

from __future__ import annotations

import asyncio
import errno
import random
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from fastlb.config import HealthCheck

UNKNOWN, UP, DOWN = "unknown", "up", "down"
JITTER = 0.05          # later probes start up to this share of an interval early
MAX_REPLY = 4096       # bytes of an HTTP status line / UDP reply that are read


@dataclass(frozen=True)
class Target:
    """What to probe for one backend of one VIP. ``key`` is (VIP name, backend key)."""

    key: tuple[str, bytes]
    address: str
    port: int
    check: HealthCheck


@dataclass(frozen=True)
class Result:
    key: tuple[str, bytes]
    ok: bool
    latency_s: float | None    # None when the probe failed
    detail: str
    at: float                  # time.monotonic() when the probe ended


class Verdict:
    """One backend's health: its state and the current run of successes or failures."""

    __slots__ = ("state", "successes", "failures", "last")

    def __init__(self, state: str = UNKNOWN):
        self.state = state
        self.successes = 0
        self.failures = 0
        self.last: Result | None = None

    def feed(self, result: Result, rise: int, fall: int) -> str | None:
        """Count one result; return the new state on a transition, else None."""
        self.last = result
        if result.ok:
            self.successes += 1
            self.failures = 0
            if self.state != UP and (self.state == UNKNOWN or self.successes >= rise):
                self.state = UP
                return UP
        else:
            self.failures += 1
            self.successes = 0
            if self.state != DOWN and (self.state == UNKNOWN or self.failures >= fall):
                self.state = DOWN
                return DOWN
        return None


def _why(exc: BaseException, timeout: float) -> str:
    if isinstance(exc, TimeoutError):
        return f"no answer within {timeout:g} s"
    if isinstance(exc, OSError) and exc.errno:
        return f"{errno.errorcode.get(exc.errno, exc.errno)} ({exc.strerror})"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


async def _tcp(target: Target) -> tuple[float, str]:
    start = time.perf_counter()
    _, writer = await asyncio.open_connection(target.address, target.port)
    latency = time.perf_counter() - start
    writer.close()
    return latency, "connected"


async def _http(target: Target) -> tuple[float, str]:
    check = target.check
    host = f"[{target.address}]" if ":" in target.address else target.address
    reader, writer = await asyncio.open_connection(target.address, target.port)
    try:
        writer.write(f"GET {check.path} HTTP/1.0\r\nHost: {host}\r\nUser-Agent: fastlb-health\r\n"
                     "Connection: close\r\n\r\n".encode())
        sent = time.perf_counter()
        await writer.drain()
        first = await reader.read(1)
        latency = time.perf_counter() - sent
        if not first:
            raise ConnectionResetError(errno.ECONNRESET, "closed without an answer")
        line = first + await reader.readline()
    finally:
        writer.close()
    parts = line[:MAX_REPLY].split()
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/") or not parts[1].isdigit():
        raise ValueError(f"not an HTTP status line: {line[:60]!r}")
    status = int(parts[1])
    if status != check.expect:
        raise ValueError(f"HTTP status {status}, expected {check.expect}")
    return latency, f"HTTP {status}"


class _Reply(asyncio.DatagramProtocol):
    def __init__(self, future: asyncio.Future):
        self.future = future

    def datagram_received(self, data: bytes, addr) -> None:
        if not self.future.done():
            self.future.set_result(data)

    def error_received(self, exc: Exception) -> None:  # ICMP unreachable, on a connected socket
        if not self.future.done():
            self.future.set_exception(exc)


async def _udp(target: Target) -> tuple[float, str]:
    loop = asyncio.get_running_loop()
    reply = loop.create_future()
    family = socket.AF_INET6 if ":" in target.address else socket.AF_INET
    transport, _ = await loop.create_datagram_endpoint(lambda: _Reply(reply), family=family,
                                                       remote_addr=(target.address, target.port))
    try:
        start = time.perf_counter()
        transport.sendto(target.check.payload.encode())
        data = await reply
        return time.perf_counter() - start, f"{len(data)}-byte reply"
    finally:
        transport.close()


PROBES = {"tcp": _tcp, "http": _http, "udp": _udp}


async def probe(target: Target) -> Result:
    """Run one probe of ``target`` within its timeout."""
    check = target.check
    if check.kind == "none":
        return Result(target.key, True, None, "no check", time.monotonic())
    try:
        async with asyncio.timeout(check.timeout):
            latency, detail = await PROBES[check.kind](target)
    except (OSError, ValueError, TimeoutError, EOFError, asyncio.IncompleteReadError) as exc:
        return Result(target.key, False, None, _why(exc, check.timeout), time.monotonic())
    return Result(target.key, True, latency, detail, time.monotonic())


class Prober:
    """Runs the probes of a set of targets on a thread of its own, reporting to ``on_result``.

    ``on_result`` is called on the prober's thread: hand the result over
    (the controller puts it on its queue).
    """

    def __init__(self, on_result: Callable[[Result], None]):
        self.on_result = on_result
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self._run_loop, name="fastlb-health", daemon=True)
        self.tasks: dict[tuple[str, bytes], tuple[Target, asyncio.Task]] = {}

    def start(self) -> None:
        self.thread.start()

    def _run_loop(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def probe_all(self, targets: list[Target]) -> dict[tuple[str, bytes], Result]:
        """One probe of each target, all at once; blocks until the last ends (its timeout at most)."""
        async def run():
            return await asyncio.gather(*(probe(t) for t in targets))
        if not self.thread.is_alive():
            return {r.key: r for r in asyncio.run(run())}
        return {r.key: r for r in asyncio.run_coroutine_threadsafe(run(), self.loop).result()}

    def set_targets(self, targets: dict[tuple[str, bytes], Target], now: frozenset = frozenset()) -> None:
        """Probe exactly ``targets`` from now on; keys in ``now`` get their first probe at once."""
        self.loop.call_soon_threadsafe(self._set_targets, dict(targets), now)

    def _set_targets(self, targets: dict, now: frozenset) -> None:
        for key in list(self.tasks):
            target, task = self.tasks[key]
            if targets.get(key) != target:
                task.cancel()
                del self.tasks[key]
        for key, target in targets.items():
            if key in self.tasks or target.check.kind == "none":
                continue
            delay = 0.0 if key in now else random.uniform(0, target.check.interval)
            self.tasks[key] = (target, self.loop.create_task(self._every(target, delay)))

    async def _every(self, target: Target, delay: float) -> None:
        await asyncio.sleep(delay)
        interval = target.check.interval
        due = self.loop.time()
        while True:
            result = await probe(target)
            self.on_result(result)
            due += interval * (1 - random.uniform(0, JITTER))
            wait = due - self.loop.time()
            if wait < 0:  # the loop was late: start again from now rather than catch up in a burst
                due, wait = self.loop.time(), 0
            await asyncio.sleep(wait)

    def stop(self) -> None:
        if not self.thread.is_alive():
            return

        async def halt():
            tasks = [task for _, task in self.tasks.values()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        try:
            asyncio.run_coroutine_threadsafe(halt(), self.loop).result(timeout=5)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(timeout=5)
