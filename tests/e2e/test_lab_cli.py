"""``fastlb lab``: up/down/status/traffic, the demo, and the line-rate generator.

The root tests run the real command line (``python -m fastlb.cli lab ...``)
the way a user would, and check what is left on the host afterwards:
namespaces, links, XDP programs, state files, run folders, processes, pins.
The line-rate tests count every burst three times, independently: the
generator's own counter, the kernel's counters on the client's and the
backends' ``eth0``, and fastlb's per-backend counters. Everything is removed
at the end, also when a test fails.
"""

from __future__ import annotations

import json
import os
import re
import select
import signal
import struct
import subprocess
import sys
import time

import pytest
from click.testing import CliRunner

from fastlb.cli import main
from fastlb.lab import Lab, LabError, cleanup_stale, lb_process, linerate, netns, runs, tcp_requests
from fastlb.lab.topology import python_env

XDP_REDIRECT, XDP_ABORTED = 4, 0


def fastlb(*args: object, cwd=None, timeout: float = 120) -> subprocess.CompletedProcess:
    """The fastlb command line, run as a user would (this interpreter, the source tree)."""
    return subprocess.run([sys.executable, "-m", "fastlb.cli", *map(str, args)], capture_output=True,
                          text=True, env=python_env(), cwd=cwd, timeout=timeout)


def host_links() -> set[str]:
    out = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True, check=True).stdout
    return {line.split(":")[1].strip().split("@")[0] for line in out.splitlines()}


def host_xdp_links() -> list[str]:
    out = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True, check=True).stdout
    return [line for line in out.splitlines() if " xdp" in line]


def runid_of(output: str) -> str:
    match = re.search(r"lab ([0-9a-f]{6}) is up", output)
    assert match, output
    return match[1]


def assert_lab_gone(runid: str) -> None:
    assert not [n for n in netns.list_namespaces() if n.startswith(f"flb-{runid}-")]
    assert not (netns.STATE_DIR / f"{runid}.json").exists()
    assert not (netns.STATE_DIR / runid).exists()


