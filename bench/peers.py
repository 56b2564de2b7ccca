"""The benchmarks' peers and servers, from their Debian packages, as processes in lab namespaces.

- :func:`nginx_http`: the backends' HTTP server (``GET /`` answers the
  backend's name), on port 80 and on :data:`NAT_PORT`;
- :func:`haproxy`: HAProxy ``mode tcp``, ``balance roundrobin``;
- :func:`nginx_stream`: nginx's ``stream`` proxy (round robin by default).

Each writes its config into a folder, starts the process in a namespace
(foreground, so that the Popen is the process itself) and returns a
:class:`Peer`, which stops it. The lab kills whatever is left in its
namespaces when it goes down, so a failure cannot leave a peer behind.
Settings are production-ish for this box: threads or workers equal to the
cores, connection limits within the file-descriptor limit (20,000 here).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from fastlb.lab.clients import wait_tcp
from fastlb.lab.netns import LabError

if TYPE_CHECKING:
    from fastlb.lab.topology import Lab

CORES = os.cpu_count() or 1
MAXCONN = 8000                   # HAProxy's maxconn: two fds per proxied connection, 20,000 fds
NAT_PORT = 8080                  # the backends' second port, for fastlb NAT VIPs
HAPROXY_PORT = 8001              # on the LB's own address
NGINX_PORT = 8002
STREAM_MODULE = "/usr/lib/nginx/modules/ngx_stream_module.so"
START_TIMEOUT = 10.0


@dataclass
class Peer:
    """A server process in a lab namespace, with its config text and log."""

    name: str
    role: str
    config: str
    log: Path
    proc: subprocess.Popen = field(repr=False)

    def pids(self) -> list[int]:
        """The process and its children (nginx's workers)."""
        out = [self.proc.pid]
        try:
            with open(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children") as f:
                out += [int(p) for p in f.read().split()]
        except OSError:
            pass
        return out

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def __enter__(self) -> Peer:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _start(lab: Lab, name: str, role: str, config: str, folder: Path, argv: list[str],
           ready: list[tuple[str, int]]) -> Peer:
    log = folder / f"{name}.log"
    with open(log, "ab") as out:
        proc = lab.exec(role, argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                        start_new_session=True)
    peer = Peer(name, role, config, log, proc)
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while proc.poll() is None and time.monotonic() < deadline:
            try:
                wait_tcp(lab, ready, timeout=1.0)
                return peer
            except LabError:
                continue
        raise LabError(f"{name} in {lab.ns(role)} did not start (exit {proc.poll()}): "
                       f"{log.read_text(errors='replace').strip()[-400:]}")
    except BaseException:
        peer.stop()
        raise


def nginx_http_config(name: str, folder: Path) -> str:
    return f"""worker_processes {CORES};
worker_rlimit_nofile 20000;
pid {folder}/{name}.pid;
error_log {folder}/{name}.log;
events {{ worker_connections 8000; }}
http {{
    access_log off;
    keepalive_requests 1000000;
    server {{
        listen 80 reuseport;
        listen {NAT_PORT} reuseport;
        location / {{ return 200 "{name}\\n"; }}
    }}
}}
"""


def _nginx_argv(conf: Path, folder: Path) -> list[str]:
    return ["nginx", "-c", str(conf), "-p", str(folder), "-e", str(folder / "nginx-startup.log"),
            "-g", "daemon off;"]


def nginx_http(lab: Lab, backend: str, folder: Path) -> Peer:
    """nginx on ``backend``, answering ``GET /`` with the backend's name on port 80 and NAT_PORT."""
    config = nginx_http_config(backend, folder)
    conf = folder / f"{backend}-nginx.conf"
    conf.write_text(config)
    return _start(lab, f"nginx-{backend}", backend, config, folder, _nginx_argv(conf, folder),
                  [(lab.addr(backend), 80), (lab.addr(backend), NAT_PORT)])


def haproxy_config(lab: Lab, folder: Path, check: str = "") -> str:
    """``check``: HTTP health checks of ``GET /health`` with these server options
    (e.g. ``inter 200 fall 2 rise 2``); empty for none."""
    servers = "\n".join(f"    server {b} {lab.addr(b)}:80" for b in lab.backend_names)
    if check:
        servers = f"    option httpchk GET /health\n    default-server check {check}\n" + servers
    return f"""global
    nbthread {CORES}
    maxconn {MAXCONN}
    stats socket {folder}/haproxy.sock mode 600 level admin
defaults
    mode tcp
    timeout connect 5s
    timeout client 30s
    timeout server 30s
frontend bench
    bind {lab.addr("lb")}:{HAPROXY_PORT}
    default_backend servers
backend servers
    balance roundrobin
{servers}
"""


def haproxy(lab: Lab, folder: Path, check: str = "") -> Peer:
    """HAProxy in the LB namespace on the LB's address, port HAPROXY_PORT."""
    config = haproxy_config(lab, folder, check)
    conf = folder / "haproxy.cfg"
    conf.write_text(config)
    return _start(lab, "haproxy", "lb", config, folder, ["haproxy", "-db", "-f", str(conf)],
                  [(lab.addr("lb"), HAPROXY_PORT)])


def haproxy_servers(folder: Path) -> dict[str, str]:
    """Server name -> status (``UP``, ``DOWN``, ``UP 1/2`` ...) from HAProxy's stats socket."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(1.0)
        s.connect(str(folder / "haproxy.sock"))
        s.sendall(b"show stat\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    lines = data.decode().splitlines()
    header = lines[0].lstrip("# ").split(",")
    name, status = header.index("svname"), header.index("status")
    return {row[name]: row[status] for row in (line.split(",") for line in lines[1:] if line)
            if row[name] not in ("FRONTEND", "BACKEND")}


def nginx_stream_config(lab: Lab, folder: Path) -> str:
    servers = "\n".join(f"        server {lab.addr(b)}:80;" for b in lab.backend_names)
    return f"""load_module {STREAM_MODULE};
worker_processes {CORES};
worker_rlimit_nofile 20000;
pid {folder}/nginx-stream.pid;
error_log {folder}/nginx-stream.log;
events {{ worker_connections {MAXCONN}; }}
stream {{
    upstream servers {{
{servers}
    }}
    server {{
        listen {lab.addr("lb")}:{NGINX_PORT} reuseport;
        proxy_pass servers;
    }}
}}
"""


def nginx_stream(lab: Lab, folder: Path) -> Peer:
    """nginx ``stream`` in the LB namespace on the LB's address, port NGINX_PORT."""
    config = nginx_stream_config(lab, folder)
    conf = folder / "nginx-stream.conf"
    conf.write_text(config)
    return _start(lab, "nginx-stream", "lb", config, folder, _nginx_argv(conf, folder),
                  [(lab.addr("lb"), NGINX_PORT)])
