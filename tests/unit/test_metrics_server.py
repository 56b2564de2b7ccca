"""fastlb's metrics endpoint starts, serves the exposition and stops, with every
prometheus-client it meets: Debian 12's 0.16 (whose start_http_server returns
nothing) as well as PyPI's current one."""

from __future__ import annotations

import socket
import urllib.request

from fastlb.controller.metrics import MetricsServer


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_metrics_server_serves_and_closes():
    port = free_port()
    server = MetricsServer("127.0.0.1", port, lambda: {"interface": "eth0", "vips": [], "conntrack": {"size": 8}})
    try:
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        assert 'fastlb_conntrack_size{interface="eth0"} 8.0' in body
    finally:
        server.close()
    with socket.socket() as s:  # the port is free again
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))
