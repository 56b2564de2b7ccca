"""The lab's backend servers: HTTP on TCP and a UDP echo, each answering with its name.

Run inside a backend namespace::

    python -m fastlb.lab.servers --name b1 --http-port 80 --udp-port 9000 [--latency-ms N]

HTTP (threaded, HTTP/1.1, keep-alive or ``Connection: close`` as the client asks),
on every IPv4 and IPv6 address:

- ``GET /``            answers ``b1\\n`` after the current latency;
- ``GET /health``      answers ``ok\\n`` at once;
- ``GET /latency?ms=N`` sets the latency of ``GET /`` to N ms and answers ``N\\n``;
- ``GET /whoami...``   (any path under it) answers ``b1 CLIENT\\n`` after the latency,
  CLIENT being the X-Forwarded-For header, else the peer's address.

A connection may start with a PROXY protocol v2 header (HAProxy's
``send-proxy-v2``): its source address then counts as the peer's.

UDP: every datagram gets ``b1\\n`` back. Under DSR the datagram is addressed to
the VIP, and the reply must come *from* the VIP or the client drops it. The
server reads each datagram's destination address (IP_PKTINFO / IPV6_PKTINFO)
and sends the reply from that address, so it serves every VIP on ``lo`` and the
backend's own address without knowing them in advance.
"""

from __future__ import annotations

import argparse
import errno
import selectors
import signal
import socket
import struct
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

# Linux values; Python 3.11's socket module lacks IP_PKTINFO.
IP_PKTINFO = getattr(socket, "IP_PKTINFO", 8)
IPV6_RECVPKTINFO = getattr(socket, "IPV6_RECVPKTINFO", 49)
IPV6_PKTINFO = getattr(socket, "IPV6_PKTINFO", 50)
IN_PKTINFO = struct.Struct("=I4s4s")      # ifindex, spec_dst, addr
IN6_PKTINFO = struct.Struct("=16sI")      # addr, ifindex
MAX_LATENCY_MS = 60_000


class Settings:
    """Server state shared by the handler threads."""

    def __init__(self, name: str, latency_ms: float):
        self.name = name
        self.latency_ms = latency_ms


class Handler(BaseHTTPRequestHandler):
    """GET /, /health and /latency; everything else is 404."""

    protocol_version = "HTTP/1.1"
    server_version = "fastlb-lab"
    timeout = 30  # an idle keep-alive connection is closed after this many seconds
    settings: Settings  # set on the subclass made by serve()

    def setup(self) -> None:
        self.proxied_client = read_proxy_v2(self.request)   # before the request's bytes are buffered
        super().setup()

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        url = urlsplit(self.path)
        if url.path.startswith("/whoami"):
            if self.settings.latency_ms > 0:
                time.sleep(self.settings.latency_ms / 1000)
            client = self.headers.get("X-Forwarded-For") or self.proxied_client or self.client_address[0]
            self._reply(200, f"{self.settings.name} {client}\n")
        elif url.path == "/":
            if self.settings.latency_ms > 0:
                time.sleep(self.settings.latency_ms / 1000)
            self._reply(200, f"{self.settings.name}\n")
        elif url.path == "/health":
            self._reply(200, "ok\n")
        elif url.path == "/latency":
            try:
                ms = float(parse_qs(url.query)["ms"][0])
                if not 0 <= ms <= MAX_LATENCY_MS:
                    raise ValueError(ms)
            except (KeyError, ValueError):
                self._reply(400, f"use /latency?ms=N with 0 <= N <= {MAX_LATENCY_MS}\n")
                return
            self.settings.latency_ms = ms
            self._reply(200, f"{ms:g}\n")
        else:
            self._reply(404, "not found\n")

    def _reply(self, status: int, body: str) -> None:
        data = body.encode()
        self.send_response(status)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(data)))
        if self.close_connection:
            self.send_header("Connection", "close")
        elif self.request_version == "HTTP/1.0":
            self.send_header("Connection", "keep-alive")
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args) -> None:  # noqa: A002
        pass  # one line per request would flood the log under load


PROXY_V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"


def read_proxy_v2(sock: socket.socket) -> str | None:
    """Consume a PROXY v2 header at the start of ``sock``, if there is one; its source address."""
    sock.settimeout(30)
    head = b""
    while len(head) < 16:
        head = sock.recv(16, socket.MSG_PEEK)
        if not head or not PROXY_V2_SIGNATURE.startswith(head[:12]):
            return None
        if len(head) < 16:
            time.sleep(0.001)
    if not head.startswith(PROXY_V2_SIGNATURE):
        return None
    length = struct.unpack("!H", head[14:16])[0]
    data = b""
    while len(data) < 16 + length:
        chunk = sock.recv(16 + length - len(data))
        if not chunk:
            return None
        data += chunk
    family = data[13] >> 4
    if family == 1 and length >= 12:
        return socket.inet_ntop(socket.AF_INET, data[16:20])
    if family == 2 and length >= 36:
        return socket.inet_ntop(socket.AF_INET6, data[16:32])
    return None


