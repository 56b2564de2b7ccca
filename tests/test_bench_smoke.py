"""The benchmarks in smoke mode, so they cannot rot. Timings are never asserted."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.root


def test_bench_quick_writes_every_section(tmp_path):
    out = tmp_path / "BENCHMARKS.md"
    res = subprocess.run([sys.executable, str(ROOT / "bench" / "run.py"), "--quick", "--out", str(out)],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    text = out.read_text()
    assert "## Per-packet cost" in text
    assert "fastlb DSR, established flow | IPv6 UDP" in text
    assert "fastlb tunnel, new flow each packet | IPv6 TCP" in text
    assert "fastlb NAT, established flow | IPv4 TCP" in text
    assert "## Machine" in text
