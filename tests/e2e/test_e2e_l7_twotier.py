"""Two tiers across boxes (issue 15 item 7): an L4 fastlb box whose backends are two L7 fastlb boxes.

fastlb.lab.twotier wires it: the L4 box (``lb``) has two tcp VIPs, one
forwarding by tunnel to the L7 boxes' ``eth1`` (where ``fastlb decap``
runs) and one by DSR to their ``eth0`` (where ``fastlb attach`` runs). Each
L7 box runs ``fastlb attach`` with http VIPs for the same two addresses,
with the same routes to the application servers. Real fastlb processes
(three attaches, two decaps), real HAProxy, real curl; each request is its
own connection (``Connection: close``), so the L4 box spreads them over both
L7 boxes.

The L4 box checks the L7 boxes as backends: ``GET /health`` on port 8080 of
the address it sends to, where each L7 box has one more http VIP (its own
address, port 8080) whose pool is an application server. A box whose fastlb
stops is out within the checks' interval, and no request fails after that.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest

from fastlb.lab import lb_process
from fastlb.lab.twotier import L7_BOXES, TUNNEL_IFACE, TwoTierLab
from helpers.e2e import run_fastlb

pytestmark = [pytest.mark.root, pytest.mark.netns]

TUNNEL_VIP, DSR_VIP = "198.19.0.100", "198.19.0.101"
TUNNEL_SOURCE = "198.18.200.0/24"
API, STATIC = "api.example.com", "/whoami/static/"
COUNT = 40
CHECK_PORT = 8080       # each L7 box answers the L4 box's checks here, on the addresses it is sent to
L4_HEALTH = ('[vip.health]\nkind = "http"\nport = 8080\npath = "/health"\ninterval = 0.3\ntimeout = 0.3\n'
             'rise = 1\nfall = 2\n')


def l4_config(lab: TwoTierLab) -> str:
    text = f'[settings]\ntunnel_source = "{TUNNEL_SOURCE}"\n\n'
    for vip, forwarding, addr in ((TUNNEL_VIP, "tunnel", lab.tunnel_addr), (DSR_VIP, "dsr", lab.addr)):
        text += (f'[[vip]]\naddress = "{vip}"\nport = 80\nprotocol = "tcp"\nforwarding = "{forwarding}"\n'
                 f'algorithm = "maglev"\n{L4_HEALTH}')
        text += "".join(f'[[vip.backend]]\naddress = "{addr(box)}"\n' for box in L7_BOXES) + "\n"
    return text


def l7_config(lab: TwoTierLab, box: str) -> str:
    """Both L7 boxes: the same http VIPs, default pool b1, api.example.com to b2, /whoami/static/ to b3;
    and, for the L4 box's checks, an http VIP on each of the box's own addresses, port 8080, pool b1."""
    text = "".join(f'[[vip]]\naddress = "{addr}"\nport = {CHECK_PORT}\nprotocol = "http"\n'
                   f'[[vip.backend]]\naddress = "{lab.addr("b1")}"\nport = 80\n\n'
                   for addr in (lab.addr(box), lab.tunnel_addr(box)))
    for vip in (TUNNEL_VIP, DSR_VIP):
        text += (f'[[vip]]\naddress = "{vip}"\nport = 80\nprotocol = "http"\nalgorithm = "rr"\n'
                 '[vip.health]\nkind = "http"\npath = "/health"\ninterval = 0.3\ntimeout = 0.3\nrise = 1\nfall = 2\n'
                 f'[[vip.backend]]\naddress = "{lab.addr("b1")}"\n'
                 f'[[vip.route]]\nhost = "{API}"\n[[vip.route.backend]]\naddress = "{lab.addr("b2")}"\n'
                 f'[[vip.route]]\npath_prefix = "{STATIC}"\n[[vip.route.backend]]\naddress = "{lab.addr("b3")}"\n\n')
    return text


@pytest.fixture(scope="module")
def running() -> dict[str, lb_process.Balancer]:
    """Role -> its fastlb attach: the lab fixture fills it and stops what is still in it."""
    return {}


@pytest.fixture(scope="module")
def lab(running):
    with TwoTierLab(backends=3) as lab:
        decaps: list[str] = []
        try:
            configs = {"lb": l4_config(lab), **{box: l7_config(lab, box) for box in L7_BOXES}}
            for role, text in configs.items():
                (lab.run_dir / f"{role}.toml").write_text(text)

            def decap(box):
                run_fastlb(lab, box, "decap", "attach", TUNNEL_IFACE, "--vip", TUNNEL_VIP, "--from", TUNNEL_SOURCE,
                           check=True)
                decaps.append(box)

            def start(role):
                running[role] = lb_process.start(lab, lab.run_dir / f"{role}.toml", lab.run_dir / f"{role}.log",
                                                 role=role)
            with ThreadPoolExecutor(5) as pool:   # BCC compiles at each attach: side by side
                futures = [pool.submit(decap, box) for box in L7_BOXES] + [pool.submit(start, r) for r in configs]
                for f in futures:
                    f.result()
            wait_l4_health(lab, {box: "up" for box in L7_BOXES})
            yield lab
        finally:
            for role, bal in running.items():
                lb_process.stop(lab, bal, role=role)
            for box in decaps:
                run_fastlb(lab, box, "decap", "detach", TUNNEL_IFACE)


def l4_health(lab) -> dict[tuple[str, str], str]:
    """The L4 box's view: (VIP, L7 box) -> up/down/unknown."""
    boxes = {addr: box for box in L7_BOXES for addr in (lab.addr(box), lab.tunnel_addr(box))}
    return {(v["vip"], boxes[b["backend"].rpartition(":")[0]]): b.get("health")
            for v in stats(lab, "lb")["vips"] for b in v["backends"]}