class LabHTTPServer(ThreadingHTTPServer):
    """A thread per connection, a long listen queue for load tests; IPv4 only."""

    request_queue_size = 1024
    daemon_threads = True


class DualStackHTTPServer(LabHTTPServer):
    """The same on ``::``, also accepting IPv4 (IPV6_V6ONLY off)."""

    address_family = socket.AF_INET6

    def server_bind(self) -> None:
        self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()


def udp_sockets(port: int) -> list[socket.socket]:
    """One UDP socket per family on the wildcard address, reporting destinations."""
    v4 = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    v4.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)
    v4.bind(("0.0.0.0", port))
    socks = [v4]
    try:
        v6 = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    except OSError:
        return socks  # IPv6 is off in this namespace
    v6.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    v6.setsockopt(socket.IPPROTO_IPV6, IPV6_RECVPKTINFO, 1)
    v6.bind(("::", port))
    return socks + [v6]


def udp_answer(sock: socket.socket, reply: bytes) -> None:
    """Answer one datagram on ``sock`` with ``reply``, sent from the address it was sent to."""
    _, ancdata, _, peer = sock.recvmsg(2048, socket.CMSG_SPACE(IN6_PKTINFO.size))
    cmsgs = []
    for level, kind, data in ancdata:
        if level == socket.IPPROTO_IP and kind == IP_PKTINFO:
            _, _, dst = IN_PKTINFO.unpack_from(data)
            cmsgs = [(socket.IPPROTO_IP, IP_PKTINFO, IN_PKTINFO.pack(0, dst, bytes(4)))]
        elif level == socket.IPPROTO_IPV6 and kind == IPV6_PKTINFO:
            dst, _ = IN6_PKTINFO.unpack_from(data)
            cmsgs = [(socket.IPPROTO_IPV6, IPV6_PKTINFO, IN6_PKTINFO.pack(dst, 0))]
    sock.sendmsg([reply], cmsgs, 0, peer)


def udp_serve(socks: list[socket.socket], name: str) -> None:
    """Answer datagrams on all ``socks`` forever."""
    reply = f"{name}\n".encode()
    sel = selectors.DefaultSelector()
    for s in socks:
        sel.register(s, selectors.EVENT_READ)
    while True:
        for key, _ in sel.select():
            try:
                udp_answer(key.fileobj, reply)
            except OSError as exc:  # e.g. ICMP errors from an earlier reply; keep serving
                print(f"{name}: udp: {exc}", file=sys.stderr)


def serve(name: str, http_port: int, udp_port: int, latency_ms: float = 0.0) -> None:
    """Run both servers until SIGTERM or SIGINT."""
    settings = Settings(name, latency_ms)
    handler = type("LabHandler", (Handler,), {"settings": settings})
    socks = udp_sockets(udp_port)  # bound before HTTP listens: HTTP up means UDP up
    try:
        httpd = DualStackHTTPServer(("::", http_port), handler)
    except OSError as exc:
        if exc.errno not in (errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL):  # else: no IPv6 here
            raise
        httpd = LabHTTPServer(("0.0.0.0", http_port), handler)
    threading.Thread(target=udp_serve, args=(socks, name), daemon=True).start()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        httpd.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        httpd.server_close()


def main(argv: list[str] | None = None) -> None:
    """Command line entry point."""
    p = argparse.ArgumentParser(
        prog="python -m fastlb.lab.servers",
        description="fastlb lab backend: HTTP and UDP echo servers that answer with their name.",
        epilog="example: ip netns exec flb-1a2b3c-b1 python -m fastlb.lab.servers --name b1")
    p.add_argument("--name", required=True, help="the name to answer with (b1, b2, ...)")
    p.add_argument("--http-port", type=int, default=80, metavar="PORT", help="TCP port (80)")
    p.add_argument("--udp-port", type=int, default=9000, metavar="PORT", help="UDP port (9000)")
    p.add_argument("--latency-ms", type=float, default=0.0, metavar="MS",
                   help="delay before answering GET / (0); change it with GET /latency?ms=N")
    args = p.parse_args(argv)
    serve(args.name, args.http_port, args.udp_port, args.latency_ms)


if __name__ == "__main__":
    main()
