"""BIRD daemons for the lab: one per namespace, each with its own config and control socket.

Every BIRD runs in the foreground (``bird -f``) inside a namespace the lab
made, started with ``ip netns exec``; its config, control socket and log
live in the lab run's own folder (``/run/fastlb/lab/<runid>/``), so two
runs never share one, and none of them is the host's (``/run/bird``).
Cleanup needs nothing special: :func:`fastlb.lab.netns.destroy` ends every
process inside a namespace before removing it, BIRD included, also after a
crash (:func:`fastlb.lab.netns.cleanup_stale`).

::

    bird = Bird(ns="flb-1a2b3c-router", run_dir=lab.run_dir, name="router")
    bird.start(ROUTER_CONF)          # returns once birdc answers
    print(bird.birdc("show", "protocols"))
    bird.stop()
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

from fastlb.lab import netns
from fastlb.lab.netns import LabError

START_TIMEOUT = 10.0


def available() -> bool:
    """True when BIRD 2 (``bird`` and ``birdc``) is installed."""
    return bool(shutil.which("bird") and shutil.which("birdc"))


class Bird:
    """One BIRD in namespace ``ns``: ``<run_dir>/<name>.conf``, ``.ctl`` (socket) and ``.log``."""

    def __init__(self, ns: str, run_dir: Path | str, name: str):
        self.ns = ns
        self.run_dir = Path(run_dir)
        self.name = name
        self.conf = self.run_dir / f"{name}.conf"
        self.socket = self.run_dir / f"{name}.ctl"
        self.log = self.run_dir / f"{name}.log"
        self.proc: subprocess.Popen | None = None

    def start(self, config: str, timeout: float = START_TIMEOUT) -> None:
        """Write ``config`` and start BIRD on it; return once its control socket answers."""
        if not available():
            raise LabError("BIRD is not installed", fix="apt-get install bird2 (sudo make setup does it)")
        if self.proc is not None and self.proc.poll() is None:
            raise LabError(f"BIRD {self.name} runs already (pid {self.proc.pid})")
        self.conf.write_text(config)
        res = subprocess.run(["bird", "-p", "-c", str(self.conf)], capture_output=True, text=True, timeout=10)
        if res.returncode != 0:
            raise LabError(f"BIRD {self.name}'s config does not parse: {(res.stderr or res.stdout).strip()}")
        log = open(self.log, "ab")
        try:
            self.proc = subprocess.Popen(
                netns.exec_argv(self.ns, ["bird", "-f", "-c", self.conf, "-s", self.socket,
                                          "-P", self.run_dir / f"{self.name}.pid"]),
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
        finally:
            log.close()
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise LabError(f"BIRD {self.name} in {self.ns} exited with {self.proc.returncode}: "
                               f"{self._log_tail()}")
            if self.socket.exists() and self._answers():
                return
            if time.monotonic() > deadline:
                self.kill()
                raise LabError(f"BIRD {self.name} in {self.ns} did not answer on {self.socket} within "
                               f"{timeout:g} s: {self._log_tail()}")
            time.sleep(0.05)

    def _answers(self) -> bool:
        try:
            return subprocess.run(["birdc", "-s", str(self.socket), "show", "status"], capture_output=True,
                                  timeout=2).returncode == 0
        except subprocess.TimeoutExpired:
            return False

    def _log_tail(self) -> str:
        try:
            text = self.log.read_text(errors="replace").strip()
        except OSError:
            return "(no log)"
        return " | ".join(text.splitlines()[-5:]) or "(empty log)"

    def birdc(self, *command: str, check: bool = True, timeout: float = 10.0) -> str:
        """``birdc -s SOCKET command...``'s output (it needs no namespace: the socket is a path)."""
        res = subprocess.run(["birdc", "-s", str(self.socket), *command], capture_output=True, text=True,
                             timeout=timeout)
        if check and res.returncode != 0:
            raise LabError(f"birdc {' '.join(command)} on {self.name} failed: "
                           f"{(res.stdout + res.stderr).strip()[-300:]}")
        return res.stdout

    def configure(self, config: str | None = None) -> None:
        """Write ``config`` (if given) and ``birdc configure``."""
        if config is not None:
            self.conf.write_text(config)
        out = self.birdc("configure")
        if "Reconfigured" not in out and "in progress" not in out:
            raise LabError(f"BIRD {self.name} refused its new config: {out.strip()[-300:]}")

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM, then SIGKILL after ``timeout``; a BIRD that is gone already is fine."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None

    def kill(self) -> None:
        """SIGKILL (a crash: BIRD's sessions drop without a NOTIFICATION)."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)
        self.proc = None
