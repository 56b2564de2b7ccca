"""Per-packet cost of the XDP program, by BPF_PROG_TEST_RUN.

Method (see shared LAB-NOTES): many calls of repeat=1 each, made from a
compiled loop (fastlb.testing._testrun.time_calls, C with the GIL released), because
a repeat > 1 call times a rewritten packet on its own output. The kernel's
per-call duration is summed; each figure is the median of several runs. The
empty XDP_PASS program (the fixed cost of a call) and a bare MAC-swap
XDP_TX program (the floor of any forwarder) run in the same process, so the
ratios hold on a noisy machine. The new-flow path gets a fresh 5-tuple per
call: the loop bumps a counter inside the source address.

Run alone: sudo .venv/bin/python bench/bench_packets.py [--quick]
"""

from __future__ import annotations

import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import xdp_floor  # noqa: E402
from scapy.layers.inet import IP, TCP, UDP  # noqa: E402
from scapy.layers.inet6 import IPv6  # noqa: E402
from scapy.layers.l2 import Ether  # noqa: E402
from scapy.packet import Raw  # noqa: E402

from fastlb.kernel import cdefs  # noqa: E402
from fastlb.kernel.layout import Sizes  # noqa: E402
from fastlb.testing import _testrun  # noqa: E402
from fastlb.testing.testbed import XDP_VERDICTS, Testbed  # noqa: E402

VIP4, VIP6 = "198.19.0.100", "2001:db8:ffff::100"
# One VIP address per forwarding mode and family; every VIP has three backends.
MODE_VIPS = {("dsr", 4): VIP4, ("dsr", 6): VIP6,
             ("tunnel", 4): "198.19.0.101", ("tunnel", 6): "2001:db8:ffff::101",
             ("nat", 4): "198.19.0.102", ("nat", 6): "2001:db8:ffff::102"}
PERSIST_VIP4 = "198.19.0.103"   # DSR, TCP, persistence = 600: the persistence rows
GROUPED_VIP4 = "198.19.0.104"   # the same with persistence_prefix = 16
LC_VIP = "198.19.0.105"     # an lc VIP (DSR, IPv4 TCP): the new-flow rows of a non-maglev algorithm
CONFIG = """
[settings]
conntrack_size = 1048576
tunnel_source = "198.18.200.0/24"
tunnel_source6 = "2001:db8:200::/64"
""" + "".join(f"""
[[vip]]
address = "{vip}"
port = 80
protocol = "{proto}"
forwarding = "{mode}"
""" + "".join(f"""[[vip.backend]]
address = "{'198.18.0.' if family == 4 else '2001:db8::'}{n}"
""" for n in (11, 12, 13)) for (mode, family), vip in MODE_VIPS.items() for proto in ("tcp", "udp")) + f"""
[[vip]]
address = "{PERSIST_VIP4}"
port = 80
persistence = 600
""" + "".join(f"""[[vip.backend]]
address = "198.18.0.{n}"
""" for n in (11, 12, 13)) + f"""
[[vip]]
address = "{GROUPED_VIP4}"
port = 80
persistence = 600
persistence_prefix = 16
""" + "".join(f"""[[vip.backend]]
address = "198.18.0.{n}"
""" for n in (11, 12, 13)) + f"""
[[vip]]
address = "{LC_VIP}"
port = 80
protocol = "tcp"
algorithm = "lc"
""" + "".join(f"""[[vip.backend]]
address = "198.18.0.{n}"
""" for n in (11, 12, 13))

