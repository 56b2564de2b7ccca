"""Two-arm: `fastlb attach eth1 eth0`, clients on one interface, backends on the other.

The lab's LB, switch and backends stay as they are (backends on the LB's
eth0 segment); a second client namespace is wired straight to the LB as its
eth1, in a subnet of its own. fastlb runs on both interfaces: frames from
the clients cross to the backends' side by XDP_REDIRECT through a devmap,
and NAT replies cross back the same way. The backends reach the clients'
subnet through the LB (its kernel forwards DSR replies; fastlb turns NAT
replies back).
"""

from __future__ import annotations

import json
import os
import subprocess
from collections import Counter

import pytest

from fastlb.lab import netns
from fastlb.lab.topology import Lab, python_argv, python_env
from helpers.e2e import Attached, run_fastlb

pytestmark = [pytest.mark.root, pytest.mark.netns]

CLIENT2, LB2 = "198.18.20.1", "198.18.20.2"
COUNT = 100


@pytest.fixture(scope="module")
def lab():
    with Lab(backends=3, ipv6=False) as lab:
        c2 = netns.ns_name(lab.runid, "c2")
        netns.create(c2)
        try:
            fd = netns.open_fd(c2)
            try:
                with lab.ipr("lb") as ipr:
                    ipr.link("add", ifname="eth1", kind="veth", peer={"ifname": "eth0", "net_ns_fd": fd})
                    eth1 = ipr.link_lookup(ifname="eth1")[0]
                    ipr.addr("add", index=eth1, address=LB2, prefixlen=24)
                    ipr.link("set", index=eth1, state="up")
            finally:
                os.close(fd)
            netns.sysctl(lab.ns("lb"), {"net.ipv4.ip_forward": 1})
            run_in(c2, ["ip", "addr", "add", f"{CLIENT2}/24", "dev", "eth0"])
            run_in(c2, ["ip", "link", "set", "eth0", "up"])
            run_in(c2, ["ip", "link", "set", "lo", "up"])
            run_in(c2, ["ip", "route", "add", "198.19.0.0/24", "via", LB2])
            # Frames redirected into a veth need NAPI at its peer; XDP-rewritten ones, full checksums.
            netns.ethtool(c2, "eth0", "gro", "on", "tx", "off")
            for b in lab.backend_names:
                with lab.ipr(b) as ipr:
                    ipr.route("add", dst="198.18.20.0/24", gateway=lab.addr("lb"))
            lab.c2 = c2
            yield lab
        finally:
            netns.destroy(c2)


def run_in(ns, argv):
    subprocess.run(netns.exec_argv(ns, argv), check=True, capture_output=True, timeout=30)


def client_tcp(lab, count, port=80) -> Counter:
    res = subprocess.run(netns.exec_argv(lab.c2, python_argv("fastlb.lab.client_worker", "tcp", "--host", lab.vip4,
                                                               "--port", str(port), "--count", str(count))),
                         capture_output=True, text=True, env=python_env(), timeout=120)
    out = json.loads(res.stdout)
    assert not out.get("error"), out
    return Counter(out["counts"])


def client_udp(lab, count) -> Counter:
    res = subprocess.run(netns.exec_argv(lab.c2, python_argv("fastlb.lab.client_worker", "udp", "--host", lab.vip4,
                                                               "--port", str(lab.udp_port), "--count", str(count))),
                         capture_output=True, text=True, env=python_env(), timeout=120)
    out = json.loads(res.stdout)
    assert not out.get("error"), out
    return Counter(out["counts"])


def config(lab, forwarding) -> str:
    text = ""
    for proto, port in (("tcp", 80), ("udp", lab.udp_port)):
        text += (f'[[vip]]\naddress = "{lab.vip4}"\nport = {port}\nprotocol = "{proto}"\n'
                 f'forwarding = "{forwarding}"\n')
        text += "".join(f'[[vip.backend]]\naddress = "{lab.addr(b)}"\n' for b in lab.backend_names) + "\n"
    return text


def status(lab) -> dict:
    return json.loads(run_fastlb(lab, "lb", "status", "--json", check=True).stdout)[0]


class TwoArm(Attached):
    """`fastlb attach eth1 eth0`: the clients' side first."""

    def __init__(self, lab, config_path):
        self.lab = lab
        self.proc = lab.exec("lb", python_argv("fastlb.cli", "attach", "eth1", "eth0", "-c", str(config_path),
                                                "--metrics", "off"),
                             env=python_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        if "attached to eth1 eth0" not in line:
            self.proc.kill()
            _, err = self.proc.communicate(timeout=10)
            raise AssertionError(f"fastlb attach eth1 eth0 failed: {line} {err}")


@pytest.mark.parametrize("forwarding", ["dsr", "nat"])
def test_clients_on_one_interface_reach_backends_on_the_other(lab, tmp_path, forwarding):
    path = tmp_path / f"{forwarding}.toml"
    path.write_text(config(lab, forwarding))
    attached = TwoArm(lab, path)
    try:
        tcp = client_tcp(lab, COUNT)
        udp = client_udp(lab, COUNT)
        st = status(lab)
    finally:
        code, _, err = attached.stop()
    assert code == 0, err
    for counts in (tcp, udp):
        assert sum(counts.values()) == COUNT and set(counts) == set(lab.backend_names), counts
    assert st["interfaces"] == ["eth1", "eth0"]
    name = "redirect_dsr" if forwarding == "dsr" else "redirect_nat"
    assert st["reasons"][name]["packets"] >= 2 * COUNT
    if forwarding == "nat":  # the replies crossed back by fastlb, not by the LB's stack
        assert st["reasons"]["redirect_nat_reply"]["packets"] >= 2 * COUNT
    with lab.ipr("lb") as ipr:  # detached from both interfaces
        for name in ("eth0", "eth1"):
            link = ipr.get_links(ipr.link_lookup(ifname=name)[0])[0]
            xdp = link.get_attr("IFLA_XDP")
            assert not (xdp and xdp.get_attr("IFLA_XDP_PROG_ID")), f"{name} still has a program"
