"""A UDP traffic generator for the lab, and what it shows of fastlb.

The generator is BPF_PROG_TEST_RUN in live-frames mode: the kernel runs an
XDP program (bpf/lab_trafficgen.c) on frames it allocates itself, in batches
of 64, and really sends what the program redirects. The program writes a
scapy-built template over every frame, gives it the source port of one of
``--flows`` flows and redirects it into the client's ``eth0``. From there the
frames take the lab's normal path: the switch, fastlb on the LB's ``eth0``
(XDP_TX under DSR), the switch again, the backends. It sends several Mpps
from one core, where a Python socket loop manages well under one.

Its scapy mode (``--scapy``) sends the same flows as frames that scapy builds,
one ``send`` on scapy's layer-2 socket each, paced at ``--rate`` frames a
second. It is slow (thousands a second), but each frame is an ordinary
transmit from the client's stack, needs nothing of the kernel but a packet
socket, and at a low rate arrives whole where a line-rate burst overflows
queues: in an emulated VM (make vm-test), every frame sent is counted.

Two ends, as in :mod:`fastlb.lab.clients`:

- :func:`line_rate` (the caller) switches GRO on at the switch side of the
  client's veth for live frames (a frame redirected into a veth is dropped
  unless its peer runs NAPI: an XDP program or GRO), reads fastlb's
  per-backend counters (``fastlb status --json`` in the LB namespace) and
  the backends' ``eth0`` receive counters (IFLA_STATS64), runs the generator
  in the client namespace, waits for the queues to drain and reads both again.
- ``python -m fastlb.lab.linerate ...`` (run inside the client namespace)
  builds the frame, compiles and loads the program (with ``--scapy``: builds
  one frame per flow), sends for at most ``--seconds`` or ``--packets`` and
  prints one JSON object. It runs in the
  client namespace because a live frame's redirect resolves the ifindex in
  the namespace of the process that calls BPF_PROG_TEST_RUN.

The sent count is the program's own per-CPU counter of redirected frames.
What arrived is counted twice, independently: by fastlb (packets it
forwarded to each backend) and by the kernel at each backend's ``eth0``
(received packets; this also counts a little other traffic, such as ARP and
the ICMP errors the client sends back for the servers' replies).
"""

from __future__ import annotations

import argparse
import ctypes
import ipaddress
import json
import socket
import sys
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from fastlb.kernel.cdefs import bpf_dir

if TYPE_CHECKING:
    from fastlb.lab.topology import Lab

TRAFFICGEN_SRC = bpf_dir() / "lab_trafficgen.c"
BPF_F_TEST_XDP_LIVE_FRAMES = 2
BATCH_SIZE = 64
MIN_FRAME = 64                 # bytes without FCS, like the LAB-NOTES figures
BASE_PORT = 1024               # flow f uses source port BASE_PORT + f
MAX_FLOWS = 65536 - BASE_PORT
MAX_SECONDS = 30.0
MAX_PACKETS = 1 << 31
DEFAULT_RATE = 1000            # --scapy: frames a second
MAX_RATE = 20_000              # ... at most: about what one Python loop sends
CALL_SECONDS = 0.2             # aim for test-run calls of about this long
FIRST_CALL = 16384             # frames in the first call, before the rate is known
SETTLE_TIMEOUT = 3.0           # seconds to wait for the receive counters to stop moving
SETTLE_NOISE = 50              # ... which they do when they move less than this in 0.1 s
# Why the rate is what it is: test_run hands each batch to the veth and lets
# softirqs run when it re-enables bottom halves, so the frames' whole path
# usually runs on the generator's core between batches.
PACING_NOTE = ("after each batch of 64 the kernel carries the frames through the lab on the "
               "generator's core (bridge, fastlb, bridge, the backends' stacks): the rate is the "
               "whole path's, not the generator's alone")
# enum tg_stat in bpf/lab_trafficgen.c
TG_SENT, TG_ABORT_SHORT, TG_ABORT_NO_CONFIG, TG_STAT_MAX = range(4)


# ---- the caller's side --------------------------------------------------------------


