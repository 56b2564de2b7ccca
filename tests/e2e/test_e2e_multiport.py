"""Multi-port VIPs in the namespace lab: one VIP, one pool, every listed port, and no other.

Run as a script, this file is both sides: ``serve NAME PORT...`` (TCP and UDP
on each port, answering NAME; run on each backend) and ``probe HOST PORT...``
(one TCP connection and one UDP datagram to each port; prints who answered).
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time

PORTS = [80, *range(9000, 9011)]
OUTSIDE = 9011


def serve_main(name: str, vip: str, ports: list[int]) -> None:
    def tcp(sock):
        while True:
            conn, _ = sock.accept()
            with conn:
                conn.sendall(name.encode())

    def udp(sock):
        while True:
            _, peer = sock.recvfrom(2048)
            sock.sendto(name.encode(), peer)
    for port in ports:
        t = socket.create_server(("0.0.0.0", port))
        u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        u.bind((vip, port))   # under DSR a UDP reply must leave from the VIP
        threading.Thread(target=tcp, args=(t,), daemon=True).start()
        threading.Thread(target=udp, args=(u,), daemon=True).start()
    print("ready", flush=True)
    sys.stdin.read()


def probe_main(host: str, ports: list[int]) -> None:
    out = {}
    for port in ports:
        answers = []
        try:
            with socket.create_connection((host, port), timeout=1) as s:
                s.settimeout(1)
                answers.append(s.recv(64).decode())
        except OSError as exc:
            answers.append(f"tcp {type(exc).__name__}")
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
            u.settimeout(1)
            try:
                u.sendto(b"hi", (host, port))
                data, peer = u.recvfrom(64)
                answers.append(data.decode() if peer[0] == host else f"udp from {peer[0]}")
            except OSError as exc:
                answers.append(f"udp {type(exc).__name__}")
        out[port] = answers
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        serve_main(sys.argv[2], sys.argv[3], [int(p) for p in sys.argv[4:]])
    else:
        probe_main(sys.argv[2], [int(p) for p in sys.argv[3:]])
    sys.exit(0)

import pytest  # noqa: E402

from fastlb.lab.topology import python_env  # noqa: E402
from helpers.controller import fastlb, lab, run  # noqa: E402,F401 (fixtures)

pytestmark = [pytest.mark.root, pytest.mark.netns]


def config(lab, protocol: str) -> str:
    lines = ["[[vip]]", f'address = "{lab.vip4}"', 'ports = [80, "9000-9010"]', f'protocol = "{protocol}"',
             'algorithm = "rr"']
    for b in lab.backend_names:
        lines += ["[[vip.backend]]", f'address = "{lab.addr(b)}"']
    return "\n".join(lines) + "\n"


@pytest.fixture
def servers(lab):
    """Our TCP+UDP servers on 80, 9000-9011 of every backend, in place of the lab's."""
    procs = []
    for b in lab.backend_names:
        lab.stop_server(b)
    try:
        for b in lab.backend_names:
            p = lab.exec(b, [sys.executable, __file__, "serve", b, lab.vip4, *map(str, PORTS + [OUTSIDE])],
                         env=python_env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            procs.append(p)
            assert p.stdout.readline().strip() == "ready"
        yield
    finally:
        for p in procs:
            p.kill()
            p.wait(5)
        for b in lab.backend_names:
            lab.start_server(b)


def probe(lab, ports) -> dict[int, list[str]]:
    res = lab.run("client", [sys.executable, __file__, "probe", lab.vip4, *map(str, ports)], env=python_env(),
                  timeout=60)
    return {int(k): v for k, v in json.loads(res.stdout).items()}


def test_a_multi_port_vip_serves_tcp_and_udp_on_every_listed_port_and_not_the_next(lab, run, servers, tmp_path):
    run(config(lab, "tcp") + config(lab, "udp"))
    time.sleep(0.3)
    seen = probe(lab, PORTS + [OUTSIDE])
    names = set(lab.backend_names)
    print(f"\nmulti-port: {json.dumps(seen)}")
    for port in PORTS:
        tcp, udp = seen[port]
        assert tcp in names and udp in names, (port, seen[port])
    assert {seen[p][0] for p in PORTS} == names            # rr spreads the ports' flows over the one pool
    assert seen[OUTSIDE][0] not in names and seen[OUTSIDE][1] not in names, seen[OUTSIDE]
    # `flows list --vip` names the VIP by any of its ports, and lists the flows of all of them
    for port in (80, 9005, 9010):
        res = fastlb(lab, "flows", "list", "--vip", f"{lab.vip4}:{port}/udp", "--json", check=False)
        assert res.returncode == 0, res.stderr
        flows = json.loads(res.stdout)["flows"]
        assert {int(f["dst"].rpartition(":")[2]) for f in flows} == set(PORTS), flows
        assert {f["vip"] for f in flows} == {f"{lab.vip4}:80/udp"}
    res = fastlb(lab, "flows", "list", "--vip", f"{lab.vip4}:{OUTSIDE}/udp", check=False)
    assert res.returncode != 0 and f"no VIP {lab.vip4}:{OUTSIDE}/udp" in res.stderr, res.stderr
