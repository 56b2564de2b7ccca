"""State-aware health checks in the namespace lab: an exec script that sees replica lag, an agent.

The controller runs the real ``fastlb attach`` in the LB namespace, so an
exec check's command runs there; the agents are small TCP servers in the
backends' namespaces answering what a file of the test says.
"""

from __future__ import annotations

import sys
import time

import pytest

from fastlb.lab.clients import tcp_requests
from helpers.controller import Helper, config_text, event_time, lab, run  # noqa: F401 (fixtures)

pytestmark = [pytest.mark.root, pytest.mark.netns]

AGENT_PORT = 9777
AGENT = """
import socket, sys
srv = socket.create_server(("0.0.0.0", int(sys.argv[1])))
while True:
    conn, _ = srv.accept()
    with conn:
        conn.sendall(open(sys.argv[2], "rb").read())
"""


def test_an_exec_check_takes_a_lagging_replica_out_and_brings_it_back(lab, run, tmp_path):
    flags = tmp_path / "lagging"
    flags.mkdir()
    script = tmp_path / "replica-lag-check"
    script.write_text(f'#!/bin/sh\n[ -e {flags}/"$FASTLB_BACKEND_ADDRESS" ] && {{ echo "lagging"; exit 1; }}\n'
                      'echo "replay lag 0 s"\n')
    script.chmod(0o755)
    check = {"kind": "exec", "command": str(script), "interval": 0.2, "timeout": 0.2, "rise": 2, "fall": 2}
    ctl = run(config_text(lab, "rr", check))
    assert set(tcp_requests(lab, count=30)) == {"b1", "b2", "b3"}
    b1 = f"{lab.addr('b1')}:80"
    lagging_since = time.time()
    (flags / lab.addr("b1")).touch()
    down = ctl.wait_event("backend_down", backend=b1)
    budget = check["fall"] * check["interval"] + 1.0
    print(f"\nexec: b1 out {event_time(down) - lagging_since:.3f} s after its script said lagging "
          f"(budget {budget:g} s); detail {down['detail']!r}")
    assert event_time(down) - lagging_since <= budget and down["detail"] == "exit 1: lagging"
    time.sleep(max(0.0, lagging_since + budget - time.time()))
    counts = tcp_requests(lab, count=60)
    assert "b1" not in counts and sum(counts.values()) == 60
    ups = ctl.mark("backend_up")
    (flags / lab.addr("b1")).unlink()
    ctl.wait_event("backend_up", after=ups, backend=b1)
    time.sleep(0.3)
    assert "b1" in tcp_requests(lab, count=30)


@pytest.fixture
def agents(lab, tmp_path):
    """An agent on every backend; ``say(backend, text)`` sets its next replies."""
    procs, files = [], {}
    for b in lab.backend_names:
        files[b] = tmp_path / f"agent-{b}"
        files[b].write_text("up ready 100%\n")
        procs.append(lab.exec(b, [sys.executable, "-c", AGENT, str(AGENT_PORT), str(files[b])]))
    time.sleep(0.3)
    yield lambda b, text: files[b].write_text(text)
    for p in procs:
        p.kill()
        p.wait(5)


def test_an_agent_at_50_percent_halves_the_share_and_drain_stops_new_connections(lab, run, agents):
    check = {"kind": "agent", "port": AGENT_PORT, "interval": 0.2, "timeout": 0.2, "rise": 2, "fall": 2}
    ctl = run(config_text(lab, "wrr", check, weights={"b1": 2, "b2": 2, "b3": 2}))
    full = tcp_requests(lab, count=90)
    asked = ctl.mark("backend_weight_asked")
    agents("b1", "50%\n")
    ev = ctl.wait_event("backend_weight_asked", after=asked, backend=f"{lab.addr('b1')}:80", percent=50)
    ctl.wait_event("table_rebuilt", after=0)
    time.sleep(0.3)
    half = tcp_requests(lab, count=100)
    print(f"\nagent: shares at 100 %: {dict(full)}; b1 at 50 %: {dict(half)} ({ev['detail']})")
    assert sum(half.values()) == 100 and 12 <= half["b1"] <= 28 and half["b2"] >= 30 and half["b3"] >= 30
    held = Helper(lab, "keepalive", lab.vip4, 80, 9)
    try:
        before = held.line()["backends"]
        assert "b1" in before
        asked = ctl.mark("backend_weight_asked")
        agents("b1", "drain\n")
        ctl.wait_event("backend_weight_asked", after=asked, backend=f"{lab.addr('b1')}:80", percent=0)
        time.sleep(0.3)
        drained = tcp_requests(lab, count=60)
        assert "b1" not in drained and sum(drained.values()) == 60
        assert held.ping() == before            # established connections to b1 go on
    finally:
        held.close()
    asked = ctl.mark("backend_weight_asked")
    agents("b1", "ready\n")
    ctl.wait_event("backend_weight_asked", after=asked, backend=f"{lab.addr('b1')}:80", percent=50)
