"""lrt for HAProxy: steer leastconn by measured response times (pure; no I/O).

HAProxy 2.6 has no response-time algorithm. Under ``balance leastconn`` it
picks the server with the lowest ``(active + 1) / weight``. Setting each
server's weight inversely to its response-time estimate makes that choice
follow ``(active + 1) x latency``, the rule of fastlb's L4 lrt.

- The estimate is the selection core's peak-EWMA (``fastlb.core.PeakEwma``)
  of HAProxy's ``Tr`` per server, fed from the log stream.
- Estimates below ``floor_ms`` count as ``floor_ms`` (sub-millisecond noise on
  a LAN must not split equal servers 2:1).
- The EWMA's time constant is ``decay_s``: short, so that a backend's estimate
  follows its typical time rather than its last tail spike.
- A server without a sample for ``stale_s`` decays toward its pool's mean
  (time constant ``pull_s``): a server that looked slow, and so stopped being
  picked and measured, is tried again; so is one that has just been added.
- Weights are ``max_weight * fastest / estimate`` clamped to 1..max_weight, and
  a weight is rewritten only when it moves by more than ``hysteresis``
  (relative), so that noise does not churn the runtime API.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from fastlb.core import PeakEwma

MAX_WEIGHT = 256        # HAProxy's largest weight


@dataclass
class _Server:
    ewma: PeakEwma
    last_sample: float | None = None
    samples: int = 0
    weight: int | None = None        # last written


class Steering:
    def __init__(self, decay_s: float = 0.5, floor_ms: float = 2.0, stale_s: float = 2.0, pull_s: float = 3.0,
                 hysteresis: float = 0.2, max_weight: int = MAX_WEIGHT):
        self.decay_s = decay_s
        self.pull_s = pull_s
        self.floor_ms = floor_ms
        self.stale_s = stale_s
        self.hysteresis = hysteresis
        self.max_weight = max_weight
        self._pools: dict[str, dict[str, _Server]] = {}

    def set_pools(self, pools: dict[str, list[str]]) -> None:
        """The lrt pools and their steered servers; servers kept keep their estimates."""
        new: dict[str, dict[str, _Server]] = {}
        for pool, servers in pools.items():
            old = self._pools.get(pool, {})
            new[pool] = {s: old.get(s) or _Server(PeakEwma(decay_s=self.decay_s)) for s in servers}
        self._pools = new

    def observe(self, pool: str, server: str, tr_ms: float, now: float) -> None:
        """One response time (HAProxy's Tr, ms) of ``server``; ignored for servers not steered."""
        entry = self._pools.get(pool, {}).get(server)
        if entry is None or tr_ms < 0:
            return
        entry.ewma.observe(tr_ms * 1000.0, now)
        entry.last_sample = now
        entry.samples += 1

    def estimates(self, pool: str, now: float) -> dict[str, float | None]:
        """Each server's response-time estimate in ms (None: never measured and no pool mean yet)."""
        servers = self._pools.get(pool, {})
        # the EWMA as of its last sample: between samples it is pulled toward the pool mean
        # (below), not toward zero as PeakEwma.score_us would
        measured = {s: e.ewma.score_us(e.last_sample) / 1000.0 for s, e in servers.items()
                    if e.last_sample is not None}
        fresh = {s: v for s, v in measured.items() if now - servers[s].last_sample <= self.stale_s}
        basis = fresh or measured
        mean = sum(basis.values()) / len(basis) if basis else None
        out: dict[str, float | None] = {}
        for s, e in servers.items():
            if s in fresh:
                out[s] = fresh[s]
            elif e.last_sample is None:
                out[s] = mean
            else:
                # stale: from its last estimate toward the pool mean
                pull = math.exp(-(now - e.last_sample - self.stale_s) / self.pull_s)
                out[s] = mean + (measured[s] - mean) * pull if mean is not None else measured[s]
        return out

    def target_weights(self, pool: str, now: float) -> dict[str, int]:
        estimates = self.estimates(pool, now)
        known = {s: max(self.floor_ms, v) for s, v in estimates.items() if v is not None}
        if not known:
            return {s: self.max_weight for s in estimates}
        fastest = min(known.values())
        return {s: max(1, min(self.max_weight, round(self.max_weight * fastest / known[s])))
                if s in known else self.max_weight for s in estimates}

    def changes(self, now: float) -> dict[tuple[str, str], int]:
        """{(pool, server): weight} to write now: those that moved past the hysteresis.

        The caller writes them, then calls :meth:`written`.
        """
        out = {}
        for pool, servers in self._pools.items():
            for server, weight in self.target_weights(pool, now).items():
                old = servers[server].weight
                if old is None or abs(weight - old) > self.hysteresis * old:
                    out[(pool, server)] = weight
        return out

    def written(self, pool: str, server: str, weight: int) -> None:
        entry = self._pools.get(pool, {}).get(server)
        if entry is not None:
            entry.weight = weight

    def view(self, pool: str, now: float) -> dict[str, dict]:
        """What ``fastlb stats`` shows per server: estimate, effective weight, samples."""
        est = self.estimates(pool, now)
        return {s: {"latency_estimate_ms": None if est[s] is None else round(est[s], 3),
                    "effective_weight": e.weight, "samples": e.samples}
                for s, e in self._pools.get(pool, {}).items()}
