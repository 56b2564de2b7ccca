"""Health checks: the rise/fall state machine, each probe kind against real local servers, the prober."""

from __future__ import annotations

import asyncio
import http.server
import socket
import threading
import time

import pytest

from fastlb.config import HealthCheck
from fastlb.controller.health import DOWN, UNKNOWN, UP, Prober, Result, Target, Verdict, probe


def result(ok: bool) -> Result:
    return Result(("v", b"b"), ok, 0.001 if ok else None, "x", time.monotonic())


@pytest.mark.parametrize("first, state", [(True, UP), (False, DOWN)])
def test_the_first_result_of_an_unknown_backend_decides(first, state):
    v = Verdict()
    assert v.state == UNKNOWN
    assert v.feed(result(first), rise=3, fall=3) == state


def test_rise_and_fall_need_that_many_in_a_row():
    v = Verdict(UP)
    assert v.feed(result(False), rise=2, fall=3) is None
    assert v.feed(result(False), rise=2, fall=3) is None
    assert v.feed(result(True), rise=2, fall=3) is None      # the run of failures is broken
    assert [v.feed(result(False), 2, 3) for _ in range(3)] == [None, None, DOWN]
    assert v.feed(result(False), 2, 3) is None               # a transition is reported once
    assert [v.feed(result(True), 2, 3) for _ in range(2)] == [None, UP]


def test_alternating_results_never_flap():
    v = Verdict(UP)
    assert all(v.feed(result(i % 2 == 0), rise=2, fall=2) is None for i in range(20))
    assert v.state == UP


class _Handler(http.server.BaseHTTPRequestHandler):
    status = 200
    delay = 0.0

    def do_GET(self):  # noqa: N802
        time.sleep(self.delay)
        self.send_response(self.status if self.path == "/health" else 404)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def http_server():
    servers = []

    def start(status=200, delay=0.0):
        handler = type("H", (_Handler,), {"status": status, "delay": delay})
        srv = http.server.ThreadingHTTPServer(("127.0.0.2", 0), handler)
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        servers.append(srv)
        return srv.server_address[1]
    yield start
    for srv in servers:
        srv.shutdown()
        srv.server_close()


def check(kind, **kw) -> HealthCheck:
    return HealthCheck(kind=kind, interval=1.0, timeout=kw.pop("timeout", 0.5), **kw)


def run(target: Target) -> Result:
    return asyncio.run(probe(target))


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.2", 0))
        return s.getsockname()[1]


def test_tcp_connects_and_a_refused_connect_says_so(http_server):
    port = http_server()
    ok = run(Target(("v", b"b"), "127.0.0.2", port, check("tcp")))
    assert ok.ok and 0 < ok.latency_s < 0.5 and ok.detail == "connected"
    bad = run(Target(("v", b"b"), "127.0.0.2", closed_port(), check("tcp")))
    assert not bad.ok and bad.latency_s is None and bad.detail.startswith("ECONNREFUSED")


def test_http_wants_the_expected_status(http_server):
    good, sick = http_server(200), http_server(503)
    assert run(Target(("v", b"b"), "127.0.0.2", good, check("http", path="/health"))).detail == "HTTP 200"
    res = run(Target(("v", b"b"), "127.0.0.2", sick, check("http", path="/health")))
    assert not res.ok and "HTTP status 503, expected 200" in res.detail
    assert run(Target(("v", b"b"), "127.0.0.2", sick, check("http", path="/health", expect=503))).ok
    assert not run(Target(("v", b"b"), "127.0.0.2", good, check("http", path="/nope"))).ok


def test_http_latency_is_the_applications_and_a_tcp_connect_does_not_see_it(http_server):
    slow = http_server(delay=0.08)
    http_res = run(Target(("v", b"b"), "127.0.0.2", slow, check("http", path="/health")))
    tcp_res = run(Target(("v", b"b"), "127.0.0.2", slow, check("tcp")))
    assert http_res.ok and http_res.latency_s >= 0.08
    assert tcp_res.ok and tcp_res.latency_s < 0.05


def test_a_probe_that_gets_no_answer_fails_at_its_timeout(http_server):
    slow = http_server(delay=1.0)
    started = time.monotonic()
    res = run(Target(("v", b"b"), "127.0.0.2", slow, check("http", path="/health", timeout=0.2)))
    assert not res.ok and res.detail == "no answer within 0.2 s"
    assert time.monotonic() - started < 0.5


def test_udp_wants_a_reply_and_an_unreachable_port_fails_at_once():
    server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    server.bind(("127.0.0.2", 0))

    def echo():
        data, peer = server.recvfrom(2048)
        server.sendto(b"pong " + data, peer)
    threading.Thread(target=echo, daemon=True).start()
    try:
        res = run(Target(("v", b"b"), "127.0.0.2", server.getsockname()[1], check("udp", payload="ping")))
        assert res.ok and res.detail == "9-byte reply"
    finally:
        server.close()
    started = time.monotonic()
    res = run(Target(("v", b"b"), "127.0.0.2", closed_port(), check("udp")))
    assert not res.ok and res.detail.startswith("ECONNREFUSED") and time.monotonic() - started < 0.3


def test_the_prober_probes_every_interval_and_stops_probing_a_removed_target(http_server):
    port = http_server()
    seen: list[Result] = []
    prober = Prober(seen.append)
    prober.start()
    fast = HealthCheck(kind="tcp", interval=0.05, timeout=0.05)
    a, b = ("v", b"a"), ("v", b"b")
    try:
        prober.set_targets({a: Target(a, "127.0.0.2", port, fast), b: Target(b, "127.0.0.2", port, fast)},
                           now=frozenset({a}))
        time.sleep(0.5)
        prober.set_targets({a: Target(a, "127.0.0.2", port, fast)})
        time.sleep(0.1)
        count_b = sum(r.key == b for r in seen)
        time.sleep(0.3)
        assert sum(r.key == b for r in seen) == count_b  # b is no longer probed
        assert count_b >= 6 and sum(r.key == a for r in seen) >= 14 and all(r.ok for r in seen)
    finally:
        prober.stop()
    assert not prober.thread.is_alive()
