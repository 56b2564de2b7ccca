"""The selection core's public API: the compiled module, or its pure-Python twin.

``fastlb.core._core`` (Cython) is used unless ``FASTLB_PURE_PYTHON=1`` is set or it
cannot be imported (not built, or built for another Python); then
``fastlb.core._pure`` answers, with identical results and Maglev builds about 20
to 70 times slower (bench/bench_core.py). :data:`IMPLEMENTATION` says which one ("cython" or
"python"), and :data:`IMPORT_ERROR` keeps the reason the compiled module
was not used.

Functions (docs/HASH.md states every rule):

* ``jhash_3words(a, b, c, initval)``, ``jhash2(words, initval)``,
  ``jhash(data, initval)``: Linux's jhash family, u32 arithmetic.
* ``flow_hash(src, dst, sport, dport, proto, seed, mode)``: the kernel's flow hash.
* ``p2c_rehash(h, seed)``: the hash of the second P2C candidate.
* ``maglev_table(keys, weights, size, seed)``: weighted Maglev table of positions.
* ``table_delta(old, new)``: ``(slots, values)`` that changed.
* ``swrr_sequence(weights, max_len)``: nginx's smooth WRR, unrolled.
* ``p2c_candidates(h, ring, seed)``, ``p2c_pick(a, b, active, weights, rtt=None)``.
* ``is_prime(n)``, ``next_prime(n)``, and :class:`PeakEwma`.
"""

from __future__ import annotations

import os

from fastlb.core import _pure

IMPORT_ERROR: str | None = None

if os.environ.get("FASTLB_PURE_PYTHON") == "1":
    _impl = _pure
    IMPORT_ERROR = "FASTLB_PURE_PYTHON=1"
else:
    try:
        from fastlb.core import _core as _impl
    except ImportError as exc:  # not built: the twin gives the same answers
        _impl = _pure
        IMPORT_ERROR = f"{type(exc).__name__}: {exc}"

IMPLEMENTATION = "cython" if _impl is not _pure else "python"

jhash_3words = _impl.jhash_3words
jhash2 = _impl.jhash2
jhash = _impl.jhash
flow_hash = _impl.flow_hash
p2c_rehash = _impl.p2c_rehash
maglev_table = _impl.maglev_table
table_delta = _impl.table_delta
swrr_sequence = _impl.swrr_sequence
p2c_candidates = _impl.p2c_candidates
p2c_pick = _impl.p2c_pick
is_prime = _pure.is_prime
next_prime = _pure.next_prime
PeakEwma = _pure.PeakEwma        # plain Python in both: one object per backend, no inner loop

EMPTY = _pure.EMPTY
MAX_WEIGHT = _pure.MAX_WEIGHT

__all__ = [
    "EMPTY", "IMPLEMENTATION", "IMPORT_ERROR", "MAX_WEIGHT", "PeakEwma", "flow_hash", "is_prime",
    "jhash", "jhash2", "jhash_3words", "maglev_table", "next_prime", "p2c_candidates", "p2c_pick",
    "p2c_rehash", "swrr_sequence", "table_delta",
]
