"""Live config changes (fastlb.config.edits): each a pure Config -> Config, tested alone."""

from __future__ import annotations

import ipaddress

import pytest

from fastlb.config import edits, parse_config
from fastlb.errors import FastlbError
from helpers.l7 import HTTP_ROUTED, HTTP_ROUTED_VIP

TEXT = """
[[vip]]
address = "198.19.0.100"
port = 80
[[vip.backend]]
address = "198.18.0.11"
[[vip.backend]]
address = "198.18.0.12"
"""
VIP = "198.19.0.100:80/tcp"


@pytest.fixture
def cfg():
    return parse_config(TEXT, "lb.toml")


def _keys(config, index=0):
    return [(b.key.decode(), b.weight) for b in config.vips[index].backends]


def test_backend_add(cfg):
    new, msg = edits.backend_add(cfg, VIP, "198.18.0.13", 3, ifname="eth0")
    assert _keys(new)[-1] == ("198.18.0.13:80", 3) and _keys(cfg) == _keys(new)[:2]
    assert msg == "added backend 198.18.0.13:80 (weight 3) to 198.19.0.100:80/tcp"
    assert _keys(edits.backend_add(cfg, VIP, "198.18.0.13:8080", ifname="eth0")[0])[-1] == ("198.18.0.13:8080", 1)
    with pytest.raises(FastlbError, match="has backend 198.18.0.11 already"):
        edits.backend_add(cfg, VIP, "198.18.0.11", ifname="eth0")
    with pytest.raises(FastlbError, match="no VIP 198.19.0.1:80 runs on eth0"):
        edits.backend_add(cfg, "198.19.0.1:80", "198.18.0.13", ifname="eth0")


def test_backend_remove(cfg):
    new, msg = edits.backend_remove(cfg, VIP, "198.18.0.11", ifname="eth0")
    assert _keys(new) == [("198.18.0.12:80", 1)]
    assert msg.startswith("removed backend 198.18.0.11:80 from 198.19.0.100:80/tcp")
    with pytest.raises(FastlbError, match="is the last backend") as err:
        edits.backend_remove(new, VIP, "198.18.0.12", ifname="eth0")
    assert "fastlb vip remove 198.19.0.100:80/tcp" in str(err.value)
    with pytest.raises(FastlbError, match="has no backend 198.18.0.99"):
        edits.backend_remove(cfg, VIP, "198.18.0.99", ifname="eth0")


@pytest.mark.parametrize("weight", [-1, 65536, "2", True, None])
def test_backend_weight_refuses_what_is_not_a_u16(cfg, weight):
    with pytest.raises(FastlbError, match="weight must be an integer from 0 to 65535"):
        edits.backend_weight(cfg, VIP, "198.18.0.11", weight, ifname="eth0")


def test_backend_weight_and_drain(cfg):
    new, msg = edits.backend_weight(cfg, VIP, "198.18.0.12:80", 7, ifname="eth0")
    assert _keys(new) == [("198.18.0.11:80", 1), ("198.18.0.12:80", 7)]
    assert msg == "weight 7 for backend 198.18.0.12:80 of 198.19.0.100:80/tcp"
    drained, msg = edits.backend_drain(new, VIP, "198.18.0.12", ifname="eth0")
    assert _keys(drained)[1] == ("198.18.0.12:80", 0) and msg.startswith("drained (weight 0")


def test_vip_add(cfg):
    new, msg = edits.vip_add(cfg, "[2001:db8::1]:53/udp", ["2001:db8::11", "[2001:db8::12]:5353"], "rr",
                             ifname="eth0")
    vip = new.vips[1]
    assert (vip.address, vip.port, vip.protocol, vip.algorithm) == (ipaddress.ip_address("2001:db8::1"), 53, "udp",
                                                                     "rr")
    assert [b.port for b in vip.backends] == [53, 5353] and msg.endswith("with 2 backend(s)")
    with pytest.raises(FastlbError, match="runs already"):
        edits.vip_add(cfg, VIP, ["198.18.0.11"], ifname="eth0")
    with pytest.raises(FastlbError, match="at least one backend"):
        edits.vip_add(cfg, "198.19.0.101:80", [], ifname="eth0")
    with pytest.raises(FastlbError, match="bad VIP"):
        edits.vip_add(cfg, "nonsense", ["198.18.0.11"], ifname="eth0")


