"""Health checks: the rise/fall state machine, each probe kind against real local servers, the prober."""

from __future__ import annotations

import asyncio
import contextlib
import http.server
import socket
import statistics
import struct
import subprocess
import threading
import time
from pathlib import Path

import pytest

from fastlb.config import HealthCheck
from fastlb.controller import health
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


@contextlib.contextmanager
def running_prober():
    """A started Prober and the list its results go to; stopped at the end."""
    seen: list[Result] = []
    prober = Prober(seen.extend)
    prober.start()
    try:
        yield prober, seen
    finally:
        prober.stop()


def test_the_prober_probes_every_interval_and_stops_probing_a_removed_target(http_server):
    port = http_server()
    fast = HealthCheck(kind="tcp", interval=0.05, timeout=0.05)
    a, b = ("v", b"a"), ("v", b"b")
    with running_prober() as (prober, seen):
        prober.set_targets({a: Target(a, "127.0.0.2", port, fast), b: Target(b, "127.0.0.2", port, fast)},
                           now=frozenset({a}))
        time.sleep(0.5)
        prober.set_targets({a: Target(a, "127.0.0.2", port, fast)})
        time.sleep(0.1)
        count_b = sum(r.key == b for r in seen)
        time.sleep(0.3)
        assert sum(r.key == b for r in seen) == count_b  # b is no longer probed
        assert count_b >= 6 and sum(r.key == a for r in seen) >= 14 and all(r.ok for r in seen)
    assert not prober.thread.is_alive()


def test_tcp_info_layout_gives_the_handshake_rtt(http_server):
    """TcpChecks reads a check's latency at TCPI_RTT of struct tcp_info (linux/tcp.h): state first
    (1: ESTABLISHED), then the RTT in microseconds at offset 68."""
    port = http_server()
    with socket.create_connection(("127.0.0.2", port)) as sock:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, health.TCP_INFO_LEN)
    assert info[0] == 1
    assert 0 < struct.unpack_from("I", info, health.TCPI_RTT)[0] < 10_000_000


def test_the_prober_ends_tcp_checks_on_its_ticks_and_says_why_one_failed(http_server):
    """TCP checks (TcpChecks): a connect that ended is read at the next tick, its latency from TCP_INFO."""
    port, closed = http_server(), closed_port()
    fast = HealthCheck(kind="tcp", interval=0.1, timeout=0.1)
    up, refused = ("v", b"up"), ("v", b"refused")
    with running_prober() as (prober, seen):
        prober.set_targets({up: Target(up, "127.0.0.2", port, fast),
                            refused: Target(refused, "127.0.0.2", closed, fast)}, now=frozenset({up, refused}))
        time.sleep(0.5)
    ups, fails = [r for r in seen if r.key == up], [r for r in seen if r.key == refused]
    assert len(ups) >= 3 and all(r.ok and r.detail == "connected" and 0 < r.latency_s < 0.1 for r in ups), ups
    assert len(fails) >= 3 and all(not r.ok and r.detail.startswith("ECONNREFUSED") for r in fails), fails


# ---- exec: the operator's command decides ------------------------------------------------

def script(tmp_path, body: str, name="check.sh") -> str:
    path = tmp_path / name
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)
    return str(path)


def exec_target(command: str, address="198.18.0.11", timeout=0.5) -> Target:
    return Target(("198.19.0.100:80/tcp", b"b"), address, 5432, check("exec", command=command, timeout=timeout))


def test_exec_exit_0_is_up_and_its_environment_names_the_backend(tmp_path):
    cmd = script(tmp_path, 'echo "$FASTLB_BACKEND_ADDRESS $FASTLB_BACKEND_PORT $FASTLB_VIP"\n')
    res = run(exec_target(cmd))
    assert res.ok and res.weight is None and res.detail == "exit 0: 198.18.0.11 5432 198.19.0.100:80/tcp"


def test_exec_a_lagging_replica_is_down_and_weight_n_sets_the_weight(tmp_path):
    cmd = script(tmp_path, '[ "$FASTLB_BACKEND_ADDRESS" = 198.18.0.12 ] && { echo "lagging 42 s"; exit 1; }\n'
                           'echo "weight 7"\n')
    lagging = run(exec_target(cmd, "198.18.0.12"))
    assert not lagging.ok and lagging.detail == "exit 1: lagging 42 s"
    fine = run(exec_target(cmd, "198.18.0.11"))
    assert fine.ok and fine.weight == 7 and fine.percent is None


