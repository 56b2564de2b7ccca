"""fastlb's namespace lab: a client, a load balancer and backends on a bridge, all in netns.

::

    from fastlb.lab import Lab, tcp_requests

    with Lab(backends=3) as lab:               # needs root
        lab.write_config("lab.toml")           # the lab's VIPs and backends, TCP 80 + UDP 9000
        lb = lab.exec("lb", ["fastlb", "attach", lab.lb_iface, "-c", "lab.toml"])
        ...                                    # wait until it says it is attached
        print(tcp_requests(lab, lab.vip4, 80, count=300))   # Counter({'b1': 101, ...})
    # down(): SIGTERM to everything in the lab's namespaces (so fastlb detaches), then removal

Modules: :mod:`~fastlb.lab.topology` (the :class:`Lab`), :mod:`~fastlb.lab.netns`
(namespaces, state files, :func:`cleanup_stale`), :mod:`~fastlb.lab.servers` and
:mod:`~fastlb.lab.clients` (the traffic at both ends), :mod:`~fastlb.lab.lb_process`
(``fastlb attach`` in the LB namespace, and its counters), :mod:`~fastlb.lab.twotier`
(an L4 box in front of two L7 boxes), :mod:`~fastlb.lab.spread`
(requests counted by the client and by fastlb), :mod:`~fastlb.lab.linerate` (a
line-rate UDP burst from BPF_PROG_TEST_RUN live frames), :mod:`~fastlb.lab.runs`
(labs that outlive ``fastlb lab up``), :mod:`~fastlb.lab.demo` and
:mod:`~fastlb.lab.chart` (``fastlb lab demo``), :mod:`~fastlb.lab.cli` (the
``fastlb lab`` commands).

The names below are imported lazily: the servers and clients run as
``python -m fastlb.lab.servers`` inside namespaces, and should not pay for
importing pyroute2 at every start.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "Lab": "fastlb.lab.topology",
    "VIP4": "fastlb.lab.topology",
    "VIP6": "fastlb.lab.topology",
    "LabError": "fastlb.lab.netns",
    "cleanup_stale": "fastlb.lab.netns",
    "tcp_requests": "fastlb.lab.clients",
    "udp_requests": "fastlb.lab.clients",
    "udp_by_source": "fastlb.lab.clients",
    "http_get": "fastlb.lab.clients",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'fastlb.lab' has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__
