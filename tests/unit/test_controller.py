"""The controller's parts without root: health config, --save rendering, metrics, the CLI with no controller."""

from __future__ import annotations

import ipaddress

import pytest
from click.testing import CliRunner
from prometheus_client import CollectorRegistry, generate_latest

from fastlb.cli import main
from fastlb.config import HealthCheck, parse_config, render_config
from fastlb.config.edits import parse_backend_spec
from fastlb.controller.metrics import StatsCollector, parse_listen
from fastlb.errors import ConfigError, FastlbError

from helpers.configs import BACKENDS, VIP


# ---- config: [vip.health] ----

def test_no_health_table_means_no_check():
    (vip,) = parse_config(VIP + BACKENDS).vips
    assert vip.health == HealthCheck() and vip.health.kind == "none"
    assert (vip.all_down, vip.expire_nodest_conn) == ("drop", True)
    assert all(vip.check_of(b) is vip.health for b in vip.backends)


def test_vip_health_is_every_backends_default_and_a_backend_may_override_it():
    text = VIP + """
[vip.health]
kind = "http"
interval = 0.2
timeout = 0.1
rise = 3
fall = 1
path = "/health"
all_down = "keep"
expire_nodest_conn = false
[[vip.backend]]
address = "198.18.0.11"
[[vip.backend]]
address = "198.18.0.12"
[vip.backend.health]
kind = "tcp"
port = 8080
"""
    (vip,) = parse_config(text).vips
    assert vip.health == HealthCheck(kind="http", interval=0.2, timeout=0.1, rise=3, fall=1, path="/health")
    assert (vip.all_down, vip.expire_nodest_conn) == ("keep", False)
    first, second = vip.backends
    assert vip.check_of(first) == vip.health
    assert vip.check_of(second) == HealthCheck(kind="tcp", interval=0.2, timeout=0.1, rise=3, fall=1, port=8080,
                                               path="/health")


@pytest.mark.parametrize("health, field, message", [
    ('kind = "icmp"', "vip[0].health.kind", "unknown kind 'icmp'"),
    ("interval = 0.2\ntimeout = 0.5", "vip[0].health.timeout", "timeout 0.5 s is longer than interval 0.2 s"),
    ('kind = "tcp"\npath = "/x"', "vip[0].health.path", "'path' is only read by http checks"),
    ('kind = "http"\npayload = "x"', "vip[0].health.payload", "'payload' is only read by udp checks"),
    ('kind = "http"\npath = "health"', "vip[0].health.path", "is not an absolute URL path"),
    ("rise = 0", "vip[0].health.rise", "rise must be 1..100, got 0"),
    ('interval = "1"', "vip[0].health.interval", "expected a float, got a string"),
    ('all_down = "panic"', "vip[0].health.all_down", "unknown all_down 'panic'"),
    ("expire_nodest_conn = 1", "vip[0].health.expire_nodest_conn", "expected a boolean"),
    ("intervall = 1", "vip[0].health.intervall", "did you mean 'interval'?"),
])
def test_bad_health_keys_name_the_field(health, field, message):
    with pytest.raises(ConfigError) as info:
        parse_config(VIP + "[vip.health]\n" + health + "\n" + BACKENDS)
    assert info.value.field == field and message in str(info.value)


def test_vip_level_keys_are_refused_on_a_backend():
    with pytest.raises(ConfigError, match="unknown key 'all_down'") as info:
        parse_config(VIP + BACKENDS + '[vip.backend.health]\nall_down = "keep"\n')
    assert info.value.field == "vip[0].backend[1].health.all_down"


def test_controller_settings_take_seconds():
    cfg = parse_config("[settings]\nudp_timeout = 30\nsweep_interval = 0.5\n" + VIP + BACKENDS)
    assert (cfg.settings.udp_timeout, cfg.settings.sweep_interval) == (30.0, 0.5)
    with pytest.raises(ConfigError, match="udp_timeout must be 1..86400, got 0"):
        parse_config("[settings]\nudp_timeout = 0\n" + VIP + BACKENDS)


def test_render_config_reads_back_equal():
    text = """
[settings]
ring_size = 251
hash_seed = 7
udp_timeout = 12.5
tunnel_source = "198.18.200.0/24"

[[vip]]
address = "198.19.0.100"
port = 80
algorithm = "lrt"
forwarding = "tunnel"
announce = "arp"
[vip.health]
kind = "http"
interval = 0.25
timeout = 0.25
path = "/ready?x=\\"1\\""
all_down = "keep"
[[vip.backend]]
address = "198.18.0.11"
weight = 3
[vip.backend.health]
kind = "udp"
payload = "hi\\n"
[[vip.backend]]
address = "198.18.0.12"
weight = 0

[[vip]]
address = "2001:db8::1"
port = 53
protocol = "udp"
hash = "src"
[vip.health]
expire_nodest_conn = false
[[vip.backend]]
address = "2001:db8::11"
"""
    cfg = parse_config(text)
    again = parse_config(render_config(cfg))
    assert again == cfg
    assert render_config(again) == render_config(cfg)


@pytest.mark.parametrize("spec, want", [
    ("198.18.0.11", (ipaddress.ip_address("198.18.0.11"), None)),
    ("198.18.0.11:8080", (ipaddress.ip_address("198.18.0.11"), 8080)),
    ("[2001:db8::11]:80", (ipaddress.ip_address("2001:db8::11"), 80)),
    ("2001:db8::11", (ipaddress.ip_address("2001:db8::11"), None)),
])
def test_backend_specs(spec, want):
    assert parse_backend_spec(spec) == want


