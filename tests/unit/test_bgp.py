"""fastlb.controller.bgp without BIRD: what is announced, and the include's text."""

from __future__ import annotations

from fastlb.config import parse_config
from fastlb.controller import bgp
from helpers.bgp import VIPS, bgp_table

CONFIG = parse_config(VIPS + bgp_table())
ALL = {v.name for v in CONFIG.vips}


# ---- the plan ---------------------------------------------------------------------------------


def test_an_address_is_announced_while_one_of_its_vips_is_healthy():
    routes, vips = bgp.plan(CONFIG, ALL)
    assert routes == ["198.19.0.100/32", "198.19.0.101/32", "2001:db8:ffff::100/128"]
    assert "198.19.0.102:80/tcp" not in vips   # announce = "none": not ours to announce
    assert {v.state for v in vips.values()} == {bgp.ANNOUNCED}

    routes, vips = bgp.plan(CONFIG, ALL - {"198.19.0.100:9000/udp", "198.19.0.101:80/tcp"})
    assert routes == ["198.19.0.100/32", "2001:db8:ffff::100/128"]
    assert vips["198.19.0.100:9000/udp"].state == bgp.KEPT
    assert "198.19.0.100:80/tcp" in vips["198.19.0.100:9000/udp"].why
    assert (vips["198.19.0.101:80/tcp"].state, vips["198.19.0.101:80/tcp"].why) == (bgp.WITHDRAWN,
                                                                                      "no healthy backend")


def test_nothing_is_announced_while_detached():
    routes, vips = bgp.plan(CONFIG, ALL, attached=False)
    assert routes == [] and {v.why for v in vips.values()} == {"fastlb is not attached"}


# ---- the include ---------------------------------------------------------------------------------


def test_the_include_names_everything_after_the_interface_and_announces_by_family():
    text = bgp.render(CONFIG.bgp, "eth0.10", ["198.19.0.100/32", "2001:db8:ffff::100/128"])
    assert "ipv4 table fastlb_eth0_10_4;" in text and "ipv6 table fastlb_eth0_10_6;" in text
    v4 = text[text.index("protocol static fastlb_eth0_10_vips4"):text.index("protocol static fastlb_eth0_10_vips6")]
    assert "route 198.19.0.100/32 blackhole;" in v4 and "2001:db8" not in v4
    peer0 = text[text.index("protocol bgp fastlb_eth0_10_peer0"):text.index("protocol bgp fastlb_eth0_10_peer1")]
    assert "neighbor 198.18.0.254 as 65000;" in peer0 and "table fastlb_eth0_10_4;" in peer0
    assert "graceful restart off;" in peer0 and "import none;" in peer0 and "router id 198.18.0.2;" in peer0
    assert "hold time 9;" in peer0 and "keepalive time 3;" in peer0 and "bfd" not in text
    assert bgp.render(CONFIG.bgp, "eth0.10", ["198.19.0.100/32", "2001:db8:ffff::100/128"]) == text
