"""The lab's floor, bench/xdp_floor.c: loaded for BPF_PROG_TEST_RUN, or attached to the LB's eth0.

The floor rewrites the destination MAC of VIP packets to one fixed backend and
sends them back out with XDP_TX: the least any balancer does in the lab, so
the most any balancer can reach. bench_packets times it per packet,
bench_rate and bench_floor run traffic through it on the LB's eth0.
"""

from __future__ import annotations

import contextlib
import ipaddress
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fastlb.lab.topology import Lab

SOURCE = Path(__file__).resolve().parent / "xdp_floor.c"


def load(vip: str, backend_mac: str):
    """(BPF object, program fd) of the floor for ``vip``, sending its packets to ``backend_mac``."""
    from bcc import BPF
    vip_be = int.from_bytes(ipaddress.IPv4Address(vip).packed, "little" if socket.htons(1) != 1 else "big")
    mac = ",".join(f"0x{b}" for b in backend_mac.split(":"))
    bpf = BPF(src_file=str(SOURCE).encode(), cflags=[f"-DFLOOR_VIP={vip_be}u", f"-DFLOOR_MAC={mac}"])
    return bpf, bpf.load_func(b"xdp_floor", BPF.XDP).fd


@contextlib.contextmanager
def attached(lab: Lab, vip: str, backend: str = "b1") -> Iterator[None]:
    """The floor on the LB's eth0 for the duration, forwarding ``vip`` to ``backend``; removed on exit.

    The lab's switch port of the LB already runs the XDP_PASS program that XDP_TX into a veth needs.
    """
    bpf, fd = load(vip, lab.mac(backend))
    try:
        with lab.ipr("lb") as ipr:
            index = ipr.link_lookup(ifname=lab.lb_iface)[0]
            ipr.link("set", index=index, xdp_fd=fd)
        try:
            yield
        finally:
            with lab.ipr("lb") as ipr:
                ipr.link("set", index=index, xdp_fd=-1)
    finally:
        bpf.cleanup()
