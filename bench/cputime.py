"""CPU time for the end-to-end benchmarks: per namespace, and of fastlb's XDP program.

- :func:`namespace_ns`: scheduler run time (``/proc/PID/task/TID/schedstat``,
  nanoseconds) summed over every task in the given network namespaces, plus
  ksoftirqd. This kernel has no IRQ time accounting, so softirq work is
  charged to whichever task was running: summed over *all* the lab's
  namespaces it is the lab's whole cost, however busy the rest of the shared
  machine is; for one namespace it is only approximate.
- :class:`XdpRunTime`: the kernel's own run time of one BPF program
  (``run_time_ns`` of ``struct bpf_prog_info``), counted only while
  BPF_ENABLE_STATS is on. Stats are switched on for the duration of a
  ``with`` block and off when its fd closes, even if the process dies.
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

from fastlb.kernel import bpfsys, pins
from fastlb.lab import netns

BPF_ENABLE_STATS = 32            # enum bpf_cmd
BPF_STATS_RUN_TIME = 0           # enum bpf_stats_type
RUN_TIME_OFFSET = 192            # offsetof(struct bpf_prog_info, run_time_ns), Linux 5.1 and later


class _EnableStatsAttr(ctypes.Structure):
    _fields_ = [("type", ctypes.c_uint32)]


class _ProgRunInfo(ctypes.Structure):
    """``struct bpf_prog_info`` up to ``run_cnt``; the head is not needed here."""
    _fields_ = [("head", ctypes.c_uint8 * RUN_TIME_OFFSET), ("run_time_ns", ctypes.c_uint64),
                ("run_cnt", ctypes.c_uint64)]


def _task_ns(pid: str) -> int:
    total = 0
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return 0
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                total += int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            continue    # the task ended meanwhile
    return total


def namespace_ns(names: list[str], ksoftirqd: bool = True) -> int:
    """Run time so far of every task in the named network namespaces (and ksoftirqd), in ns."""
    wanted = set()
    for name in names:
        try:
            st = os.stat(netns.NETNS_DIR / name)
        except FileNotFoundError:
            continue
        wanted.add((st.st_dev, st.st_ino))
    total = 0
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            st = os.stat(f"/proc/{pid}/ns/net")
            if (st.st_dev, st.st_ino) in wanted:
                total += _task_ns(pid)
            elif ksoftirqd:
                with open(f"/proc/{pid}/comm") as f:
                    if f.read().startswith("ksoftirqd/"):
                        total += _task_ns(pid)
        except OSError:
            continue
    return total


def attachment_dir(ns: str, ifname: str = "eth0") -> Path:
    """The pin folder of fastlb's attachment to ``ifname`` in network namespace ``ns``, seen from here."""
    inode = os.stat(netns.NETNS_DIR / ns).st_ino
    return pins.root() / f"net{inode}" / ifname


def attachment_prog(ns: str, ifname: str = "eth0") -> Path:
    """The pinned program of that attachment."""
    return attachment_dir(ns, ifname) / pins.PROG_PIN


class XdpRunTime:
    """Run time of a pinned program while the block runs: ``with XdpRunTime(path) as rt: ...; rt.read()``."""

    def __init__(self, prog_pin: Path):
        self.prog_pin = prog_pin
        self._stats_fd = -1
        self._prog_fd = -1

    def __enter__(self) -> XdpRunTime:
        self._stats_fd = bpfsys._bpf(BPF_ENABLE_STATS, _EnableStatsAttr(type=BPF_STATS_RUN_TIME))
        try:
            self._prog_fd = bpfsys.obj_get(str(self.prog_pin))
        except BaseException:
            os.close(self._stats_fd)
            raise
        return self

    def read(self) -> tuple[int, int]:
        """(run time in ns, runs) so far."""
        info = bpfsys._info(self._prog_fd, _ProgRunInfo())
        return info.run_time_ns, info.run_cnt

    def __exit__(self, *exc) -> None:
        os.close(self._prog_fd)
        os.close(self._stats_fd)