def wait_gone(pid: int, start_time: int, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while netns.process_start_time(pid) == start_time and time.monotonic() < deadline:
        time.sleep(0.05)
    return netns.process_start_time(pid) != start_time


# ---- no root needed --------------------------------------------------------------------


@pytest.fixture
def not_root(monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)


def test_lab_is_a_fastlb_command():
    res = CliRunner().invoke(main, ["lab", "--help"])
    assert res.exit_code == 0
    for command in ("up", "down", "status", "traffic", "demo"):
        assert f"  {command} " in res.output


def test_algorithm_and_forwarding_follow_the_config_and_what_the_lab_hosts(not_root):
    res = CliRunner().invoke(main, ["lab", "up", "--algorithm", "fastest"])
    assert res.exit_code == 2 and "unknown algorithm 'fastest'" in res.output and "maglev" in res.output
    res = CliRunner().invoke(main, ["lab", "up", "--forwarding", "nat"])
    assert res.exit_code == 2 and "'nat' works in fastlb, but the lab cannot host it" in res.output
    # accepted: parsing passes and the root check is what stops it
    res = CliRunner().invoke(main, ["lab", "up", "--algorithm", "wrr"])
    assert res.exit_code == 1 and "needs root" in res.output and "sudo fastlb lab up" in res.output


@pytest.mark.parametrize("args", [["traffic", "--flows", "10"], ["traffic", "--packets", "5"],
                                  ["down", "abc123", "--all"], ["up", "--backends", "0"],
                                  ["traffic", "--line-rate", "--seconds", "0"], ["traffic", "--scapy"],
                                  ["traffic", "--line-rate", "--rate", "100"],
                                  ["traffic", "--line-rate", "--scapy", "--rate", "0"]])
def test_bad_usage_is_refused_before_anything_runs(args, not_root):
    res = CliRunner().invoke(main, ["lab", *args])
    assert res.exit_code == 2, res.output


@pytest.mark.parametrize("src, dst, length, offset", [
    ("198.18.0.1", "198.19.0.100", 64, 34),
    ("2001:db8::1", "2001:db8:ffff::100", 66, 54),
])
def test_template_frames(src, dst, length, offset):
    from scapy.layers.inet import UDP
    from scapy.layers.l2 import Ether

    frame, udp_offset = linerate.build_frame("02:00:c6:12:00:01", "02:00:c6:12:00:02", src, dst, 9000)
    assert (len(frame), udp_offset) == (length, offset)
    pkt = Ether(frame)
    assert (pkt[UDP].sport, pkt[UDP].dport, pkt.dst) == (linerate.BASE_PORT, 9000, "02:00:c6:12:00:02")
    assert frame[udp_offset:udp_offset + 2] == struct.pack("!H", linerate.BASE_PORT)


@pytest.mark.parametrize("flows, seconds, packets", [(0, 1, None), (linerate.MAX_FLOWS + 1, 1, None),
                                                     (10, 0, None), (10, 31, None), (10, 1, 0)])
def test_a_burst_must_be_bounded(flows, seconds, packets):
    with pytest.raises(LabError, match="out of range"):
        linerate.check_bounds(flows, seconds, packets)


@pytest.mark.parametrize("rate", [0, linerate.MAX_RATE + 1])
def test_a_scapy_burst_must_have_a_rate_it_can_keep(rate):
    linerate.check_bounds(10, 1, None, None)   # live frames: no rate
    with pytest.raises(LabError, match=f"rate={rate} is out of range"):
        linerate.check_bounds(10, 1, None, rate)


def test_the_scapy_frames_are_the_flows_of_the_template():
    from scapy.layers.inet import UDP
    from scapy.layers.l2 import Ether

    frames = linerate.scapy_frames("02:00:c6:12:00:01", "02:00:c6:12:00:02", "198.18.0.1", "198.19.0.100", 9000, 3)
    template, udp_offset = linerate.build_frame("02:00:c6:12:00:01", "02:00:c6:12:00:02", "198.18.0.1",
                                                "198.19.0.100", 9000)
    assert frames[0] == template
    assert [Ether(f)[UDP].sport for f in frames] == [linerate.BASE_PORT + f for f in range(3)]
    for f in frames:  # scapy computed each one's checksum
        pkt = Ether(f)
        sent_sum = pkt[UDP].chksum
        del pkt[UDP].chksum
        assert Ether(bytes(pkt))[UDP].chksum == sent_sum


# ---- lab up / down / status / traffic ------------------------------------------------


@pytest.mark.root
@pytest.mark.netns
def test_up_then_down_leaves_nothing_behind():
    links_before = host_links()
    up = fastlb("lab", "up", "--backends", "2")
    assert up.returncode == 0, up.stderr
    runid = runid_of(up.stdout)
    try:
        assert f"ip netns exec flb-{runid}-client curl http://198.19.0.100/" in up.stdout
        state = netns.read_state(runid)
        assert state.persistent and not state.owner_alive() and not state.stale
        run = runs.find(runid)
        bal = run.balancer
        assert bal.alive(), "fastlb attach should outlive lab up"
        pin_dir = re.search(r"pins: (\S+)", bal.banner)[1]
        assert os.path.isdir(pin_dir)
        lab = Lab.existing(runid)
        for family in (4, 6):  # real connections through fastlb
            counts = tcp_requests(lab, family=family, count=40)
            assert sum(counts.values()) == 40 and set(counts) == {"b1", "b2"}, counts
        listed = json.loads(fastlb("lab", "status", "--json").stdout)
        mine = next(d for d in listed if d["runid"] == runid)
        assert (mine["kind"], mine["fastlb_running"], mine["backends"]) == ("lab up", True, 2)
        traffic = fastlb("lab", "traffic", "--lab", runid, "--connections", "30")
        assert traffic.returncode == 0, traffic.stdout + traffic.stderr
        assert "all answered" in " ".join(traffic.stdout.split())  # rich wraps at the terminal width
        assert host_links() == links_before
    finally:
        down = fastlb("lab", "down", runid)
    assert down.returncode == 0, down.stderr
    assert f"removed lab {runid}" in down.stdout
    assert_lab_gone(runid)
    assert wait_gone(bal.pid, bal.start_time), "fastlb attach survived lab down"
    assert not os.path.exists(pin_dir), "fastlb's pins were left behind"
    assert host_links() == links_before
    assert not host_xdp_links()
    assert runid not in fastlb("lab", "status").stdout
    again = fastlb("lab", "down", runid)
    assert again.returncode != 0 and f"no lab {runid}" in again.stderr


CRASHING_LAB = """
import json, time
from fastlb.lab import Lab
lab = Lab(backends=1, ipv6=False).up()
print(json.dumps({"runid": lab.runid, "namespaces": lab.namespaces}), flush=True)
time.sleep(120)
"""


@pytest.mark.root
@pytest.mark.netns
def test_a_lab_up_lab_survives_cleanup_stale_and_a_crashed_lab_does_not():
    up = fastlb("lab", "up", "--backends", "1", "--no-ipv6")
    assert up.returncode == 0, up.stderr
    runid = runid_of(up.stdout)
    child = subprocess.Popen([sys.executable, "-c", CRASHING_LAB], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=python_env())
    try:
        ready, _, _ = select.select([child.stdout], [], [], 60)
        assert ready, "the child lab did not come up"
        crashed = json.loads(child.stdout.readline())
        # a lab that a running process owns is not lab down's to remove
        refused = fastlb("lab", "down", crashed["runid"])
        assert refused.returncode != 0 and "belongs to process" in refused.stderr
        child.send_signal(signal.SIGKILL)
        child.wait(10)
        removed = cleanup_stale()
        assert set(crashed["namespaces"]) <= set(removed)
        assert_lab_gone(crashed["runid"])
        persistent = Lab.existing(runid)
        assert not set(persistent.namespaces) & set(removed)
        assert runs.find(runid).balancer.alive()
        assert tcp_requests(persistent, count=5) == {"b1": 5}  # through fastlb, still attached
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        cleanup_stale()
        down = fastlb("lab", "down", runid)
    assert down.returncode == 0, down.stderr
    assert_lab_gone(runid)


# ---- the demo --------------------------------------------------------------------------


@pytest.mark.root
@pytest.mark.netns
def test_demo_quick_runs_to_completion_writes_the_chart_and_leaves_nothing(tmp_path):
    links_before = host_links()
    res = fastlb("lab", "demo", "--quick", cwd=tmp_path, timeout=90)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr
    out = " ".join(res.stdout.split())  # rich wraps lines at the terminal width
    runid = runid_of(out)
    assert re.search(r"b3's servers are stopped; fastlb's health checks .* took it out after [0-9.]+ s", out)
    assert "no new connection reached b3" in out
    assert "Line-rate burst" in out
    elapsed = float(re.search(r"demo finished in ([0-9.]+) s", out)[1])
    assert elapsed <= 30, f"the quick demo took {elapsed} s"
    png = (tmp_path / "fastlb-demo.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack("!II", png[16:24])
    assert width >= 800 and height >= 400 and len(png) > 20_000
    assert_lab_gone(runid)
    assert host_links() == links_before
    assert not host_xdp_links()


# ---- the line-rate generator -----------------------------------------------------------


@pytest.fixture(scope="module")
def attached():
    """A lab with fastlb attached (maglev over 3 backends), for the bursts."""
    with Lab(backends=3, run_dir=True) as lab:
        bal = lb_process.start(lab, lab.write_config(lab.run_dir / "fastlb.toml"), lab.run_dir / "fastlb.log")
        try:
            yield lab
        finally:
            lb_process.stop(lab, bal)


@pytest.mark.root
@pytest.mark.netns
def test_line_rate_sends_what_it_says_as_counted_at_the_receivers(attached):
    r = linerate.line_rate(attached, flows=500, seconds=1.0)
    assert r.sent > 10_000 and r.sent == r.requested, "the program redirects every frame it is given"
    assert 1.0 <= r.seconds < 2.0
    # the kernel's counter on the client's eth0 agrees with the program's (plus ARP and the like)
    assert r.sent <= r.client_tx + r.client_tx_dropped <= r.sent + 1000
    assert 0 < r.total_forwarded <= r.sent
    assert all(r.forwarded[b] > 0 for b in attached.backend_names), r.forwarded  # 500 flows spread
    assert r.total_received >= 0.95 * r.total_forwarded, (r.forwarded, r.received)
    assert r.mpps > 0


@pytest.mark.root
@pytest.mark.netns
def test_a_scapy_burst_is_counted_whole_by_fastlb_and_the_backends(attached):
    r = linerate.line_rate(attached, flows=64, seconds=10, packets=2000, scapy=True, rate=2000)
    assert r.generator == "scapy" and r.sent == r.requested == 2000
    assert 0.9 <= r.seconds < 5, "paced at 2,000 a second, and ended by the packet cap"
    assert r.sent <= r.client_tx + r.client_tx_dropped <= r.sent + 100 and r.client_tx_dropped == 0
    # at this rate nothing is lost on the way: fastlb forwarded every frame, and each
    # backend's eth0 took at least what fastlb sent it (plus ARP and the like)
    assert r.total_forwarded == r.sent, r.forwarded
    assert all(0 < r.forwarded[b] <= r.received[b] for b in attached.backend_names), (r.forwarded, r.received)


def udp_counters(lab: Lab, backend: str, family: int) -> dict[str, int]:
    """The backend's UDP MIB: InDatagrams, InErrors, InCsumErrors, ... (per namespace)."""
    if family == 4:
        rows = [line.split() for line in lab.run(backend, ["cat", "/proc/net/snmp"]).stdout.splitlines()
                if line.startswith("Udp:")]
        return dict(zip(rows[0][1:], map(int, rows[1][1:])))
    pairs = (line.split() for line in lab.run(backend, ["cat", "/proc/net/snmp6"]).stdout.splitlines())
    return {k.removeprefix("Udp6"): int(v) for k, v in pairs if k.startswith("Udp6")}


@pytest.mark.root
@pytest.mark.netns
@pytest.mark.parametrize("family", [4, 6])
def test_a_packet_capped_burst_arrives_as_valid_udp(attached, family):
    before = {b: udp_counters(attached, b, family) for b in attached.backend_names}
    r = linerate.line_rate(attached, family=family, flows=64, seconds=10, packets=20_000)
    after = {b: udp_counters(attached, b, family) for b in attached.backend_names}
    assert r.sent == r.requested == 20_000
    assert r.seconds < 5, "the packet cap, not the time limit, should end it"
    assert 0 < r.total_forwarded <= r.sent
    for b in attached.backend_names:
        delta = {k: after[b][k] - before[b][k] for k in after[b]}
        assert delta["InCsumErrors"] == 0, f"{b}: per-flow checksum update is wrong"
        # every datagram fastlb sent here reached the UDP socket layer (delivered, or the
        # slow echo server's buffer was full)
        assert delta["InDatagrams"] + delta["InErrors"] >= 0.95 * r.forwarded[b], (b, delta, r.forwarded)


@pytest.mark.root
@pytest.mark.parametrize("src, dst", [("198.18.0.1", "198.19.0.100"), ("2001:db8::1", "2001:db8:ffff::100")])
def test_the_generator_rewrites_every_frame_and_keeps_the_checksum_valid(src, dst):
    """Through BPF_PROG_TEST_RUN without live frames: the output is what a burst would send."""
    from scapy.layers.inet import UDP
    from scapy.layers.l2 import Ether

    frame, udp_offset = linerate.build_frame("02:00:c6:12:00:01", "02:00:c6:12:00:02", src, dst, 9000)
    cpus = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(cpus)})  # one CPU: one per-CPU sequence
    try:
        with linerate.Generator(frame, udp_offset, ifindex=1, flows=3) as gen:
            ports = []
            for garbage in (b"\xff", b"\x00", b"\x5a", b"\xff", b"\x00"):
                # a live frame's page comes back with whatever was written into it
                verdict, out = gen.once(garbage * len(frame))
                assert verdict == XDP_REDIRECT
                pkt = Ether(out)
                ports.append(pkt[UDP].sport)
                sent_sum = pkt[UDP].chksum
                del pkt[UDP].chksum
                assert Ether(bytes(pkt))[UDP].chksum == sent_sum, "UDP checksum invalid"
                changed = {i for i in range(len(frame)) if out[i] != frame[i]}
                assert changed <= set(range(udp_offset, udp_offset + 2)) | {udp_offset + 6, udp_offset + 7}
            assert ports == [1024, 1025, 1026, 1024, 1025]
            verdict, _ = gen.once(frame[:40])  # shorter than the template
            assert verdict == XDP_ABORTED
            stats = gen.stats()
            assert stats[linerate.TG_SENT] == 5 and stats[linerate.TG_ABORT_SHORT] == 1
    finally:
        os.sched_setaffinity(0, cpus)
