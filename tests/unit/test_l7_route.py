"""fastlb.controller.l7.route: the model of HAProxy's route choice (the same cases as the e2e routing test) and explain."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from fastlb.cli import main
from fastlb.config import parse_config
from fastlb.controller.l7.route import host_only, match

CONFIG = '''[[vip]]
address = "198.19.0.100"
port = 80
protocol = "http"
algorithm = "maglev"
hash = "uri"
[[vip.backend]]
address = "198.18.0.11"
[[vip.route]]
host = "api.example.com"
path_prefix = "/whoami/v1/"
algorithm = "lc"
[[vip.route.backend]]
address = "198.18.0.12"
[[vip.route]]
host = "*.example.com"
[[vip.route.backend]]
address = "198.18.0.13"
'''


@pytest.mark.parametrize("host,path,route", [
    ("api.example.com", "/whoami/v1/x", 0),
    ("API.Example.com:8080", "/whoami/v1/x?q=1", 0),
    ("api.example.com", "/whoami/v2/x", 1),
    ("www.example.com:80", "/whoami/v1/", 1),
    ("example.org", "/whoami/v1/", None),
    ("example.com", "/whoami", None),
    (None, "/", None),
])
def test_routes_match_in_order_else_the_default_pool(host, path, route) -> None:
    vip = parse_config(CONFIG).vips[0]
    assert match(vip, host, path).route == route


def test_host_only() -> None:
    assert host_only("A.B:80") == "a.b" and host_only("[2001:db8::1]:80") == "[2001:db8::1]"
    assert host_only("a.b") == "a.b"


def test_explain_names_route_pool_and_says_what_it_cannot_predict(tmp_path) -> None:
    path = tmp_path / "fastlb.toml"
    path.write_text(CONFIG)
    res = CliRunner().invoke(main, ["explain", "-c", str(path), "--vip", "198.19.0.100:80/http",
                                    "--host", "api.example.com", "--path", "/whoami/v1/a"])
    assert res.exit_code == 0, res.output
    assert "route[0] (host api.example.com, path /whoami/v1/*)" in res.output
    assert "HAProxy backend 198.19.0.100:80_route0, algorithm lc" in res.output
    res = CliRunner().invoke(main, ["explain", "-c", str(path), "--vip", "198.19.0.100:80/http", "--path", "/x"])
    assert "the default pool" in res.output and "cannot name the backend" in res.output
