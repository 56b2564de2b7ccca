"""Network namespaces for the lab: create, enter, clean up, and recover from crashes.

Everything here acts only on namespaces whose names the lab made up itself
(``flb-<runid>-<role>``). Before a lab creates a namespace it records the name
in a state file, ``/run/fastlb/lab/<runid>.json``, together with its own PID and
that PID's start time. If the process dies without cleaning up (SIGKILL, a
crash), :func:`cleanup_stale` finds the state file of the dead owner and
removes what it lists: first every process still inside those namespaces, then
the namespaces themselves. A namespace that no state file lists is never
touched.

A lab made by ``fastlb lab up`` outlives the command that built it: once it is
ready, its state file is marked ``persistent`` (owned by no process), and
:func:`cleanup_stale` leaves it alone. Only :func:`remove_lab` (``fastlb lab
down``) removes it. A run may also own a folder, ``/run/fastlb/lab/<runid>/``
(config, logs), which goes with it.

Namespaces are made with pyroute2 (``netns.create`` bind-mounts them under
``/var/run/netns/NAME``, like ``ip netns add``), so ``ip netns exec NAME ...``
works on them, and that is how the lab runs programs inside them.
"""

from __future__ import annotations

import errno
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from pyroute2 import netns as _pr_netns
from pyroute2.netlink.exceptions import NetlinkError

from fastlb.controller.files import write_atomic
from fastlb.errors import FastlbError, os_error

NETNS_DIR = Path("/var/run/netns")
STATE_DIR = Path("/run/fastlb/lab")
PREFIX = "flb-"
RUNID_RE = re.compile(r"^[0-9a-z]{1,6}$")
# Tolerated on cleanup: the object is gone already.
GONE = (errno.ENOENT, errno.ENODEV, errno.ESRCH, errno.EINVAL)


class LabError(FastlbError):
    """Building, running or removing the namespace lab failed."""


def errno_of(exc: BaseException) -> int:
    """The errno of an OSError or a pyroute2 NetlinkError, 0 if none."""
    if isinstance(exc, NetlinkError):
        return exc.code or 0
    return getattr(exc, "errno", 0) or 0


def describe(exc: BaseException) -> str:
    """``ENODEV (No such device)`` for an OSError or NetlinkError, else ``str(exc)``."""
    code = errno_of(exc)
    return os_error(OSError(code, os.strerror(code))) if code else str(exc)


def new_runid() -> str:
    """Return a fresh run id: 6 hex digits not used by any state file or namespace."""
    for _ in range(100):
        runid = secrets.token_hex(3)
        if not (STATE_DIR / f"{runid}.json").exists() and not (STATE_DIR / runid).exists() and not any(
            n.startswith(f"{PREFIX}{runid}-") for n in list_namespaces()
        ):
            return runid
    raise LabError("could not find an unused lab run id in 100 tries",
                   fix=f"remove stale state files in {STATE_DIR} with fastlb.lab.cleanup_stale()")


def check_runid(runid: str) -> str:
    """Return ``runid`` if it is 1 to 6 characters of [0-9a-z], else raise LabError."""
    if not isinstance(runid, str) or not RUNID_RE.match(runid):
        raise LabError(f"lab run id {runid!r} is invalid",
                       fix="use 1 to 6 characters from [0-9a-z], or leave it out for a random one")
    return runid


def ns_name(runid: str, role: str) -> str:
    """The namespace name of ``role`` in run ``runid``: ``flb-<runid>-<role>``."""
    return f"{PREFIX}{runid}-{role}"


def list_namespaces() -> list[str]:
    """Names of the namespaces bound under /var/run/netns (all of them, not only ours)."""
    try:
        return sorted(os.listdir(NETNS_DIR))
    except FileNotFoundError:
        return []


def create(name: str) -> None:
    """Create the named namespace (like ``ip netns add``). Raise LabError if it exists."""
    if name in list_namespaces():
        raise LabError(f"network namespace {name} exists already",
                       fix="pick another lab run id, or run fastlb.lab.cleanup_stale()")
    try:
        _pr_netns.create(name)
    except OSError as exc:
        if exc.errno != errno.EEXIST:  # a failed create can leave its mount point behind
            try:
                _pr_netns.remove(name)
            except OSError:
                pass
        raise LabError(f"cannot create network namespace {name}: {os_error(exc)}",
                       fix="run as root") from exc


