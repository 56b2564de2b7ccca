"""announce = "arp": clients on the LB's segment reach a VIP with no route.

The VIP sits in the segment's own subnet; fastlb answers ARP and neighbour
solicitations for it with the LB's MAC, so the client's stack sends to the
LB as it would to any neighbour. Pings of the VIP are answered by the LB.
"""

from __future__ import annotations

import json

import pytest

from fastlb.lab.clients import tcp_requests
from fastlb.lab.topology import Lab
from helpers.e2e import attached, run_fastlb, status

pytestmark = [pytest.mark.root, pytest.mark.netns]

VIP4, VIP6 = "198.18.0.100", "2001:db8::100"  # in the segment's subnets: no route needed


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    with Lab(backends=3) as lab:
        for b in lab.backend_names:
            with lab.ipr(b) as ipr:
                lo = ipr.link_lookup(ifname="lo")[0]
                ipr.addr("add", index=lo, address=VIP4, prefixlen=32)
                ipr.addr("add", index=lo, address=VIP6, prefixlen=128)
        config = ""
        for vip, fam in ((VIP4, 4), (VIP6, 6)):
            config += f'[[vip]]\naddress = "{vip}"\nport = 80\nannounce = "arp"\n'
            config += "".join(f'[[vip.backend]]\naddress = "{lab.addr(b, fam)}"\n' for b in lab.backend_names)
        with attached(lab, tmp_path_factory.mktemp("announce"), config):
            yield lab


def neighbour_mac(lab, address) -> str:
    with lab.ipr("client") as ipr:
        for msg in ipr.get_neighbours():
            if msg.get_attr("NDA_DST") == address:
                return msg.get_attr("NDA_LLADDR")
    return ""


@pytest.mark.parametrize("vip,family", [(VIP4, 4), (VIP6, 6)])
def test_a_client_with_no_route_reaches_the_vip(lab, vip, family):
    counts = tcp_requests(lab, vip=vip, count=60)
    assert sum(counts.values()) == 60 and set(counts) == set(lab.backend_names)
    assert neighbour_mac(lab, vip) == lab.mac("lb"), "the client did not learn the LB's MAC for the VIP"


@pytest.mark.parametrize("vip", [VIP4, VIP6])
def test_the_lb_answers_pings_of_the_vip(lab, vip):
    res = lab.run("client", ["ping", "-c", "3", "-i", "0.2", "-W", "1", vip], check=False, timeout=10)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "3 received" in res.stdout



# ---- what reads the maps: an arp VIP's address marker is no VIP (issue 13 item 3) ----

def test_stats_json_and_metrics_show_arp_vips(lab):
    tcp_requests(lab, vip=VIP4, count=10)
    text = run_fastlb(lab, "lb", "stats")
    assert text.returncode == 0, text.stderr
    assert f"VIP {VIP4}:80/tcp  maglev" in text.stdout and f"VIP [{VIP6}]:80/tcp  maglev" in text.stdout
    res = run_fastlb(lab, "lb", "stats", "--json")
    assert res.returncode == 0, res.stderr
    (att,) = json.loads(res.stdout)
    vips = {v["vip"]: v for v in att["vips"]}
    assert set(vips) == {f"{VIP4}:80/tcp", f"[{VIP6}]:80/tcp"}     # the address markers are no VIPs
    assert vips[f"{VIP4}:80/tcp"]["new_flows"] >= 10 and len(vips[f"{VIP4}:80/tcp"]["backends"]) == 3
    scrape = lab.run("lb", ["curl", "-s", "-w", "\n%{http_code}", "http://127.0.0.1:9469/metrics"], check=False)
    assert scrape.stdout.rstrip().endswith("200"), scrape.stdout[-300:]
    assert any(line.startswith("fastlb_vip_packets_total{") and f'vip="{VIP4}:80/tcp"' in line
               for line in scrape.stdout.splitlines()), scrape.stdout[-1000:]


def test_status_names_the_mode_of_a_link_attached_program(lab):
    (att,) = status(lab)
    assert att["attached"] and att["mode"] in ("native", "generic"), att["mode"]
    assert {v["vip"] for v in att["vips"]} == {f"{VIP4}:80/tcp", f"[{VIP6}]:80/tcp"}
