"""The states the maps pass through while ``tables.apply`` rewrites them.

A live change is many map writes. Between any two of them the program runs
on whatever the maps hold, so every intermediate state must forward a new
flow that the old or the new tables would forward: DATAPLANE.md rule 11
drops one for want of a backend (``FL_DROP_NO_BACKEND``) only when its VIP
has no backend of weight > 0. The tests wrap the maps so that after every
write, SYNs from fresh source ports go to each VIP through the loaded
program (BPF_PROG_TEST_RUN).
"""

from __future__ import annotations

import itertools
import os

import pytest

from fastlb.config import parse_config
from fastlb.dataplane import tables
from fastlb.testing.testbed import LB_MAC, XDP_VERDICTS, fake_mac
from helpers.packets import VIP4 as VIP, eth, tcp, v4

pytestmark = pytest.mark.root

BACKENDS = ("198.18.0.11", "198.18.0.12", "198.18.0.13")
PORTS = {"maglev": 81, "rr": 82, "wrr": 83, "lc": 84, "lrt": 85}
SYNS_PER_VIP = 24     # per probe: with 3 backends, every backend's share is met


def config_text() -> str:
    text = "[settings]\nconntrack_size = 8192\nhash_seed = 4242\nring_size = 1021\n"
    for algorithm, port in PORTS.items():
        text += f'\n[[vip]]\naddress = "{VIP}"\nport = {port}\nalgorithm = "{algorithm}"\n'
        text += "".join(f'[[vip.backend]]\naddress = "{b}"\nweight = {i + 1}\n' for i, b in enumerate(BACKENDS))
    return text


class ProbedMaps:
    """The testbed's maps, probed after every write that ``tables.apply`` makes."""

    WRITES = {"update", "delete", "write_u32_slice", "write_u32_slots"}

    def __init__(self, maps, probe):
        self._maps, self._probe = maps, probe

    def __getattr__(self, name):
        attr = getattr(self._maps, name)
        if name not in self.WRITES:
            return attr

        def write(*args, **kwargs):
            out = attr(*args, **kwargs)
            self._probe(f"{name}({args[0]!r})")
            return out
        return write


@pytest.fixture(scope="module")
def bed():
    from fastlb.kernel.layout import Sizes
    from fastlb.testing.testbed import Testbed
    sizes = Sizes(max_vips=8, max_backends=64, conntrack_size=8192, hash_seed=4242, ring_size=1021)
    with Testbed(sizes, name=f"updates-{os.getpid()}") as tb:
        yield tb


def test_a_backend_going_down_or_coming_back_never_leaves_a_new_flow_without_a_backend(bed):
    config = parse_config(config_text())
    macs = {b: fake_mac(b) for b in BACKENDS}
    victim = BACKENDS[-1]
    down = frozenset((v.name, b.key) for v in config.vips for b in v.backends if str(b.address) == victim)
    ports = itertools.count(10_000)
    dropped: list[str] = []
    probes = 0

    def probe(after: str) -> None:
        nonlocal probes
        probes += 1
        for algorithm, port in PORTS.items():
            for _ in range(SYNS_PER_VIP):
                verdict, _ = bed.run(bytes(eth() / v4() / tcp(dport=port, sport=next(ports))))
                if verdict != XDP_VERDICTS["tx"]:
                    dropped.append(f"{algorithm} SYN after {after}")

    tables.apply(bed.maps, config, macs, bed.sizes, lb_mac=LB_MAC)
    bed.flush_conntrack()
    probed = ProbedMaps(bed.maps, probe)
    try:
        tables.apply(probed, config, macs, bed.sizes, down=down)     # the victim goes down
        assert probes > 0
        assert not dropped, f"{len(dropped)} new flows dropped while {victim} went down: {sorted(set(dropped))}"
        bed.flush_conntrack()
        tables.apply(probed, config, macs, bed.sizes)                # ... and comes back up
        assert not dropped, f"{len(dropped)} new flows dropped while {victim} came back: {sorted(set(dropped))}"
    finally:
        bed.flush_conntrack()
