"""Config of http/https VIPs (issue 15): the keys of the L7 tier and their one-line errors."""

from __future__ import annotations

import pytest

from fastlb.config import parse_config, render_config, validate
from fastlb.errors import ConfigError

HEAD = '[[vip]]\naddress = "198.19.0.100"\nport = 80\nprotocol = "http"\n'
POOL = '[[vip.backend]]\naddress = "198.18.0.11"\nport = 8080\n'


def test_the_issue_example_parses_and_round_trips() -> None:
    text = HEAD + '''algorithm = "lrt"
client_ip = "xff"
[vip.health]
kind = "http"
path = "/health"
''' + POOL + '''[[vip.route]]
host = "api.example.com"
path_prefix = "/v1/"
algorithm = "lc"
[[vip.route.backend]]
address = "198.18.0.21"
port = 8080
[[vip.route]]
host = "*.Example.com"
[[vip.route.backend]]
address = "2001:db8::22"
'''
    config = parse_config(text)
    vip = config.vips[0]
    assert vip.is_l7 and vip.name == "198.19.0.100:80/http" and vip.forwarding == "proxy"
    assert vip.algorithm == "lrt" and vip.client_ip == "xff" and vip.health.kind == "http"
    assert [(r.host, r.path_prefix, r.algorithm) for r in vip.routes] == [
        ("api.example.com", "/v1/", "lc"), ("*.example.com", None, "lrt")]
    assert vip.routes[1].backends[0].port == 80          # the VIP's port by default; any family
    assert parse_config(render_config(config)) == config
    assert validate(config) == config                    # the same rules with no text


def test_defaults_of_an_http_vip() -> None:
    vip = parse_config(HEAD + POOL).vips[0]
    assert (vip.algorithm, vip.hash, vip.client_ip, vip.routes) == ("rr", "src", "xff", ())


@pytest.mark.parametrize("value", ["src", "uri", "header:X-User"])
def test_maglev_hash_keys(value: str) -> None:
    vip = parse_config(HEAD + f'algorithm = "maglev"\nhash = "{value}"\n' + POOL).vips[0]
    assert vip.hash == value


def test_https_reads_its_certificate(tmp_path) -> None:
    pem = tmp_path / "site.pem"
    pem.write_text("-----BEGIN CERTIFICATE-----\nx\n-----END CERTIFICATE-----\n"
                   "-----BEGIN PRIVATE KEY-----\ny\n-----END PRIVATE KEY-----\n")
    text = HEAD.replace('"http"', '"https"').replace("80", "443") + f'certificate = "{pem}"\n' + POOL
    config = parse_config(text)
    assert config.vips[0].certificate == str(pem)
    assert parse_config(render_config(config)) == config


# (description, TOML after HEAD's 4 lines, field, line, substring)
BAD = [
    ("forwarding on an http VIP", 'forwarding = "dsr"\n' + POOL, "vip[0].forwarding", 5, "has no meaning"),
    ("route without a backend", POOL + '[[vip.route]]\nhost = "a.example.com"\n',
     "vip[0].route[0].backend", 8, "the route has no backends"),
    ("route matching everything", POOL + '[[vip.route]]\n[[vip.route.backend]]\naddress = "198.18.0.21"\n',
     "vip[0].route[0]", 8, "a route needs host or path_prefix"),
    ("bad host pattern", POOL + '[[vip.route]]\nhost = "api.*.com"\n[[vip.route.backend]]\naddress = "198.18.0.21"\n',
     "vip[0].route[0].host", 9, "is not a host name or *.domain pattern"),
    ("host with a port", POOL + '[[vip.route]]\nhost = "api.example.com:80"\n',
     "vip[0].route[0].host", 9, "is not a host name"),
    ("path_prefix without a slash", POOL + '[[vip.route]]\npath_prefix = "v1"\n',
     "vip[0].route[0].path_prefix", 9, "is not a URL path"),
    ("unknown route key", POOL + '[[vip.route]]\nprefix = "/v1/"\n',
     "vip[0].route[0].prefix", 9, "did you mean 'path_prefix'"),
    ("unknown route algorithm", POOL + '[[vip.route]]\nhost = "a.example.com"\nalgorithm = "fastest"\n',
     "vip[0].route[0].algorithm", 10, "unknown algorithm"),
    ("https without certificate", POOL, "vip[0].certificate", 1, "needs a certificate"),
    ("https with a missing certificate", 'certificate = "/nonexistent/site.pem"\n' + POOL,
     "vip[0].certificate", 5, "cannot read the certificate"),
    ("certificate on http", 'certificate = "/etc/hostname"\n' + POOL, "vip[0].certificate", 5,
     "only read on https VIPs"),
    ("bad client_ip", 'client_ip = "x-forwarded-for"\n' + POOL, "vip[0].client_ip", 5, "unknown client_ip"),
    ("bad hash", 'algorithm = "maglev"\nhash = "5tuple"\n' + POOL, "vip[0].hash", 6, "unknown hash"),
    ("bad header name", 'algorithm = "maglev"\nhash = "header:X User"\n' + POOL, "vip[0].hash", 6,
     "does not name an HTTP header"),
    ("hash without maglev", 'algorithm = "rr"\nhash = "uri"\n' + POOL, "vip[0].hash", 6,
     "only read by the maglev algorithm"),
    ("udp health check", '[vip.health]\nkind = "udp"\n' + POOL, "vip[0].health.kind", 6, "over TCP or HTTP"),
    ("weight over 256", POOL + "weight = 300\n", "vip[0].backend[0].weight", 8, "over 256"),
    ("duplicate route backend", POOL + '[[vip.route]]\nhost = "a.example.com"\n[[vip.route.backend]]\n'
     'address = "198.18.0.21"\n[[vip.route.backend]]\naddress = "198.18.0.21"\n',
     "vip[0].route[0].backend[1]", 12, "duplicate backend"),
    ("no default pool", '[[vip.route]]\nhost = "a.example.com"\n[[vip.route.backend]]\naddress = "198.18.0.21"\n',
     "vip[0].backend", 1, "default pool"),
]