def test_exec_a_hanging_command_is_killed_with_its_children_at_the_timeout(tmp_path):
    pids = tmp_path / "pids"
    cmd = script(tmp_path, f'sleep 60 & echo $! > {pids}; echo $$ >> {pids}; wait\n')
    started = time.monotonic()
    res = run(exec_target(cmd, timeout=0.3))
    assert not res.ok and res.detail == "no answer within 0.3 s"
    assert time.monotonic() - started < 1.0
    time.sleep(0.2)
    for pid in map(int, pids.read_text().split()):
        state = Path(f"/proc/{pid}/stat")
        assert not state.exists() or state.read_text().split(")")[1].split()[0] == "Z", pid


def test_a_hanging_exec_check_does_not_slow_the_other_checks(tmp_path, http_server):
    port = http_server()
    seen: list[Result] = []
    prober = Prober(seen.extend)
    prober.start()
    fast = HealthCheck(kind="tcp", interval=0.1, timeout=0.1)
    hang = HealthCheck(kind="exec", interval=0.1, timeout=0.1, command=script(tmp_path, "sleep 60\n"))
    a, h = ("v", b"a"), ("v", b"h")
    try:
        prober.set_targets({a: Target(a, "127.0.0.2", port, fast), h: Target(h, "198.18.0.12", 80, hang)},
                           now=frozenset({a, h}))
        time.sleep(1.05)
    finally:
        prober.stop()
    fast_results = [r for r in seen if r.key == a]
    hung = [r for r in seen if r.key == h]
    # the pace, not a count in a wall-clock window (the last 50 ms batch may not be handed over yet,
    # and a loaded machine delays some): a loop that waited for the hung command would space the
    # tcp check's results by its 0.1 s timeout on top of the 0.1 s interval
    gaps = [b.at - a.at for a, b in zip(fast_results, fast_results[1:])]
    assert len(fast_results) >= 6 and all(r.ok for r in fast_results), len(fast_results)
    assert statistics.median(gaps) < 0.15, gaps
    assert len(hung) >= 5 and not any(r.ok for r in hung)
    assert subprocess.run(["pgrep", "-f", str(tmp_path)], capture_output=True).stdout == b""


# ---- agent: HAProxy's agent-check protocol -----------------------------------------------

@pytest.fixture
def agent_server():
    """An agent on 127.0.0.2 that answers the next line of ``replies`` to each connection."""
    srv = socket.create_server(("127.0.0.2", 0))
    replies: list[bytes] = []

    def serve():
        while True:
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            with conn:
                if replies:
                    conn.sendall(replies.pop(0))
    threading.Thread(target=serve, daemon=True).start()
    yield srv.getsockname()[1], replies
    srv.close()


def test_agent_words_set_the_share_and_the_state_and_unsaid_ones_stay(agent_server):
    port, replies = agent_server
    from fastlb.controller.health import AgentState
    state = AgentState()
    target = Target(("v", b"b"), "127.0.0.2", port, check("agent", port=port))

    def ask(reply: bytes) -> Result:
        replies.append(reply)
        return asyncio.run(probe(target, state))
    half = ask(b"50%\n")
    assert half.ok and half.percent == 50 and half.detail == "agent: 50%"
    assert ask(b"up ready\r\n").percent == 50            # the share it said before stays
    assert ask(b"drain").percent == 0                    # no newline: the end of the stream ends it
    assert ask(b"75%,up\n").percent == 0                 # still draining
    down = ask(b"down #replica lagging\n")
    assert not down.ok and down.detail == "agent: down #replica lagging"
    assert not ask(b"75%\n").ok                          # down until it says up
    back = ask(b"up ready maxconn:30\n")
    assert back.ok and back.percent == 75
    assert not ask(b"maint\n").ok
    assert not ask(b"what?\n").ok
    assert ask(b"ready\n").ok


def test_agent_no_reply_or_no_agent_is_a_failed_check(agent_server):
    port, _ = agent_server
    silent = asyncio.run(probe(Target(("v", b"b"), "127.0.0.2", port, check("agent", port=port))))
    assert not silent.ok and "without a reply" in silent.detail
    res = asyncio.run(probe(Target(("v", b"b"), "127.0.0.2", closed_port(), check("agent", port=1))))
    assert not res.ok and res.detail.startswith("ECONNREFUSED")
