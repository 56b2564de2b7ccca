"""The controller e2e tests' shared helpers: ``fastlb attach`` as a Controller whose
log lines are events, a config writer, the lab and run fixtures, and the client
helpers that run in the client namespace.

Run as a script, this file is the client side of two helpers that run in
the client namespace: ``keepalive`` (hold HTTP keep-alive connections and
use them on demand) and ``churn`` (new connections in a loop).
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from datetime import datetime
from pathlib import Path

if __name__ != "__main__":
    import pytest

    from fastlb.dataplane import flows
    from fastlb.kernel import pins
    from fastlb.kernel.maps import PinnedMaps
    from fastlb.lab.topology import Lab, python_argv, python_env

HEALTH = {"kind": "http", "path": "/health", "interval": 0.2, "timeout": 0.2, "rise": 2, "fall": 2}
EVENT = re.compile(r'(\w+)=("(?:[^"\\]|\\.)*"|\S+)')


# ---- the client-side helpers (run as a script in the client namespace) ----------------------

def _get(sock: socket.socket, close: bool) -> str:
    """One GET / on ``sock``; the body (the backend's name)."""
    sock.sendall(b"GET / HTTP/1.1\r\nHost: vip\r\n" + (b"Connection: close\r\n" if close else b"") + b"\r\n")
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(4096)
        if not chunk:
            raise ConnectionAbortedError("closed before an answer")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(re.search(rb"Content-Length: (\d+)", head).group(1))
    while len(body) < length:
        chunk = sock.recv(4096)
        if not chunk:
            raise ConnectionAbortedError("closed inside the answer")
        body += chunk
    return body.decode().strip()


def _outcome(sock: socket.socket) -> str:
    try:
        return _get(sock, close=False)
    except ConnectionResetError:
        return "reset"
    except (TimeoutError, socket.timeout):
        return "timeout"
    except OSError as exc:
        return f"error {exc!r}"


def keepalive_main(host: str, port: int, count: int) -> None:
    """Open ``count`` keep-alive connections; on each stdin line, one GET on each; EOF closes them."""
    conns = []
    for _ in range(count):
        s = socket.create_connection((host, port), timeout=3)
        conns.append(s)
    print(json.dumps({"backends": [_outcome(s) for s in conns], "ports": [s.getsockname()[1] for s in conns]}),
          flush=True)
    for _ in sys.stdin:
        print(json.dumps({"backends": [_outcome(s) for s in conns]}), flush=True)
    for s in conns:
        s.close()


def churn_main(host: str, port: int) -> None:
    """New connections, one after another, until stdin closes; then print what happened."""
    import threading
    stop = threading.Event()
    threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
    counts, errors = Counter(), []
    while not stop.is_set():
        try:
            with socket.create_connection((host, port), timeout=2) as s:
                s.settimeout(2)
                counts[_get(s, close=True)] += 1
        except OSError as exc:
            errors.append(f"{time.time():.3f} {exc!r}")
        time.sleep(0.005)
    print(json.dumps({"counts": counts, "failed": len(errors), "errors": errors[:5]}), flush=True)


if __name__ == "__main__":
    mode, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
    if mode == "keepalive":
        keepalive_main(host, port, int(sys.argv[4]))
    else:
        churn_main(host, port)
    sys.exit(0)


# ---- the test side -------------------------------------------------------------------------

def toml_value(v) -> str:
    return json.dumps(v) if isinstance(v, str) else str(v)


def config_text(lab, algorithm="rr", health=None, weights=None, services=(("tcp", 80),),
                backends=None, settings="sweep_interval = 0.5\n", address=None) -> str:
    weights = weights or {}
    lines = ["[settings]", settings]
    for proto, port in services:
        lines += ["[[vip]]", f'address = "{address or lab.vip4}"', f"port = {port}", f'protocol = "{proto}"',
                  f'algorithm = "{algorithm}"']
        if health:
            lines += ["[vip.health]"] + [f"{k} = {toml_value(v)}" for k, v in health.items()]
        for b in backends or lab.backend_names:
            lines += ["[[vip.backend]]", f'address = "{lab.addr(b)}"', f"weight = {weights.get(b, 1)}"]
        lines.append("")
    return "\n".join(lines)


def fastlb(lab, *args, check=True, user=None) -> subprocess.CompletedProcess:
    argv = python_argv("fastlb.cli", *args)
    if user is not None:
        argv = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups", *argv]
    return lab.run("lb", argv, timeout=60, check=check, env=python_env())


class Controller:
    """``fastlb attach`` in the LB namespace; its log lines are events."""

    def __init__(self, lab, config_path, *extra, log=None):
        self.lab = lab
        self.config = Path(config_path)
        self.log_path = Path(log or f"{config_path}.log")
        self.log = open(self.log_path, "a+")
        self.offset = self.log.tell()
        self.proc = lab.exec("lb", python_argv("fastlb.cli", "attach", lab.lb_iface, "-c", config_path, *extra),
                             env=python_env(), stdout=subprocess.PIPE, stderr=self.log, text=True)
        self.banner = self.proc.stdout.readline()
        if "attached to" not in self.banner:
            self.proc.kill()
            self.proc.wait(10)
            raise AssertionError(f"fastlb attach failed: {self.banner} {self.text()}")

    def text(self) -> str:
        self.log.flush()
        return self.log_path.read_text()[self.offset:]

    def events(self, name=None) -> list[dict]:
        out = []
        for line in self.text().splitlines():
            if line.startswith("fastlb: ts="):
                fields = {k: v.strip('"') for k, v in EVENT.findall(line[len("fastlb: "):])}
                if name is None or fields["event"] == name:
                    out.append(fields)
        return out

    def mark(self, name) -> int:
        """How many ``name`` events so far: pass it as ``after`` to wait for a new one."""
        return len(self.events(name))

    def wait_event(self, name, timeout=10.0, after=0, **match) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for ev in self.events(name)[after:]:
                if all(ev.get(k) == str(v) for k, v in match.items()):
                    return ev
            time.sleep(0.05)
        raise AssertionError(f"no {name} {match} within {timeout} s; log:\n{self.text()[-3000:]}")

    def signal(self, sig) -> None:
        os.kill(self.pid(), sig)

    def pid(self) -> int:
        """The python process (ip netns exec execs it, so it is the Popen's own pid)."""
        return self.proc.pid

    def stop(self) -> tuple[int, str]:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        out, _ = self.proc.communicate(timeout=30)
        self.log.close()
        return self.proc.returncode, out


def event_time(ev: dict) -> float:
    return datetime.fromisoformat(ev["ts"].replace("Z", "+00:00")).timestamp()


class Helper:
    """A client helper of this file (keepalive or churn), running in the client namespace."""

    def __init__(self, lab, *args):
        self.proc = lab.exec("client", [sys.executable, __file__, *map(str, args)], env=python_env(),
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def line(self) -> dict:
        line = self.proc.stdout.readline()
        assert line, f"the helper exited with {self.proc.wait(5)}"
        return json.loads(line)

    def ping(self) -> list[str]:
        self.proc.stdin.write("ping\n")
        self.proc.stdin.flush()
        return self.line()["backends"]

    def close(self) -> dict | None:
        self.proc.stdin.close()
        out = self.proc.stdout.read()
        self.proc.wait(10)
        return json.loads(out) if out.strip() else None


def pin_dir(lab) -> Path:
    inode = os.stat(f"/run/netns/{lab.ns('lb')}").st_ino
    return pins.root() / f"net{inode}" / lab.lb_iface


def map_ids_and_flows(lab) -> tuple[dict, set]:
    """The pinned maps' ids, and each conntrack entry's flow and pick (key, vip, backend)."""
    with PinnedMaps(pin_dir(lab)) as maps:
        ids = {name: maps.info(name).id for name in maps.fds}
        return ids, {(bytes(k), v.vip_id, v.backend_id) for k, v in flows.read(maps)}


def stats_json(lab) -> dict:
    return json.loads(fastlb(lab, "stats", "--json").stdout)[0]


def backend_stats(data, lab, vip="tcp") -> dict[str, dict]:
    by_addr = {f"{lab.addr(b)}:{80 if vip == 'tcp' else 9000}": b for b in lab.backend_names}
    v = next(v for v in data["vips"] if v["vip"].endswith(f"/{vip}"))
    return {by_addr[b["backend"]]: b for b in v["backends"]}


@pytest.fixture(scope="module")
def lab():
    with Lab(backends=3, ipv6=False) as lab:
        yield lab


@pytest.fixture
def run(lab, tmp_path):
    """Start controllers; stop every one at the end of the test, and detach."""
    started = []

    def start(text, *extra, name="fastlb.toml"):
        path = tmp_path / name
        path.write_text(text)
        ctl = Controller(lab, path, *extra)
        started.append(ctl)
        return ctl
    yield start
    for ctl in started:
        if ctl.proc.poll() is None:
            ctl.stop()
    fastlb(lab, "detach", lab.lb_iface, check=False)
    for b in lab.backend_names:
        if lab.server_pid(b) is None:
            lab.start_server(b)