@pytest.mark.parametrize("head,body,field,line,message",
                         [pytest.param(HEAD.replace('"http"', '"https"') if d.startswith("https") else HEAD,
                                       b, f, n, m, id=d) for d, b, f, n, m in BAD])
def test_bad_l7_config(head: str, body: str, field: str, line: int, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(head + body, "fastlb.toml")
    err = info.value
    assert (err.field, err.line) == (field, line), str(err)
    assert message in str(err)
    assert str(err).startswith(f"fastlb.toml:{line}: {field}: ") and "\n" not in str(err)


@pytest.mark.parametrize("key,value", [("client_ip", '"xff"'), ("certificate", '"/etc/hostname"')])
def test_l7_keys_on_a_tcp_vip(key: str, value: str) -> None:
    text = f'[[vip]]\naddress = "198.19.0.100"\nport = 80\n{key} = {value}\n[[vip.backend]]\naddress = "198.18.0.11"\n'
    with pytest.raises(ConfigError, match=f"vip\\[0\\].{key}: '{key}' is only read on http and https VIPs"):
        parse_config(text)


def test_tcp_and_http_on_one_port_collide() -> None:
    text = HEAD + POOL + '[[vip]]\naddress = "198.19.0.100"\nport = 80\n[[vip.backend]]\naddress = "198.18.0.11"\n'
    with pytest.raises(ConfigError, match="duplicate VIP"):
        parse_config(text)


@pytest.mark.parametrize("line, field, words", [
    ('ports = [80, "8080-8081"]', "vip[0].ports", "'ports' is for tcp and udp VIPs"),
    ("persistence = -1", "vip[0].persistence", "persistence"),
    ("persistence_prefix = 24", "vip[0].persistence_prefix", "persistence_prefix without persistence"),
    ("persistence = 60\npersistence_prefix = 33", "vip[0].persistence_prefix", "persistence_prefix"),
    ("slow_start = -1", "vip[0].slow_start", "slow_start"),
])
def test_the_stateful_keys_get_one_line_errors_on_an_http_vip(line, field, words) -> None:
    text = f'[[vip]]\naddress = "198.19.0.100"\nprotocol = "http"\n{line}\n'
    text += "" if line.startswith("ports") else "port = 80\n"
    with pytest.raises(ConfigError) as info:
        parse_config(text + '[[vip.backend]]\naddress = "198.18.0.11"\n')
    assert info.value.field == field and words in str(info.value) and "\n" not in str(info.value)


def test_persistence_and_slow_start_are_read_on_an_http_vip() -> None:
    """HAProxy serves them (stick tables, slowstart: fastlb.controller.l7.render)."""
    text = ('[[vip]]\naddress = "198.19.0.100"\nport = 80\nprotocol = "http"\npersistence = 600\n'
            'persistence_prefix = 24\nslow_start = 10\n[[vip.backend]]\naddress = "198.18.0.11"\n')
    vip = parse_config(text).vips[0]
    assert (vip.persistence, vip.persistence_prefix, vip.slow_start) == (600, 24, 10)


@pytest.mark.parametrize("kind", ["exec", "agent"])
def test_exec_and_agent_checks_are_refused_on_an_http_vip(kind) -> None:
    text = ('[[vip]]\naddress = "198.19.0.100"\nport = 80\nprotocol = "http"\n[vip.health]\n'
            f'kind = "{kind}"\n' + ('command = "/bin/true"\n' if kind == "exec" else "port = 5555\n") +
            '[[vip.backend]]\naddress = "198.18.0.11"\n')
    with pytest.raises(ConfigError, match="checked by HAProxy over TCP or HTTP"):
        parse_config(text)