def test_a_bad_backend_spec_says_what_to_write():
    with pytest.raises(FastlbError, match="bad backend 'nope'.*Fix: write ADDR or ADDR:PORT"):
        parse_backend_spec("nope")


# ---- metrics ----

@pytest.mark.parametrize("text, want", [("127.0.0.1:9469", ("127.0.0.1", 9469)), ("[::1]:9000", ("::1", 9000)),
                                        ("off", None), ("OFF", None)])
def test_metrics_listen(text, want):
    assert parse_listen(text) == want


@pytest.mark.parametrize("text", ["9469", "localhost:9469", "127.0.0.1:0", "127.0.0.1:x"])
def test_metrics_listen_refuses(text):
    with pytest.raises(ValueError, match="127.0.0.1:9469"):
        parse_listen(text)


def test_metric_names_follow_the_conventions():
    data = {"interface": "eth0", "conntrack": {"size": 100, "entries": 7}, "reloads": {"ok": 2, "failed": 1},
            "reasons": {"tx_dsr": {"verdict": "tx", "packets": 5, "bytes": 500}},
            "events": {"guard_unrecorded": 3, "ct_full": 0},
            "vips": [{"vip": "198.19.0.100:80/tcp", "packets": 5, "bytes": 500, "new_flows": 2, "active": 1,
                      "healthy_backends": 1,
                      "backends": [{"backend": "198.18.0.11:80", "packets": 5, "bytes": 500, "new_flows": 2,
                                    "active": 1, "health": "up", "weight": 2, "in_table": True,
                                    "latency_ms": 1.5, "checks_passed": 9, "checks_failed": 1}]}]}
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StatsCollector(lambda: data))
    text = generate_latest(registry).decode()
    for line in ('fastlb_backend_packets_total{backend="198.18.0.11:80",interface="eth0",tier="l4",vip="198.19.0.100:80/tcp"} 5.0',
                 'fastlb_backend_probe_latency_seconds{backend="198.18.0.11:80",interface="eth0",tier="l4",'
                 'vip="198.19.0.100:80/tcp"} 0.0015',
                 'fastlb_backend_health_checks_total{backend="198.18.0.11:80",interface="eth0",result="failed",tier="l4",'
                 'vip="198.19.0.100:80/tcp"} 1.0',
                 'fastlb_backend_up{backend="198.18.0.11:80",interface="eth0",tier="l4",vip="198.19.0.100:80/tcp"} 1.0',
                 'fastlb_packets_total{interface="eth0",reason="tx_dsr",verdict="tx"} 5.0',
                 'fastlb_vip_bytes_total{interface="eth0",tier="l4",vip="198.19.0.100:80/tcp"} 500.0',
                 'fastlb_conntrack_entries{interface="eth0"} 7.0',
                 'fastlb_events_total{event="guard_unrecorded",interface="eth0"} 3.0',
                 'fastlb_events_total{event="ct_full",interface="eth0"} 0.0',
                 'fastlb_config_reloads_total{interface="eth0",result="failed"} 1.0'):
        assert line in text, text


# ---- the control socket ----

@pytest.fixture
def ctl_root(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTLB_CTL_ROOT", str(tmp_path / "ctl"))
    return tmp_path / "ctl"


def test_no_controller_is_one_clear_line(ctl_root):
    res = CliRunner().invoke(main, ["backend", "drain", "198.19.0.100:80/tcp", "198.18.0.11"])
    assert res.exit_code == 1
    assert res.output.strip().splitlines() == [
        "fastlb: error: no fastlb controller is running in this network namespace. Fix: start one: "
        "fastlb attach IFACE -c CONFIG (the changes are made through it)"]


def test_lrt_scores_round_so_that_equal_latencies_tie_and_slow_ones_lose():
    from fastlb.dataplane.tables import LRT_FLOOR_US, lrt_score
    assert lrt_score(300) == lrt_score(900) == lrt_score(LRT_FLOOR_US) == LRT_FLOOR_US
    assert lrt_score(3900) == lrt_score(4100)          # within one step: a tie
    assert lrt_score(55_000) > 5 * lrt_score(3900)     # 50 ms slower still loses every pair
    assert lrt_score(10**12) == 2**32 - 1              # the kernel's u32


# ---- the loop's order ----

def test_a_command_in_the_batch_of_a_health_change_is_answered_after_the_rebuild():
    """`fastlb status` sent while a backend goes down must not report it down before
    the maps hold that (a client that reacts to the reply then meets the old tables)."""
    import queue
    import signal
    import types

    from fastlb.controller.loop import Controller

    done = []
    ctl = object.__new__(Controller)   # the loop alone: every effect below is a recorder
    ctl.config = types.SimpleNamespace(settings=types.SimpleNamespace(sweep_interval=60.0), vips=())
    ctl.maps, ctl.announcer, ctl.events = None, None, queue.Queue()
    ctl.ramping = lambda: False
    ctl._on_result_main = lambda result: done.append(f"result {result}") or True
    ctl._rebuild = lambda: done.append("rebuild")

    def run_call(call):
        done.append(f"call {call}")
        ctl.events.put(("signal", signal.SIGTERM))   # the next batch ends the loop
    ctl._run_call = run_call
    ctl.events.put(("results", ["b3 down"]))
    ctl.events.put(("call", "status"))
    ctl.run()
    assert done == ["result b3 down", "rebuild", "call status"]
    # A stop in the same batch still answers the commands that came before it.
    done.clear()
    ctl._run_call = lambda call: done.append(f"call {call}")
    for event in (("call", "stats"), ("signal", signal.SIGTERM), ("call", "late")):
        ctl.events.put(event)
    ctl.run()
    assert done == ["call stats"]
