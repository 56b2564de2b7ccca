"""Response times the data plane measured (lrt under NAT): per-backend sums out of ``backend_resp``.

The program times each NAT connection's first response, from the client's
first payload to the backend's first payload, and adds it to the backend's
per-CPU ``fl_resp`` slot (bpf/fastlb_kern.c, "Response time"). ``read`` sums
the CPUs; ``Meter`` turns two reads into the mean of the responses between
them, which the controller feeds to the backend's lrt estimate.
"""

from __future__ import annotations

import ctypes

from fastlb.kernel import bpfsys, structs
from fastlb.kernel.maps import PinnedMaps


def read(maps: PinnedMaps, be_ids) -> dict[int, tuple[int, int]]:
    """backend id -> (sum of first-response times in µs, how many), over all CPUs."""
    out = {}
    per_cpu = (structs.Resp * maps.ncpus)()
    for be_id in be_ids:
        total_us = count = 0
        if bpfsys.map_lookup(maps.fds["backend_resp"], ctypes.c_uint32(be_id), per_cpu):
            for r in per_cpu:
                total_us += r.sum_us
                count += r.count
        out[be_id] = (total_us, count)
    return out


class Meter:
    """The mean response time of each backend's responses since the last ``update``."""

    def __init__(self):
        self.last: dict[int, tuple[int, int]] = {}

    def update(self, sums: dict[int, tuple[int, int]]) -> dict[int, tuple[float, int]]:
        """backend id -> (mean µs, how many) of the responses new since the last call. A slot whose
        sums went down was given to a new backend (the loader zeroes it): it starts afresh."""
        out = {}
        for be_id, (total, count) in sums.items():
            was_total, was_count = self.last.get(be_id, (0, 0))
            if count < was_count or total < was_total:
                was_total, was_count = 0, 0
            if count > was_count:
                out[be_id] = ((total - was_total) / (count - was_count), count - was_count)
        self.last = dict(sums)
        return out
