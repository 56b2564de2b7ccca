"""The lab client's worker: runs inside the client namespace and prints one JSON object.

``python -m fastlb.lab.client_worker tcp|udp|get|hold|wait ...`` makes the
connections that :mod:`fastlb.lab.clients` (the caller's API) asks for. Every
socket operation has a timeout, and the process as a whole has one too.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import socket
import sys
import time
from collections import Counter

MAX_COUNT = 1_000_000
MAX_REPLY = 65536


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET


def http_once(host: str, port: int, path: str, timeout: float) -> tuple[int, str]:
    """One GET on a new connection with ``Connection: close``; return (status, body)."""
    hosthdr = f"[{host}]" if ":" in host else host
    request = f"GET {path} HTTP/1.1\r\nHost: {hosthdr}\r\nConnection: close\r\n\r\n".encode()
    deadline = time.monotonic() + timeout
    with socket.socket(_family(host), socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect((host, port))
        s.sendall(request)
        data = b""
        while len(data) <= MAX_REPLY:
            if time.monotonic() > deadline:
                raise TimeoutError(f"no complete answer within {timeout:g} s")
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
    head, sep, body = data.partition(b"\r\n\r\n")
    if not sep:
        raise ValueError(f"malformed HTTP answer {data[:80]!r}")
    status = head.split(b"\r\n", 1)[0].split()
    return int(status[1]), body.decode(errors="replace")


def cmd_tcp(host: str, port: int, count: int, timeout: float, path: str) -> dict:
    """Make ``count`` GETs; stop at the first failure."""
    counts: Counter = Counter()
    for i in range(count):
        try:
            status, body = http_once(host, port, path, timeout)
            if status != 200:
                raise ValueError(f"HTTP status {status}: {body.strip()[:80]!r}")
        except (OSError, ValueError) as exc:
            return {"counts": counts, "error": f"request {i + 1}/{count} failed: {exc!r}"}
        counts[body.strip()] += 1
    return {"counts": counts}


def cmd_udp(host: str, port: int, count: int, timeout: float, sources: int | None,
            first_port: int = 0, size: int = 0) -> dict:
    """Send ``count`` datagrams round robin over ``sources`` sockets; stop at the first failure.

    ``first_port`` > 0 binds the sockets to first_port, first_port+1, ... so
    that a later run repeats the same flows.
    """
    family = _family(host)
    want = ipaddress.ip_address(host)
    counts: Counter = Counter()
    by_source: dict[int, Counter] = {}
    pool = [socket.socket(family, socket.SOCK_DGRAM) for _ in range(sources or 0)]
    try:
        for n, s in enumerate(pool):
            s.settimeout(timeout)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", first_port + n if first_port else 0))
        for i in range(count):
            s = pool[i % len(pool)] if pool else socket.socket(family, socket.SOCK_DGRAM)
            s.settimeout(timeout)
            try:
                s.sendto(f"ping {i}".encode().ljust(size, b"."), (host, port))
                data, peer = s.recvfrom(2048)
                if ipaddress.ip_address(peer[0]) != want:
                    raise ValueError(f"answer came from {peer[0]}, not from {host}")
                src = s.getsockname()[1]
            except (OSError, ValueError) as exc:
                return {"counts": counts, "by_source": by_source,
                        "error": f"datagram {i + 1}/{count} failed: {exc!r}"}
            finally:
                if not pool:
                    s.close()
            name = data.decode(errors="replace").strip()
            counts[name] += 1
            by_source.setdefault(src, Counter())[name] += 1
    finally:
        for s in pool:
            s.close()
    return {"counts": counts, "by_source": by_source}


def keepalive_get(s: socket.socket, host: str, path: str = "/") -> str:
    """One GET on an open keep-alive connection; returns the body (status 200 required)."""
    hosthdr = f"[{host}]" if ":" in host else host
    s.sendall(f"GET {path} HTTP/1.1\r\nHost: {hosthdr}\r\nConnection: keep-alive\r\n\r\n".encode())
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = s.recv(4096)
        if not chunk:
            raise ConnectionError("closed before the answer's headers")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode(errors="replace").split("\r\n")
    status = int(lines[0].split()[1])
    length = next((int(ln.split(":", 1)[1]) for ln in lines[1:] if ln.lower().startswith("content-length:")), 0)
    while len(body) < length:
        chunk = s.recv(4096)
        if not chunk:
            raise ConnectionError("closed inside the answer's body")
        body += chunk
    if status != 200:
        raise ValueError(f"HTTP status {status}")
    return body.decode(errors="replace").strip()


def cmd_hold(host: str, port: int, count: int, timeout: float, requests: bool = False) -> dict:
    """Open ``count`` TCP connections and hold them until stdin closes.

    Idle by default. With ``requests``, each connection makes one keep-alive
    GET at once, and again for every ``check`` line read from stdin, which
    answers ``{"ok": N, "failed": M, "backends": {...}}``; a ``detail`` line
    does the same GETs and answers each connection's own result,
    ``{"connections": [{"port": P, "backend": "b1" | None, "error": ...}]}``
    (P: its local port). Prints ``{"held": count}`` once all are open (or
    an error); the connections close (FIN) when stdin reaches EOF.
    """
    conns = []
    try:
        for i in range(count):
            s = socket.socket(_family(host), socket.SOCK_STREAM)
            conns.append(s)
            s.settimeout(timeout)
            try:
                s.connect((host, port))
                if requests:
                    keepalive_get(s, host)
            except (OSError, ValueError) as exc:
                print(json.dumps({"error": f"connection {i + 1}/{count} failed: {exc!r}"}), flush=True)
                return {}
        print(json.dumps({"held": count}), flush=True)
        for line in sys.stdin:
            if line.strip() == "detail":
                rows = []
                for s in conns:
                    row = {"port": s.getsockname()[1], "backend": None, "error": None}
                    try:
                        row["backend"] = keepalive_get(s, host)
                    except (OSError, ValueError) as exc:
                        row["error"] = repr(exc)
                    rows.append(row)
                print(json.dumps({"connections": rows}), flush=True)
                continue
            if line.strip() != "check":
                continue
            ok, failed, backends = 0, 0, Counter()
            for s in conns:
                try:
                    backends[keepalive_get(s, host)] += 1
                    ok += 1
                except (OSError, ValueError):
                    failed += 1
            print(json.dumps({"ok": ok, "failed": failed, "backends": backends}), flush=True)
    finally:
        for s in conns:
            s.close()
    return {"released": count}


def cmd_wait(targets: list[tuple[str, int]], timeout: float) -> dict:
    """Poll TCP connects until every target accepts one, or the time is up."""
    deadline = time.monotonic() + timeout
    waiting = list(targets)
    last: dict[tuple[str, int], str] = {}
    while waiting:
        for t in list(waiting):
            try:
                with socket.create_connection(t, timeout=0.5):
                    waiting.remove(t)
            except OSError as exc:
                last[t] = repr(exc)
        if waiting and time.monotonic() > deadline:
            return {"error": f"no TCP answer within {timeout:g} s from "
                             + ", ".join(f"[{h}]:{p} ({last.get((h, p))})" for h, p in waiting)}
        if waiting:
            time.sleep(0.05)
    return {}


def cmd_get(host: str, port: int, path: str, timeout: float) -> dict:
    """One GET; status 200 required."""
    try:
        status, body = http_once(host, port, path, timeout)
    except (OSError, ValueError) as exc:
        return {"error": repr(exc)}
    if status != 200:
        return {"error": f"HTTP status {status}: {body.strip()[:80]!r}"}
    return {"body": body.strip()}


def main(argv: list[str] | None = None) -> int:
    """Command line entry point: runs in the client namespace and prints one JSON object."""
    p = argparse.ArgumentParser(prog="python -m fastlb.lab.client_worker",
                                description="fastlb lab client: counted TCP/UDP requests, JSON out.",
                                epilog="example: ip netns exec flb-1a2b3c-client python -m "
                                       "fastlb.lab.client_worker tcp --host 198.19.0.100 --count 100")
    sub = p.add_subparsers(dest="cmd", required=True)
    for name in ("tcp", "udp", "get"):
        c = sub.add_parser(name)
        c.add_argument("--host", required=True, help="address to send to")
        c.add_argument("--port", type=int, required=True)
        c.add_argument("--timeout", type=float, default=2.0, help="seconds per request (2)")
        if name != "get":
            c.add_argument("--count", type=int, default=100, metavar="N",
                           help=f"requests, 1 to {MAX_COUNT} (100)")
        if name != "udp":
            c.add_argument("--path", default="/", help="HTTP path (/)")
    sub.choices["udp"].add_argument("--sources", type=int, default=None, metavar="S",
                                    help="client sockets to spread over (default: one each)")
    sub.choices["udp"].add_argument("--first-port", type=int, default=0, metavar="P",
                                    help="bind the --sources sockets to ports P, P+1, ... (default: any)")
    sub.choices["udp"].add_argument("--size", type=int, default=0, metavar="BYTES",
                                    help="pad each datagram's payload to BYTES (default: a few bytes)")
    h = sub.add_parser("hold", help="open --count idle connections and hold them until stdin closes")
    h.add_argument("--host", required=True)
    h.add_argument("--port", type=int, required=True)
    h.add_argument("--count", type=int, default=10, metavar="N")
    h.add_argument("--timeout", type=float, default=2.0)
    h.add_argument("--requests", action="store_true",
                   help="GET on each connection (keep-alive) now and at every 'check' line on stdin")
    w = sub.add_parser("wait")
    w.add_argument("--target", nargs=2, action="append", required=True, metavar=("ADDR", "PORT"))
    w.add_argument("--timeout", type=float, default=15.0)
    a = p.parse_args(argv)
    if a.cmd in ("tcp", "udp") and not 1 <= a.count <= MAX_COUNT:
        p.error(f"--count must be 1 to {MAX_COUNT}")
    if a.cmd == "tcp":
        out = cmd_tcp(a.host, a.port, a.count, a.timeout, a.path)
    elif a.cmd == "udp":
        if a.sources is not None and a.sources < 1:
            p.error("--sources must be at least 1")
        if a.first_port and a.sources is None:
            p.error("--first-port needs --sources")
        out = cmd_udp(a.host, a.port, a.count, a.timeout, a.sources, a.first_port, a.size)
    elif a.cmd == "get":
        out = cmd_get(a.host, a.port, a.path, a.timeout)
    elif a.cmd == "hold":
        if not 1 <= a.count <= MAX_COUNT:
            p.error(f"--count must be 1 to {MAX_COUNT}")
        out = cmd_hold(a.host, a.port, a.count, a.timeout, a.requests)
    else:
        out = cmd_wait([(h, int(port)) for h, port in a.target], a.timeout)
    json.dump(out, sys.stdout)
    sys.stdout.write("\n")
    return 1 if out.get("error") else 0


if __name__ == "__main__":
    sys.exit(main())
