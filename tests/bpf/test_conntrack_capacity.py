"""Conntrack capacity and the pinned-layout check on any CPU count (issue 13, items 6 and 7).

``conntrack_size`` is what an operator reads: the established flows the box
holds, whatever the CPU count and however RSS spreads flows over CPUs, while
the default new-flow guard admits new ones (docs/CONFIG.md). The kernel
rounds a per-CPU LRU's max_entries to a multiple of the possible CPUs; the
pinned-layout check must expect what the kernel makes, or ``--keep``
restarts fail on 3, 6, 12, 24 or 96 CPUs.
"""

from __future__ import annotations

import ctypes
import os

import pytest

from fastlb.kernel import bpfsys
from fastlb.kernel.layout import MAP_SPECS, MapSpec, Sizes, check_pinned_layouts, kernel_max_entries


@pytest.mark.parametrize("ncpus,want", [(1, 65536), (2, 65536), (3, 65538), (6, 65538), (12, 65544),
                                        (24, 65544), (32, 65536), (96, 65568)])
def test_per_cpu_lru_entries_round_up_to_the_possible_cpus(ncpus, want):
    """The kernel's rule (htab_map_alloc): roundup(max_entries, possible CPUs)."""
    assert kernel_max_entries(65536, bpfsys.BPF_F_NO_COMMON_LRU, "lru_hash", ncpus) == want


def test_rounding_that_would_overflow_rounds_down_and_common_lru_is_exact():
    assert kernel_max_entries(2**32 - 1, bpfsys.BPF_F_NO_COMMON_LRU, "lru_hash", 2) == 2**32 - 2
    for ncpus in (3, 6, 12, 24, 96):
        assert kernel_max_entries(65536, 0, "lru_hash", ncpus) == 65536
        assert kernel_max_entries(65537, bpfsys.BPF_F_NO_COMMON_LRU, "hash", ncpus) == 65537


def test_conntrack_holds_conntrack_size_flows_plus_the_default_guards_headroom_on_any_cpu_count():
    """One LRU for the box (no per-CPU split that strands capacity on CPUs without
    RX queues), sized conntrack_size plus the same again for the new flows the
    default guard admits in a second; the default guard admits conntrack_size new
    flows per second over the box's possible CPUs."""
    from fastlb.config import Settings
    specs = {s.name: s for s in MAP_SPECS}
    for name in ("conntrack", "nat_rev"):
        assert not specs[name].flags & bpfsys.BPF_F_NO_COMMON_LRU
    sizes = Sizes(conntrack_size=65536)
    assert specs["conntrack"].entries(sizes) == 2 * 65536
    for ncpus in (2, 3, 32, 96):
        rate = Settings(conntrack_size=65536).guard_rate(ncpus)
        assert rate * ncpus >= 65536 > (rate - 1) * ncpus
    assert Settings(conntrack_size=65536, new_flow_rate=5).guard_rate(96) == 5
    assert Settings(new_flow_rate=0).guard_rate(96) == 0


@pytest.mark.root
def test_a_real_per_cpu_lru_of_odd_size_is_adopted(tmp_path):
    """A per-CPU LRU created with a size the possible CPUs do not divide: the
    kernel rounds it; the check expects the rounded size and adopts the pin."""
    from bcc import BPF

    from fastlb.kernel import pins, structs
    base = pins.ensure_bpffs()
    pin_dir = base / f"test-odd-{os.getpid()}"
    pin_dir.mkdir()
    ncpus = bpfsys.possible_cpus()
    size = 4097 if ncpus % 2 == 0 else 4096 + ncpus // 2 + 1
    assert size % ncpus
    spec = MapSpec("nat_port", "lru_hash", structs.FlowKey, ctypes.c_uint16, flags=bpfsys.BPF_F_NO_COMMON_LRU)
    text = f'''
struct flow_key {{ u32 src[4]; u32 dst[4]; u16 sport; u16 dport; u8 proto; u8 family; u16 pad; }};
BPF_TABLE_PINNED7("lru_hash", struct flow_key, u16, nat_port, {size}, "{pin_dir}/nat_port", BPF_F_NO_COMMON_LRU);
int noop(void *ctx) {{ u32 zero = 0; struct flow_key k = {{}}; nat_port.lookup(&k); return 0; }}
'''
    bpf = BPF(text=text.encode())
    try:
        bpf.load_func(b"noop", BPF.XDP)
        fd = bpfsys.obj_get(str(pin_dir / "nat_port"))
        try:
            assert bpfsys.map_info(fd).max_entries != size  # the kernel rounded it
        finally:
            os.close(fd)
        check_pinned_layouts(pin_dir, Sizes(conntrack_size=size), specs=(spec,))
    finally:
        bpf.cleanup()
        pins.remove_dir(pin_dir)
