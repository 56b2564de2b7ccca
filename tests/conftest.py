"""Shared fixtures.

The XDP program is compiled once per test session (BCC compiles at every
load, a second or more) with its maps pinned in a per-run folder of fastlb's
bpffs; tests configure it through the maps. Root-only tests carry the
``root`` marker and are skipped, with the reason, when not run as root.
"""

from __future__ import annotations

import os
import uuid

import pytest

from fastlb import cdefs

IS_ROOT = os.geteuid() == 0

XDP_ABORTED, XDP_DROP, XDP_PASS, XDP_TX, XDP_REDIRECT = range(5)
VERDICT_CODES = {"drop": XDP_DROP, "pass": XDP_PASS, "tx": XDP_TX, "redirect": XDP_REDIRECT}

# The MAC each test backend answers with (packet tests do no ARP).
def fake_mac(address) -> str:
    last = int(str(address).replace(":", ".").split(".")[-1] or "0", 16 if ":" in str(address) else 10)
    return f"02:00:00:00:00:{last & 0xff:02x}"


def pytest_collection_modifyitems(config, items):
    if IS_ROOT:
        return
    skip = pytest.mark.skip(reason="needs root (bpf(), network namespaces): run sudo make test")
    for item in items:
        if "root" in item.keywords or "netns" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def runid() -> str:
    return uuid.uuid4().hex[:6]


class LoadedProgram:
    """The balancer loaded once, its maps open, and a way to (re)apply configs."""

    def __init__(self, pin_dir, sizes):
        from fastlb.maps import PinnedMaps
        from fastlb.program import Program
        self.sizes = sizes
        self.pin_dir = pin_dir
        self.program = Program(pin_dir, sizes).load()
        self.maps = PinnedMaps(pin_dir)
        self.config = None

    @property
    def fd(self) -> int:
        return self.program.fd

    def apply(self, config_text: str):
        from fastlb import tables
        from fastlb.config import parse_config
        config = parse_config(config_text)
        macs = {str(b.address): fake_mac(b.address) for v in config.vips for b in v.backends}
        tables.apply(self.maps, config, macs, self.sizes)
        self.config = config
        return config

    def run(self, data: bytes):
        """(verdict, output bytes) of one packet."""
        from fastlb import _testrun
        retval, out, _ = _testrun.run(self.fd, bytes(data))
        return retval, out

    def reason_counts(self) -> dict[str, int]:
        return {name: self.maps.counter("reason_stats", idx).packets
                for name, idx in cdefs.enum("fl_reason").items() if name != "FL_REASON_MAX"}

    def flush_conntrack(self) -> None:
        for key in list(self.maps.keys("conntrack")):
            self.maps.delete("conntrack", key)

    def close(self):
        from fastlb import pins
        self.maps.close()
        self.program.close()
        pins.remove_dir(self.pin_dir)


@pytest.fixture(scope="session")
def loaded(runid):
    """The real XDP program, loaded (not attached) for BPF_PROG_TEST_RUN."""
    if not IS_ROOT:
        pytest.skip("needs root")
    from fastlb import pins
    from fastlb.program import Sizes
    base = pins.ensure_bpffs()
    sizes = Sizes(max_vips=8, max_backends=64, ring_size=65537, conntrack_size=4096)
    prog = LoadedProgram(base / f"test-{runid}", sizes)
    yield prog
    prog.close()
