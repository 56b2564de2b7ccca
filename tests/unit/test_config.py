"""Tests for fastlb.config: the TOML config loader and its errors."""

from __future__ import annotations

import dataclasses
import errno
import ipaddress
import re
import tomllib
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fastlb import config
from fastlb.config import (Backend, Config, Settings, Vip, _KeyLines, load_config, parse_config, render_config,
                           parse_vip_spec)
from fastlb.errors import ConfigError

CONFIGS = Path(__file__).parent / "configs"


def toml(text: str) -> str:
    """Drop the newline after the opening quotes, so the first line of a row is line 1."""
    return text.removeprefix("\n")


# (description, TOML text, expected field, expected line, substring of str(err))
MALFORMED = [
    ("bad TOML syntax", """
[[vip]]
address = "198.19.0.100"
port = 80 80
""", None, 3, "invalid TOML: Expected newline or end of document after a statement"),
    ("a key given twice is a TOML error", """
[[vip]]
port = 80
port = 81
""", None, 3, "invalid TOML: Cannot overwrite a value"),
    ("TOML error at the end of the document", """
[[vip]]
address = "198.19.0.100"
port = [80,
""", None, 4, "at the end of the file"),
    ("empty file", "", "vip", 1, "no VIPs defined"),
    ("settings but no VIP", """
[settings]
ring_size = 65537
""", "vip", 1, "no VIPs defined"),
    ("empty vip array", """
# nothing to balance
vip = []
""", "vip", 2, "no VIPs defined"),
    ("setting at the top level", """
ring_size = 65537
[[vip]]
""", "ring_size", 1, "'ring_size' belongs in [settings]"),
    ("misspelt settings table", """
[setting]
ring_size = 65537
""", "setting", 1, "unknown table 'setting'. Fix: did you mean 'settings'?"),
    ("unknown top-level key", """
verbose = true
""", "verbose", 1, "unknown key 'verbose'. Fix: remove it; valid here: settings, vip"),
    ("settings is not a table", """
settings = 5
""", "settings", 1, "expected a table, got an integer 5"),
    ("single [vip] instead of [[vip]]", """
[vip]
address = "198.19.0.100"
""", "vip", 1, "expected an array of tables, got a table. Fix: write each one as [[vip]]"),
    ("backend header before any vip", """
[[vip.backend]]
address = "198.18.0.11"
""", "vip", 1, "expected an array of tables"),
    ("misspelt setting", """
[settings]
conntrack_size = 100
ring_sise = 65537
""", "settings.ring_sise", 3, "did you mean 'ring_size'?"),
    ("ring_size as a string", """
[settings]
ring_size = "65537"
""", "settings.ring_size", 2, "expected an integer, got a string '65537'. Fix: write the number without quotes"),
    ("ring_size as a boolean", """
[settings]
ring_size = true
""", "settings.ring_size", 2, "expected an integer, got a boolean True"),
    ("ring_size as a float", """
[settings]
ring_size = 65537.0
""", "settings.ring_size", 2, "expected an integer, got a float"),
    ("ring_size not prime", """
[settings]

ring_size = 65536
""", "settings.ring_size", 3,
     "not prime, and Maglev needs a prime table size. Fix: use a nearest prime: 65521 or 65537"),
    ("ring_size too large", """
[settings]
ring_size = 2000003
""", "settings.ring_size", 2, "ring_size must be 3..1048573, got 2000003"),
    ("ring_size too small", """
[settings]
ring_size = 2
""", "settings.ring_size", 2, "ring_size must be 3..1048573, got 2"),
    ("conntrack_size zero", """
[settings]
conntrack_size = 0
""", "settings.conntrack_size", 2,
     "conntrack_size must be 1..16777216, got 0. Fix: use a value from 1 to 16777216; the default is 65536"),
    ("max_vips over 4096", """
[settings]
max_vips = 4097
""", "settings.max_vips", 2, "max_vips must be 1..4096"),
    ("max_backends over 65536", """
[settings]
max_backends = 65537
""", "settings.max_backends", 2, "max_backends must be 1..65536"),
    ("hash_seed negative", """
[settings]
hash_seed = -1
""", "settings.hash_seed", 2, "hash_seed must be 0..4294967295, got -1"),
    ("hash_seed over u32", """
[settings]
hash_seed = 4294967296
""", "settings.hash_seed", 2, "hash_seed must be 0..4294967295"),
    ("swrr_size zero", """
[settings]
swrr_size = 0
""", "settings.swrr_size", 2, "swrr_size must be 1..65536"),
    ("more VIPs than max_vips", """
[settings]
max_vips = 1
[[vip]]
address = "198.19.0.100"
port = 80
[[vip.backend]]
address = "198.18.0.11"
[[vip]]
address = "198.19.0.101"
port = 80
[[vip.backend]]
address = "198.18.0.11"
""", "vip[1]", 8, "VIP number 2 is over settings.max_vips = 1"),
    ("more backends than max_backends over all VIPs", """
[settings]
max_backends = 2
[[vip]]
address = "198.19.0.100"
port = 80
[[vip.backend]]
address = "198.18.0.11"
[[vip.backend]]
address = "198.18.0.12"
[[vip]]
address = "198.19.0.101"
port = 80
[[vip.backend]]
address = "198.18.0.11"
""", "vip[1].backend[0]", 13, "backend number 3 (counting all VIPs) is over settings.max_backends = 2"),
    ("more Maglev backends than ring slots", """
[settings]
ring_size = 3
[[vip]]
address = "198.19.0.100"
port = 80
[[vip.backend]]
address = "198.18.0.11"
[[vip.backend]]
address = "198.18.0.12"
[[vip.backend]]
address = "198.18.0.13"
[[vip.backend]]
address = "198.18.0.14"
""", "vip[0].backend[3]", 12, "backend number 4 does not fit in settings.ring_size = 3"),
    ("misspelt vip key", """
[[vip]]
adress = "198.19.0.100"
""", "vip[0].adress", 2, "unknown key 'adress'. Fix: did you mean 'address'?"),
    ("backend key on the vip", """
[[vip]]
address = "198.19.0.100"
port = 80
weight = 3
""", "vip[0].weight", 4, "'weight' belongs in [[vip.backend]]"),
    ("unknown table under a vip", """
[[vip]]
address = "198.19.0.100"
port = 80
[[vip.backend]]
address = "198.18.0.11"
[vip.tls]
interval = 5
""", "vip[0].tls", 6, "unknown table 'tls'. Fix: remove it; valid here: address, port, ports, protocol"),
    ("vip without address", """
[[vip]]
port = 80
""", "vip[0].address", 1, "missing required key 'address'. Fix: add 'address = ...' to this [[vip]]"),
    ("second vip without port", """
[[vip]]
address = "198.19.0.100"
port = 80
[[vip.backend]]
address = "198.18.0.11"

[[vip]]
address = "198.19.0.101"
[[vip.backend]]
address = "198.18.0.11"
""", "vip[1].port", 7, "missing required key 'port'"),
    ("vip port zero", """
[[vip]]
address = "198.19.0.100"
port = 0
""", "vip[0].port", 3, "port must be 1..65535, got 0"),
    ("vip port too large", """
[[vip]]
address = "198.19.0.100"
port = 65536
""", "vip[0].port", 3, "port must be 1..65535, got 65536"),
    ("vip port as a string", """
[[vip]]
address = "198.19.0.100"
port = "80"
""", "vip[0].port", 3, "Fix: write the number without quotes: port = 80"),
    ("vip address not an address", """
[[vip]]
address = "198.19.0.300"
""", "vip[0].address", 2, "'198.19.0.300' is not an IPv4 or IPv6 address"),
    ("vip address as a number", """
[[vip]]
address = 3322085476
""", "vip[0].address", 2, 'expected a string, got an integer 3322085476. Fix: quote it: address = "3322085476"'),
    ("vip address unspecified IPv4", """
[[vip]]
address = "0.0.0.0"
""", "vip[0].address", 2, "VIP address 0.0.0.0 is the unspecified address"),
    ("vip address unspecified IPv6", """
[[vip]]
address = "::"
""", "vip[0].address", 2, "VIP address :: is the unspecified address"),
    ("vip address multicast", """
[[vip]]
address = "224.0.0.1"
""", "vip[0].address", 2, "is a multicast address"),
    ("vip address IPv6 multicast", """
[[vip]]
address = "ff02::1"
""", "vip[0].address", 2, "is a multicast address"),
    ("vip address broadcast", """
[[vip]]
address = "255.255.255.255"
""", "vip[0].address", 2, "is the broadcast address"),
    ("vip address with a zone index", """
[[vip]]
address = "fe80::1%eth0"
""", "vip[0].address", 2, "has a zone index"),
    ("unknown protocol", """
[[vip]]
address = "198.19.0.100"
port = 80
protocol = "sctp"
""", "vip[0].protocol", 4, "unknown protocol 'sctp'. Fix: use one of: tcp, udp"),
    ("upper-case protocol", """
[[vip]]
address = "198.19.0.100"
port = 80
protocol = "TCP"
""", "vip[0].protocol", 4, "did you mean 'tcp'?"),
    ("unknown algorithm", """
[[vip]]
address = "198.19.0.100"
port = 80
algorithm = "magleve"
""", "vip[0].algorithm", 4, "unknown algorithm 'magleve'. Fix: did you mean 'maglev'? Valid: rr, wrr, lc, lrt, maglev"),
    ("tunnel without its source prefix", """
[[vip]]
address = "198.19.0.100"
port = 80
forwarding = "tunnel"
[[vip.backend]]
address = "198.18.0.11"
""", "vip[0].forwarding", 4, "tunnel forwarding needs settings.tunnel_source"),
    ("tunnel source that is no prefix", """
[settings]
tunnel_source = "198.18.200.1/24"
""", "settings.tunnel_source", 2, "is not an IPv4 prefix"),
    ("tunnel source of the wrong family", """
[settings]
tunnel_source6 = "198.18.200.0/24"
""", "settings.tunnel_source6", 2, "is an IPv4 prefix; tunnel_source6 takes IPv6"),
    ("tunnel source with no host bits", """
[settings]
tunnel_source = "198.18.200.1/32"
""", "settings.tunnel_source", 2, "has no host bits"),
    ("ICMP source of the wrong family", """
[settings]
icmp_source = "2001:db8::2"
""", "settings.icmp_source", 2, "takes IPv4"),
    ("IPv4 backend on an IPv6 tunnel VIP", """
[settings]
tunnel_source = "198.18.200.0/24"
tunnel_source6 = "2001:db8:200::/64"
[[vip]]
address = "2001:db8:ffff::100"
port = 80
forwarding = "tunnel"
[[vip.backend]]
address = "198.18.0.11"
""", "vip[0].backend[0].address", 9, "IPv4 backend on an IPv6 tunnel VIP"),
    ("unknown announce", """
[[vip]]
address = "198.19.0.100"
port = 80
announce = "ndp"
[[vip.backend]]
address = "198.18.0.11"
""", "vip[0].announce", 4, "unknown announce 'ndp'. Fix: use one of: none, arp, bgp"),
    ("unknown forwarding", """
[[vip]]
address = "198.19.0.100"
port = 80
forwarding = "dnat"
""", "vip[0].forwarding", 4, "did you mean 'nat'?"),
    ("unknown hash", """
[[vip]]
address = "198.19.0.100"
port = 80
hash = "3tuple"
""", "vip[0].hash", 4, "unknown hash '3tuple'"),
    ("vip with no backends", """
[[vip]]
address = "198.19.0.100"
port = 80
""", "vip[0].backend", 1, "the VIP has no backends"),
    ("vip with an empty backend array", """
[[vip]]
address = "198.19.0.100"
port = 80
backend = []
""", "vip[0].backend", 4, "the VIP has no backends"),
    ("single [vip.backend] instead of [[vip.backend]]", """
[[vip]]
address = "198.19.0.100"
port = 80
[vip.backend]
address = "198.18.0.11"
""", "vip[0].backend", 4, "Fix: write each one as [[vip.backend]]"),
    ("misspelt backend key", """
[[vip]]
address = "198.19.0.100"
port = 80
[[vip.backend]]
address = "198.18.0.11"
weigth = 2
""", "vip[0].backend[0].weigth", 6, "did you mean 'weight'?"),
    ("backend without address", """
[[vip]]
address = "198.19.0.100"
port = 80
[[vip.backend]]
address = "198.18.0.11"
[[vip.backend]]
weight = 2
""", "vip[0].backend[1].address", 6,
     "missing required key 'address'. Fix: add 'address = ...' to this [[vip.backend]]"),
    ("backend loopback", """
[[vip]]
address = "198.19.0.100"
port = 80
[[vip.backend]]
address = "127.0.0.1"
""", "vip[0].backend[0].address", 5, "backend address 127.0.0.1 is a loopback address"),
    ("backend IPv6 loopback", """
[[vip]]
address = "2001:db8::1"
port = 80
[[vip.backend]]
address = "::1"
""", "vip[0].backend[0].address", 5, "is a loopback address"),
    ("backend unspecified", """
[[vip]]
address = "198.19.0.100"
port = 80
[[vip.backend]]
address = "0.0.0.0"
""", "vip[0].backend[0].address", 5, "is the unspecified address"),
    ("backend not an address", """
[[vip]]
address = "198.19.0.100"
port = 80
[[vip.backend]]
address = "backend-1.example"
""", "vip[0].backend[0].address", 5, "is not an IPv4 or IPv6 address"),
    ("backend weight negative", """
[[vip]]
address = "198.19.0.100"
port = 80
[[vip.backend]]
address = "198.18.0.11"
weight = -1
""", "vip[0].backend[0].weight", 6,
     "weight must be 0..65535, got -1. Fix: use a value from 0 to 65535; the default is 1"),
    ("backend weight too large", """
[[vip]]
address = "198.19.0.100"
port = 80
[[vip.backend]]
address = "198.18.0.11"
weight = 65536
""", "vip[0].backend[0].weight", 6, "weight must be 0..65535"),
    ("backend weight boolean", """
[[vip]]
address = "198.19.0.100"
port = 80
[[vip.backend]]
address = "198.18.0.11"
weight = false
""", "vip[0].backend[0].weight", 6, "expected an integer, got a boolean False"),
    ("IPv6 backend on an IPv4 DSR VIP", """
[[vip]]
address = "198.19.0.100"
port = 80
[[vip.backend]]
address = "198.18.0.11"
[[vip.backend]]
address = "2001:db8::11"
""", "vip[0].backend[1].address", 7, "IPv6 backend on an IPv4 VIP: dsr forwarding cannot change the address family"),
    ("DSR backend on another port", """
[[vip]]
address = "198.19.0.100"
port = 80
[[vip.backend]]
address = "198.18.0.11"
port = 8080
""", "vip[0].backend[0].port", 6,
     "only nat forwarding remaps ports (this VIP uses dsr). Fix: remove the port key or set port = 80"),
    ("duplicate backend", """
[[vip]]
address = "198.19.0.100"
port = 80
[[vip.backend]]
address = "198.18.0.11"
[[vip.backend]]
address = "198.18.0.12"
[[vip.backend]]
address = "198.18.0.11"
port = 80
""", "vip[0].backend[2]", 8, "duplicate backend 198.18.0.11:80: already defined as vip[0].backend[0] (line 4)"),
    ("duplicate VIP", """
[[vip]]
address = "198.19.0.100"
port = 80
[[vip.backend]]
address = "198.18.0.11"

[[vip]]
address = "198.19.0.100"
port = 80
protocol = "tcp"
[[vip.backend]]
address = "198.18.0.12"
""", "vip[1]", 7, "duplicate VIP 198.19.0.100:80/tcp: already defined as vip[0] (line 1)"),
    ("duplicate IPv6 VIP spelt differently", """
[[vip]]
address = "2001:db8::1"
port = 443
[[vip.backend]]
address = "2001:db8::11"
[[vip]]
address = "2001:DB8:0:0::1"
port = 443
[[vip.backend]]
address = "2001:db8::11"
""", "vip[1]", 6, "duplicate VIP [2001:db8::1]:443/tcp: already defined as vip[0] (line 1)"),
    ("backend given as a dotted key", """
[[vip]]
address = "198.19.0.100"
port = 80
backend.address = "198.18.0.11"
""", "vip[0].backend", 4, "expected an array of tables, got a table"),
    ("inline tables point at the enclosing key", """
# inline tables have no lines of their own
vip = [{address = "198.19.0.100", port = 0, backend = [{address = "198.18.0.11"}]}]
""", "vip[0].port", 2, "port must be 1..65535, got 0"),
    ("bgp speaker exabgp is not one", """
[bgp]
speaker = "exabgp"
local_as = 65001
""", "bgp.speaker", 2, "unknown speaker 'exabgp'. Fix: use one of: bird"),
    ("bgp speaker unknown", """
[bgp]
speaker = "gobgp"
""", "bgp.speaker", 2, "unknown speaker 'gobgp'"),
    ("bgp without a speaker", """
[bgp]
local_as = 65001
""", "bgp.speaker", 1, "missing required key 'speaker'. Fix: add 'speaker = ...' to this [bgp]"),
    ("bgp local_as zero", """
[bgp]
speaker = "bird"
local_as = 0
""", "bgp.local_as", 3, "local_as must be 1..4294967295, got 0"),
    ("bgp router_id IPv6", """
[bgp]
speaker = "bird"
local_as = 65001
router_id = "2001:db8::1"
""", "bgp.router_id", 4, "is an IPv6 address; router_id takes IPv4"),
    ("bgp hold_time below 3", """
[bgp]
speaker = "bird"
local_as = 65001
hold_time = 1
""", "bgp.hold_time", 4, "hold_time must be 3..65535, got 1"),
    ("bgp with no peer", """
[bgp]
speaker = "bird"
local_as = 65001
""", "bgp.peer", 1, "[bgp] has no peers. Fix: add a [[bgp.peer]]"),
    ("bgp peer without its AS", """
[bgp]
speaker = "bird"
local_as = 65001
[[bgp.peer]]
address = "198.18.1.254"
""", "bgp.peer[0].as", 4, "missing required key 'as'"),
    ("bgp peer given twice", """
[bgp]
speaker = "bird"
local_as = 65001
[[bgp.peer]]
address = "198.18.1.254"
as = 65000
[[bgp.peer]]
address = "198.18.1.254"
as = 65002
""", "bgp.peer[1].address", 8, "duplicate peer 198.18.1.254: already defined as bgp.peer[0] (line 4)"),
    ("bgp bfd_interval without bfd", """
[bgp]
speaker = "bird"
local_as = 65001
bfd_interval = 0.05
""", "bgp.bfd_interval", 4, "'bfd_interval' is only read with bfd = true"),
    ("bgp include path relative", """
[bgp]
speaker = "bird"
local_as = 65001
bird_include = "fastlb.conf"
""", "bgp.bird_include", 4, "is not an absolute path"),
    ("bgp key in a vip", """
[[vip]]
address = "198.19.0.100"
port = 80
local_as = 65001
""", "vip[0].local_as", 4, "'local_as' belongs in [bgp]"),
    ("announce bgp without a bgp table", """
[[vip]]
address = "198.19.0.100"
port = 80
announce = "bgp"
[[vip.backend]]
address = "198.18.0.11"
""", "vip[0].announce", 4, 'announce = "bgp" needs a [bgp] table'),
    ("IPv6 VIP announced with only IPv4 peers", """
[[vip]]
address = "2001:db8:ffff::100"
port = 80
announce = "bgp"
[[vip.backend]]
address = "2001:db8::11"
[bgp]
speaker = "bird"
local_as = 65001
[[bgp.peer]]
address = "198.18.1.254"
as = 65000
""", "vip[0].announce", 4, "no [[bgp.peer]] is IPv6"),
    ("an exec check without a command", """
[[vip]]
address = "198.19.0.100"
port = 80
[vip.health]
kind = "exec"
[[vip.backend]]
address = "198.18.0.11"
""", "vip[0].health.command", 4, "an exec check needs a command"),
    ("an exec check whose program does not exist", """
[[vip]]
address = "198.19.0.100"
port = 80
[vip.health]
kind = "exec"
command = "/nonexistent/replica-lag-check --max 5"
[[vip.backend]]
address = "198.18.0.11"
""", "vip[0].health.command", 6, "/nonexistent/replica-lag-check is not an executable file"),
    ("an exec command with unbalanced quotes", """
[[vip]]
address = "198.19.0.100"
port = 80
[vip.health]
kind = "exec"
command = "/bin/true 'x"
[[vip.backend]]
address = "198.18.0.11"
""", "vip[0].health.command", 6, "does not split into words"),
    ("command on a tcp check", """
[[vip]]
address = "198.19.0.100"
port = 80
[vip.health]
kind = "tcp"
command = "/bin/true"
[[vip.backend]]
address = "198.18.0.11"
""", "vip[0].health.command", 6, "'command' is only read by exec checks"),
    ("an agent check without the agent's port", """
[[vip]]
address = "198.19.0.100"
port = 80
[vip.health]
kind = "agent"
[[vip.backend]]
address = "198.18.0.11"
""", "vip[0].health.port", 4, "an agent check needs the agent's port"),
    ("port and ports both", """
[[vip]]
address = "198.19.0.100"
port = 21
ports = [21, "30000-30100"]
[[vip.backend]]
address = "198.18.0.11"
""", "vip[0].ports", 4, "a VIP has port or ports, not both"),
    ("a bad port range", """
[[vip]]
address = "198.19.0.100"
ports = [21, "30100-30000"]
[[vip.backend]]
address = "198.18.0.11"
""", "vip[0].ports", 3, "bad port or range '30100-30000'"),
    ("overlapping ranges in one VIP", """
[[vip]]
address = "198.19.0.100"
ports = ["9000-9010", 9005]
[[vip.backend]]
address = "198.18.0.11"
""", "vip[0].ports", 3, "ports 9000-9010 and 9005 overlap"),
    ("ports of two VIPs of one address and protocol overlap", """
[[vip]]
address = "198.19.0.100"
ports = [21, "30000-30100"]
[[vip.backend]]
address = "198.18.0.11"
[[vip]]
address = "198.19.0.100"
ports = ["30100-30200"]
[[vip.backend]]
address = "198.18.0.11"
""", "vip[1].ports", 8, "port 30100 of VIP 198.19.0.100:30100/tcp is also a port of VIP 198.19.0.100:21/tcp"),
    ("a backend port on a multi-port VIP", """
[[vip]]
address = "198.19.0.100"
ports = [21, "30000-30100"]
forwarding = "nat"
[[vip.backend]]
address = "198.18.0.11"
port = 2121
""", "vip[0].backend[0].port", 7, "a backend of a multi-port VIP takes the port each client used"),
    ("more multi-port ports than the vips map has room for", """
[settings]
max_vip_ports = 100
[[vip]]
address = "198.19.0.100"
ports = [21, "30000-30100"]
[[vip.backend]]
address = "198.18.0.11"
""", "vip[0].ports", 5, "the multi-port VIPs list 102 ports, over settings.max_vip_ports = 100"),
    ("a multi-line string does not fool the line locator", """
[[vip]]
address = "198.19.0.100"
port = 80
note = '''
[settings]
ring_size = 4
'''
[[vip.backend]]
address = "198.18.0.11"
[settings]
ring_size = 4 # a comment with "quotes" and [brackets]
""", "settings.ring_size", 11, "use a nearest prime: 3 or 5"),
]


