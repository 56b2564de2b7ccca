"""Selection-core benchmark: Maglev build time, balance and disruption.

``run(quick=False)`` returns a Markdown section for docs/BENCHMARKS.md
(bench/run.py collects it). Run it on its own with::

    python bench/bench_core.py [--quick]

Build times compare the compiled core with its pure-Python twin in the same
process: the median of several Cython builds, fewer twin builds (it is slow).
Balance and disruption come from the compiled core (the twin builds the same
tables; tests/unit/test_core.py checks that).
"""

from __future__ import annotations

import gc
import os
import platform
import random
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

if __package__ in (None, "") and __name__ == "__main__":  # python bench/bench_core.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fastlb.core import _core, _pure  # noqa: E402

SEED = 0x5EED


def _keys(n: int) -> list[bytes]:
    return [f"198.18.{i // 250}.{i % 250}:80".encode() for i in range(n)]


def _weights(kind: str, n: int, rnd: random.Random) -> list[int]:
    if kind == "equal":
        return [1] * n
    if kind == "1..100":
        return [rnd.randint(1, 100) for _ in range(n)]
    return [rnd.randint(1, 65535) for _ in range(n)]     # all distinct, in practice


def _median_ms(fn, runs: int) -> float:
    times = []
    gc.disable()
    try:
        for _ in range(runs):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
    finally:
        gc.enable()
    return statistics.median(times) * 1e3


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def build_times(quick: bool) -> list[str]:
    rnd = random.Random(1)
    sizes = (65537,) if quick else (65537, 655373)
    kinds = ("equal",) if quick else ("equal", "1..100", "1..65535")
    c_runs = 5 if quick else 9
    rows = ["| backends | table size M | weights | Cython (median) | twin | speedup |",
            "|---:|---:|---|---:|---:|---:|"]
    for m in sizes:
        for n in (100, 1000):
            keys = _keys(n)
            for kind in kinds:
                w = _weights(kind, n, rnd)
                c_ms = _median_ms(lambda: _core.maglev_table(keys, w, m, SEED), c_runs)
                p_runs = 1 if quick or m > 100_000 else 3
                p_ms = _median_ms(lambda: _pure.maglev_table(keys, w, m, SEED), p_runs)
                rows.append(f"| {n} | {m:,} | {kind} | {c_ms:.2f} ms (n={c_runs}) | "
                            f"{p_ms:.0f} ms (n={p_runs}) | {p_ms / c_ms:.0f}x |")
    return rows


def balance(quick: bool) -> list[str]:
    rnd = random.Random(2)
    sizes = (65537,) if quick else (65537, 655373)
    rows = ["| backends | M | weights | max / ideal slots | ideal (rounding bound) | worst slot error |",
            "|---:|---:|---|---:|---:|---:|"]
    for m in sizes:
        for n in (100, 1000):
            for kind in ("equal", "1..100"):
                w = _weights(kind, n, rnd)
                counts = Counter(_core.maglev_table(_keys(n), w, m, SEED))
                total = sum(w)
                ideal = [m * x / total for x in w]
                ratio = max(counts[i] / ideal[i] for i in range(n))
                bound = max(-(-ideal[i] // 1) / ideal[i] for i in range(n))   # ceil(ideal) / ideal
                err = max(abs(counts[i] - ideal[i]) for i in range(n))
                rows.append(f"| {n} | {m:,} | {kind} | {ratio:.4f} | {bound:.4f} | {err:.2f} slots |")
    return rows


def _moved(keys, w, removed: set[int], m: int) -> tuple[int, int]:
    old = _core.maglev_table(keys, w, m, SEED)
    keep = [i for i in range(len(keys)) if i not in removed]
    new = _core.maglev_table([keys[i] for i in keep], [w[i] for i in keep], m, SEED)
    new_as_old = [keep[p] for p in new]               # positions of the new list -> old positions
    own = sum(1 for p in old if p in removed)
    changed = sum(1 for a, b in zip(old, new_as_old) if a != b)
    return own, changed


def disruption(quick: bool) -> list[str]:
    rnd = random.Random(3)
    m = 65537
    rows = ["| backends | weights | removed | slots changed | minimum (their own share) | "
            "other backends' slots moved |",
            "|---:|---|---:|---:|---:|---:|"]
    trials = 1 if quick else 5
    for n in (1000,) if quick else (100, 1000):
        keys = _keys(n)
        for kind in ("equal", "1..100"):
            w = _weights(kind, n, rnd)
            for count in sorted({1, max(1, n // 100), n // 10}):
                own_sum = changed_sum = 0
                for _ in range(trials):
                    removed = set(rnd.sample(range(n), count))
                    own, changed = _moved(keys, w, removed, m)
                    own_sum += own
                    changed_sum += changed
                extra = (changed_sum - own_sum) / (trials * m - own_sum)
                rows.append(f"| {n} | {kind} | {count} ({count / n:.1%}) | {changed_sum / (trials * m):.2%} | "
                            f"{own_sum / (trials * m):.2%} | {extra:.2%} |")
    return rows


def run(quick: bool = False) -> str:
    """The Markdown section: build times, balance, disruption."""
    started = time.perf_counter()
    parts = [
        "## Selection core: weighted Maglev",
        "",
        f"{_cpu()}, {os.cpu_count()} CPUs, Python {platform.python_version()}"
        f"{', quick run' if quick else ''}. Tables are built by `fastlb.core._core` (Cython) and by its "
        "pure-Python twin `fastlb.core._pure` in the same process; they are identical (tests/unit/test_core.py). "
        "docs/HASH.md describes the algorithm.",
        "",
        "### Build time",
        "",
        *build_times(quick),
        "",
        "Equal weights make one turn group, so the Cython build is almost all Maglev probing. "
        "With every weight different, each turn also pays a heap operation.",
        "",
        "### Balance",
        "",
        "Slots per backend against the exact share M·w/Σw. The ideal column is the best any integer "
        "table can do (ceil(share)/share for the smallest share).",
        "",
        *balance(quick),
        "",
        "### Disruption",
        "",
        f"Remove backends at random (M = 65,537, averaged over {1 if quick else 5} draws). "
        "Slots that must change are the removed backends' own; the last column is everything beyond that, "
        "as a share of the surviving backends' slots.",
        "",
        *disruption(quick),
        "",
        f"_Measured in {time.perf_counter() - started:.1f} s._",
        "",
    ]
    return "\n".join(parts)


if __name__ == "__main__":
    print(run(quick="--quick" in sys.argv[1:]))