def open_fd(name: str) -> int:
    """Open the namespace file of ``name``; the caller closes the fd."""
    try:
        return os.open(NETNS_DIR / name, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise LabError(f"cannot open network namespace {name}: {os_error(exc)}") from exc


def pids_in(name: str) -> list[int]:
    """PIDs of the processes whose network namespace is the named one."""
    try:
        st = os.stat(NETNS_DIR / name)
    except FileNotFoundError:
        return []
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            pst = os.stat(f"/proc/{entry}/ns/net")
        except OSError:
            continue  # exited meanwhile, a zombie, or a kernel thread
        if (pst.st_dev, pst.st_ino) == (st.st_dev, st.st_ino):
            pids.append(int(entry))
    return pids


def kill_all(name: str, grace: float = 3.0, timeout: float = 5.0) -> None:
    """End every process inside the named namespace and wait until they are gone.

    SIGTERM first, so that a program that cleans up after itself (``fastlb
    attach`` detaching its XDP program and pins) can; SIGKILL for those still
    there after ``grace`` seconds.
    """
    sig = signal.SIGTERM
    start = time.monotonic()
    while True:
        pids = [p for p in pids_in(name) if p != os.getpid()]
        if not pids:
            return
        elapsed = time.monotonic() - start
        if sig == signal.SIGTERM and elapsed > grace:
            sig = signal.SIGKILL
            start, elapsed = time.monotonic(), 0.0
        if sig == signal.SIGKILL and elapsed > timeout:
            raise LabError(f"processes {pids} in network namespace {name} survive SIGKILL")
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        time.sleep(0.02)


def destroy(name: str) -> None:
    """Kill the processes inside the named namespace and remove it; a missing one is fine."""
    kill_all(name)
    try:
        _pr_netns.remove(name)
    except OSError as exc:
        if exc.errno not in GONE:
            raise LabError(f"cannot remove network namespace {name}: {os_error(exc)}") from exc


def exec_argv(name: str, argv: list[str]) -> list[str]:
    """The argv that runs ``argv`` inside the named namespace: ``ip netns exec NAME ...``."""
    return ["ip", "netns", "exec", name, *map(str, argv)]


def ethtool(name: str, ifname: str, *features: str) -> None:
    """Run ``ethtool -K IFNAME FEATURE on|off ...`` inside the named namespace."""
    argv = exec_argv(name, ["ethtool", "-K", ifname, *features])
    try:
        res = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise LabError(f"{' '.join(argv)} failed: {exc}", fix="apt-get install ethtool iproute2") from exc
    if res.returncode != 0:
        raise LabError(f"{' '.join(argv)} failed: {res.stderr.strip()}")


def sysctl(name: str, settings: dict[str, str | int]) -> None:
    """Write sysctls (dotted keys, ``net.ipv4.conf.eth0.rp_filter``) inside the named namespace.

    A forked child enters the namespace with setns() and writes /proc/sys/...:
    the net.* sysctls it sees there are the namespace's own, and the host's
    are never opened. The child reports the first failure back through a pipe.
    """
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never returns
        os.close(rfd)
        code, msg, step = 0, b"", "setns"
        try:
            _pr_netns.setns(name, flags=0)
            for step, value in settings.items():
                with open("/proc/sys/" + step.replace(".", "/"), "w") as f:
                    f.write(f"{value}\n")
        except BaseException as exc:  # report anything: the child must reach _exit
            code, msg = 1, f"{step}: {exc}".encode()
        finally:
            os.write(wfd, msg)
            os._exit(code)
    os.close(wfd)
    with os.fdopen(rfd, "rb") as r:
        msg = r.read().decode(errors="replace")
    _, status = os.waitpid(pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise LabError(f"cannot set sysctl in network namespace {name}: {msg or 'child failed'}")


# ---- state files and crash recovery ---------------------------------------------------


@dataclass
class State:
    """What one lab run owns: written before anything is created, removed last."""

    runid: str
    pid: int
    start_time: int  # the owner's start time (clock ticks after boot): guards against PID reuse
    namespaces: list[str] = field(default_factory=list)
    # Made by `fastlb lab up`: no process owns it, cleanup_stale() leaves it alone.
    persistent: bool = False
    run_dir: str | None = None  # the run's own folder, STATE_DIR/<runid>, or None
    params: dict = field(default_factory=dict)  # how the Lab was built (backends, ipv6)

    @property
    def path(self) -> Path:
        return STATE_DIR / f"{self.runid}.json"

    def save(self, exclusive: bool = False) -> None:
        """Write the state file atomically; with ``exclusive``, refuse to replace one."""
        STATE_DIR.mkdir(parents=True, exist_ok=True)
        try:
            write_atomic(self.path, json.dumps(asdict(self), indent=1) + "\n", exclusive=exclusive)
        except FileExistsError:
            raise LabError(f"lab run id {self.runid} is in use ({self.path} exists)",
                           fix="pick another run id, or leave it out for a random one") from None

    def remove(self) -> None:
        """Remove the state file; a missing one is fine."""
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass

    def owner_alive(self) -> bool:
        """True while the process that wrote this state is still running."""
        return process_start_time(self.pid) == self.start_time

    @property
    def stale(self) -> bool:
        """True for a lab that nobody will remove: not persistent, and its owner is dead."""
        return not self.persistent and not self.owner_alive()


def process_start_time(pid: int) -> int | None:
    """Start time of ``pid`` in clock ticks after boot (/proc/PID/stat field 22), None if gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) is in parentheses and may contain spaces.
    fields = stat[stat.rindex(")") + 2:].split()
    if fields[0] == "Z":
        return None  # a zombie has exited already
    return int(fields[19])


def new_state(runid: str, namespaces: list[str], run_dir: Path | None = None,
              params: dict | None = None) -> State:
    """A state owned by this process (not persistent)."""
    pid = os.getpid()
    return State(runid=runid, pid=pid, start_time=process_start_time(pid) or 0,
                 namespaces=list(namespaces), run_dir=str(run_dir) if run_dir else None,
                 params=dict(params or {}))


def read_states() -> list[State]:
    """Every lab state file that parses; others are left alone."""
    states = []
    for path in sorted(STATE_DIR.glob("*.json")):
        try:
            raw = json.loads(path.read_text())
            state = State(runid=check_runid(raw["runid"]), pid=int(raw["pid"]),
                          start_time=int(raw["start_time"]),
                          namespaces=[str(n) for n in raw["namespaces"]],
                          persistent=raw.get("persistent", False) is True,
                          run_dir=str(raw["run_dir"]) if raw.get("run_dir") else None,
                          params=dict(raw.get("params") or {}))
        except (OSError, ValueError, KeyError, TypeError, LabError):
            continue
        if state.path == path:
            states.append(state)
    return states


def read_state(runid: str) -> State | None:
    """The state of run ``runid``, None if there is none (or it does not parse)."""
    check_runid(runid)
    return next((s for s in read_states() if s.runid == runid), None)


def run_dir_of(runid: str) -> Path:
    """The folder a run may own: ``/run/fastlb/lab/<runid>``."""
    return STATE_DIR / check_runid(runid)


def remove_run_dir(state: State) -> None:
    """Remove the run's folder, if it has one. Only ``STATE_DIR/<runid>`` is ever removed."""
    if not state.run_dir:
        return
    path = Path(state.run_dir)
    if path != run_dir_of(state.runid):
        raise LabError(f"lab {state.runid}: its state file names {path} as its folder, "
                       f"not {run_dir_of(state.runid)}; not removing it",
                       fix=f"check {state.path} and remove what it lists by hand")
    try:
        shutil.rmtree(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise LabError(f"cannot remove the lab folder {path}: {os_error(exc)}") from exc


def remove_lab(state: State) -> list[str]:
    """Remove what ``state`` lists: its namespaces (with the processes inside), folder and file.

    Hosts go before the switch, so that a program in a host (``fastlb attach``)
    gets its SIGTERM while its interface still exists. Only namespaces that
    carry the run's prefix are touched. Returns the names of those removed.
    """
    prefix = ns_name(state.runid, "")
    present = set(list_namespaces())
    removed = []
    for name in reversed(state.namespaces):
        if name.startswith(prefix) and name in present:
            destroy(name)
            removed.append(name)
    remove_run_dir(state)
    state.remove()
    return removed


def cleanup_stale() -> list[str]:
    """Remove what crashed labs left behind; return the names of the namespaces removed.

    Only labs whose owning process is dead are touched, and of them only the
    namespaces their state file lists that also carry that run's prefix.
    Processes still running inside those namespaces (servers the dead lab
    started) are killed first, so that the namespaces really go away. A
    persistent lab (``fastlb lab up``) has no owner and is never touched here.
    """
    removed = []
    for state in read_states():
        if state.stale:
            removed += remove_lab(state)
    return removed
