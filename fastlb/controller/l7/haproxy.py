"""fastlb's own HAProxy: its files, its config check, its process and its runtime API.

Everything lives in ``run_dir(ifname)``, ``/run/fastlb/l7/net<netns inode>/<ifname>/``
(``FASTLB_L7_ROOT`` overrides the root): the rendered haproxy.cfg, the admin
and master sockets, the pid file (the master's pid), the server-state file
and the log socket fastlb reads. The system ``haproxy`` service and
``/etc/haproxy`` are never read or touched.

:class:`Supervisor` runs ``haproxy -W`` (master-worker) as a child in its own
session, restarts it with exponential backoff when it exits unasked, reloads
it through the master CLI, and adopts a master that a ``--keep`` run left
(found by its pid file, recognised by its command line).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

from fastlb.kernel import pins
from fastlb.errors import ConfigError, FastlbError
from fastlb.controller.files import write_atomic
from fastlb.controller.l7.render import Paths, Rendered

DEFAULT_ROOT = "/run/fastlb/l7"
HAPROXY = "haproxy"
READY_TIMEOUT = 10.0
BACKOFF_FIRST, BACKOFF_MAX = 0.5, 10.0
STOP_GRACE = 5.0


class HaproxyError(FastlbError):
    """HAProxy is missing, refused to start, or its runtime API failed."""


def run_dir(ifname: str) -> Path:
    if "/" in ifname or ifname in (".", ".."):
        raise ValueError(f"bad interface name {ifname!r}")
    return Path(os.environ.get("FASTLB_L7_ROOT", DEFAULT_ROOT)) / pins.netns_id() / ifname


def binary() -> str:
    found = shutil.which(HAPROXY) or next((p for p in ("/usr/sbin/haproxy",) if os.access(p, os.X_OK)), None)
    if found is None:
        raise HaproxyError("haproxy is not installed: http/https VIPs are served by HAProxy",
                           fix="apt-get install haproxy (make setup does)")
    return found


# ---- the config check --------------------------------------------------------

_TABLE_HEADER = re.compile(r"^# table: ([^,\s]+),", re.M)
_STICK_ROW = re.compile(r"^0x[0-9a-f]+: key=(\S+) .*?server_key=(\S+)", re.M)
STICK_BATCH = 100          # `set table` commands per runtime API call (one line, ';'-separated)
_ALERT_LINE = re.compile(r"\[ALERT\].*?parsing \[[^\]]*?:(\d+)\] : (.*)")


def check(rendered: Rendered, path: str, config_path: str | None) -> None:
    """Run ``haproxy -c`` on the file at ``path`` (holding ``rendered``).

    A refusal becomes a ConfigError that names the fastlb key its line came from.
    """
    res = subprocess.run([binary(), "-c", "-f", path], capture_output=True, text=True, timeout=30)
    if res.returncode == 0:
        return
    err = res.stderr + res.stdout
    for text in err.splitlines():
        match = _ALERT_LINE.search(text)
        if match:
            line = int(match[1])
            raise ConfigError(f"HAProxy refuses what this key became ({match[2].strip()})",
                              path=config_path, field=rendered.field_of(line),
                              fix=f"change the key; line {line} of {path} shows what fastlb wrote")
    last = next((t for t in reversed(err.splitlines()) if "ALERT" in t), err.strip()[-300:])
    raise ConfigError(f"HAProxy refuses the rendered config: {last.strip()}", path=config_path,
                      fix=f"see {path}")


# ---- the runtime API -----------------------------------------------------------

def command(sock_path: str, text: str, timeout: float = 5.0) -> str:
    """Send one command to an HAProxy CLI socket (admin or master) and return its answer."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(sock_path)
        s.sendall(text.encode() + b"\n")
        chunks = []
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
    return b"".join(chunks).decode(errors="replace")


