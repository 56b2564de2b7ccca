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
- ``exec``: run the operator's ``command`` (split like a shell line, not
  run by one) with ``FASTLB_BACKEND_ADDRESS``, ``FASTLB_BACKEND_PORT`` and
  ``FASTLB_VIP`` in its environment. Exit 0 is up, anything else down; a
  first output line ``weight N`` sets the backend's effective weight. A
  command still running at the timeout is killed with its process group;
  the loop never waits on it (its exit is watched through a pidfd).
- ``agent``: HAProxy's agent-check protocol: connect to ``port``, read one
  line of words (``up``, ``down``/``fail``/``stopped``, ``ready``,
  ``drain``, ``maint``, ``NN%``, ``maxconn:N``), see :class:`AgentState`.
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
import heapq
import itertools
import math
import os
import random
import re
import select
import shlex
import signal
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from fastlb.config import HealthCheck

UNKNOWN, UP, DOWN = "unknown", "up", "down"
JITTER = 0.05          # later probes start up to this share of an interval early
REPORT_EVERY = 0.05    # seconds: results are handed to the controller in batches this often
TICK = 0.02            # TCP checks start and end on this grid of loop time (TcpChecks): at most 50 wake-ups a second
MAX_REPLY = 4096       # bytes of an HTTP status line / UDP reply that are read
LINGER_RESET = b"\x01\x00\x00\x00\x00\x00\x00\x00"   # struct linger {on, 0 s}: close with RST, no TIME_WAIT
TCPI_RTT = 68          # offset of struct tcp_info's tcpi_rtt (u32, microseconds; linux/tcp.h)
TCP_INFO_LEN = 72


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
    weight: int | None = None  # exec: "weight N", the effective weight it asks for
    percent: int | None = None  # agent: the share of the configured weight it asks for (drain: 0)


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
    """A bare non-blocking connect: no transport or stream objects, so 1,000 a second stay cheap."""
    loop = asyncio.get_running_loop()
    family = socket.AF_INET6 if ":" in target.address else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setblocking(False)
        start = time.perf_counter()
        await loop.sock_connect(sock, (target.address, target.port))
        latency = time.perf_counter() - start
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
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


class Unhealthy(ValueError):
    """The probe got an answer, and the answer says down; ``str()`` is the detail."""


WEIGHT_LINE = re.compile(rb"\s*weight\s+([0-9]{1,5})\s*")
MAX_WEIGHT = 65535
KILL_WAIT = 1.0        # seconds a killed command gets to be reaped before the loop stops watching it


def exec_env(target: Target) -> dict[str, str]:
    return {**os.environ, "FASTLB_BACKEND_ADDRESS": target.address, "FASTLB_BACKEND_PORT": str(target.port),
            "FASTLB_VIP": target.key[0]}


async def _exec(target: Target) -> tuple[float, str, dict]:
    """Run the check's command; its exit code and first line decide. Killed (with its group) on cancel."""
    loop = asyncio.get_running_loop()
    start = time.perf_counter()
    proc = subprocess.Popen(shlex.split(target.check.command), stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=exec_env(target),
                            start_new_session=True, close_fds=True)
    pidfd = os.pidfd_open(proc.pid)
    out_fd = proc.stdout.fileno()
    os.set_blocking(out_fd, False)
    output = bytearray()
    exited = loop.create_future()

    def read_output() -> None:
        try:
            chunk = os.read(out_fd, 65536)
        except BlockingIOError:
            return
        if len(output) < MAX_REPLY:
            output.extend(chunk[:MAX_REPLY - len(output)])
        if not chunk:
            loop.remove_reader(out_fd)

    def on_exit() -> None:
        loop.remove_reader(pidfd)
        if not exited.done():
            exited.set_result(None)

    loop.add_reader(out_fd, read_output)
    loop.add_reader(pidfd, on_exit)
    try:
        await exited
        read_output()          # what is left in the pipe (the command's children may keep it open)
    finally:
        loop.remove_reader(out_fd)
        loop.remove_reader(pidfd)
        _kill_group(proc.pid)  # a timeout, or children the command left behind
        proc.stdout.close()
        _reap(loop, proc, pidfd)
    latency = time.perf_counter() - start
    first = bytes(output).split(b"\n", 1)[0]
    shown = first[:80].decode(errors="replace").strip()
    if proc.returncode != 0:
        why = f"exit {proc.returncode}" if proc.returncode > 0 else f"signal {-proc.returncode}"
        raise Unhealthy(f"{why}: {shown}" if shown else why)
    match = WEIGHT_LINE.fullmatch(first)
    weight = min(int(match.group(1)), MAX_WEIGHT) if match else None
    return latency, f"exit 0: {shown}" if shown else "exit 0", {"weight": weight}


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)   # the leader is not reaped yet, so its group id is still its own
    except ProcessLookupError:
        pass


