"""fastlb.controller.l7.tier's pure parts: which http VIPs have a server up (for BGP)."""

from __future__ import annotations

import pytest

from fastlb.config import parse_config
from fastlb.controller.l7.tier import serving
from helpers.l7 import HTTP_ROUTED

TEXT = HTTP_ROUTED + """
[[vip]]
address = "198.19.0.101"
port = 80
protocol = "http"
[[vip.backend]]
address = "198.18.0.12"

[[vip]]
address = "198.19.0.102"
port = 80
[[vip.backend]]
address = "198.18.0.13"
"""
A, B = "198.19.0.100:80/http", "198.19.0.101:80/http"


def rows(**status):
    """``show stat`` rows: FRONTEND/BACKEND rows and one server per pool with the given status."""
    out = []
    for pool, st in status.items():
        name = {"a": "198.19.0.100:80", "a_route0": "198.19.0.100:80_route0", "b": "198.19.0.101:80"}[pool]
        out += [{"pxname": name, "svname": "BACKEND", "status": "UP"},
                {"pxname": name, "svname": "198.18.0.99:80", "status": st}]
    return out


@pytest.mark.parametrize("status,want", [
    (dict(a="UP", a_route0="DOWN", b="DOWN"), {A}),
    (dict(a="DOWN", a_route0="UP 1/2", b="no check"), {A, B}),    # a route's pool keeps its VIP up
    (dict(a="DOWN", a_route0="MAINT", b="DOWN 1/2"), set()),       # going up is not up yet
    (dict(a="DRAIN", a_route0="NOLB", b="UP"), {B}),
])
def test_a_vip_serves_while_one_server_of_one_of_its_pools_is_up(status, want):
    config = parse_config(TEXT, "lb.toml")
    assert serving(config, rows(**status)) == want


def test_the_backend_rows_themselves_do_not_count():
    config = parse_config(TEXT, "lb.toml")
    only_backends = [r for r in rows(a="DOWN", a_route0="DOWN", b="DOWN") if r["svname"] == "BACKEND"]
    assert serving(config, only_backends) == set()