def wait_l4_health(lab, want: dict[str, str], timeout: float = 15.0) -> float:
    start = time.monotonic()
    while True:
        seen = l4_health(lab)
        if all(seen.get((f"{vip}:80/tcp", box)) == state for vip in (TUNNEL_VIP, DSR_VIP)
               for box, state in want.items()):
            return time.monotonic() - start
        assert time.monotonic() - start < timeout, seen
        time.sleep(0.1)


def stats(lab, role) -> dict:
    return json.loads(run_fastlb(lab, role, "stats", "--json", check=True).stdout)[0]


def l7_requests(lab, box, vip) -> int:
    return next(v["requests"] for v in stats(lab, box)["l7"]["vips"] if v["vip"] == f"{vip}:80/http")


def get(lab, vip, path="/whoami", host=None, count=COUNT) -> list[tuple[str, str]]:
    """``count`` GETs from the client, each on a connection of its own: (server, client it saw) per answer."""
    args = ["curl", "-sS", "--fail", "--max-time", "5", "-H", "Connection: close"]
    if host:
        args += ["-H", f"Host: {host}"]
    res = lab.run("client", [*args, f"http://{vip}{path}?[1-{count}]"], timeout=90, check=False)
    assert res.returncode == 0, res.stderr
    answers = [tuple(line.split()[:2]) for line in res.stdout.splitlines() if line.strip()]
    assert len(answers) == count, res.stdout[-300:]
    return answers


@pytest.mark.parametrize("vip,forwarding", [(TUNNEL_VIP, "tunnel"), (DSR_VIP, "dsr")])
def test_requests_reach_the_right_servers_by_host_and_path_through_both_tiers(lab, vip, forwarding):
    before = {box: l7_requests(lab, box, vip) for box in L7_BOXES}
    l4_before = stats(lab, "lb")
    pass_before = {box: stats(lab, box)["reasons"]["pass_l7"]["packets"] for box in L7_BOXES}

    by_host = get(lab, vip, host=API)
    by_path = get(lab, vip, path=f"{STATIC}x")
    default = get(lab, vip, host="www.example.org")
    assert Counter(s for s, _ in by_host) == {"b2": COUNT}
    assert Counter(s for s, _ in by_path) == {"b3": COUNT}
    assert Counter(s for s, _ in default) == {"b1": COUNT}
    # the application servers learn the client through both tiers (X-Forwarded-For)
    assert {c for _, c in by_host + by_path + default} == {lab.addr("client")}

    # the L4 box balanced every connection: both L7 boxes served, and between them all of them
    served = {box: l7_requests(lab, box, vip) - before[box] for box in L7_BOXES}
    print(f"{forwarding}: requests per L7 box {served}")
    assert sum(served.values()) == 3 * COUNT and all(n > 0 for n in served.values()), served
    l4_vip = f"{vip}:80/tcp"
    new_flows = (next(v["new_flows"] for v in stats(lab, "lb")["vips"] if v["vip"] == l4_vip)
                 - next(v["new_flows"] for v in l4_before["vips"] if v["vip"] == l4_vip))
    assert new_flows >= 3 * COUNT, new_flows
    sent = stats(lab, "lb")["reasons"][f"tx_{forwarding}"]["packets"] - l4_before["reasons"][f"tx_{forwarding}"]["packets"]
    assert sent >= 3 * 3 * COUNT, sent        # each connection: SYN, request, ACKs, FIN
    if forwarding == "tunnel":
        for box in L7_BOXES:
            (decap,) = json.loads(run_fastlb(lab, box, "decap", "status", "--json", check=True).stdout)
            assert decap["attached"] and decap["counters"]["ok"] > 0, decap
    else:   # DSR: the L7 box's own XDP tier passed the packets to HAProxy
        for box in L7_BOXES:
            passed = stats(lab, box)["reasons"]["pass_l7"]["packets"] - pass_before[box]
            assert passed >= served[box], (box, passed)



def test_an_l7_box_whose_fastlb_stops_is_taken_out_by_the_l4_boxs_checks(lab, running):
    """Last in the file: it stops l7a's fastlb (HAProxy, its VIPs on lo) for good."""
    bal = running.pop("l7a")
    lb_process.stop(lab, bal, role="l7a")
    took = wait_l4_health(lab, {"l7a": "down", "l7b": "up"})
    print(f"two tiers: l7a out of the L4 box's tables {took:.2f} s after its fastlb detached")
    for vip in (TUNNEL_VIP, DSR_VIP):
        before = l7_requests(lab, "l7b", vip)
        assert Counter(s for s, _ in get(lab, vip, host=API)) == {"b2": COUNT}     # none failed
        assert l7_requests(lab, "l7b", vip) - before == COUNT
