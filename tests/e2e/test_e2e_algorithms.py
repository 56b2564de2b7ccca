"""Every algorithm with real connections through `fastlb attach` in a namespace lab."""

from __future__ import annotations

import json
import subprocess
from collections import Counter

import pytest

from fastlb.lab.clients import tcp_requests, udp_by_source
from fastlb.lab.topology import Lab
from helpers.e2e import attached, run_fastlb

pytestmark = [pytest.mark.root, pytest.mark.netns]


@pytest.fixture(scope="module")
def lab():
    with Lab(backends=3) as lab:
        yield lab


def shares(counts: Counter) -> dict[str, float]:
    total = sum(counts.values())
    return {k: 100.0 * v / total for k, v in counts.items()}


def test_wrr_spreads_600_connections_by_weight(lab, tmp_path):
    text = lab.config_text(vips=[lab.vip4], algorithm="wrr", weights={"b1": 3, "b2": 2, "b3": 1})
    with attached(lab, tmp_path, text):
        counts = tcp_requests(lab, count=600)
    got = shares(counts)
    for name, want in (("b1", 50.0), ("b2", 33.3), ("b3", 16.7)):
        assert abs(got.get(name, 0.0) - want) <= 5.0, got


def test_rr_gives_each_backend_a_third(lab, tmp_path):
    text = lab.config_text(vips=[lab.vip4], algorithm="rr", weights={"b1": 3, "b2": 2, "b3": 1})
    with attached(lab, tmp_path, text):
        counts = tcp_requests(lab, count=600)
    for name, share in shares(counts).items():
        assert abs(share - 33.3) <= 5.0, counts
    assert len(counts) == 3


def test_source_hash_keeps_one_client_on_one_backend(lab, tmp_path):
    text = lab.config_text(vips=[lab.vip4]).replace('forwarding = "dsr"', 'forwarding = "dsr"\nhash = "src"')
    with attached(lab, tmp_path, text):
        counts = tcp_requests(lab, count=50)
    assert len(counts) == 1 and sum(counts.values()) == 50


def udp_backends(lab) -> dict[int, str]:
    by_source = udp_by_source(lab, port=lab.udp_port, count=40, sources=40, first_port=42000)
    assert len(by_source) == 40
    out = {}
    for port, counts in by_source.items():
        assert len(counts) == 1
        out[port] = next(iter(counts))
    return out


def explained(lab, config_path, port) -> str:
    res = run_fastlb(lab, "lb", "explain", "-c", str(config_path), "--vip", f"{lab.vip4}:{lab.udp_port}/udp",
                     "--src", f"{lab.addr('client')}:{port}", "--json", check=True)
    address = json.loads(res.stdout)["backend"]
    return next(b for b in lab.backend_names if lab.addr(b) == address)


def test_maglev_is_the_same_across_reattach_and_across_boxes(lab, tmp_path):
    text = lab.config_text(vips=[lab.vip4])
    with attached(lab, tmp_path, text) as path:
        first = udp_backends(lab)
        sample = sorted(first)[::8]
        assert {p: explained(lab, path, p) for p in sample} == {p: first[p] for p in sample}
    assert set(first.values()) == set(lab.backend_names)
    with attached(lab, tmp_path, text):
        assert udp_backends(lab) == first, "a re-attach moved flows"
    with Lab(backends=3) as other, attached(other, tmp_path, other.config_text(vips=[other.vip4]), name="b.toml"):
        assert udp_backends(other) == first, "a second box with the same config disagrees"


def established_per_backend(lab) -> dict[str, int]:
    out = {}
    for b in lab.backend_names:
        res = lab.run(b, ["ss", "-Htn", "state", "established", "( sport = :80 )"])
        out[b] = len([ln for ln in res.stdout.splitlines() if ln.strip()])
    return out


def test_lc_sends_new_connections_past_a_loaded_backend(lab, tmp_path):
    only_b1 = lab.config_text(vips=[lab.vip4], algorithm="lc", weights={"b1": 1, "b2": 0, "b3": 0})
    holder = None
    with attached(lab, tmp_path, only_b1, "--keep", name="b1.toml"):
        holder = lab.exec_python("client", "fastlb.lab.client_worker", "hold", "--host", lab.vip4, "--port", 80,
                                 "--count", 30, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert json.loads(holder.stdout.readline()) == {"held": 30}
    try:
        assert established_per_backend(lab)["b1"] == 30
        everyone = lab.config_text(vips=[lab.vip4], algorithm="lc")
        with attached(lab, tmp_path, everyone, name="all.toml") as path:
            res = run_fastlb(lab, "lb", "explain", "-c", str(path), "--vip", f"{lab.vip4}:80/tcp",
                             "--src", f"{lab.addr('client')}:1234", "--json", check=True)
            live = {c["backend"]: c["active"] for c in json.loads(res.stdout)["candidates"]}
            assert live.get(lab.addr("b1"), 30) == 30, live  # the kernel's count survived the re-attach
            counts = tcp_requests(lab, count=20)
    finally:
        holder.stdin.close()
        holder.wait(timeout=10)
    assert sum(counts.values()) == 20
    assert "b1" not in counts and set(counts) == {"b2", "b3"}, counts
