"""The balancer loaded but not attached, for BPF_PROG_TEST_RUN.

Tests, the fuzzer and the benchmarks share this: the program is compiled
once into a scratch pin folder of fastlb's bpffs, configured through its
maps, and fed packets with the compiled test-run loop (fastlb.testing._testrun).
Backends get made-up MAC addresses, since nothing is resolved here.
"""

from __future__ import annotations

import ctypes
import ipaddress
import uuid

from fastlb.config import parse_config
from fastlb.dataplane import tables
from fastlb.kernel import cdefs, pins
from fastlb.kernel.layout import Sizes
from fastlb.kernel.loader import Program
from fastlb.kernel.maps import PinnedMaps
from fastlb.testing import _testrun

# enum xdp_action (include/uapi/linux/bpf.h), by the verdict names cdefs.reason_verdict gives.
XDP_VERDICTS = {"aborted": 0, "drop": 1, "pass": 2, "tx": 3, "redirect": 4}


# The MAC the testbed's balancer answers ARP/ND with (its "interface" MAC).
LB_MAC = "02:00:00:00:00:02"


def fake_mac(address) -> str:
    """A locally administered MAC derived from the address's last byte."""
    return f"02:00:00:00:00:{ipaddress.ip_address(str(address)).packed[-1]:02x}"


class Testbed:
    """A loaded (unattached) balancer with its maps open. Close it, or use ``with``."""

    def __init__(self, sizes: Sizes | None = None, name: str | None = None):
        self.sizes = sizes or Sizes()
        base = pins.ensure_bpffs()
        self.pin_dir = base / f"scratch-{name or uuid.uuid4().hex[:8]}"
        self.program = Program(self.pin_dir, self.sizes)
        self.maps = None
        self.config = None
        try:
            self.program.load()
            self.maps = PinnedMaps(self.pin_dir)
        except BaseException:
            self.close()
            raise

    @property
    def fd(self) -> int:
        return self.program.fd

    def apply(self, config_text: str):
        """Parse ``config_text`` and write it to the maps; returns the Config."""
        config = parse_config(config_text)
        macs = {str(b.address): fake_mac(b.address) for v in config.vips for b in v.backends}
        tables.apply(self.maps, config, macs, self.sizes, lb_mac=LB_MAC)
        self.config = config
        return config

    def run(self, data: bytes) -> tuple[int, bytes]:
        """(XDP verdict, output bytes) of one packet."""
        retval, out, _ = _testrun.run(self.fd, bytes(data))
        return retval, out

    def reason_counts(self) -> dict[str, int]:
        return {name: self.maps.counter("reason_stats", idx).packets
                for name, idx in cdefs.enum("fl_reason").items() if name != "FL_REASON_MAX"}

    def forget(self) -> None:
        """Empty the VIP and backend tables, as a fresh load has them (slots are placed anew)."""
        from fastlb.kernel import structs
        for key in list(self.maps.keys("vips")):
            self.maps.delete("vips", key)
        for vip_id in range(self.sizes.max_vips):
            self.maps.update("vip_table", ctypes.c_uint32(vip_id), structs.VipMeta())
        for be_id in range(self.sizes.max_backends):
            self.maps.update("backends", ctypes.c_uint32(be_id), structs.Backend())
        self.flush_conntrack()
        self.config = None

    def flush_conntrack(self) -> int:
        keys = list(self.maps.keys("conntrack"))
        for key in keys:
            self.maps.delete("conntrack", key)
        return len(keys)

    def close(self) -> None:
        if self.maps is not None:
            self.maps.close()
            self.maps = None
        self.program.close()
        pins.remove_dir(self.pin_dir)

    def __enter__(self) -> "Testbed":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
