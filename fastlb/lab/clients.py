"""Client-side traffic for the lab: real TCP and UDP requests, counted by the backend that answered.

The functions at the top (:func:`tcp_requests`, :func:`udp_requests`, ...) are
called from the test or demo process. Each starts *one* Python process in the
lab's client namespace, ``python -m fastlb.lab.client_worker ...``, which makes all
the connections and prints one JSON object. Every socket operation has a timeout,
and the process as a whole has one too.

The first failed request ends the run: the caller gets a LabError that says
which request failed, why, and what had answered until then.
"""

from __future__ import annotations

import ipaddress
import json
from collections import Counter
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fastlb.lab.topology import Lab


def _target(lab: Lab, vip: str | None, family: int | None) -> str:
    if vip is None:
        return lab.vip(family or 4)
    version = ipaddress.ip_address(vip).version
    if family is not None and family != version:
        from fastlb.lab.netns import LabError

        raise LabError(f"address {vip} is not of family {family}", fix="leave family out")
    return vip


def _run(lab: Lab, what: str, args: list[object], timeout: float) -> dict:
    """Run this module in the client namespace and return its JSON answer.

    ``what`` names the job in errors, e.g. ``"TCP to [198.19.0.100]:80"``.
    """
    from fastlb.lab.netns import LabError

    res = lab.run_python("client", "fastlb.lab.client_worker", *args, timeout=timeout, check=False)
    try:
        out = json.loads(res.stdout)
    except ValueError:
        raise LabError(f"{what}: the client helper failed (exit {res.returncode}): "
                       f"{res.stderr.strip()[-500:]}") from None
    if out.get("error"):
        before = f" (answered before: {dict(out['counts'])})" if "counts" in out else ""
        raise LabError(f"{what}: {out['error']}{before}")
    return out


def tcp_requests(lab: Lab, vip: str | None = None, port: int = 80, count: int = 100,
                 family: int | None = None, timeout: float = 2.0, path: str = "/") -> Counter:
    """Make ``count`` HTTP GETs, one TCP connection each, from the client namespace.

    ``vip`` defaults to the lab's VIP of ``family`` (4 unless given); any address
    works, e.g. a backend's own. Returns how many each backend answered,
    ``Counter({"b1": 34, ...})``. Raises LabError at the first failure.
    """
    host = _target(lab, vip, family)
    out = _run(lab, f"TCP to [{host}]:{port}",
               ["tcp", "--host", host, "--port", port, "--count", count,
                "--timeout", timeout, "--path", path], timeout=10 + count * timeout)
    return Counter(out["counts"])


def udp_by_source(lab: Lab, vip: str | None = None, port: int = 9000, count: int = 100,
                  family: int | None = None, sources: int | None = None,
                  timeout: float = 2.0, first_port: int = 0, size: int = 0) -> dict[int, Counter]:
    """Send ``count`` UDP datagrams from the client namespace; answers per source port.

    ``sources``: how many client sockets (source ports, so flows) share the
    datagrams, round robin; None gives every datagram its own socket. A reply
    must come from the address the datagram went to (the VIP under DSR), or it
    counts as a failure. Raises LabError at the first failure.
    """
    host = _target(lab, vip, family)
    args = ["udp", "--host", host, "--port", port, "--count", count, "--timeout", timeout]
    if sources is not None:
        args += ["--sources", sources]
    if first_port:
        args += ["--first-port", first_port]
    if size:
        args += ["--size", size]
    out = _run(lab, f"UDP to [{host}]:{port}", args, timeout=10 + count * timeout)
    return {int(p): Counter(c) for p, c in out["by_source"].items()}


def udp_requests(lab: Lab, vip: str | None = None, port: int = 9000, count: int = 100,
                 family: int | None = None, sources: int | None = None,
                 timeout: float = 2.0) -> Counter:
    """Like :func:`udp_by_source`, but the total per backend: ``Counter({"b1": 30, ...})``."""
    total: Counter = Counter()
    for counts in udp_by_source(lab, vip, port, count, family, sources, timeout).values():
        total.update(counts)
    return total


def http_get(lab: Lab, host: str, port: int = 80, path: str = "/", timeout: float = 2.0) -> str:
    """One HTTP GET from the client namespace; return the body (status 200 required)."""
    out = _run(lab, f"GET http://[{host}]:{port}{path}",
               ["get", "--host", host, "--port", port, "--path", path, "--timeout", timeout],
               timeout=10 + timeout)
    return out["body"]


def wait_tcp(lab: Lab, targets: list[tuple[str, int]], timeout: float = 15.0) -> None:
    """Wait until a TCP connect from the client namespace to every (address, port) succeeds."""
    args: list[object] = ["wait", "--timeout", timeout]
    for host, port in targets:
        args += ["--target", host, port]
    _run(lab, "waiting for the lab servers", args, timeout=10 + timeout)