@dataclass(frozen=True)
class LineRate:
    """One burst: what the generator sent and what fastlb and the backends saw."""

    generator: str                  # "live" (BPF live frames) or "scapy"
    family: int
    flows: int
    frame_len: int
    sent: int                       # frames the program redirected (its own counter)
    requested: int                  # frames the kernel was asked to run it on
    seconds: float                  # the generator's wall time, test-run calls only
    calls: int                      # BPF_PROG_TEST_RUN calls made
    client_tx: int                  # the client's eth0: packets handed to the veth
    client_tx_dropped: int          # ... and those the veth dropped (peer queue full)
    forwarded: dict[str, int] = field(default_factory=dict)   # backend -> fastlb packets
    received: dict[str, int] = field(default_factory=dict)    # backend -> eth0 rx packets

    @property
    def mpps(self) -> float:
        """Generator rate, million frames per second."""
        return self.sent / self.seconds / 1e6 if self.seconds > 0 else 0.0

    @property
    def total_forwarded(self) -> int:
        return sum(self.forwarded.values())

    @property
    def total_received(self) -> int:
        return sum(self.received.values())


def link_stats(lab: Lab, role: str, ifname: str = "eth0") -> dict[str, int]:
    """IFLA_STATS64 of ``ifname`` in ``role``'s namespace (rx_packets, tx_dropped, ...)."""
    from fastlb.lab.netns import LabError

    with lab.ipr(role) as ipr:
        idx = ipr.link_lookup(ifname=ifname)
        if not idx:
            raise LabError(f"{ifname} is missing in {lab.ns(role)}")
        stats = ipr.get_links(idx[0])[0].get_attr("IFLA_STATS64")
    if stats is None:
        raise LabError(f"{ifname} in {lab.ns(role)} reports no IFLA_STATS64 counters")
    return {k: int(v) for k, v in stats.items() if isinstance(v, int)}


def _rx_packets(lab: Lab) -> dict[str, int]:
    return {b: link_stats(lab, b)["rx_packets"] for b in lab.backend_names}


def _settle(lab: Lab, timeout: float = SETTLE_TIMEOUT) -> dict[str, int]:
    """The backends' rx counters once the burst has drained out of the queues.

    Other traffic goes on meanwhile (health checks, ARP), so "drained" means
    fewer than SETTLE_NOISE more packets in a tenth of a second.
    """
    last = _rx_packets(lab)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        time.sleep(0.1)
        now = _rx_packets(lab)
        if sum(now.values()) - sum(last.values()) < SETTLE_NOISE:
            return now
        last = now
    return last


def enable_peer_napi(lab: Lab) -> None:
    """GRO on at the switch side of the client's veth, so redirected frames are taken in."""
    from fastlb.lab import netns

    netns.ethtool(lab.ns("switch"), lab.switch_port("client"), "gro", "on")


def line_rate(lab: Lab, family: int = 4, flows: int = 1000, seconds: float = 2.0,
              packets: int | None = None, vip: str | None = None, scapy: bool = False,
              rate: int = DEFAULT_RATE) -> LineRate:
    """Send a bounded UDP burst from the client to a VIP's UDP port; count it at both ends.

    ``vip`` defaults to the lab's VIP of ``family``. fastlb must be attached
    in the lab's LB namespace and serve it (its counters are read with
    ``fastlb status --json``). Stops after ``seconds`` or ``packets``,
    whichever comes first. ``scapy``: scapy's mode, ``rate`` frames a second.
    """
    from fastlb.lab import lb_process
    from fastlb.lab.netns import LabError

    check_bounds(flows, seconds, packets, rate if scapy else None)
    vip = vip or lab.vip(family)
    family = ipaddress.ip_address(vip).version
    args: list[object] = [
        "--ifname", "eth0", "--src-mac", lab.mac("client"), "--dst-mac", lab.mac("lb"),
        "--src", lab.addr("client", family), "--dst", vip, "--port", lab.udp_port,
        "--flows", flows, "--seconds", seconds]
    if packets is not None:
        args += ["--packets", packets]
    if scapy:
        args += ["--scapy", "--rate", rate]
    else:
        enable_peer_napi(lab)
    fwd_before = lb_process.backend_counters(lab, lb_process.status(lab), vip, lab.udp_port, "udp")
    rx_before = _rx_packets(lab)
    tx_before = link_stats(lab, "client")
    res = lab.run_python("client", "fastlb.lab.linerate", *args, timeout=seconds + 60, check=False)
    try:
        out = json.loads(res.stdout)
    except ValueError:
        raise LabError(f"the line-rate generator failed (exit {res.returncode}): "
                       f"{res.stderr.strip()[-800:]}") from None
    if out.get("error"):
        raise LabError(f"the line-rate generator failed: {out['error']}")
    rx_after = _settle(lab)
    tx_after = link_stats(lab, "client")
    fwd_after = lb_process.backend_counters(lab, lb_process.status(lab), vip, lab.udp_port, "udp")
    return LineRate(
        generator=out["generator"], family=family, flows=flows, frame_len=out["frame_len"], sent=out["sent"],
        requested=out["requested"], seconds=out["seconds"], calls=out["calls"],
        client_tx=tx_after["tx_packets"] - tx_before["tx_packets"],
        client_tx_dropped=tx_after["tx_dropped"] - tx_before["tx_dropped"],
        forwarded={b: fwd_after[b].packets - fwd_before[b].packets for b in lab.backend_names},
        received={b: rx_after[b] - rx_before[b] for b in lab.backend_names})


