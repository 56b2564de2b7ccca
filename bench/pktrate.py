"""Forwarded packet rate through the namespace lab, per wall second and per CPU second.

Shared by bench_rate (fastlb against nftables) and bench_scale (fastlb as its
tables grow). The pieces:

- The generator is :class:`fastlb.lab.linerate.Generator` (BPF_PROG_TEST_RUN
  live frames), run in a worker thread of this process that has entered the
  lab's client namespace (a live frame's redirect resolves the ifindex in the
  caller's namespace). It runs in-process, rather than as
  ``python -m fastlb.lab.linerate``, for its CPU clock: after each batch of 64
  the kernel carries the frames through the whole lab in softirq on the
  generator's CPU (see ``linerate.PACING_NOTE``), and this kernel has no IRQ
  time accounting, so that softirq time is charged to the generator thread.
  Its thread CPU time, plus what ksoftirqd on its CPU ran meanwhile, is what
  the whole path cost, however busy the rest of the shared machine is.
- Sinks: each backend drops the lab's UDP port at its ``eth0`` ingress (an
  nftables netdev chain), before any IP processing, and the packets are
  counted by ``eth0``'s receive counter. Sinks never transmit, so the switch
  would forget their MACs and flood every frame to every port: :func:`prepare`
  gives the bridge static entries for every host.

A :class:`Sample` is one bounded burst: frames sent, frames the sinks got,
wall seconds and CPU seconds.
"""

from __future__ import annotations

import concurrent.futures
import os
import statistics
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from fastlb.lab import linerate

if TYPE_CHECKING:
    from fastlb.lab.topology import Lab

SINK_TABLE = "flb_bench_sink"
DRAIN_TIMEOUT = 3.0      # seconds to wait for the sinks' counters to stop moving
DRAIN_NOISE = 20         # ... which they do when they move by fewer packets in 50 ms
GENERATOR_CPU = 0        # the worker thread is pinned here, so one ksoftirqd is its helper


def sink_rules(port: int) -> str:
    """The nftables ruleset of a sink: drop the benchmark's UDP port at eth0's ingress."""
    return (f"table netdev {SINK_TABLE} {{\n"
            f"  chain ingress_drop {{\n"
            f"    type filter hook ingress device eth0 priority 0; policy accept;\n"
            f"    udp dport {port} drop\n"
            f"  }}\n"
            f"}}\n")


def prepare(lab: Lab) -> None:
    """Static switch entries for every host, and a sink on every backend."""
    for host in lab.hosts:
        lab.run("switch", ["bridge", "fdb", "replace", lab.mac(host), "dev", lab.switch_port(host),
                           "master", "static"])
    for backend in lab.backend_names:
        lab.run(backend, ["nft", "-f", "-"], input=sink_rules(lab.udp_port))
    linerate.enable_peer_napi(lab)


@dataclass(frozen=True)
class Sample:
    """One burst."""

    sent: int           # frames the generator redirected
    received: int       # frames the sinks' eth0 counted
    wall: float         # seconds of test-run calls
    cpu: float          # generator thread + its ksoftirqd, seconds

    @property
    def mpps(self) -> float:
        """Forwarded million packets per wall second."""
        return self.received / self.wall / 1e6 if self.wall else 0.0

    @property
    def ns_per_packet(self) -> float:
        """CPU nanoseconds per forwarded packet, the whole path (generator included)."""
        return self.cpu / self.received * 1e9 if self.received else float("inf")

    @property
    def mpps_per_core(self) -> float:
        """Forwarded million packets per CPU second."""
        return 1e3 / self.ns_per_packet if self.received else 0.0


def median(samples: list[Sample], attr: str) -> float:
    return statistics.median(getattr(s, attr) for s in samples)


def _ksoftirqd_ns(cpu: int) -> int:
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/comm") as f:
                if f.read().strip() != f"ksoftirqd/{cpu}":
                    continue
            with open(f"/proc/{pid}/schedstat") as f:
                return int(f.read().split()[0])
        except OSError:
            continue
    return 0


def _rx(lab: Lab, roles: list[str]) -> int:
    return sum(linerate.link_stats(lab, role)["rx_packets"] for role in roles)


def _drained(lab: Lab, roles: list[str]) -> int:
    """The sinks' receive count once the burst has left the queues."""
    last = _rx(lab, roles)
    deadline = time.monotonic() + DRAIN_TIMEOUT
    while time.monotonic() < deadline:
        time.sleep(0.05)
        now = _rx(lab, roles)
        if now - last < DRAIN_NOISE:
            return now
        last = now
    return last


class Client:
    """A worker thread inside the lab's client namespace that builds generators and runs bursts.

    Use as a context manager; generators made through it are closed on exit.
    """

    def __init__(self, lab: Lab):
        self.lab = lab
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="bench-client", initializer=self._enter)
        self._generators: list[linerate.Generator] = []

    def _enter(self) -> None:
        from pyroute2 import netns as pr_netns

        pr_netns.setns(self.lab.ns("client"), flags=0)   # this thread only: network namespaces are per task
        os.sched_setaffinity(0, {GENERATOR_CPU})

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for gen in self._generators:
            self._pool.submit(gen.close).result()
        self._generators.clear()
        self._pool.shutdown(wait=True)

    def generator(self, dst_role_or_vip: str, flows: int) -> linerate.Generator:
        """A compiled generator of ``flows`` UDP flows to a VIP (via the LB) or to a host's address."""
        lab = self.lab
        if dst_role_or_vip in lab.hosts:
            dst_mac, dst = lab.mac(dst_role_or_vip), lab.addr(dst_role_or_vip)
        else:
            dst_mac, dst = lab.mac("lb"), dst_role_or_vip

        def build() -> linerate.Generator:
            import socket

            frame, udp_offset = linerate.build_frame(lab.mac("client"), dst_mac, lab.addr("client"), dst,
                                                     lab.udp_port)
            return linerate.Generator(frame, udp_offset, socket.if_nametoindex("eth0"), flows)

        gen = self._pool.submit(build).result()
        self._generators.append(gen)
        return gen

    def burst(self, gen: linerate.Generator, seconds: float, sinks: list[str]) -> Sample:
        """One bounded burst; the sinks are the roles whose eth0 counts what arrived."""
        linerate.check_bounds(1, seconds, None)
        before = _rx(self.lab, sinks)

        def timed() -> tuple[dict, float]:
            soft0, cpu0 = _ksoftirqd_ns(GENERATOR_CPU), time.thread_time_ns()
            out = gen.burst(seconds)
            cpu = time.thread_time_ns() - cpu0 + _ksoftirqd_ns(GENERATOR_CPU) - soft0
            return out, cpu / 1e9

        out, cpu = self._pool.submit(timed).result()
        received = _drained(self.lab, sinks) - before
        return Sample(sent=out["sent"], received=received, wall=out["seconds"], cpu=cpu)

    def measure(self, gen: linerate.Generator, sinks: list[str], seconds: float, bursts: int,
                warmup: float) -> list[Sample]:
        """A short warm-up burst (flows enter the balancers' tables), then ``bursts`` measured ones."""
        if warmup > 0:
            self.burst(gen, warmup, sinks)
        return [self.burst(gen, seconds, sinks) for _ in range(bursts)]
