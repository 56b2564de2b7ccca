"""The L7 tier end to end: `fastlb attach` with http/https VIPs, real HAProxy, curl and wrk (issue 15).

One lab (client, LB, three backends running fastlb.lab.servers) and one
attachment for the module; each test writes its config and reloads it with
`fastlb reload`, as a user would. Loads are bounded in count and time.
"""

from __future__ import annotations

import json
import re
import subprocess
import threading
import time
from collections import Counter

import pytest

from fastlb.lab.topology import Lab

from test_e2e import Attached, run_fastlb

pytestmark = [pytest.mark.root, pytest.mark.netns]

HEALTH = '[vip.health]\nkind = "http"\npath = "/health"\ninterval = 0.2\ntimeout = 0.2\nrise = 1\nfall = 2\n'


@pytest.fixture(scope="module")
def lab():
    with Lab(backends=3, ipv6=False) as lab:
        yield lab


def http_config(lab: Lab, body: str = "", algorithm: str = "rr", backends=("b1", "b2", "b3"),
                weights: dict | None = None, head: str = "", health: str = HEALTH) -> str:
    weights = weights or {}
    pool = "".join(f'[[vip.backend]]\naddress = "{lab.addr(b)}"\nport = 80\nweight = {weights.get(b, 1)}\n'
                   for b in backends)
    return (f'[[vip]]\naddress = "{lab.vip4}"\nport = 80\nprotocol = "http"\nalgorithm = "{algorithm}"\n'
            f'{head}{health}{pool}{body}')


@pytest.fixture(scope="module")
def l7(lab, tmp_path_factory):
    folder = tmp_path_factory.mktemp("l7")
    path = folder / "fastlb.toml"
    path.write_text(http_config(lab))
    att = Attached(lab, path)
    state = {"lab": lab, "path": path, "att": att}
    yield state
    code, out, err = att.stop()
    assert code == 0, err
    assert "detached from eth0" in out


def use(l7, text: str) -> None:
    """Make ``text`` the running config (a seamless reload), and wait until every backend is up."""
    l7["path"].write_text(text)
    res = run_fastlb(l7["lab"], "lb", "reload", check=False)
    assert res.returncode == 0, res.stderr
    wait_up(l7["lab"])


def l7_stats(lab) -> dict:
    res = run_fastlb(lab, "lb", "stats", "--json", check=True)
    return json.loads(res.stdout)[0]["l7"]


def wait_up(lab, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        data = l7_stats(lab)
        servers = [s for v in data["vips"] for p in v["pools"] for s in p["backends"]]
        if servers and all(s["status"].startswith("UP") or s["status"] == "no check" for s in servers):
            return
        assert time.monotonic() < deadline, servers
        time.sleep(0.1)


def curl(lab, *args, timeout: float = 30) -> str:
    res = lab.run("client", ["curl", "-sS", "--max-time", "5", *args], timeout=timeout, check=False)
    assert res.returncode == 0, res.stderr
    return res.stdout


def counts(lab, count: int, parallel: int = 1, path: str = "/whoami", host: str | None = None) -> Counter:
    """``count`` GETs through the VIP (``parallel`` at a time); which backend answered each."""
    args = ["--parallel", "--parallel-max", str(parallel)] if parallel > 1 else []
    if host:
        args += ["-H", f"Host: {host}"]
    out = curl(lab, *args, f"http://{lab.vip4}{path}?[1-{count}]", timeout=120)
    names = Counter(line.split()[0] for line in out.splitlines() if line.strip())
    assert sum(names.values()) == count, out[-300:]
    return names


def shares(c: Counter) -> dict[str, float]:
    total = sum(c.values())
    return {k: 100.0 * v / total for k, v in sorted(c.items())}


def lb(lab, *argv) -> str:
    return lab.run("lb", list(argv)).stdout


# ---- routing -------------------------------------------------------------------------------

def test_routing_by_host_and_path_with_a_default_pool(l7):
    lab = l7["lab"]
    routes = (f'[[vip.route]]\nhost = "api.example.com"\npath_prefix = "/whoami/v1/"\n'
              f'[[vip.route.backend]]\naddress = "{lab.addr("b2")}"\n'
              f'[[vip.route]]\nhost = "*.example.com"\n[[vip.route.backend]]\naddress = "{lab.addr("b3")}"\n')
    use(l7, http_config(lab, routes, backends=("b1",)))
    assert counts(lab, 10, host="api.example.com", path="/whoami/v1/x") == {"b2": 10}
    assert counts(lab, 10, host="api.example.com", path="/whoami/v2/x") == {"b3": 10}   # the wildcard route
    assert counts(lab, 10, host="www.example.com:80", path="/whoami/v1/") == {"b3": 10}
    assert counts(lab, 10, host="example.org", path="/whoami/v1/") == {"b1": 10}       # no route: default pool
    assert counts(lab, 10, host="example.com", path="/whoami") == {"b1": 10}           # *.x is not x itself


def test_the_xdp_tier_passes_http_vip_traffic_under_its_own_counter(l7):
    lab = l7["lab"]
    assert f"inet {lab.vip4}/32" in lb(lab, "ip", "-o", "addr", "show", "dev", "lo")
    before = json.loads(run_fastlb(lab, "lb", "stats", "--json", check=True).stdout)[0]
    curl(lab, f"http://{lab.vip4}/whoami")
    after = json.loads(run_fastlb(lab, "lb", "stats", "--json", check=True).stdout)[0]
    key = next(k for k in after["reasons"] if "l7" in k.lower())
    assert after["reasons"][key]["packets"] >= before["reasons"][key]["packets"] + 3   # SYN, request, ACKs


# ---- algorithms ------------------------------------------------------------------------------

def test_rr_spreads_evenly(l7):
    lab = l7["lab"]
    use(l7, http_config(lab, algorithm="rr", weights={"b1": 3}))
    got = shares(counts(lab, 300))
    assert all(abs(v - 33.3) <= 5 for v in got.values()) and len(got) == 3, got


def test_wrr_3_to_1_within_5_points_over_400_requests(l7):
    lab = l7["lab"]
    use(l7, http_config(lab, algorithm="wrr", backends=("b1", "b2"), weights={"b1": 3, "b2": 1}))
    got = shares(counts(lab, 400))
    assert abs(got["b1"] - 75) <= 5 and abs(got["b2"] - 25) <= 5, got


def test_maglev_uri_hash_keeps_a_uri_on_one_backend(l7):
    lab = l7["lab"]
    use(l7, http_config(lab, algorithm="maglev", head='hash = "uri"\n'))
    for path in ("/whoami/a", "/whoami/b", "/whoami/c"):
        c = Counter(curl(lab, f"http://{lab.vip4}{path}").split()[0] for _ in range(5))
        assert len(c) == 1, (path, c)