def check_bounds(flows: int, seconds: float, packets: int | None, rate: int | None = None) -> None:
    """Raise LabError unless the burst is bounded, its flows fit the port range and a
    scapy mode's ``rate`` (None: live frames) is one it can keep."""
    from fastlb.lab.netns import LabError

    if not 1 <= flows <= MAX_FLOWS:
        raise LabError(f"flows={flows} is out of range", fix=f"use 1 to {MAX_FLOWS} flows")
    if not 0 < seconds <= MAX_SECONDS:
        raise LabError(f"seconds={seconds:g} is out of range",
                       fix=f"use more than 0 and at most {MAX_SECONDS:g} seconds")
    if packets is not None and not 1 <= packets <= MAX_PACKETS:
        raise LabError(f"packets={packets} is out of range", fix=f"use 1 to {MAX_PACKETS} packets")
    if rate is not None and not 1 <= rate <= MAX_RATE:
        raise LabError(f"rate={rate} is out of range", fix=f"use 1 to {MAX_RATE} frames a second")


def table(result: LineRate, title: str | None = None):
    """A rich Table: per backend, what fastlb forwarded and what arrived."""
    from rich.table import Table

    kind = "Line-rate burst" if result.generator == "live" else "scapy burst"
    t = Table(title=title or f"{kind}: {result.sent:,} frames of {result.frame_len} bytes, "
                             f"{result.flows:,} flows, {result.seconds:.2f} s = {rate_text(result)} sent",
              caption=PACING_NOTE if result.generator == "live" else None)
    t.add_column("backend")
    t.add_column("fastlb forwarded", justify="right")
    t.add_column("share", justify="right")
    t.add_column("received at eth0", justify="right")
    t.add_column("received / forwarded", justify="right")
    total = result.total_forwarded or 1
    for b in sorted(result.forwarded):
        fwd, rx = result.forwarded[b], result.received[b]
        t.add_row(b, f"{fwd:,}", f"{100 * fwd / total:.1f} %", f"{rx:,}",
                  f"{100 * rx / fwd:.1f} %" if fwd else "-")
    t.add_row("all", f"{result.total_forwarded:,}", "100 %", f"{result.total_received:,}",
              f"{100 * result.total_received / result.total_forwarded:.1f} %"
              if result.total_forwarded else "-", style="bold")
    return t


def rate_text(result: LineRate) -> str:
    """The generator's rate, in the unit that suits it."""
    if result.generator == "live":
        return f"{result.mpps:.2f} Mpps"
    return f"{result.sent / result.seconds if result.seconds > 0 else 0:,.0f} frames/s"


def summary(result: LineRate) -> str:
    """One paragraph: sent, dropped on the way, forwarded, received."""
    dropped = (f" and dropped {result.client_tx_dropped:,} (its peer's queue was full)"
               if result.client_tx_dropped else ", dropping none")
    how = f"{result.calls} test-run calls" if result.generator == "live" else "scapy, one send each"
    return (f"generator: {result.sent:,} frames in {result.seconds:.2f} s ({how}) "
            f"= {rate_text(result)}; the client's veth took {result.client_tx:,}{dropped}; "
            f"fastlb forwarded {result.total_forwarded:,} "
            f"({result.total_forwarded / result.seconds / 1e6:.2f} Mpps over the same time); "
            f"the backends' eth0 counted {result.total_received:,}.")


# ---- the client namespace's side ----------------------------------------------------


