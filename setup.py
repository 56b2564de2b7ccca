"""Builds fastlb's compiled extensions with Cython.

* ``fastlb.core._core``: the selection core (Maglev, smooth WRR, least-connections
  and least-response-time scores, the kernel's flow hash). ``fastlb/core/_pure.py``
  is its pure-Python twin.
* ``fastlb.testing._testrun``: a compiled BPF_PROG_TEST_RUN loop for the packet tests,
  the fuzzer and the per-packet benchmark.

``FASTLB_DEBUG_BUILD=1`` turns bounds checking and wraparound back on.
"""

import os

from setuptools import Extension, setup

# pip builds with Cython 3 (pyproject.toml's build requirement); the Debian
# package builds with Debian 12's Cython 0.29.32 (debian/rules). The .pyx
# sources compile with both; debian/check-core.py and tests/test_core.py hold
# the compiled core to its pure-Python twin.
CYTHON_RANGE = ((0, 29), (4, 0))

try:
    import Cython
    from Cython.Build import cythonize
except ImportError as exc:  # pragma: no cover - pip's build isolation installs it
    raise SystemExit("fastlb needs Cython (0.29.32 or later, or 3.x) to build; "
                     "pip install 'Cython>=3.0,<4' or apt-get install cython3") from exc

_version = tuple(int(p) for p in Cython.__version__.split(".")[:2] if p.isdigit())
if not (CYTHON_RANGE[0] <= _version < CYTHON_RANGE[1]):
    raise SystemExit(f"fastlb needs Cython 0.29.32 or later (or 3.x) to build, found {Cython.__version__}")

debug = os.environ.get("FASTLB_DEBUG_BUILD") == "1"
directives = {
    "language_level": 3,
    "boundscheck": debug,
    "wraparound": debug,
    "cdivision": True,
    "initializedcheck": debug,
}

extensions = [
    Extension("fastlb.core._core", ["fastlb/core/_core.pyx"], extra_compile_args=["-O2"]),
    Extension("fastlb.testing._testrun", ["fastlb/testing/_testrun.pyx"], extra_compile_args=["-O2"]),
]

setup(ext_modules=cythonize(extensions, compiler_directives=directives))