def _reap(loop: asyncio.AbstractEventLoop, proc: subprocess.Popen, pidfd: int) -> None:
    """Collect the exit status now if there is one, else when the pidfd says so (never block the loop)."""
    if proc.poll() is not None:
        os.close(pidfd)
        return

    def reaped() -> None:
        loop.remove_reader(pidfd)
        proc.poll()
        os.close(pidfd)
    loop.add_reader(pidfd, reaped)


class AgentState:
    """What a backend's agent has said so far (HAProxy keeps what a reply does not mention).

    A reply is words split by spaces, tabs or commas, up to the first CR or
    LF; ``#`` starts a description. ``NN%`` sets the share of the configured
    weight; ``ready``, ``drain`` and ``maint`` the administrative state;
    ``up`` and ``down``/``fail``/``stopped`` the operating state;
    ``maxconn:N`` is accepted and ignored (fastlb has no connection cap).
    The backend is up when the agent answered, its operating state is up and
    it is not in ``maint``; ``drain`` keeps it up with weight 0 (established
    flows go on, no new ones). Unlike HAProxy, where the agent only adds to a
    separate health check, an unreachable agent counts as a failed check:
    here it is the backend's one check.
    """

    __slots__ = ("percent", "admin", "operating")

    def __init__(self):
        self.percent, self.admin, self.operating = 100, "ready", "up"

    def apply(self, line: str) -> tuple[bool, int, str]:
        """Take one reply; (up, share of the configured weight in %, detail)."""
        words_part, _, note = line.partition("#")
        words = [w for w in re.split(r"[ \t,]+", words_part.strip().lower()) if w]
        known = 0
        for word in words:
            if word.endswith("%") and word[:-1].isdigit():
                self.percent = min(int(word[:-1]), 25600)   # the weight it gives is capped at 65535 anyway
            elif word in ("ready", "drain", "maint"):
                self.admin = word
            elif word == "up":
                self.operating = "up"
            elif word in ("down", "fail", "stopped"):
                self.operating = "down"
            elif not word.startswith("maxconn:"):
                continue
            known += 1
        if not known:
            raise Unhealthy(f"agent reply with no word fastlb knows: {line[:60]!r}")
        detail = f"agent: {line.strip()[:80]}"
        up = self.operating == "up" and self.admin != "maint"
        return up, 0 if self.admin == "drain" else self.percent, detail


async def _agent(target: Target, state: AgentState) -> tuple[float, str, dict]:
    reader, writer = await asyncio.open_connection(target.address, target.port)
    start = time.perf_counter()
    try:
        data = b""
        while len(data) < MAX_REPLY and not any(c in data for c in b"\r\n"):
            chunk = await reader.read(MAX_REPLY - len(data))
            if not chunk:
                break
            data += chunk
    finally:
        writer.close()
    latency = time.perf_counter() - start
    line = data.split(b"\n", 1)[0].split(b"\r", 1)[0].decode("ascii", errors="replace")
    if not line.strip():
        raise ConnectionResetError(errno.ECONNRESET, "the agent closed without a reply")
    up, percent, detail = state.apply(line)
    if not up:
        raise Unhealthy(detail)
    return latency, detail, {"percent": percent}


PROBES = {"tcp": _tcp, "http": _http, "udp": _udp, "exec": _exec}


