"""announce = "bgp" on an http VIP: BIRD announces it, a router learns it, clients behind the router get HTTP.

The ECMP lab (fastlb.lab.ecmp: a router running BIRD, the client behind it)
with one box attached: ``fastlb attach`` with an http VIP and a ``[bgp]``
table, and the box's own BIRD that includes what fastlb writes. The client
has no route to the VIP until the router learns it over BGP; the box's
HAProxy answers it through the router. When HAProxy's checks find every
server down, the route is withdrawn, and announced again when one is back;
detach withdraws it.
"""

from __future__ import annotations

from collections import Counter

import pytest

from fastlb.lab import lb_process
from fastlb.lab.ecmp import EcmpLab
from helpers.e2e import run_fastlb

pytestmark = [pytest.mark.root, pytest.mark.netns]

VIP = "198.19.0.100"
BOX = "lba"


def config(lab: EcmpLab) -> str:
    pool = "".join(f'[[vip.backend]]\naddress = "{lab.addr(b)}"\n' for b in lab.backend_names)
    return (f'[[vip]]\naddress = "{VIP}"\nport = 80\nprotocol = "http"\nalgorithm = "rr"\nannounce = "bgp"\n'
            '[vip.health]\nkind = "http"\npath = "/health"\ninterval = 0.3\ntimeout = 0.3\nrise = 1\nfall = 2\n'
            f'{pool}\n{lab.bgp_table(BOX, detach_delay=0.5)}')


def test_bird_announces_an_http_vip_and_clients_behind_the_router_get_answers():
    with EcmpLab(backends=2, bfd=False) as lab:
        # the box answers the client itself (HAProxy terminates TCP): its way back is the router
        lab.run(BOX, ["ip", "route", "add", "198.18.1.0/24", "via", lab.addr("router")])
        path = lab.run_dir / f"{BOX}.toml"
        path.write_text(config(lab))
        assert lab.router_nexthops(VIP) == set()
        bal = lb_process.start(lab, path, lab.run_dir / f"{BOX}.log", role=BOX)
        try:
            took = lab.wait_nexthops(VIP, {lab.addr(BOX)}, timeout=20, explain=bal.output)
            print(f"bgp: the router learned the http VIP {took:.2f} s after fastlb attached")
            res = lab.run("client", ["curl", "-sS", "--fail", "--max-time", "5", f"http://{VIP}/whoami?[1-20]"],
                          timeout=60, check=False)
            assert res.returncode == 0, res.stderr
            answers = [line.split() for line in res.stdout.splitlines() if line.strip()]
            assert Counter(a[0] for a in answers) == {"b1": 10, "b2": 10}, res.stdout
            assert {a[1] for a in answers} == {lab.addr("client")}          # X-Forwarded-For
            out = run_fastlb(lab, BOX, "status", check=True).stdout
            assert f"announcing {VIP}/32" in out and "Established, 1 route(s) exported" in out, out
            assert f"VIP {VIP}:80/tcp  rr/l7" in out and f"bgp: announced {VIP}/32" in out, out
            # every server down (HAProxy's checks): withdrawn; one back: announced again
            for b in lab.backend_names:
                lab.stop_server(b)
            try:
                gone = lab.wait_nexthops(VIP, set(), timeout=10, explain=bal.output)
            finally:
                lab.start_servers()
            back = lab.wait_nexthops(VIP, {lab.addr(BOX)}, timeout=10, explain=bal.output)
            print(f"bgp: withdrawn {gone:.2f} s after the last server stopped, announced again {back:.2f} s "
                  "after they started")
        finally:
            lb_process.stop(lab, bal, role=BOX)
        lab.wait_nexthops(VIP, set(), timeout=10)                         # detach withdrew it
