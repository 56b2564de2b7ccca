"""HAProxy's per-request log lines, read from fastlb's own UNIX datagram socket.

HAProxy sends one datagram per request (``log <socket> format raw``) with
``render.LOG_FORMAT``: ``fastlb <backend> <server> <Tr> <Ta> <status>``. ``Tr``
is the server's response time in ms (-1 when it sent no response), ``Ta``
the whole request's. :func:`parse` is pure; :class:`Reader` is the thread
that feeds each parsed line to a callback.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from dataclasses import dataclass


@dataclass(frozen=True)
class Request:
    backend: str
    server: str
    tr_ms: int          # -1: no response from the server
    ta_ms: int
    status: int         # -1: none (aborted)


def parse(line: str) -> Request | None:
    """One log line as a Request; None for anything else (another format, a truncated datagram)."""
    fields = line.strip().split()
    try:
        i = fields.index("fastlb")
        backend, server, tr, ta, status = fields[i + 1:i + 6]
        return Request(backend, server, int(tr), int(ta), int(status))
    except (ValueError, IndexError):
        return None


class Reader:
    """Bind ``path`` and call ``on_request(request, monotonic_now)`` for each line, on a thread of its own."""

    def __init__(self, path: str, on_request):
        self.path = path
        self.on_request = on_request
        self.lines = 0
        self.unparsed = 0
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        self.sock.bind(path)
        os.chmod(path, 0o600)
        self._thread = threading.Thread(target=self._run, name="fastlb-l7-log", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            try:
                data = self.sock.recv(4096)
            except OSError:
                return    # closed
            self.lines += 1
            request = parse(data.decode(errors="replace"))
            if request is None:
                self.unparsed += 1
                continue
            self.on_request(request, time.monotonic())

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
