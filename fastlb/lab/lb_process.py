"""fastlb itself in the lab: ``fastlb attach`` in the LB's namespace, and its counters.

The lab runs the real command line, as a user would::

    ip netns exec flb-<runid>-lb python -m fastlb.cli attach eth0 -c CONFIG

in a session of its own (a closing terminal does not end it), its output
appended to a log file. It is ready once it prints ``attached to``; SIGTERM
makes it detach and exit. Its counters come from ``fastlb status --json``,
run the same way in the same namespace.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from fastlb.lab import netns
from fastlb.lab.netns import LabError
from fastlb.lab.topology import python_argv, python_env

if TYPE_CHECKING:
    from fastlb.lab.topology import Lab

ATTACH_TIMEOUT = 60.0   # BCC compiles the program at every attach: about 2 s here
STOP_TIMEOUT = 15.0
READY = "attached to"
DETACHED = "detached from"


def fastlb_argv(*args: object) -> list[str]:
    """argv of the fastlb command line, run with this interpreter (installed or not)."""
    return python_argv("fastlb.cli", *args)


@dataclass
class Balancer:
    """A ``fastlb attach`` running in a lab's LB namespace.

    ``start_time`` guards against PID reuse; ``log_offset`` is where this
    attach's output starts in ``log`` (several attaches may share one log).
    """

    pid: int
    start_time: int
    config: str
    log: str
    log_offset: int = 0
    banner: str = ""
    _proc: subprocess.Popen | None = field(default=None, repr=False, compare=False)

    def alive(self) -> bool:
        return netns.process_start_time(self.pid) == self.start_time

    def output(self) -> str:
        """What this attach has written to its log so far."""
        try:
            with open(self.log, "rb") as f:
                f.seek(self.log_offset)
                return f.read().decode(errors="replace")
        except FileNotFoundError:
            return ""

    def to_dict(self) -> dict:
        return {"pid": self.pid, "start_time": self.start_time, "config": self.config,
                "log": self.log, "log_offset": self.log_offset, "banner": self.banner}

    @classmethod
    def from_dict(cls, d: dict) -> Balancer:
        return cls(pid=int(d["pid"]), start_time=int(d["start_time"]), config=str(d["config"]),
                   log=str(d["log"]), log_offset=int(d.get("log_offset", 0)),
                   banner=str(d.get("banner", "")))


def _tail(text: str, lines: int = 5) -> str:
    return " | ".join(text.strip().splitlines()[-lines:]) or "(no output)"


def start(lab: Lab, config: str | os.PathLike, log: str | os.PathLike,
          timeout: float = ATTACH_TIMEOUT, role: str = "lb", options: tuple[str, ...] = ()) -> Balancer:
    """Start ``fastlb attach`` on the LB's eth0 with ``config``; return once it is attached.

    ``role``: the LB namespace (a lab with several LBs, fastlb.lab.ecmp, names them).
    ``options``: more options of ``fastlb attach`` (``("--keep",)``).

    Raises LabError, with the end of its output, if it exits or is not
    attached within ``timeout`` seconds (it is killed then).
    """
    from fastlb.kernel import pins

    # fastlb's pin root must be a bpffs of the host's mount namespace, or the
    # attach (in ip netns exec's private one) refuses. /run is empty after a
    # reboot, so mount it here when it is missing, as the first fastlb command would.
    pins.ensure_bpffs()
    log = Path(log)
    with open(log, "ab") as out:
        offset = out.tell()
        try:
            proc = lab.exec(role, fastlb_argv("attach", lab.lb_iface, "-c", str(config), *options), env=python_env(),
                            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                            start_new_session=True)
        except OSError as exc:
            raise LabError(f"cannot start fastlb attach in {lab.ns(role)}: {netns.describe(exc)}") from exc
    bal = Balancer(pid=proc.pid, start_time=netns.process_start_time(proc.pid) or 0, config=str(config),
                   log=str(log), log_offset=offset, _proc=proc)
    deadline = time.monotonic() + timeout
    while True:
        text = bal.output()
        ready = [line for line in text.splitlines() if READY in line]
        if ready:
            bal.banner = ready[0].strip()
            return bal
        if proc.poll() is not None:
            raise LabError(f"fastlb attach in {lab.ns(role)} exited with {proc.returncode}: {_tail(text)}",
                           fix=f"see {log}")
        if time.monotonic() > deadline:
            proc.kill()
            proc.wait(5)
            raise LabError(f"fastlb attach in {lab.ns(role)} was not attached after {timeout:g} s: "
                           f"{_tail(text)}", fix=f"see {log}")
        time.sleep(0.05)


def stop_controller(bal: Balancer, timeout: float = STOP_TIMEOUT) -> None:
    """SIGTERM ``fastlb attach`` and wait for it to exit (SIGKILL after ``timeout``).

    Started with ``--keep``, it leaves its data plane attached: :func:`stop` removes it later.
    """
    if bal.alive():
        try:
            os.kill(bal.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + timeout
    while bal.alive() and time.monotonic() < deadline:
        if bal._proc is not None and bal._proc.poll() is not None:
            break
        time.sleep(0.02)
    if bal.alive():
        os.kill(bal.pid, signal.SIGKILL)
    if bal._proc is not None:
        bal._proc.wait(5)


def stop(lab: Lab, bal: Balancer, timeout: float = STOP_TIMEOUT, role: str = "lb") -> None:
    """SIGTERM ``fastlb attach`` and wait for it; make sure fastlb is detached from eth0.

    When it detached by itself, its output says so. Otherwise (it had died,
    or ignored SIGTERM and was killed, or kept its data plane: ``--keep``)
    ``fastlb detach eth0`` removes the program and its pins, as long as the
    LB's namespace still exists.
    """
    stop_controller(bal, timeout)
    if DETACHED in bal.output() or lab.ns(role) not in netns.list_namespaces():
        return
    res = lab.run(role, fastlb_argv("detach", lab.lb_iface), timeout=60, check=False, env=python_env())
    if res.returncode != 0 and "not attached" not in res.stderr:
        raise LabError(f"fastlb did not detach from {lab.lb_iface} in {lab.ns(role)}: "
                       f"{res.stderr.strip() or res.stdout.strip()}",
                       fix=f"ip netns exec {lab.ns(role)} fastlb detach {lab.lb_iface}")


def status(lab: Lab, role: str = "lb") -> list[dict]:
    """``fastlb status --json`` in the LB's namespace (``role``), parsed."""
    res = lab.run(role, fastlb_argv("status", "--json"), timeout=60, check=False, env=python_env())
    try:
        data = json.loads(res.stdout)
    except ValueError:
        data = None
    if res.returncode != 0 or not isinstance(data, list):
        raise LabError(f"fastlb status in {lab.ns(role)} failed (exit {res.returncode}): "
                       f"{(res.stderr or res.stdout).strip()[-500:]}")
    return data