class Runtime:
    """The worker's runtime API on the admin socket."""

    def __init__(self, paths: Paths):
        self.paths = paths

    def __call__(self, text: str) -> str:
        try:
            answer = command(self.paths.admin_socket, text)
        except OSError as exc:
            raise HaproxyError(f"HAProxy's admin socket {self.paths.admin_socket} did not answer "
                               f"'{text.split()[0]}': {exc.strerror or exc}",
                               fix="see fastlb's log for haproxy_exited") from exc
        return answer

    def checked(self, text: str) -> str:
        """A command whose answer is empty or a success line; anything else is an error."""
        answer = self(text).strip()
        ok = ("", "New server registered.", "Server deleted.")
        if answer not in ok and not answer.startswith("Health check") and "successfully" not in answer:
            raise HaproxyError(f"HAProxy refused '{text}': {answer.splitlines()[0] if answer else ''}",
                               fix="see docs/L7.md for what the runtime API accepts")
        return answer

    def stat(self) -> list[dict[str, str]]:
        """``show stat`` as one dict per row (frontends, backends and servers)."""
        text = self("show stat")
        lines = [line for line in text.splitlines() if line.strip()]
        if not lines or not lines[0].startswith("# "):
            raise HaproxyError(f"unexpected 'show stat' answer: {text[:100]!r}", fix="see haproxy.out")
        header = lines[0][2:].split(",")
        return [dict(zip(header, line.split(","))) for line in lines[1:]]

    def info(self) -> dict[str, str]:
        out = {}
        for line in self("show info").splitlines():
            key, sep, value = line.partition(": ")
            if sep:
                out[key] = value
        return out

    def save_state(self) -> None:
        """Write ``show servers state`` to the server-state file (read back at the next start or reload)."""
        text = self("show servers state")
        if not text.startswith("1"):
            raise HaproxyError(f"unexpected 'show servers state' answer: {text[:100]!r}", fix="see haproxy.out")
        write_atomic(self.paths.state_file, text)

    def stick_entries(self) -> dict[str, list[tuple[str, str]]]:
        """Every stick table's bindings: table (= pool) -> [(client key, server name)]."""
        out = {}
        for name in _TABLE_HEADER.findall(self("show table")):
            rows = _STICK_ROW.findall(self(f"show table {name}"))
            if rows:
                out[name] = rows
        return out

    def restore_sticks(self, entries: dict[str, list[tuple[str, str]]]) -> int:
        """Write bindings saved before a reload into the new worker's tables, by server name (the
        new worker numbers its servers afresh); bindings whose pool or server is gone are dropped.
        Returns how many were written. Each gets the table's full expiry again."""
        ids: dict[tuple[str, str], str] = {}
        for line in self("show servers state").splitlines()[2:]:
            f = line.split()
            if len(f) > 4:
                ids[(f[1], f[3])] = f[2]          # be_name, srv_name -> srv_id
        commands = [f"set table {table} key {key} data.server_id {ids[(table, server)]}"
                    for table, rows in entries.items() for key, server in rows if (table, server) in ids]
        for i in range(0, len(commands), STICK_BATCH):
            self(";".join(commands[i:i + STICK_BATCH]))
        return len(commands)


# ---- the process ----------------------------------------------------------------

def master_pid(paths: Paths) -> int | None:
    """The pid of the HAProxy master running ``paths.config``, from the pid file; None if none runs."""
    try:
        pid = int(Path(paths.pid_file).read_text().split()[0])
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except (OSError, ValueError, IndexError):
        return None
    if not cmdline or not cmdline[0].endswith(b"haproxy") or paths.config.encode() not in cmdline:
        return None
    return pid


def stop_master(pid: int, grace: float = STOP_GRACE) -> None:
    """Soft-stop the master (its workers finish their requests), then hard-stop after ``grace``."""
    for sig, wait in ((signal.SIGUSR1, grace), (signal.SIGTERM, 2.0), (signal.SIGKILL, 2.0)):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if not _alive(pid):
                return
            time.sleep(0.05)


def _alive(pid: int) -> bool:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


