"""Configs for the BGP tests (tests/unit/test_bgp.py, tests/e2e/test_bgp.py)."""

from __future__ import annotations

VIPS = """
[[vip]]
address = "198.19.0.100"
port = 80
announce = "bgp"
[[vip.backend]]
address = "198.18.0.11"

[[vip]]
address = "198.19.0.100"
port = 9000
protocol = "udp"
announce = "bgp"
[[vip.backend]]
address = "198.18.0.11"

[[vip]]
address = "198.19.0.101"
port = 80
announce = "bgp"
[[vip.backend]]
address = "198.18.0.11"

[[vip]]
address = "198.19.0.102"
port = 80
[[vip.backend]]
address = "198.18.0.11"

[[vip]]
address = "2001:db8:ffff::100"
port = 80
announce = "bgp"
[[vip.backend]]
address = "2001:db8::11"
"""


def bgp_table(include: str = "/run/fastlb-bird/eth0.conf", socket: str = "/run/bird/bird.ctl",
              extra: str = "") -> str:
    return f"""
[bgp]
speaker = "bird"
local_as = 65001
router_id = "198.18.0.2"
bird_socket = "{socket}"
bird_include = "{include}"
{extra}
[[bgp.peer]]
address = "198.18.0.254"
as = 65000
[[bgp.peer]]
address = "2001:db8::fe"
as = 65000
"""
