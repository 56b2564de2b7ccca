"""Prometheus for real: Debian's prometheus, with a config and data folder of
this test's own, runs in the lab's LB namespace (listening on 127.0.0.1 there)
and scrapes a running `fastlb attach`. Every query of the shipped Grafana
dashboard (docs/grafana/fastlb.json) is then asked through Prometheus' HTTP
API, and each must return data."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fastlb.lab import clients
from fastlb.lab.topology import HEALTH_HTTP, Lab, python_argv, python_env

pytestmark = [pytest.mark.root, pytest.mark.netns]

DASHBOARD = Path(__file__).resolve().parents[2] / "docs" / "grafana" / "fastlb.json"
METRICS = "127.0.0.1:19469"
PROMETHEUS = "127.0.0.1:19090"
SCRAPE_S = 1
QUERY = """
import json, sys, urllib.parse, urllib.request
url = "http://%s/api/v1/query?" + urllib.parse.urlencode({"query": sys.argv[1]})
print(json.dumps(json.load(urllib.request.urlopen(url, timeout=5))))
""" % PROMETHEUS


def query(lab: Lab, expr: str) -> list[dict]:
    res = lab.run("lb", [sys.executable, "-c", QUERY, expr], timeout=20)
    body = json.loads(res.stdout)
    assert body["status"] == "success", body
    return body["data"]["result"]


def wait_for(what: str, predicate, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.5)


@pytest.fixture(scope="module")
def scraped(tmp_path_factory):
    """A lab balancing two VIP services with health checks, fastlb serving metrics,
    Prometheus scraping it every second; traffic sent; yields the lab."""
    prometheus = shutil.which("prometheus")
    assert prometheus, "Debian's prometheus is missing; sudo make setup installs it"
    folder = tmp_path_factory.mktemp("prometheus")
    (folder / "prometheus.yml").write_text(
        "global:\n"
        f"  scrape_interval: {SCRAPE_S}s\n"
        f"  evaluation_interval: {SCRAPE_S}s\n"
        "scrape_configs:\n"
        "  - job_name: fastlb\n"
        f"    static_configs: [{{targets: ['{METRICS}']}}]\n")
    with Lab(backends=2, ipv6=False) as lab:
        config = lab.write_config(folder / "fastlb.toml", health=HEALTH_HTTP)
        fastlb = lab.exec("lb", python_argv("fastlb.cli", "attach", lab.lb_iface, "-c", config, "--metrics", METRICS),
                          env=python_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        prom = None
        try:
            line = fastlb.stdout.readline()
            assert "attached to" in line, f"fastlb attach failed: {line} {fastlb.stderr.read() if fastlb.poll() else ''}"
            prom = lab.exec("lb", [prometheus, f"--config.file={folder / 'prometheus.yml'}",
                                   f"--storage.tsdb.path={folder / 'data'}", f"--web.listen-address={PROMETHEUS}",
                                   "--storage.tsdb.retention.time=1h"],
                            stdout=subprocess.DEVNULL, stderr=open(folder / "prometheus.log", "w"))
            wait_for("Prometheus to scrape fastlb",
                     lambda: prom.poll() is None and _answers(lab) and query(lab, 'up{job="fastlb"} == 1'))
            # Both backends up before the traffic, so that every backend series moves.
            wait_for("both backends up", lambda: len(query(lab, "fastlb_backend_up == 1")) == 4)
            assert len(clients.tcp_requests(lab, count=100)) == 2
            assert len(clients.udp_requests(lab, count=100)) == 2
            # rate(...[1m]) needs two samples after the traffic.
            time.sleep(3 * SCRAPE_S)
            yield lab
        finally:
            if prom is not None:
                prom.terminate()
                prom.wait(timeout=30)
            fastlb.terminate()
            _, err = fastlb.communicate(timeout=30)
            assert fastlb.returncode == 0, err


def _answers(lab: Lab) -> bool:
    try:
        query(lab, "vector(1)")
        return True
    except Exception:  # noqa: BLE001 - not listening yet
        return False


def dashboard_queries() -> list[tuple[str, str]]:
    dash = json.loads(DASHBOARD.read_text())
    return [(p["title"], t["expr"]) for p in dash["panels"] for t in p["targets"]]


@pytest.mark.parametrize("title,expr", dashboard_queries(), ids=[t for t, _ in dashboard_queries()])
def test_every_dashboard_query_returns_data_from_a_real_prometheus(scraped, title, expr):
    result = query(scraped, expr)
    assert result, f"panel {title!r}: {expr} returned no data"


def test_the_traffic_is_in_prometheus(scraped):
    # Not only present: the scraped counters moved with the 200 requests sent.
    packets = query(scraped, "sum(fastlb_vip_packets_total)")
    assert float(packets[0]["value"][1]) >= 200
    flows = query(scraped, "fastlb_backend_new_flows_total > 0")
    assert len(flows) == 4, flows       # 2 VIP services x 2 backends
