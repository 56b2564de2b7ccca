"""Labs made by ``fastlb lab up``: build one that outlives the command, list them, remove them.

A lab made by :func:`up` keeps running after the command exits. Its state
file (``/run/fastlb/lab/<runid>.json``, see :mod:`fastlb.lab.netns`) is marked
persistent, so no ``cleanup_stale()`` removes it; :func:`down` does. Its
folder, ``/run/fastlb/lab/<runid>/``, holds::

    fastlb.toml   the config fastlb runs with (HTTP health checks on every VIP)
    fastlb.log    the output of fastlb attach
    b1.log ...    the output of the backends' servers
    run.json      what lab up started: fastlb's PID and start time, the options

:func:`down` stops fastlb first (SIGTERM, so that it detaches and removes its
pins), then removes the namespaces, the folder and the state file.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from fastlb.lab import lb_process, netns
from fastlb.lab.lb_process import Balancer
from fastlb.lab.netns import LabError
from fastlb.lab.topology import HEALTH_HTTP, Lab

RUN_FILE = "run.json"
CONFIG_FILE = "fastlb.toml"
LOG_FILE = "fastlb.log"


@dataclass
class Run:
    """One lab, as its state file and run.json describe it."""

    state: netns.State
    info: dict               # run.json; empty for a lab that lab up did not make

    @property
    def runid(self) -> str:
        return self.state.runid

    @property
    def kind(self) -> str:
        """``lab up``, ``pid N`` (a process owns it: a test, the demo) or ``stale``."""
        if self.state.persistent:
            return "lab up"
        return f"pid {self.state.pid}" if self.state.owner_alive() else "stale"

    @property
    def balancer(self) -> Balancer | None:
        raw = self.info.get("balancer")
        return Balancer.from_dict(raw) if raw else None

    @property
    def namespaces_present(self) -> list[str]:
        present = set(netns.list_namespaces())
        return [n for n in self.state.namespaces if n in present]

    def describe(self) -> dict:
        """A JSON-able summary (``fastlb lab status --json``)."""
        bal = self.balancer
        return {"runid": self.runid, "kind": self.kind, "persistent": self.state.persistent,
                "backends": self.state.params.get("backends"), "ipv6": self.state.params.get("ipv6"),
                "algorithm": self.info.get("algorithm"), "forwarding": self.info.get("forwarding"),
                "namespaces": self.state.namespaces, "namespaces_present": len(self.namespaces_present),
                "fastlb_pid": bal.pid if bal else None, "fastlb_running": bool(bal and bal.alive()),
                "run_dir": self.state.run_dir, "created": self.info.get("created")}

    def lab(self) -> Lab:
        """A Lab object naming this run's namespaces (whether or not they still exist)."""
        params = self.state.params
        lab = Lab(backends=int(params.get("backends", 1)), ipv6=bool(params.get("ipv6", True)),
                  runid=self.runid, servers=False)
        if self.state.run_dir:
            lab.run_dir = Path(self.state.run_dir)
        return lab


def _read_info(state: netns.State) -> dict:
    if not state.run_dir:
        return {}
    try:
        info = json.loads((Path(state.run_dir) / RUN_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}


def runs() -> list[Run]:
    """Every lab with a state file: made by lab up, owned by a running process, or stale."""
    return [Run(s, _read_info(s)) for s in netns.read_states()]


def find(runid: str | None) -> Run:
    """The lab ``runid``; without one, the only lab made by lab up. Raises LabError otherwise."""
    if runid is not None:
        netns.check_runid(runid)
        run = next((r for r in runs() if r.runid == runid), None)
        if run is None:
            raise LabError(f"there is no lab {runid}", fix="see the labs with: fastlb lab status")
        return run
    persistent = [r for r in runs() if r.state.persistent]
    if not persistent:
        raise LabError("no lab made by fastlb lab up is running", fix="start one with: sudo fastlb lab up")
    if len(persistent) > 1:
        raise LabError(f"{len(persistent)} labs are up: {', '.join(r.runid for r in persistent)}",
                       fix="name one, e.g. fastlb lab down " + persistent[0].runid)
    return persistent[0]


def up(backends: int = 3, ipv6: bool = True, algorithm: str = "maglev",
       forwarding: str = "dsr") -> tuple[Lab, Balancer]:
    """Build a lab, start fastlb attach in it and hand the lab over (it outlives this process).

    On any failure everything built so far is removed.
    """
    lab = Lab(backends=backends, ipv6=ipv6, run_dir=True)
    lab.up()
    try:
        config = lab.write_config(lab.run_dir / CONFIG_FILE, algorithm=algorithm, forwarding=forwarding,
                                  health=HEALTH_HTTP)
        bal = lb_process.start(lab, config, lab.run_dir / LOG_FILE)
        # A backend is in no table until its first health check: ready means all up.
        lb_process.wait_health(lab, lab.backend_names, "up")
        info = {"algorithm": algorithm, "forwarding": forwarding, "created": time.time(),
                "balancer": bal.to_dict()}
        (lab.run_dir / RUN_FILE).write_text(json.dumps(info, indent=1) + "\n")
        lab.release()
    except BaseException as exc:
        try:
            lab.down()  # SIGTERM to everything in the lab: fastlb detaches
        except LabError as cleanup:
            exc.add_note(f"and the clean-up failed too: {cleanup}")
        raise
    return lab, bal


def down(run: Run) -> list[str]:
    """Remove a lab made by lab up (or a stale one): fastlb first, then everything else.

    Refuses a lab that a running process owns (it removes its lab itself).
    Returns the namespaces removed.
    """
    if not run.state.persistent and run.state.owner_alive():
        raise LabError(f"lab {run.runid} belongs to process {run.state.pid}, which is running",
                       fix="let that process end (it removes its lab), or stop it")
    bal = run.balancer
    if bal is not None:
        lb_process.stop(run.lab(), bal)
    return netns.remove_lab(run.state)