@dataclass(frozen=True)
class Counters:
    """fastlb's counters for one backend of one VIP."""

    packets: int = 0
    new_flows: int = 0

    def __sub__(self, other: Counters) -> Counters:
        return Counters(self.packets - other.packets, self.new_flows - other.new_flows)


def vip_name(address: str, port: int, protocol: str) -> str:
    """fastlb's name of a VIP: ``198.19.0.100:80/tcp``, ``[2001:db8:ffff::100]:80/tcp``."""
    return f"[{address}]:{port}/{protocol}" if ":" in address else f"{address}:{port}/{protocol}"


def backend_counters(lab: Lab, data: list[dict], vip: str, port: int, protocol: str) -> dict[str, Counters]:
    """Per lab backend name, fastlb's counters on the VIP from :func:`status` output.

    A backend the VIP does not list counts zero. Raises LabError when fastlb
    is not attached to the LB's eth0 or does not serve the VIP.
    """
    name = vip_name(vip, port, protocol)
    att = next((a for a in data if a.get("interface") == lab.lb_iface), None)
    if att is None or not att.get("attached"):
        raise LabError(f"fastlb is not attached to {lab.lb_iface} in {lab.ns('lb')}",
                       fix="attach it first (fastlb lab up attaches it)")
    entry = next((v for v in att.get("vips", []) if v["vip"] == name), None)
    if entry is None:
        raise LabError(f"fastlb in {lab.ns('lb')} serves no VIP {name}",
                       fix="use a config with that VIP (Lab.config_text() has it)")
    family = 6 if ":" in vip else 4
    by_addr = {lab.addr(b, family): b for b in lab.backend_names}
    out = {b: Counters() for b in lab.backend_names}
    for be in entry["backends"]:
        backend = by_addr.get(be["backend"])
        if backend is not None:
            out[backend] = Counters(int(be["packets"]), int(be["new_flows"]))
    return out


def health(lab: Lab) -> dict[tuple[str, str], str | None]:
    """The controller's health view: (VIP name, lab backend name) -> up, down, unknown.

    Read with ``fastlb stats --json`` in the LB's namespace (it asks the
    running controller). None for a backend whose VIP has no health check.
    """
    res = lab.run("lb", fastlb_argv("stats", "--json"), timeout=60, check=False, env=python_env())
    try:
        data = json.loads(res.stdout)
    except ValueError:
        data = None
    if res.returncode != 0 or not isinstance(data, list):
        raise LabError(f"fastlb stats in {lab.ns('lb')} failed (exit {res.returncode}): "
                       f"{(res.stderr or res.stdout).strip()[-500:]}")
    names = {}
    for b in lab.backend_names:
        for family in (4, 6) if lab.ipv6 else (4,):
            addr = lab.addr(b, family)
            names[f"[{addr}]" if family == 6 else addr] = b
    out = {}
    for att in data:
        if att.get("interface") != lab.lb_iface:
            continue
        for vip in att.get("vips", []):
            for be in vip.get("backends", []):
                host = be["backend"].rpartition(":")[0]
                if host in names:
                    out[(vip["vip"], names[host])] = be.get("health")
    return out


def wait_health(lab: Lab, backends: list[str], state: str, timeout: float = 15.0) -> float:
    """Wait until the controller reports every one of ``backends`` as ``state`` on every VIP.

    Returns the seconds it took. Raises LabError, with the last view, after ``timeout``.
    """
    start = time.monotonic()
    seen: dict = {}
    while time.monotonic() - start < timeout:
        seen = {key: s for key, s in health(lab).items() if key[1] in backends}
        if {b for _, b in seen} == set(backends) and all(s == state for s in seen.values()):
            return time.monotonic() - start
        time.sleep(0.1)
    raise LabError(f"fastlb's health checks did not report {', '.join(backends)} {state} within {timeout:g} s "
                   f"(last seen: {seen or 'none of them'})")