async def probe(target: Target, agent: AgentState | None = None) -> Result:
    """Run one probe of ``target`` within its timeout (``agent``: what its agent said before)."""
    check = target.check
    if check.kind == "none":
        return Result(target.key, True, None, "no check", time.monotonic())
    try:
        async with asyncio.timeout(check.timeout):
            if check.kind == "agent":
                out = await _agent(target, agent if agent is not None else AgentState())
            else:
                out = await PROBES[check.kind](target)
    except (OSError, ValueError, TimeoutError, EOFError, asyncio.IncompleteReadError) as exc:
        detail = str(exc) if isinstance(exc, Unhealthy) else _why(exc, check.timeout)
        return Result(target.key, False, None, detail, time.monotonic())
    latency, detail, *extra = out
    return Result(target.key, True, latency, detail, time.monotonic(), **(extra[0] if extra else {}))


class TcpChecks:
    """Every TCP check of a prober, run by plain loop callbacks: no task, future or timer per check.

    One heap holds each target's next start, and one timer on a TICK grid
    does all the work of a tick at once: it collects the connects that ended
    (one ``epoll_wait`` on our own epoll), fails those past their timeout and
    starts what is due. So 1,000 backends checked every second wake the loop
    1/TICK times a second, not once per start and once per end. A start is a
    non-blocking ``connect``; a connect that ended is read from its epoll
    event (``SO_ERROR`` only on an error), its latency is the kernel's own
    measure of the handshake (``TCP_INFO``'s RTT, so the tick's lateness does
    not count), and it closes with a reset (no TIME_WAIT), as HAProxy's checks
    do. bench/bench_health.py measures it.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, on_result: Callable[[Result], None]):
        self.loop = loop
        self.on_result = on_result
        self.targets: dict[tuple[str, bytes], Target] = {}
        self.generation: dict[tuple[str, bytes], int] = {}    # a re-added key's old heap entries are stale
        self.due: list[tuple[float, int, tuple[str, bytes], int]] = []     # heap: (start, order, key, generation)
        self.pending: dict[tuple[str, bytes], tuple[socket.socket, float, float, float]] = {}
        self.timer: asyncio.TimerHandle | None = None
        self.order = itertools.count()
        self.connecting = select.epoll()      # our own epoll of pending connects, polled at each tick
        self.by_fd: dict[int, tuple[str, bytes]] = {}

    def add(self, target: Target, delay: float) -> None:
        self.targets[target.key] = target
        self.generation[target.key] = gen = next(self.order)
        heapq.heappush(self.due, (self.loop.time() + delay, gen, target.key, gen))
        self._arm()

    def remove(self, key: tuple[str, bytes]) -> None:
        """Stop checking ``key``; its heap entry is skipped when it comes up."""
        self.targets.pop(key, None)
        self.generation.pop(key, None)
        if key in self.pending:
            sock = self.pending.pop(key)[0]
            self.by_fd.pop(sock.fileno(), None)
            sock.close()                      # closing the socket takes it out of the epoll

    def close(self) -> None:
        for key in list(self.targets):
            self.remove(key)
        if self.timer is not None:
            self.timer.cancel()
        self.connecting.close()

    def _arm(self) -> None:
        """Wake at the first tick where something is due; every tick while connects are pending."""
        now = self.loop.time()
        wake = now + TICK if self.pending else self.due[0][0] if self.due else None
        if wake is None:
            return
        wake = math.ceil(wake / TICK) * TICK
        if self.timer is not None:
            if self.timer.when() <= wake:
                return
            self.timer.cancel()
        self.timer = self.loop.call_at(wake, self._tick)

    def _tick(self) -> None:
        self.timer = None
        if self.pending:
            self._ended()
        now = self.loop.time()
        for key in [k for k, p in self.pending.items() if p[2] <= now]:
            self._finish(key, TimeoutError())
        while self.due and self.due[0][0] <= now:
            when, _, key, gen = heapq.heappop(self.due)
            if self.generation.get(key) == gen and key not in self.pending:
                self._start(self.targets[key], when)
        self._arm()

    def _start(self, target: Target, when: float) -> None:
        family = socket.AF_INET6 if ":" in target.address else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
        self.pending[target.key] = (sock, time.perf_counter(), self.loop.time() + target.check.timeout, when)
        err = sock.connect_ex((target.address, target.port))
        if err == errno.EINPROGRESS:
            self.by_fd[sock.fileno()] = target.key
            self.connecting.register(sock.fileno(), select.EPOLLOUT | select.EPOLLONESHOT)
        else:
            self._finish(target.key, OSError(err, os.strerror(err)) if err else None)

    def _ended(self) -> None:
        for fd, events in self.connecting.poll(0):
            key = self.by_fd.get(fd)
            if key is None:
                continue
            if events & (select.EPOLLERR | select.EPOLLHUP):
                err = self.pending[key][0].getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) or errno.ECONNRESET
                self._finish(key, OSError(err, os.strerror(err)))
            else:
                self._finish(key, None)

    def _finish(self, key: tuple[str, bytes], exc: BaseException | None) -> None:
        sock, started, _, when = self.pending.pop(key)
        self.by_fd.pop(sock.fileno(), None)
        latency = None
        if exc is None:
            rtt_us = struct.unpack_from("I", sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, TCP_INFO_LEN),
                                        TCPI_RTT)[0]
            latency = rtt_us / 1e6 if rtt_us else time.perf_counter() - started
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
        sock.close()
        target = self.targets[key]
        interval = target.check.interval
        now = self.loop.time()
        due = when + interval * (1 - random.uniform(0, JITTER))
        heapq.heappush(self.due, (max(due, now), next(self.order), key, self.generation[key]))  # late: no burst
        if exc is None:
            self.on_result(Result(key, True, latency, "connected", time.monotonic()))
        else:
            self.on_result(Result(key, False, None, _why(exc, target.check.timeout), time.monotonic()))


class Prober:
    """Runs the probes of a set of targets on a thread of its own, reporting to ``on_results``.

    ``on_results`` is called on the prober's thread with the results of up
    to REPORT_EVERY seconds (one call, not one per result, so that 1,000
    backends wake the controller 20 times a second, not 1,000): hand them
    over (the controller puts them on its queue).
    """

    def __init__(self, on_results: Callable[[list[Result]], None]):
        self.on_results = on_results
        self.results: list[Result] = []
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self._run_loop, name="fastlb-health", daemon=True)
        self.tasks: dict[tuple[str, bytes], tuple[Target, asyncio.Task]] = {}
        self.agents: dict[tuple[str, bytes], AgentState] = {}   # touched on the loop's thread only
        self.tcp = TcpChecks(self.loop, self._report)

    def _report(self, result: Result) -> None:
        if not self.results:
            self.loop.call_later(REPORT_EVERY, self._hand_over)
        self.results.append(result)

    def _hand_over(self) -> None:
        results, self.results = self.results, []
        self.on_results(results)

    def _probe(self, target: Target) -> asyncio.Future:
        agent = self.agents.setdefault(target.key, AgentState()) if target.check.kind == "agent" else None
        return probe(target, agent)

    def start(self) -> None:
        self.thread.start()

    def _run_loop(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def probe_all(self, targets: list[Target]) -> dict[tuple[str, bytes], Result]:
        """One probe of each target, all at once; blocks until the last ends (its timeout at most)."""
        async def run():
            return await asyncio.gather(*(self._probe(t) for t in targets))
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
                self.agents.pop(key, None)
        for key in list(self.tcp.targets):
            if targets.get(key) != self.tcp.targets[key]:
                self.tcp.remove(key)
        for key, target in targets.items():
            if key in self.tasks or key in self.tcp.targets or target.check.kind == "none":
                continue
            delay = 0.0 if key in now else random.uniform(0, target.check.interval)
            if target.check.kind == "tcp":
                self.tcp.add(target, delay)
            else:
                self.tasks[key] = (target, self.loop.create_task(self._every(target, delay)))

    async def _every(self, target: Target, delay: float) -> None:
        await asyncio.sleep(delay)
        interval = target.check.interval
        due = self.loop.time()
        while True:
            self._report(await self._probe(target))
            due += interval * (1 - random.uniform(0, JITTER))
            wait = due - self.loop.time()
            if wait < 0:  # the loop was late: start again from now rather than catch up in a burst
                due, wait = self.loop.time(), 0
            await asyncio.sleep(wait)

    def stop(self) -> None:
        if not self.thread.is_alive():
            return

        async def halt():
            self.tcp.close()
            tasks = [task for _, task in self.tasks.values()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        try:
            asyncio.run_coroutine_threadsafe(halt(), self.loop).result(timeout=5)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(timeout=5)
