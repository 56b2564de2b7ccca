"""The benchmarks in smoke mode, so they cannot rot. Timings are never asserted."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.root, pytest.mark.slow]  # 2-4 min: make test-slow


def test_bench_quick_writes_every_section(tmp_path):
    out = tmp_path / "BENCHMARKS.md"
    res = subprocess.run([sys.executable, str(ROOT / "bench" / "run.py"), "--quick", "--out", str(out)],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    text = out.read_text()
    assert "## Per-packet cost" in text
    assert "fastlb DSR, established flow | IPv6 UDP" in text
    assert "fastlb tunnel, new flow each packet | IPv6 TCP" in text
    assert "fastlb NAT, established flow | IPv4 TCP" in text
    assert "floor: VIP packets to one backend's MAC" in text
    for algorithm in ("maglev", "lc"):
        for what in ("SYN", "ACK"):
            assert f"fastlb DSR {algorithm}, new flow each packet, {what} | IPv4 TCP" in text
    assert "## Controller cost: CPU and memory under conntrack load" in text
    assert "| 1,000 | 1,000 |" in text
    assert "## Machine" in text
    assert "## Packet rate through a veth lab: fastlb against nftables" in text
    assert "| nftables DNAT numgen | 64,512 |" in text
    assert "| fastlb DSR (XDP_TX) | 1,000 |" in text
    assert "| floor: bench/xdp_floor.c (XDP_TX to one sink) | 64,512 |" in text
    assert "Goal (issue 14): fastlb's share ≤ 1.1× the floor's" in text
    assert "## End-to-end TCP with wrk" in text
    for path in ("direct to one backend", "HAProxy mode tcp", "nginx stream", "fastlb DSR", "fastlb NAT",
                 "fastlb tunnel"):
        for mode in ("keepalive", "close"):
            assert f"| {path} | {mode} |" in text
    assert "## End to end against the lab's floor" in text
    for path in ("direct to the backend", "floor (bench/xdp_floor.c)", "fastlb, controller running",
                 "fastlb, controller stopped (--keep)"):
        for mode in ("keepalive", "close"):
            assert f"| {path} | {mode} |" in text
    assert "Goals (issue 14), fastlb with its controller, by req/s in both wrk modes" in text
    assert "The controller's own CPU during its fastlb runs" in text
    assert "## The L7 tier against the same HAProxy configured by hand" in text
    for path in ("hand HAProxy (mode http)", "fastlb http VIP, rr", "fastlb http VIP, lrt"):
        for mode in ("keepalive", "close"):
            assert f"| {path} | {mode} |" in text
    assert "## Control plane" in text
    assert "### Health failure to the maps" in text
    assert "| fastlb attach |" in text
    assert "### Ring slots written per single-backend change" in text
    assert "## Scaling: VIPs, backends and conntrack entries" in text
    for dim in ("VIPs", "backends of the VIP", "conntrack entries"):
        assert f"### As {dim} grow" in text
        assert f"![fastlb as {dim} grow](" in text
    assert "## Health checks at scale" in text
    assert "| `tcp` | 1,000 | 1 s |" in text