def build_frame(src_mac: str, dst_mac: str, src: str, dst: str, port: int,
                base_port: int = BASE_PORT, min_len: int = MIN_FRAME) -> tuple[bytes, int]:
    """The template frame (flow 0) and the offset of its UDP header, built with scapy."""
    from scapy.layers.inet import IP, UDP
    from scapy.layers.inet6 import IPv6
    from scapy.layers.l2 import Ether

    if ipaddress.ip_address(src).version != ipaddress.ip_address(dst).version:
        raise ValueError(f"{src} and {dst} are of different address families")
    l3 = IPv6(src=src, dst=dst, hlim=64) if ":" in dst else IP(src=src, dst=dst, ttl=64)
    udp_offset = 14 + len(l3)
    payload = (b"fastlb lab line-rate burst " * 4)[:max(4, min_len - udp_offset - 8)]
    frame = bytes(Ether(src=src_mac, dst=dst_mac) / l3 / UDP(sport=base_port, dport=port) / payload)
    return frame, udp_offset


class Generator:
    """The generator program, compiled for one template frame and loaded (not attached).

    Use as a context manager. :meth:`burst` sends live frames; :meth:`once`
    runs the program on one frame without sending it (for tests: the output
    is the frame the burst would send next).
    """

    def __init__(self, frame: bytes, udp_offset: int, ifindex: int, flows: int,
                 base_port: int = BASE_PORT):
        from fastlb.kernel.bcc_load import load_xdp

        if not 1 <= flows <= MAX_FLOWS or not 0 < base_port <= 65536 - flows:
            raise ValueError(f"flows={flows} from source port {base_port} do not fit in 1..65535")
        self.frame = frame
        cflags = [f"-DTG_FRAME_LEN={len(frame)}", f"-DTG_UDP_OFFSET={udp_offset}"]
        self.bpf, self.fn, _ = load_xdp(TRAFFICGEN_SRC, "xdp_trafficgen", cflags)
        try:
            config = self.bpf[b"tg_config"]
            leaf = config.Leaf()
            leaf.ifindex = ifindex
            leaf.flows = flows
            leaf.base_port = base_port
            ctypes.memmove(leaf.frame, frame, len(frame))
            config[config.Key(0)] = leaf
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> Generator:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self.bpf is not None:
            self.bpf.cleanup()
            self.bpf = None

    def stats(self) -> list[int]:
        """Frames per enum tg_stat, summed over the CPUs."""
        table = self.bpf[b"tg_stats"]
        return [sum(table[table.Key(i)]) for i in range(TG_STAT_MAX)]

    def once(self, data: bytes | None = None) -> tuple[int, bytes]:
        """Run the program on ``data`` (default: the template) without sending: (verdict, frame)."""
        from fastlb.testing import _testrun

        retval, out, _ = _testrun.run(self.fn.fd, self.frame if data is None else data)
        return retval, out

    def burst(self, seconds: float, packets: int | None = None) -> dict:
        """Send live frames until ``seconds`` or ``packets``; return what was done."""
        from fastlb.errors import BpfError
        from fastlb.testing import _testrun

        limit = packets if packets is not None else MAX_PACKETS
        before = self.stats()
        requested, calls, chunk = 0, 0, min(FIRST_CALL, limit)
        start = time.monotonic()
        deadline = start + seconds
        while requested < limit:
            n = min(chunk, limit - requested)
            t0 = time.monotonic()
            try:
                _testrun.run(self.fn.fd, self.frame, repeat=n, flags=BPF_F_TEST_XDP_LIVE_FRAMES,
                             batch_size=BATCH_SIZE)
            except OSError as exc:
                raise BpfError(f"BPF_PROG_TEST_RUN with live frames failed: {exc}",
                               fix="this needs Linux 5.18 or later") from exc
            now = time.monotonic()
            requested += n
            calls += 1
            if now >= deadline:
                break
            rate = n / max(now - t0, 1e-6)
            # About CALL_SECONDS per call, and none running far past the deadline. A call
            # whose frames were dropped early on the way runs fast and overstates the
            # rate, so a call grows to at most 4 times the last one.
            chunk = max(BATCH_SIZE, min(int(rate * CALL_SECONDS), int(rate * (deadline - now)) + BATCH_SIZE,
                                        4 * n))
        elapsed = time.monotonic() - start
        counts = [a - b for a, b in zip(self.stats(), before)]
        return {"generator": "live", "sent": counts[TG_SENT],
                "aborted": counts[TG_ABORT_SHORT] + counts[TG_ABORT_NO_CONFIG],
                "requested": requested, "calls": calls, "seconds": elapsed, "frame_len": len(self.frame)}