def test_vip_remove(cfg):
    two, _ = edits.vip_add(cfg, "198.19.0.101:80", ["198.18.0.11"], ifname="eth0")
    new, msg = edits.vip_remove(two, VIP, ifname="eth0")
    assert [v.name for v in new.vips] == ["198.19.0.101:80/tcp"] and msg == f"removed VIP {VIP}"
    with pytest.raises(FastlbError, match="is the last VIP") as err:
        edits.vip_remove(cfg, VIP, ifname="eth0")
    assert "fastlb detach eth0" in str(err.value)


def test_the_commands_are_the_control_sockets():
    assert list(edits.COMMANDS) == ["backend.add", "backend.remove", "backend.weight", "backend.drain",
                                    "vip.add", "vip.remove"]


# ---- a route's pool of an http VIP (--route N) ----------------------------------------------

HTTP_TEXT, HTTP_VIP = HTTP_ROUTED, HTTP_ROUTED_VIP


def _route_keys(config, route=0):
    return [(b.key.decode(), b.weight) for b in config.vips[0].routes[route].backends]


def test_backend_edits_reach_a_routes_pool_and_leave_the_default_pool_alone():
    cfg = parse_config(HTTP_TEXT, "lb.toml")
    new, msg = edits.backend_add(cfg, HTTP_VIP, "198.18.0.23", 2, ifname="eth0", route=0)
    assert _route_keys(new)[-1] == ("198.18.0.23:80", 2) and "route[0]" in msg
    assert _keys(new) == _keys(cfg)
    new, msg = edits.backend_weight(new, HTTP_VIP, "198.18.0.21", 5, ifname="eth0", route=0)
    assert ("198.18.0.21:80", 5) in _route_keys(new)
    new, _ = edits.backend_drain(new, HTTP_VIP, "198.18.0.22", ifname="eth0", route=0)
    assert ("198.18.0.22:80", 0) in _route_keys(new)
    new, msg = edits.backend_remove(new, HTTP_VIP, "198.18.0.21", ifname="eth0", route=0)
    assert [k for k, _ in _route_keys(new)] == ["198.18.0.22:80", "198.18.0.23:80"] and "route[0]" in msg
    assert _keys(new) == _keys(cfg)
    assert new.vips[0].routes[0].host == "api.example.com"


def test_a_route_that_does_not_exist_or_its_last_backend_is_refused():
    cfg = parse_config(HTTP_TEXT, "lb.toml")
    with pytest.raises(FastlbError, match="no route 1"):
        edits.backend_add(cfg, HTTP_VIP, "198.18.0.23", ifname="eth0", route=1)
    with pytest.raises(FastlbError, match="no route"):
        edits.backend_add(parse_config(TEXT, "lb.toml"), VIP, "198.18.0.23", ifname="eth0", route=0)
    with pytest.raises(FastlbError, match="route"):
        edits.backend_add(cfg, HTTP_VIP, "198.18.0.23", ifname="eth0", route=-1)
    one, _ = edits.backend_remove(cfg, HTTP_VIP, "198.18.0.21", ifname="eth0", route=0)
    with pytest.raises(FastlbError, match="last backend"):
        edits.backend_remove(one, HTTP_VIP, "198.18.0.22", ifname="eth0", route=0)
    with pytest.raises(FastlbError, match="has no backend"):
        edits.backend_weight(cfg, HTTP_VIP, "198.18.0.11", 3, ifname="eth0", route=0)
