"""fastlb.controller.l7.render: the haproxy.cfg fastlb writes, and HAProxy's own check of it."""

from __future__ import annotations

import os
import shutil

import pytest

from fastlb.config import parse_config
from fastlb.errors import ConfigError
from fastlb.controller.l7 import haproxy, render

PATHS = render.Paths("/run/fastlb/l7/netX/eth0")
HEAD = '[[vip]]\naddress = "198.19.0.100"\nport = 80\nprotocol = "http"\n'
POOL = '[[vip.backend]]\naddress = "198.18.0.11"\nport = 8080\nweight = 3\n' \
       '[[vip.backend]]\naddress = "198.18.0.12"\nport = 8080\n'
ROUTES = '''[[vip.route]]
host = "api.example.com"
path_prefix = "/v1/"
algorithm = "lc"
[[vip.route.backend]]
address = "198.18.0.21"
[[vip.route]]
host = "*.example.com"
[[vip.route.backend]]
address = "2001:db8::22"
port = 8081
'''


def rendered(body: str, head: str = HEAD) -> render.Rendered:
    return render.render(parse_config(head + body, "fastlb.toml"), PATHS)


def block(text: str, header: str) -> list[str]:
    """The lines of section ``header`` (up to the next blank line)."""
    lines = text.splitlines()
    start = lines.index(header)
    end = next((i for i in range(start, len(lines)) if not lines[i].strip()), len(lines))
    return [line.strip() for line in lines[start + 1:end]]


def test_global_section_is_fastlbs_own() -> None:
    text = rendered(POOL).text
    glob = block(text, "global")
    assert "master-worker" in glob
    assert f"stats socket {PATHS.admin_socket} mode 600 level admin expose-fd listeners" in glob
    assert f"server-state-file {PATHS.state_file}" in glob
    assert any(line.startswith("hard-stop-after ") for line in glob)
    assert f"log {PATHS.log_socket} len 1024 format raw local0 info" in glob
    assert f'log-format "{render.LOG_FORMAT}"' in block(text, "defaults")
    assert "/etc/haproxy" not in text and all(p.startswith("/run/fastlb/") for p in (
        PATHS.config, PATHS.admin_socket, PATHS.master_socket, PATHS.pid_file, PATHS.state_file, PATHS.log_socket))


@pytest.mark.parametrize("algorithm,balance,weights", [
    ("rr", "balance roundrobin", ["weight 1", "weight 1"]),
    ("wrr", "balance roundrobin", ["weight 3", "weight 1"]),
    ("lc", "balance leastconn", ["weight 3", "weight 1"]),
    ("lrt", "balance leastconn", [f"weight {render.LRT_START_WEIGHT}"] * 2),
])
def test_algorithms(algorithm: str, balance: str, weights: list[str]) -> None:
    lines = block(rendered(f'algorithm = "{algorithm}"\n' + POOL).text, "backend 198.19.0.100:80")
    assert balance in lines and "hash-type consistent" not in lines
    servers = [line for line in lines if line.startswith("server ")]
    assert [s.split(" weight ")[0] for s in servers] == ["server 198.18.0.11:8080 198.18.0.11:8080",
                                                        "server 198.18.0.12:8080 198.18.0.12:8080"]
    assert [f"weight {s.split(' weight ')[1].split()[0]}" for s in servers] == weights


@pytest.mark.parametrize("hash_,balance", [("src", "balance source"), ("uri", "balance uri"),
                                           ("header:X-User", "balance hdr(X-User)")])
def test_maglev_is_a_consistent_hash(hash_: str, balance: str) -> None:
    lines = block(rendered(f'algorithm = "maglev"\nhash = "{hash_}"\n' + POOL).text, "backend 198.19.0.100:80")
    assert balance in lines and "hash-type consistent" in lines


def test_routes_in_order_then_the_default_pool() -> None:
    text = rendered(POOL + ROUTES).text
    fe = block(text, "frontend 198.19.0.100:80")
    assert fe[0] == "bind 198.19.0.100:80" and "option forwardfor" in fe
    uses = [line for line in fe if line.startswith(("use_backend", "default_backend"))]
    assert uses == ["use_backend 198.19.0.100:80_route0 if route0_host route0_path",
                    "use_backend 198.19.0.100:80_route1 if route1_host",
                    "default_backend 198.19.0.100:80"]
    assert "acl route0_host req.hdr(host),host_only,lower -m str api.example.com" in fe
    assert "acl route0_path path -m beg /v1/" in fe
    assert "acl route1_host req.hdr(host),host_only,lower -m end .example.com" in fe
    assert "balance leastconn" in block(text, "backend 198.19.0.100:80_route0")
    assert "server 2001:db8::22.8081 [2001:db8::22]:8081 weight 1" in block(text, "backend 198.19.0.100:80_route1")


def test_every_section_names_its_fastlb_key() -> None:
    result = rendered(POOL + ROUTES)
    text = result.text
    assert "# vip[0]: 198.19.0.100:80/http (line 1), algorithm rr" in text
    assert "# vip[0].route[1]: host *.example.com, algorithm rr" in text
    line = text.splitlines().index("    server 2001:db8::22.8081 [2001:db8::22]:8081 weight 1") + 1
    assert result.field_of(line) == "vip[0].route[1].backend[0]"


