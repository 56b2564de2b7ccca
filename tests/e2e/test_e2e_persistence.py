"""Persistence with the real controller in the namespace lab: bindings survive a reload that adds backends.

Thirty clients (30 addresses of the client namespace) each open connections
to a maglev VIP with ``persistence = 600``; three backends are then added by
a reload (SIGHUP), and each client's new connections must keep their
backend. The same run without persistence is the control, and shows clients
moving. Run as a script, this file is the client: ``ask HOST PORT SRC...``
opens one connection from each source address and prints who answered.
"""

from __future__ import annotations

import json
import socket
import sys


def ask_main(host: str, port: int, sources: list[str]) -> None:
    out = {}
    for src in sources:
        with socket.create_connection((host, port), timeout=3, source_address=(src, 0)) as s:
            s.sendall(b"GET / HTTP/1.0\r\nHost: vip\r\n\r\n")
            data = b""
            while chunk := s.recv(4096):
                data += chunk
        out[src] = data.partition(b"\r\n\r\n")[2].decode().strip()
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    ask_main(sys.argv[2], int(sys.argv[3]), sys.argv[4:])
    sys.exit(0)

import signal  # noqa: E402
import subprocess  # noqa: E402

import pytest  # noqa: E402

from fastlb.lab.topology import Lab, python_env  # noqa: E402
from helpers.controller import Controller, fastlb  # noqa: E402

pytestmark = [pytest.mark.root, pytest.mark.netns]

SOURCES = [f"198.18.0.{200 + i}" for i in range(30)]


@pytest.fixture(scope="module")
def lab():
    with Lab(backends=6, ipv6=False) as lab:
        for src in SOURCES:
            subprocess.run(["ip", "-n", lab.ns("client"), "addr", "add", f"{src}/24", "dev", "eth0"], check=True)
        yield lab


def config(lab, backends: int, persistence: int) -> str:
    lines = ["[[vip]]", f'address = "{lab.vip4}"', "port = 80", 'algorithm = "maglev"']
    if persistence:
        lines.append(f"persistence = {persistence}")
    lines += ["[vip.health]", 'kind = "tcp"', "interval = 0.5", "timeout = 0.5"]
    for b in lab.backend_names[:backends]:
        lines += ["[[vip.backend]]", f'address = "{lab.addr(b)}"']
    return "\n".join(lines) + "\n"


def ask(lab) -> dict[str, str]:
    res = lab.run("client", [sys.executable, __file__, "ask", lab.vip4, "80", *SOURCES], env=python_env(), timeout=60)
    return json.loads(res.stdout)


def reload_with(ctl, path, text) -> None:
    path.write_text(text)
    done = ctl.mark("config_reloaded")
    ctl.signal(signal.SIGHUP)
    ctl.wait_event("config_reloaded", after=done)


@pytest.mark.parametrize("persistence", [600, 0], ids=["persistence", "control"])
def test_every_client_keeps_its_backend_when_three_are_added(lab, tmp_path, persistence):
    path = tmp_path / "fastlb.toml"
    path.write_text(config(lab, 3, persistence))
    ctl = Controller(lab, path)
    try:
        before = ask(lab)
        assert set(before.values()) == {"b1", "b2", "b3"}
        reload_with(ctl, path, config(lab, 6, persistence))
        ctl.wait_event("table_rebuilt", backends_in_table=6)
        after = ask(lab)
        kept = sum(after[s] == before[s] for s in SOURCES)
        print(f"\n{'persistence 600' if persistence else 'no persistence'}: {kept} of 30 clients kept their "
              f"backend after 3 -> 6 backends by reload; now on {sorted(set(after.values()))}")
        if persistence:
            assert kept == 30
            bound = json.loads(fastlb(lab, "flows", "list", "--persistent", "--json").stdout)
            assert bound["total"] == 30 and all(b["live"] for b in bound["bindings"])
            ctl.proc.kill()                       # kill -9: the pinned maps, bindings included, stay
            ctl.proc.wait(10)
            ctl = Controller(lab, path)           # a new controller adopts them
            assert ask(lab) == before
            gone = before[SOURCES[0]]
            mine = [s for s in SOURCES if before[s] == gone]
            reload_with(ctl, path, config(lab, 6, persistence).replace(
                f'[[vip.backend]]\naddress = "{lab.addr(gone)}"\n', ""))
            ctl.wait_event("clients_unbound")
            moved = ask(lab)
            assert all(moved[s] != gone for s in mine)                               # rebound elsewhere
            assert all(moved[s] == before[s] for s in SOURCES if s not in mine)      # the others stay
            assert ask(lab) == moved
        else:
            assert kept < 30 and len(set(after.values())) > 3
    finally:
        ctl.stop()
        fastlb(lab, "detach", lab.lb_iface, check=False)
