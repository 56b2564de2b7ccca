"""A flood of new flows against a small conntrack, with and without the guard.

100 keep-alive connections to an `rr` VIP are held open; then the lab's
line-rate generator sends more than 100,000 distinct new UDP flows through
fastlb, whose conntrack_size is 4,096 (a map of 8,192 entries, one LRU list). With the
new-flow guard on, the flood is forwarded but not recorded, and every held
connection still works. With the guard off (the control run), the flood
evicts the held connections' entries; their next packets are mid-flow and go
to their ring slot, which under `rr` is often another backend: those
connections are reset. That is the harm the guard prevents.

The holder, the flood and so the program's runs for both share one CPU (the
test pins itself, and its children inherit it): the kernel's common LRU
hands each CPU free entries in batches of 128 and evicts only from the
global list, so entries that another, then idle, CPU recorded last sit on
that CPU's pending list, out of the eviction's reach; 100 held connections
recorded on the holder's CPU then survived any flood sent from the other.
"""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from fastlb.lab import linerate
from fastlb.lab.topology import Lab
from helpers.e2e import Attached, scrape, status

pytestmark = [pytest.mark.root, pytest.mark.netns]

HELD = 100
FLOWS_PER_SOURCE = 60_000      # the generator varies the source port; two sources
FLOOD_SOURCES = ("198.18.0.1", "198.18.0.201")  # the client, and a spoofed neighbour


def config(lab, new_flow_rate: int) -> str:
    text = f"[settings]\nconntrack_size = 4096\nnew_flow_rate = {new_flow_rate}\n\n"
    for proto, port in (("tcp", 80), ("udp", lab.udp_port)):
        text += f'[[vip]]\naddress = "{lab.vip4}"\nport = {port}\nprotocol = "{proto}"\nalgorithm = "rr"\n'
        text += "".join(f'[[vip.backend]]\naddress = "{lab.addr(b)}"\n' for b in lab.backend_names) + "\n"
    return text


def flood(lab) -> int:
    """More than 100,000 distinct new UDP flows at line rate; returns the frames sent."""
    linerate.enable_peer_napi(lab)  # frames redirected into a veth need NAPI on its peer
    sent = 0
    for src in FLOOD_SOURCES:
        res = lab.run_python("client", "fastlb.lab.linerate", "--ifname", "eth0", "--src-mac", lab.mac("client"),
                             "--dst-mac", lab.mac("lb"), "--src", src, "--dst", lab.vip4, "--port", lab.udp_port,
                             "--flows", FLOWS_PER_SOURCE, "--packets", 2 * FLOWS_PER_SOURCE, "--seconds", 5,
                             timeout=60)
        sent += json.loads(res.stdout)["sent"]
    return sent


def events(lab) -> dict:
    """The event counters, from `fastlb status` and, the same, from the metrics endpoint."""
    counted = status(lab)[0]["events"]
    exported = {dict(labels)["event"]: int(value) for (name, labels), value in scrape(lab).items()
                if name == "fastlb_events_total"}
    assert exported == counted, (exported, counted)
    return counted


def held_connections_after_flood(lab, tmp_path, new_flow_rate: int) -> tuple[dict, int, dict]:
    cpus = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(cpus)})
    try:
        return _held_connections_after_flood(lab, tmp_path, new_flow_rate)
    finally:
        os.sched_setaffinity(0, cpus)


def _held_connections_after_flood(lab, tmp_path, new_flow_rate: int) -> tuple[dict, int, dict]:
    path = tmp_path / f"flood-{new_flow_rate}.toml"
    path.write_text(config(lab, new_flow_rate))
    attached = Attached(lab, path)
    holder = lab.exec_python("client", "fastlb.lab.client_worker", "hold", "--host", lab.vip4, "--port", 80,
                             "--count", HELD, "--requests", stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             text=True)
    try:
        assert json.loads(holder.stdout.readline()) == {"held": HELD}
        holder.stdin.write("check\n")
        holder.stdin.flush()
        before = json.loads(holder.stdout.readline())
        assert before["ok"] == HELD, before
        sent = flood(lab)
        holder.stdin.write("check\n")
        holder.stdin.flush()
        after = json.loads(holder.stdout.readline())
        return after, sent, events(lab)
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
        attached.stop()


@pytest.fixture(scope="module")
def lab():
    with Lab(backends=3, ipv6=False) as lab:
        yield lab


def test_with_the_guard_every_held_connection_survives_the_flood(lab, tmp_path):
    after, sent, ev = held_connections_after_flood(lab, tmp_path, new_flow_rate=200)
    print(f"guard on: {sent} frames, held connections after: {after}, events: {ev}")
    assert sent >= 100_000
    assert after["ok"] == HELD, after
    assert ev.get("guard_unrecorded", 0) > 0


def test_without_the_guard_the_flood_evicts_held_connections(lab, tmp_path):
    after, sent, ev = held_connections_after_flood(lab, tmp_path, new_flow_rate=0)
    print(f"guard off: {sent} frames, held connections after: {after}, events: {ev}")
    assert sent >= 100_000
    assert ev.get("guard_unrecorded", 0) == 0
    assert after["failed"] > 0, f"the control run shows no harm: {after}"


def test_the_lb_itself_stays_reachable_during_a_flood(lab, tmp_path):
    """The operator's own TCP (SSH, say) to the LB's address passes while a flood is balanced."""
    from fastlb.lab.clients import tcp_requests, wait_tcp
    path = tmp_path / "reach.toml"
    path.write_text(config(lab, new_flow_rate=200))
    attached = Attached(lab, path)
    own = lab.exec_python("lb", "fastlb.lab.servers", "--name", "lb-itself", "--http-port", 2222,
                          "--udp-port", 2223, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_tcp(lab, [(lab.addr("lb"), 2222)], timeout=10)
        linerate.enable_peer_napi(lab)
        gen = lab.exec_python("client", "fastlb.lab.linerate", "--ifname", "eth0", "--src-mac", lab.mac("client"),
                              "--dst-mac", lab.mac("lb"), "--src", FLOOD_SOURCES[1], "--dst", lab.vip4,
                              "--port", lab.udp_port, "--flows", FLOWS_PER_SOURCE, "--seconds", 4,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            counts = tcp_requests(lab, vip=lab.addr("lb"), port=2222, count=50)
            still_flooding = gen.poll() is None
        finally:
            out, _ = gen.communicate(timeout=60)
        assert sum(counts.values()) == 50 and set(counts) == {"lb-itself"}
        assert still_flooding, "the flood ended before the requests did; nothing was shown"
        assert json.loads(out)["sent"] > 0
    finally:
        own.terminate()
        own.wait(timeout=10)
        attached.stop()