def test_health_client_ip_and_tls(tmp_path) -> None:
    pem = tmp_path / "site.pem"
    pem.write_text("-----BEGIN CERTIFICATE-----\n-----BEGIN PRIVATE KEY-----\n")
    head = HEAD.replace('"http"', '"https"') + f'certificate = "{pem}"\nclient_ip = "proxy"\n'
    text = rendered('[vip.health]\nkind = "http"\npath = "/health"\ninterval = 0.5\nfall = 3\n' + POOL, head).text
    fe = block(text, "frontend 198.19.0.100:80")
    assert fe[0] == f"bind 198.19.0.100:80 ssl crt {pem} alpn h2,http/1.1" and "option forwardfor" not in fe
    be = block(text, "backend 198.19.0.100:80")
    assert "option httpchk" in be and "http-check expect status 200" in be
    assert any(line.startswith("http-check send meth GET uri /health ") for line in be)
    assert "server 198.18.0.12:8080 198.18.0.12:8080 weight 1 check inter 500ms rise 2 fall 3 send-proxy-v2" in be


@pytest.mark.parametrize("head,keys,stick", [
    (HEAD, "persistence = 600\n", "stick on src"),
    (HEAD, "persistence = 60\npersistence_prefix = 24\n", "stick on src,ipmask(24)"),
    (HEAD.replace("198.19.0.100", "2001:db8::100"), "persistence = 60\npersistence_prefix = 64\n",
     "stick on src,ipmask(32,64)"),
])
def test_persistence_is_a_stick_table_per_pool(head: str, keys: str, stick: str) -> None:
    """Every pool (the default one and each route's) keeps its own table of client -> server."""
    config = parse_config(head + keys + POOL + ROUTES, "fastlb.toml")
    result = render.render(config, PATHS)
    seconds = config.vips[0].persistence
    kind = "ip" if config.vips[0].address.version == 4 else "ipv6"
    name = render.pool_name(config.vips[0])
    for pool in (name, f"{name}_route0", f"{name}_route1"):
        lines = block(result.text, f"backend {pool}")
        assert f"stick-table type {kind} size {render.STICK_TABLE_SIZE} expire {seconds}s srvkey name" in lines
        assert stick in lines
    line = result.text.splitlines().index(f"    {stick}") + 1
    assert result.field_of(line) in ("vip[0].persistence", "vip[0].persistence_prefix")
    assert "stick" not in rendered(POOL).text


def test_slow_start_is_every_servers_slowstart() -> None:
    config = parse_config(HEAD + "slow_start = 10\n" + POOL + ROUTES, "fastlb.toml")
    text = render.render(config, PATHS).text
    servers = [line for line in text.splitlines() if line.strip().startswith("server ")]
    assert len(servers) == 4 and all(" slowstart 10s" in s for s in servers)
    vip = config.vips[0]
    assert " slowstart 10s" in render.server_options(vip, vip.backends[0], vip.algorithm)   # also `add server`
    assert "slowstart" not in rendered(POOL).text


def test_only_http_vips_are_rendered() -> None:
    text = rendered(POOL + '[[vip]]\naddress = "198.19.0.101"\nport = 80\n[[vip.backend]]\naddress = "198.18.0.11"\n').text
    assert "198.19.0.101" not in text


needs_haproxy = pytest.mark.skipif(shutil.which("haproxy") is None and not os.path.exists("/usr/sbin/haproxy"),
                                   reason="haproxy is not installed (make setup installs it)")


@needs_haproxy
def test_haproxy_accepts_the_rendered_config(tmp_path) -> None:
    paths = render.Paths(str(tmp_path))
    (tmp_path / "server-state").touch()
    result = render.render(parse_config(HEAD + 'algorithm = "lrt"\npersistence = 600\npersistence_prefix = 24\n'
                                        'slow_start = 30\n[vip.health]\nkind = "http"\n' + POOL + ROUTES +
                                        HEAD.replace("198.19.0.100", "2001:db8::100") +
                                        "persistence = 60\npersistence_prefix = 64\n" + POOL), paths)
    (tmp_path / "haproxy.cfg").write_text(result.text)
    haproxy.check(result, str(tmp_path / "haproxy.cfg"), "fastlb.toml")


@needs_haproxy
def test_a_refusal_names_the_fastlb_key(tmp_path) -> None:
    """A certificate that HAProxy cannot load is reported as vip[0].certificate."""
    pem = tmp_path / "site.pem"
    pem.write_text("-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n"
                   "-----BEGIN PRIVATE KEY-----\nnope\n-----END PRIVATE KEY-----\n")
    config = parse_config(HEAD.replace('"http"', '"https"') + f'certificate = "{pem}"\n' + POOL, "fastlb.toml")
    paths = render.Paths(str(tmp_path))
    result = render.render(config, paths)
    (tmp_path / "haproxy.cfg").write_text(result.text)
    with pytest.raises(ConfigError) as info:
        haproxy.check(result, str(tmp_path / "haproxy.cfg"), "fastlb.toml")
    assert info.value.field == "vip[0].certificate"
    assert str(info.value).startswith("fastlb.toml: vip[0].certificate: HAProxy refuses") and "\n" not in str(info.value)