def scapy_frames(src_mac: str, dst_mac: str, src: str, dst: str, port: int, flows: int) -> list[bytes]:
    """The scapy mode's frames: flow f's is the template with source port BASE_PORT + f."""
    return [build_frame(src_mac, dst_mac, src, dst, port, base_port=BASE_PORT + f)[0] for f in range(flows)]


def scapy_burst(frames: list[bytes], ifname: str, rate: int, seconds: float, packets: int | None = None) -> dict:
    """Send ``frames`` in turn on scapy's layer-2 socket on ``ifname``, ``rate`` a second,
    until ``seconds`` or ``packets``; return what was done (as :meth:`Generator.burst`)."""
    from scapy.config import conf

    limit = packets if packets is not None else MAX_PACKETS
    sent = 0
    sock = conf.L2socket(iface=ifname)
    start = time.monotonic()
    deadline = start + seconds
    try:
        while sent < limit:
            now = time.monotonic()
            if now >= deadline:
                break
            due = start + sent / rate      # paced from the start: a late send does not shift the rest
            if due > now:
                time.sleep(due - now)
            sock.send(frames[sent % len(frames)])
            sent += 1
    finally:
        sock.close()
    return {"generator": "scapy", "sent": sent, "aborted": 0, "requested": sent, "calls": sent,
            "seconds": time.monotonic() - start, "frame_len": len(frames[0])}


def main(argv: list[str] | None = None) -> int:
    """Command line entry point: runs in the client namespace and prints one JSON object."""
    p = argparse.ArgumentParser(
        prog="python -m fastlb.lab.linerate",
        description="fastlb lab: a bounded UDP burst, at line rate (BPF_PROG_TEST_RUN live frames) "
                    "or paced by scapy (--scapy), JSON out.",
        epilog="example: ip netns exec flb-1a2b3c-client python -m fastlb.lab.linerate --ifname eth0 "
               "--src-mac 02:00:c6:12:00:01 --dst-mac 02:00:c6:12:00:02 --src 198.18.0.1 "
               "--dst 198.19.0.100 --port 9000 --flows 1000 --seconds 2")
    p.add_argument("--ifname", required=True, help="interface to send out of (eth0)")
    p.add_argument("--src-mac", required=True)
    p.add_argument("--dst-mac", required=True, help="the next hop's MAC: the LB's eth0")
    p.add_argument("--src", required=True, help="source address")
    p.add_argument("--dst", required=True, help="destination address (the VIP)")
    p.add_argument("--port", type=int, required=True, help="destination UDP port")
    p.add_argument("--flows", type=int, default=1000, help=f"source ports to cycle through, 1 to {MAX_FLOWS}")
    p.add_argument("--seconds", type=float, default=2.0, help=f"stop after this long, at most {MAX_SECONDS:g}")
    p.add_argument("--packets", type=int, default=None, help="stop after this many frames")
    p.add_argument("--scapy", action="store_true",
                   help="send scapy-built frames, one send each, paced at --rate (not live frames)")
    p.add_argument("--rate", type=int, default=None,
                   help=f"--scapy: frames a second, 1 to {MAX_RATE} (default {DEFAULT_RATE})")
    a = p.parse_args(argv)
    if a.rate is not None and not a.scapy:
        p.error("--rate goes with --scapy")
    from fastlb.errors import FastlbError

    try:
        if a.scapy:
            rate = DEFAULT_RATE if a.rate is None else a.rate
            check_bounds(a.flows, a.seconds, a.packets, rate)
            socket.if_nametoindex(a.ifname)   # a missing interface: one OSError that names it
            frames = scapy_frames(a.src_mac, a.dst_mac, a.src, a.dst, a.port, a.flows)
            out = scapy_burst(frames, a.ifname, rate, a.seconds, a.packets)
        else:
            check_bounds(a.flows, a.seconds, a.packets)
            frame, udp_offset = build_frame(a.src_mac, a.dst_mac, a.src, a.dst, a.port)
            with Generator(frame, udp_offset, socket.if_nametoindex(a.ifname), a.flows) as gen:
                out = gen.burst(a.seconds, a.packets)
    except (FastlbError, OSError, ValueError) as exc:
        out = {"error": str(exc)}
    json.dump(out, sys.stdout)
    sys.stdout.write("\n")
    return 1 if out.get("error") else 0


if __name__ == "__main__":
    sys.exit(main())
