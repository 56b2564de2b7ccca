"""The shipped Grafana dashboard (docs/grafana/fastlb.json) asks only for series
fastlb exports (fastlb/controller/metrics.py), with labels those series have, and covers
what an operator watches: packets, bytes, new flows, active connections,
health, probe latency and drops by reason. tests/e2e/test_e2e_prometheus.py runs
every query against a real Prometheus scraping a running fastlb."""

from __future__ import annotations

import json
import re
from pathlib import Path

from fastlb.controller.metrics import StatsCollector

DASHBOARD = Path(__file__).resolve().parents[2] / "docs" / "grafana" / "fastlb.json"
METRIC = re.compile(r"\bfastlb_[a-z0-9_]+")
# label names in `by (...)`, `without (...)` and `{name="..."}` selectors
GROUPING = re.compile(r"\b(?:by|without)\s*\(([^)]*)\)")
MATCHER = re.compile(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)\s*\"")
LEGEND = re.compile(r"\{\{\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*\}\}")

# A source with one of everything the collector can export.
SOURCE = {
    "interface": "eth0",
    "vips": [{"vip": "198.19.0.100:80/tcp", "packets": 10, "bytes": 1000, "new_flows": 2, "active": 1,
              "healthy_backends": 1,
              "backends": [{"backend": "198.18.0.11:80", "packets": 10, "bytes": 1000, "new_flows": 2, "active": 1,
                            "health": "up", "weight": 1, "in_table": True, "latency_ms": 0.5,
                            "checks_passed": 3, "checks_failed": 1}]}],
    "reasons": {"tx_dsr": {"verdict": "tx", "packets": 10, "bytes": 1000},
                "drop_no_backend": {"verdict": "drop", "packets": 1, "bytes": 60}},
    "conntrack": {"size": 65536, "entries": 1},
    "reloads": {"ok": 1},
}


def exported() -> dict[str, set[str]]:
    """Every sample name fastlb exports -> its label names."""
    out: dict[str, set[str]] = {}
    for family in StatsCollector(lambda: SOURCE).collect():
        for sample in family.samples:
            out.setdefault(sample.name, set()).update(sample.labels)
    return out


def targets() -> list[dict]:
    dash = json.loads(DASHBOARD.read_text())
    return [t for panel in dash["panels"] for t in panel.get("targets", [])]


def test_the_dashboard_is_valid_json_with_a_prometheus_target_in_every_panel():
    dash = json.loads(DASHBOARD.read_text())
    assert dash["panels"]
    for panel in dash["panels"]:
        assert panel["targets"], panel["title"]
        for t in panel["targets"]:
            assert t["expr"].strip(), panel["title"]


def test_every_metric_the_dashboard_queries_is_exported():
    names = exported()
    for t in targets():
        used = METRIC.findall(t["expr"])
        assert used, f"no fastlb metric in {t['expr']!r}"
        for name in used:
            assert name in names, f"{t['expr']!r} asks for {name}, which fastlb/controller/metrics.py does not export"


def test_every_label_the_dashboard_uses_is_a_label_of_its_metrics():
    names = exported()
    for t in targets():
        labels = set().union(*(names[n] for n in METRIC.findall(t["expr"])))
        used = {x.strip() for group in GROUPING.findall(t["expr"]) for x in group.split(",") if x.strip()}
        used |= set(MATCHER.findall(t["expr"]))
        used |= set(LEGEND.findall(t.get("legendFormat", "")))
        assert used <= labels, f"{t['expr']!r} uses labels {sorted(used - labels)} its metrics lack"


def test_the_dashboard_covers_what_an_operator_watches():
    queried = {n for t in targets() for n in METRIC.findall(t["expr"])}
    for name in ("fastlb_vip_packets_total", "fastlb_vip_bytes_total", "fastlb_backend_packets_total",
                 "fastlb_backend_bytes_total", "fastlb_vip_new_flows_total", "fastlb_backend_new_flows_total",
                 "fastlb_vip_active_connections", "fastlb_backend_active_connections",
                 "fastlb_vip_healthy_backends", "fastlb_backend_up", "fastlb_backend_probe_latency_seconds",
                 "fastlb_packets_total"):
        assert name in queried, f"the dashboard has no panel for {name}"
    assert any('verdict="drop"' in t["expr"] and "reason" in t["expr"] for t in targets()), "no drops-by-reason panel"


def test_the_checker_catches_a_renamed_metric():
    # The test above must be able to fail: a name fastlb does not export is caught.
    assert "fastlb_vip_packets" not in exported()          # counters carry _total
    assert "fastlb_vip_packets_total" in exported()