class Supervisor:
    """Run, watch, reload and stop one attachment's HAProxy master."""

    def __init__(self, paths: Paths, log):
        self.paths = paths
        self.log = log
        self.runtime = Runtime(paths)
        self.proc: subprocess.Popen | None = None
        self.pid: int | None = None
        self.restarts = 0
        self.reloads = 0
        self.adopted = False
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._watcher: threading.Thread | None = None

    def start(self) -> None:
        """Adopt the master a --keep run left, else start one; return once its worker answers."""
        pid = master_pid(self.paths)
        if pid is not None:
            self.pid, self.adopted = pid, True
            self.log("haproxy_adopted", pid=pid)
            self.reload()
        else:
            self._spawn()
        self._watcher = threading.Thread(target=self._watch, name="fastlb-haproxy", daemon=True)
        self._watcher.start()

    def _spawn(self) -> None:
        Path(self.paths.state_file).touch(exist_ok=True)
        for sock in (self.paths.admin_socket, self.paths.master_socket):
            Path(sock).unlink(missing_ok=True)
        with open(self.paths.output, "ab") as out:
            self.proc = subprocess.Popen(
                [binary(), "-W", "-S", f"{self.paths.master_socket},mode,600", "-f", self.paths.config,
                 "-p", self.paths.pid_file],
                stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True)
        self.pid = self.proc.pid
        try:
            self._wait_ready(old_worker=None)
        except HaproxyError:
            self._kill_spawned()
            raise
        self.log("haproxy_started", pid=self.pid, config=self.paths.config)

    def _kill_spawned(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            stop_master(self.proc.pid, grace=0.5)
        if self.proc is not None:
            self.proc.wait()

    def worker_pid(self) -> int | None:
        try:
            return int(self.runtime.info().get("Pid", "0")) or None
        except (HaproxyError, ValueError):
            return None

    def _wait_ready(self, old_worker: int | None) -> None:
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                break
            worker = self.worker_pid()
            if worker is not None and worker != old_worker:
                return
            time.sleep(0.05)
        raise HaproxyError(f"HAProxy did not come up within {READY_TIMEOUT:g} s: {self._last_output()}",
                           fix=f"see {self.paths.output}")

    def _last_output(self) -> str:
        try:
            lines = [line for line in Path(self.paths.output).read_text(errors="replace").splitlines()
                     if "ALERT" in line or "WARNING" in line]
        except OSError:
            return "no output"
        return lines[-1].strip() if lines else "no ALERT in its output"

    def reload(self) -> None:
        """Seamless reload: save the servers' state, have the master re-read the config, wait for the new worker."""
        with self._lock:
            old = self.worker_pid()
            sticks: dict[str, list[tuple[str, str]]] = {}
            try:
                self.runtime.save_state()
                sticks = self.runtime.stick_entries()   # a new worker starts with empty stick tables
            except HaproxyError as exc:
                self.log("haproxy_state_not_saved", error=str(exc))
            try:
                command(self.paths.master_socket, "reload")
            except OSError:
                os.kill(self.pid, signal.SIGUSR2)   # the master CLI is gone (adopted from an older run?)
            self._wait_ready(old_worker=old)
            kept = self.runtime.restore_sticks(sticks) if sticks else 0
            self.reloads += 1
            self.log("haproxy_reloaded", pid=self.pid, worker=self.worker_pid(), persistence_kept=kept)

    def _watch(self) -> None:
        backoff = BACKOFF_FIRST
        while not self._stopping.is_set():
            if self.proc is not None:
                code = self.proc.wait()
            else:
                while _alive(self.pid) and not self._stopping.is_set():
                    time.sleep(0.2)
                code = None
            if self._stopping.is_set():
                return
            started = time.monotonic()
            self.restarts += 1
            self.log("haproxy_exited", pid=self.pid, code=code, restart_in_s=backoff, restarts=self.restarts)
            if self._stopping.wait(backoff):
                return
            with self._lock:
                try:
                    self.proc, self.adopted = None, False
                    self._spawn()
                except (HaproxyError, OSError) as exc:
                    self.log("haproxy_restart_failed", error=str(exc))
            # a master that ran a while earns a fresh backoff; one that dies at once doubles it
            backoff = BACKOFF_FIRST if time.monotonic() - started > 30 else min(BACKOFF_MAX, backoff * 2)

    def stop(self, keep: bool) -> None:
        """Stop watching; unless ``keep``, stop HAProxy (its workers finish what they hold)."""
        self._stopping.set()
        if keep or self.pid is None:
            return
        stop_master(self.pid)
        if self.proc is not None:
            self.proc.wait()
        self.log("haproxy_stopped", pid=self.pid)
