"""Real TCP and UDP through `fastlb attach` in a namespace lab.

A client, the LB and three backends share one L2 segment (fastlb.lab). The
LB runs the real CLI, started with ``ip netns exec`` as a user would, and the
backends run real HTTP and UDP servers that answer with their own names.
Everything is removed at the end, also when a test fails.
"""

from __future__ import annotations

import signal
import time

import pytest

from fastlb.lab.clients import tcp_requests, udp_by_source, udp_requests
from fastlb.lab.topology import Lab
from helpers.e2e import CONNECTIONS, Attached, lb_xdp_prog_id, run_fastlb, status

pytestmark = [pytest.mark.root, pytest.mark.netns]


@pytest.fixture(scope="module")
def lab():
    # static_neighbours=False: fastlb must resolve the backends' MACs itself.
    with Lab(backends=3, static_neighbours=False) as lab:
        yield lab


@pytest.fixture(scope="class")
def balancing(lab, tmp_path_factory):
    config = lab.write_config(tmp_path_factory.mktemp("cfg") / "fastlb.toml")
    attached = Attached(lab, config)
    yield attached
    code, out, err = attached.stop()
    assert code == 0, err
    assert "detached from eth0" in out


class TestBalancing:
    """Traffic through one attachment, kept for the whole class."""

    @pytest.mark.parametrize("family", [4, 6])
    def test_tcp_connections_all_succeed_and_reach_every_backend(self, lab, balancing, family):
        counts = tcp_requests(lab, family=family, count=CONNECTIONS)
        assert sum(counts.values()) == CONNECTIONS
        assert set(counts) == set(lab.backend_names), counts

    @pytest.mark.parametrize("family", [4, 6])
    def test_udp_exchanges_all_succeed_and_reach_every_backend(self, lab, balancing, family):
        counts = udp_requests(lab, port=lab.udp_port, family=family, count=CONNECTIONS)
        assert sum(counts.values()) == CONNECTIONS
        assert set(counts) == set(lab.backend_names), counts

    def test_a_udp_flow_stays_on_one_backend(self, lab, balancing):
        by_source = udp_by_source(lab, port=lab.udp_port, count=60, sources=6)
        for port, counts in by_source.items():
            assert len(counts) == 1, f"source port {port} reached {dict(counts)}"

    def test_status_sees_the_attachment_from_another_ip_netns_exec(self, lab, balancing):
        before = status(lab)
        tcp_requests(lab, count=20)
        after = status(lab)
        assert len(after) == 1 and after[0]["attached"] and after[0]["interface"] == "eth0"
        vips = {v["vip"]: v for v in after[0]["vips"]}
        assert set(vips) == {f"{lab.vip4}:80/tcp", f"{lab.vip4}:9000/udp",
                             f"[{lab.vip6}]:80/tcp", f"[{lab.vip6}]:9000/udp"}
        old = {v["vip"]: v for v in before[0]["vips"]}
        key = f"{lab.vip4}:80/tcp"
        assert vips[key]["new_flows"] - old[key]["new_flows"] == 20
        assert after[0]["reasons"]["tx_dsr"]["packets"] > before[0]["reasons"]["tx_dsr"]["packets"]
        assert after[0]["verdicts"]["pass"] > 0  # ARP/ND and the LB's own traffic passed


def test_bad_config_attaches_nothing(lab, tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text(lab.config_text().replace("weight = 1", "weight = -1", 1))
    res = run_fastlb(lab, "lb", "attach", "eth0", "-c", str(bad))
    assert res.returncode != 0
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "weight" in lines[0] and "bad.toml:" in lines[0], res.stderr


def test_missing_interface_is_one_clear_error(lab, tmp_path):
    cfg = lab.write_config(tmp_path / "ok.toml")
    res = run_fastlb(lab, "lb", "attach", "nosuch0", "-c", str(cfg))
    assert res.returncode != 0
    assert res.stderr.count("\n") == 1 and "nosuch0" in res.stderr and "does not exist" in res.stderr


def test_refuses_to_replace_a_program_it_did_not_attach(lab, tmp_path):
    """The lab's own XDP_PASS program sits on the LB's switch port."""
    cfg = lab.write_config(tmp_path / "ok.toml")
    port = lab.switch_port("lb")
    foreign = lb_xdp_prog_id(lab, port, role="switch")
    assert foreign
    res = run_fastlb(lab, "switch", "attach", port, "-c", str(cfg))
    assert res.returncode != 0
    assert "fastlb did not attach" in res.stderr
    assert lb_xdp_prog_id(lab, port, role="switch") == foreign
    assert "not attached" in run_fastlb(lab, "switch", "status").stdout


def test_keep_leaves_the_data_plane_and_detach_removes_it(lab, tmp_path):
    cfg = lab.write_config(tmp_path / "keep.toml")
    attached = Attached(lab, cfg, "--keep")
    try:
        code, out, _ = attached.stop()
        assert code == 0 and "--keep" in out
        assert lb_xdp_prog_id(lab)
        counts = tcp_requests(lab, count=30)
        assert sum(counts.values()) == 30
        assert status(lab)[0]["attached"]
    finally:
        res = run_fastlb(lab, "lb", "detach", "eth0")
    assert res.returncode == 0, res.stderr
    assert lb_xdp_prog_id(lab) == 0
    assert status(lab) == []
    again = run_fastlb(lab, "lb", "detach", "eth0")
    assert again.returncode != 0 and "not attached" in again.stderr


def test_ctrl_c_detaches_and_leaves_no_pins(lab, tmp_path):
    cfg = lab.write_config(tmp_path / "int.toml")
    attached = Attached(lab, cfg)
    attached.proc.send_signal(signal.SIGINT)
    code, out, err = attached.stop()
    assert code == 0, err
    assert lb_xdp_prog_id(lab) == 0
    assert status(lab) == []
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:  # the VIP no longer answers: nothing forwards it
        try:
            tcp_requests(lab, count=1, timeout=0.5)
        except Exception:
            break
        time.sleep(0.2)
    else:
        pytest.fail("the VIP still answers after detach")