ETH = dict(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")
# Offset of a 4-byte counter inside the source address (bumped per call for new flows).
SRC_OFFSET = {4: 14 + 12, 6: 14 + 8 + 12}


def packet(family: int, proto: str, mode: str = "dsr", flags: str = "A", vip: str | None = None) -> bytes:
    """A 64-byte frame (60 on the wire before the FCS) for the mode's VIP (or ``vip``), port 80."""
    vip = vip or MODE_VIPS[(mode, family)]
    ip = IP(src="198.18.0.1", dst=vip) if family == 4 else IPv6(src="2001:db8::1", dst=vip)
    l4 = TCP(sport=40000, dport=80, flags=flags) if proto == "tcp" else UDP(sport=40000, dport=80)
    frame = Ether(**ETH) / ip / l4
    pad = max(0, 60 - len(frame))
    return bytes(frame / Raw(b"\0" * pad))


def load_plain(source: str, function: str):
    from bcc import BPF
    bpf = BPF(src_file=str(cdefs.bpf_dir() / source).encode())
    return bpf, bpf.load_func(function.encode(), BPF.XDP).fd


def measure(fd: int, data: bytes, calls: int, runs: int, vary_offset: int = -1) -> tuple[float, int]:
    """Median kernel ns per call over ``runs`` runs, and the last verdict.

    With ``vary_offset``, each run starts its counter where the previous one
    stopped, so no run meets the flows an earlier run recorded.
    """
    results, verdict = [], None
    frame = bytearray(data)
    for run in range(runs):
        if vary_offset >= 0:
            frame[vary_offset:vary_offset + 4] = (run * calls).to_bytes(4, "big")
        ns, _wall, verdict = _testrun.time_calls(fd, bytes(frame), calls, vary_offset)
        results.append(ns)
    return statistics.median(results), verdict


def run(quick: bool = False, calls: int | None = None, runs: int | None = None) -> str:
    calls, runs = (calls or 2_000, runs or 3) if quick else (calls or 1_000_000, runs or 7)
    rows = []
    pass_bpf, pass_fd = load_plain("xdp_pass.c", "xdp_pass")
    swap_bpf, swap_fd = load_plain("xdp_macswap.c", "xdp_macswap")
    floor_bpf, floor_fd = xdp_floor.load(VIP4, "02:00:00:00:00:0b")
    sizes = Sizes(conntrack_size=1_048_576)
    try:
        with Testbed(sizes, name=f"bench-{os.getpid()}") as bed:  # two benches at once must not share pins
            bed.apply(CONFIG)
            base4 = packet(4, "tcp")
            empty, v = measure(pass_fd, base4, calls, runs)
            assert v == XDP_VERDICTS["pass"]
            rows.append(("empty program (XDP_PASS)", "IPv4 TCP", empty, v))
            swap, v = measure(swap_fd, base4, calls, runs)
            assert v == XDP_VERDICTS["tx"]
            rows.append(("MAC swap (XDP_TX)", "IPv4 TCP", swap, v))
            floor_ns, v = measure(floor_fd, base4, calls, runs)
            assert v == XDP_VERDICTS["tx"]
            rows.append(("floor: VIP packets to one backend's MAC (bench/xdp_floor.c, XDP_TX)", "IPv4 TCP",
                         floor_ns, v))
            cases = [("dsr", f, p) for f in (4, 6) for p in ("tcp", "udp")]
            cases += [(m, f, "tcp") for m in ("tunnel", "nat") for f in (4, 6)]
            for mode, family, proto in cases:
                data = packet(family, proto, mode)
                label = f"IPv{family} {proto.upper()}"
                name = {"dsr": "DSR", "tunnel": "tunnel", "nat": "NAT"}[mode]
                verdict, _ = bed.run(data)  # records the flow: the next calls hit conntrack
                est, v = measure(bed.fd, data, calls, runs)
                assert v == XDP_VERDICTS["tx"], f"established {mode} {label}: verdict {v}"
                rows.append((f"fastlb {name}, established flow", label, est, v))
                new, v = measure(bed.fd, data, calls, runs, vary_offset=SRC_OFFSET[family])
                assert v == XDP_VERDICTS["tx"], f"new flow {mode} {label}: verdict {v}"
                rows.append((f"fastlb {name}, new flow each packet", label, new, v))
                bed.flush_conntrack()
            # A new flow opened by a SYN beside one met mid-flow (ACK): maglev, and lc (a pick by load).
            for algorithm, vip in (("maglev", VIP4), ("lc", LC_VIP)):
                for flags, what in (("S", "SYN"), ("A", "ACK")):
                    data = packet(4, "tcp", flags=flags, vip=vip)
                    new, v = measure(bed.fd, data, calls, runs, vary_offset=SRC_OFFSET[4])
                    assert v == XDP_VERDICTS["tx"], f"new flow {algorithm} {what}: verdict {v}"
                    rows.append((f"fastlb DSR {algorithm}, new flow each packet, {what}", "IPv4 TCP", new, v))
                    bed.flush_conntrack()
            rows += persistence_rows(bed, calls, runs)
            rows += response_rows(bed, calls, runs)
    finally:
        pass_bpf.cleanup()
        swap_bpf.cleanup()
        floor_bpf.cleanup()
    return render(rows, empty, swap, calls, runs)


def persistence_rows(bed: Testbed, calls: int, runs: int) -> list[tuple]:
    """The DSR IPv4 TCP rows again, on a VIP with persistence (compare with the plain DSR rows above).

    "Bound client": a VIP with persistence_prefix = 16, where the counter in
    the source address changes the /16 only every 65,536 packets, so nearly
    every new flow finds its binding.
    """
    data = packet(4, "tcp", vip=PERSIST_VIP4)
    label = "IPv4 TCP"
    bed.run(data)
    est, v = measure(bed.fd, data, calls, runs)
    assert v == XDP_VERDICTS["tx"]
    rows = [("fastlb DSR + persistence, established flow", label, est, v)]
    new, v = measure(bed.fd, data, calls, runs, vary_offset=SRC_OFFSET[4])
    assert v == XDP_VERDICTS["tx"]
    rows.append(("fastlb DSR + persistence, new flow each packet (new client: binds)", label, new, v))
    bed.flush_conntrack()
    bound, v = measure(bed.fd, packet(4, "tcp", vip=GROUPED_VIP4), calls, runs, vary_offset=SRC_OFFSET[4])
    assert v == XDP_VERDICTS["tx"]
    rows.append(("fastlb DSR + persistence /16, new flow each packet (bound client)", label, bound, v))
    bed.flush_conntrack()
    return rows


def response_rows(bed: Testbed, calls: int, runs: int) -> list[tuple]:
    """NAT IPv4 TCP with and without payload: the cost of lrt's response timing (issue 16 item 5).

    A client packet with payload stamps its flow's first request (once per flow: the new-flow
    row pays it on every packet); the backend's first payload of a connection is timed once (a
    conntrack lookup and a per-CPU add), which a repeated call cannot show: the reply rows time
    the later replies, which pay one flag test. "No payload" frames carry the same 6 bytes as
    Ethernet padding instead (IP total length 40)."""
    with_payload = packet(4, "tcp", "nat")
    bare = Ether(**ETH) / IP(src="198.18.0.1", dst=MODE_VIPS[("nat", 4)]) / TCP(sport=40000, dport=80, flags="A")
    no_payload = bytes(bare) + b"\0" * (len(with_payload) - len(bare))
    rows = []
    for name, data in (("no payload", no_payload), ("payload", with_payload)):
        new, v = measure(bed.fd, data, calls, runs, vary_offset=SRC_OFFSET[4])
        assert v == XDP_VERDICTS["tx"]
        rows.append((f"fastlb NAT, new flow each packet, {name}", "IPv4 TCP", new, v))
        bed.flush_conntrack()
    # a connection, then its backend's replies (the first one is timed by this untimed call)
    _, out = bed.run(with_payload)
    fwd = Ether(out)
    for name, pad in (("no payload", False), ("payload", True)):
        ip = IP(src=fwd[IP].dst, dst=fwd[IP].src) / TCP(sport=fwd[TCP].dport, dport=fwd[TCP].sport, flags="A")
        reply = Ether(src=fwd.dst, dst=fwd.src) / ip
        reply = bytes(reply / Raw(b"\0" * 6)) if pad else bytes(reply) + b"\0" * 6
        verdict, _ = bed.run(reply)
        assert verdict != XDP_VERDICTS["pass"], "the reply was not translated"
        est, v = measure(bed.fd, reply, calls, runs)
        assert v == verdict
        rows.append((f"fastlb NAT reply, established, {name}", "IPv4 TCP", est, v))
    bed.flush_conntrack()
    return rows


def render(rows, empty: float, swap: float, calls: int, runs: int) -> str:
    out = ["## Per-packet cost (BPF_PROG_TEST_RUN)", "",
           f"{calls:,} calls of repeat=1 per run from a compiled loop (`fastlb.testing._testrun.time_calls`), "
           f"median of {runs} runs; kernel-reported ns per call. 64-byte frames (60 bytes before the FCS). "
           "*Net* subtracts the empty program (the fixed cost of a call). "
           "New-flow rows change the source address on every call, so every packet misses conntrack, "
           "is hashed, picks a ring slot and inserts an LRU entry (conntrack: 1,048,576 entries).", "",
           "| program / path | packet | gross ns | net ns | × MAC swap (gross) |",
           "|---|---|---:|---:|---:|"]
    for name, label, ns, _ in rows:
        out.append(f"| {name} | {label} | {ns:.1f} | {ns - empty:.1f} | {ns / swap:.2f} |")
    out.append("")
    return "\n".join(out)


if __name__ == "__main__":
    import argparse
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--calls", type=int, help="calls per run (default 1,000,000)")
    ap.add_argument("--runs", type=int, help="runs per figure, the median is kept (default 7)")
    args = ap.parse_args()
    print(run(quick=args.quick, calls=args.calls, runs=args.runs))