@pytest.mark.parametrize("text, field, line, message",
                         [pytest.param(toml(text), f, n, m, id=desc) for desc, text, f, n, m in MALFORMED])
def test_malformed_config(text: str, field: str | None, line: int, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(text, "fastlb.toml")
    err = info.value
    assert (err.field, err.line) == (field, line)
    assert message in str(err)
    assert str(err).startswith(f"fastlb.toml:{line}: " + (f"{field}: " if field else ""))
    assert "\n" not in str(err)


def test_the_table_is_large_and_distinct() -> None:
    assert len(MALFORMED) >= 30
    assert len({desc for desc, *_ in MALFORMED}) == len(MALFORMED)


MINIMAL = toml("""
[[vip]]
address = "198.19.0.100"
port = 80
[[vip.backend]]
address = "198.18.0.11"
""")


def test_defaults_are_filled() -> None:
    cfg = parse_config(MINIMAL)
    assert isinstance(cfg, Config)
    assert cfg.settings == Settings(ring_size=65537, conntrack_size=65536, max_vips=16, max_backends=1024,
                                    hash_seed=0, swrr_size=1024)
    assert cfg.path is None
    (vip,) = cfg.vips
    assert (vip.protocol, vip.algorithm, vip.forwarding, vip.hash) == ("tcp", "maglev", "dsr", "5tuple")
    assert vip.backends == (Backend(ipaddress.IPv4Address("198.18.0.11"), weight=1, port=80),)
    assert (vip.line, vip.backends[0].line) == (1, 4)
    assert (vip.family, vip.proto_number, vip.name) == (4, 6, "198.19.0.100:80/tcp")
    assert vip.backends[0].key == b"198.18.0.11:80"


def test_every_setting_and_ipv6_udp_vip() -> None:
    cfg = parse_config(toml("""
[settings]
ring_size = 251
conntrack_size = 1
max_vips = 2
max_backends = 3
hash_seed = 4294967295
swrr_size = 65536

[[vip]]
address = "2001:db8::1"
port = 53
protocol = "udp"
hash = "src"
[[vip.backend]]
address = "2001:db8::11"
weight = 65535
[[vip.backend]]
address = "2001:db8::12"
port = 53

[[vip]]
address = "198.19.0.100"
port = 53
protocol = "udp"
[[vip.backend]]
address = "198.18.0.11"
"""), "lb.toml")
    assert cfg.settings == Settings(251, 1, 2, 3, 4294967295, 65536)
    assert cfg.path == "lb.toml"
    v6, v4 = cfg.vips
    assert (v6.family, v6.proto_number, v6.hash, v6.name) == (6, 17, "src", "[2001:db8::1]:53/udp")
    assert [b.key for b in v6.backends] == [b"[2001:db8::11]:53", b"[2001:db8::12]:53"]
    assert [b.weight for b in v6.backends] == [65535, 1]
    assert [b.line for b in v6.backends] == [14, 17]
    assert (v4.line, v4.name) == (21, "198.19.0.100:53/udp")


def test_same_address_and_port_on_tcp_and_udp_are_two_vips() -> None:
    text = MINIMAL + MINIMAL.replace("port = 80", 'port = 80\nprotocol = "udp"')
    assert [v.name for v in parse_config(text).vips] == ["198.19.0.100:80/tcp", "198.19.0.100:80/udp"]


def test_backend_on_the_same_address_and_another_port_is_not_a_duplicate() -> None:
    text = MINIMAL.replace('port = 80', 'port = 80\nforwarding = "nat"') + toml("""
[[vip.backend]]
address = "198.18.0.11"
port = 8080
""")
    (vip,) = parse_config(text).vips
    assert [b.key for b in vip.backends] == [b"198.18.0.11:80", b"198.18.0.11:8080"]


def test_all_backends_at_weight_zero_is_allowed() -> None:
    text = MINIMAL + 'weight = 0\n[[vip.backend]]\naddress = "198.18.0.12"\nweight = 0\n'
    (vip,) = parse_config(text).vips
    assert [b.weight for b in vip.backends] == [0, 0]


def test_vip_may_be_loopback() -> None:
    (vip,) = parse_config(MINIMAL.replace("198.19.0.100", "127.0.0.2")).vips
    assert vip.address.is_loopback


def test_nat_may_remap_the_backend_port() -> None:
    nat = MINIMAL.replace("port = 80", 'port = 80\nforwarding = "nat"') + "port = 8080\n"
    (vip,) = parse_config(nat).vips
    assert (vip.forwarding, vip.port, vip.backends[0].port) == ("nat", 80, 8080)
    assert vip.backends[0].key == b"198.18.0.11:8080"


def test_tunnel_may_mix_families_but_not_remap_ports() -> None:
    tunnel = ('[settings]\ntunnel_source = "198.18.200.0/24"\ntunnel_source6 = "2001:db8:200::/64"\n'
              + MINIMAL.replace("port = 80", 'port = 80\nforwarding = "tunnel"').replace("198.18.0.11", "2001:db8::11"))
    (vip,) = parse_config(tunnel).vips
    assert (vip.family, vip.backends[0].address.version) == (4, 6)
    with pytest.raises(ConfigError, match="only nat forwarding remaps ports") as info:
        parse_config(tunnel + "port = 81\n")
    assert (info.value.field, info.value.line) == ("vip[0].backend[0].port", 10)


BGP = toml("""
[bgp]
speaker = "bird"
local_as = 4200000001
router_id = "198.18.1.2"
hold_time = 3
bfd = true
bfd_interval = 0.05
bfd_multiplier = 5
detach_delay = 0.5
bird_socket = "/run/lab/bird.ctl"
bird_include = "/run/lab/fastlb.d/eth0.conf"

[[bgp.peer]]
address = "198.18.1.254"
as = 65000

[[bgp.peer]]
address = "2001:db8:1::fe"
as = 65000
""")


def test_bgp_table_and_announced_vips() -> None:
    text = (MINIMAL.replace("port = 80", 'port = 80\nannounce = "bgp"') + BGP
            + '[[vip]]\naddress = "2001:db8:ffff::100"\nport = 80\nannounce = "bgp"\n'
              '[[vip.backend]]\naddress = "2001:db8::11"\n')
    cfg = parse_config(text)
    assert [v.announce for v in cfg.vips] == ["bgp", "bgp"]
    bgp = cfg.bgp
    assert (bgp.speaker, bgp.local_as, str(bgp.router_id), bgp.hold_time) == ("bird", 4200000001, "198.18.1.2", 3)
    assert (bgp.bfd, bgp.bfd_interval, bgp.bfd_multiplier, bgp.detach_delay) == (True, 0.05, 5, 0.5)
    assert (bgp.bird_socket, bgp.bird_include) == ("/run/lab/bird.ctl", "/run/lab/fastlb.d/eth0.conf")
    assert [(str(p.address), p.asn, p.line) for p in bgp.peers] == [("198.18.1.254", 65000, 19),
                                                                    ("2001:db8:1::fe", 65000, 23)]
    assert dataclasses.replace(parse_config(config.render_config(cfg)), path=None) == cfg


def test_bgp_defaults_and_no_bgp() -> None:
    assert parse_config(MINIMAL).bgp is None
    cfg = parse_config(MINIMAL + '[bgp]\nspeaker = "bird"\nlocal_as = 65001\n'
                       '[[bgp.peer]]\naddress = "198.18.1.254"\nas = 65000\n')
    assert cfg.vips[0].announce == "none"  # a [bgp] table announces only the VIPs that say so
    assert cfg.bgp == config.Bgp(speaker="bird", local_as=65001, peers=(
        config.BgpPeer(ipaddress.IPv4Address("198.18.1.254"), 65000),), router_id=None, hold_time=9, bfd=False,
        bfd_interval=0.1, bfd_multiplier=3, detach_delay=2.0, bird_socket="/run/bird/bird.ctl", bird_include=None)
    assert "[bgp]" in config.render_config(cfg) and "hold_time" not in config.render_config(cfg)


def test_config_is_frozen_and_lines_do_not_count_for_equality() -> None:
    cfg = parse_config(MINIMAL)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.vips[0].port = 81  # type: ignore[misc]
    moved = parse_config("# a comment moves every line down\n\n" + MINIMAL)
    assert moved.vips[0].line == 3
    assert moved == cfg
    assert hash(moved) == hash(cfg)


def test_error_is_one_line_with_field_line_and_fix() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(MINIMAL + "weigth = 2\n", "/etc/fastlb.toml")
    err = info.value
    assert str(err) == ("/etc/fastlb.toml:6: vip[0].backend[0].weigth: unknown key 'weigth'. "
                        "Fix: did you mean 'weight'? Valid: address, weight, port")
    assert (err.path, err.exit_code) == ("/etc/fastlb.toml", 2)


def test_multiline_toml_error_is_one_line() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config('[[vip]]\naddress = "198.19.0.100\nport = 80\n')
    assert "\n" not in str(info.value)
    assert info.value.line == 2


# load_config


def test_example_config_loads() -> None:
    cfg = load_config(CONFIGS / "example.toml")
    assert cfg.path == str(CONFIGS / "example.toml")
    assert [v.name for v in cfg.vips] == ["198.19.0.100:80/tcp", "[2001:db8:100::1]:443/tcp"]
    assert cfg.settings == Settings()
    assert [b.weight for b in cfg.vips[0].backends] == [1, 1, 0]


def test_missing_file_names_path_and_errno(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    with pytest.raises(ConfigError, match=r"cannot read the config file: ENOENT \(No such file or directory\)") as info:
        load_config(missing)
    assert info.value.path == str(missing)
    assert str(info.value).startswith(f"{missing}: ")
    assert isinstance(info.value.__cause__, OSError) and info.value.__cause__.errno == errno.ENOENT


def test_directory_is_unreadable(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"EISDIR \(Is a directory\)"):
        load_config(tmp_path)


def test_non_utf8_file_names_the_line(tmp_path: Path) -> None:
    bad = tmp_path / "latin1.toml"
    bad.write_bytes(MINIMAL.encode() + b'# caf\xe9\n')
    with pytest.raises(ConfigError, match="not UTF-8 text: byte 0xe9") as info:
        load_config(bad)
    assert info.value.line == 6


def test_load_reports_lines_of_the_file(tmp_path: Path) -> None:
    path = tmp_path / "lb.toml"
    path.write_text(MINIMAL.replace("port = 80", "port = 80\nhash = 'ip'"))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value).startswith(f"{path}:4: vip[0].hash: unknown hash 'ip'")


# VIP specs: find_vip and parse_vip_spec


def test_find_vip() -> None:
    cfg = load_config(CONFIGS / "example.toml")
    assert cfg.find_vip("198.19.0.100:80/tcp") is cfg.vips[0]
    assert cfg.find_vip("198.19.0.100:80") is cfg.vips[0]
    assert cfg.find_vip("[2001:db8:100:0::1]:443/TCP") is cfg.vips[1]
    assert cfg.find_vip("198.19.0.100:80/udp") is None
    assert cfg.find_vip("198.19.0.100:81") is None
    with pytest.raises(ValueError, match="bad VIP"):
        cfg.find_vip("198.19.0.100")


@pytest.mark.parametrize("spec, expected", [
    ("198.19.0.100:80/tcp", (ipaddress.ip_address("198.19.0.100"), 80, "tcp")),
    ("198.19.0.100:53/udp", (ipaddress.ip_address("198.19.0.100"), 53, "udp")),
    ("198.19.0.100:80", (ipaddress.ip_address("198.19.0.100"), 80, "tcp")),
    (" [2001:db8::1]:443/UDP ", (ipaddress.ip_address("2001:db8::1"), 443, "udp")),
    ("[2001:db8::1]:65535", (ipaddress.ip_address("2001:db8::1"), 65535, "tcp")),
])
def test_parse_vip_spec(spec: str, expected: tuple) -> None:
    assert parse_vip_spec(spec) == expected


@pytest.mark.parametrize("spec, message", [
    ("198.19.0.100", "expected ADDR:PORT[/tcp|udp|http|https]"),
    (":80", "expected ADDR:PORT[/tcp|udp|http|https]"),
    ("198.19.0.100:80/sctp", "protocol must be tcp, udp, http or https, got 'sctp'"),
    ("198.19.0.100:80/", "protocol must be tcp, udp, http or https, got ''"),
    ("2001:db8::1:80", "put an IPv6 address in brackets"),
    ("198.19.0.300:80", "'198.19.0.300' is not an IPv4 or IPv6 address"),
    ("198.19.0.100:0", "port must be a number from 1 to 65535, got '0'"),
    ("198.19.0.100:65536", "got '65536'"),
    ("198.19.0.100:http", "got 'http'"),
    ("198.19.0.100:", "got ''"),
    ("198.19.0.100:٨٠", "got '٨٠'"),
])
def test_parse_vip_spec_rejects(spec: str, message: str) -> None:
    with pytest.raises(ValueError, match=f"^bad VIP {re.escape(repr(spec))}: .*{re.escape(message)}"):
        parse_vip_spec(spec)


@given(address=st.ip_addresses(), port=st.integers(1, 65535), protocol=st.sampled_from(["tcp", "udp", "http", "https"]))
def test_vip_name_round_trips_through_parse_vip_spec(address, port, protocol) -> None:
    vip = Vip(address, port, protocol, "maglev", "dsr", "5tuple", backends=())
    assert parse_vip_spec(vip.name) == (address, port, protocol)


# The line locator


def test_key_lines_skips_strings_arrays_and_comments() -> None:
    """locator_traps.toml hides headers and keys in strings, arrays and comments."""
    text = (CONFIGS / "locator_traps.toml").read_text()
    tomllib.loads(text)  # the locator may assume valid TOML
    lines = _KeyLines(text)
    assert lines.find(("title",)) == 1
    assert lines.find(("vip", 0)) == 5
    assert lines.find(("vip", 0, "a")) == 6
    assert lines.find(("vip", 0, "b")) == 11
    assert lines.find(("vip", 0, "c")) == 12
    assert lines.find(("vip", 0, "d")) == 15
    assert lines.find(("vip", 0, "e")) == 16
    assert lines.find(("vip", 0, "f")) == 19
    assert lines.find(("vip", 0, "backend", 0)) == 23
    assert lines.find(("vip", 0, "backend", 0, "quoted.key")) == 24
    assert lines.find(("vip", 0, "backend", 0, "g")) == 25
    assert lines.find(("vip", 0, "backend", 0, "g", "h")) == 25
    assert lines.find(("vip", 1)) == 26
    assert lines.find(("vip", 1, "port")) == 27
    assert lines.find(("vip", 1, "missing")) == 26
    assert lines.find(("vip", 2)) == 5  # no third [[vip]]: falls back to the array's first line
    assert lines.find(("nowhere",)) == 1


def test_key_lines_handles_crlf() -> None:
    text = MINIMAL.replace("\n", "\r\n") + "weight = -1\r\n"
    with pytest.raises(ConfigError) as info:
        parse_config(text)
    assert (info.value.field, info.value.line) == ("vip[0].backend[0].weight", 6)


def test_settings_defaults_match_the_documented_ranges() -> None:
    defaults = Settings()
    for name, (low, high) in config._SETTINGS_RANGES.items():
        value = getattr(defaults, name)
        assert value is None and name == "new_flow_rate" or low <= value <= high  # None: derived
    assert 1 <= defaults.guard_rate(96) <= config._SETTINGS_RANGES["new_flow_rate"][1]
    assert {f.name for f in dataclasses.fields(Settings)} == set(config._SETTINGS_KEYS)
    assert config._is_prime(defaults.ring_size) and config._is_prime(config._SETTINGS_RANGES["ring_size"][1])


# ---- validate: a Config built in code, checked with no text ----

def test_validate_checks_a_config_without_text_and_agrees_with_a_file() -> None:
    cfg = parse_config(MINIMAL, "lb.toml")
    assert config.validate(cfg) == cfg
    assert config.validate(cfg) == dataclasses.replace(parse_config(config.render_config(cfg)), path="lb.toml")
    bad = dataclasses.replace(cfg, vips=(dataclasses.replace(cfg.vips[0], port=0),))
    with pytest.raises(ConfigError) as info:
        config.validate(bad)
    assert info.value.field == "vip[0].port" and info.value.line is None
    with pytest.raises(ConfigError) as text_info:
        parse_config(config.render_config(bad))
    assert str(text_info.value).partition("vip[0].port: ")[2] == str(info.value).partition("vip[0].port: ")[2] != ""


def test_validate_names_a_duplicate_vip_without_a_line() -> None:
    cfg = parse_config(MINIMAL)
    with pytest.raises(ConfigError, match=r"^vip\[1\]: duplicate VIP .*: already defined as vip\[0\]\. Fix"):
        config.validate(dataclasses.replace(cfg, vips=cfg.vips * 2))


def test_a_multi_port_vip_is_one_vip_on_every_listed_port() -> None:
    cfg = parse_config(toml("""
[[vip]]
address = "198.19.0.100"
ports = ["30000-30100", 21]
protocol = "tcp"
[[vip.backend]]
address = "198.18.0.11"
[[vip]]
address = "198.19.0.100"
port = 30050
protocol = "udp"
[[vip.backend]]
address = "198.18.0.11"
"""), "fastlb.toml")
    vip = cfg.vips[0]
    assert vip.ports == ((21, 21), (30000, 30100)) and vip.port == 21 and vip.name == "198.19.0.100:21/tcp"
    assert len(vip.listens()) == 102 and vip.backends[0].port == 21
    assert cfg.find_vip("198.19.0.100:30042/tcp") is vip and cfg.find_vip("198.19.0.100:30101/tcp") is None
    assert cfg.find_vip("198.19.0.100:30050/udp") is cfg.vips[1]
    assert parse_config(render_config(cfg), "fastlb.toml") == cfg
