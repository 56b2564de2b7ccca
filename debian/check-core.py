"""Build-time check (debian/rules): the installed Cython core, built with
Debian's Cython, imports and gives the same answers as its pure-Python twin
(fastlb/core/_pure.py). tests/unit/test_core.py checks the two in depth."""

import random

from fastlb import core
from fastlb.core import _core, _pure

assert core.IMPLEMENTATION == "cython", f"the Cython core did not import: {core.IMPORT_ERROR}"
rng = random.Random(17)
keys = [bytes(rng.randrange(256) for _ in range(16)) for _ in range(7)]
weights = [rng.randrange(0, 5) for _ in keys]
assert list(_core.maglev_table(keys, weights, 4099, 5)) == list(_pure.maglev_table(keys, weights, 4099, 5))
assert list(_core.swrr_sequence(weights, 64)) == list(_pure.swrr_sequence(weights, 64))
for _ in range(200):
    src, dst = bytes(rng.randrange(256) for _ in range(16)), bytes(rng.randrange(256) for _ in range(16))
    args = (src, dst, rng.randrange(65536), rng.randrange(65536), 6, rng.randrange(2**32), 0)
    assert _core.flow_hash(*args) == _pure.flow_hash(*args), args
print("check-core: fastlb.core._core (Cython) imports and agrees with fastlb.core._pure")
