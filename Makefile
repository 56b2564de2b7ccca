# fastlb: every target sets up what it needs first (scripts/setup.sh is
# idempotent: a few seconds when nothing changed).
#   sudo make setup   Debian packages, kernel headers for BCC, .venv, fastlb on PATH
#   sudo make test    set up, then the whole test suite (what CI runs)
#   sudo make demo    set up, then a namespace lab balancing real connections
#   sudo make bench   set up, then the benchmarks; writes docs/BENCHMARKS.md
#   sudo make fuzz    set up, then a million fuzzed frames against the data plane's rules

VENV   := .venv
PY     := $(VENV)/bin/python
PYTEST := $(PY) -m pytest

.PHONY: setup test test-core demo bench fuzz clean

setup:
	@./scripts/setup.sh

test: setup
	$(PYTEST) -q
	FASTLB_PURE_PYTHON=1 $(PYTEST) -q tests/unit/test_core.py

demo: setup
	$(VENV)/bin/fastlb lab demo

bench: setup
	$(PY) bench/run.py

fuzz: setup
	$(PY) fuzz/run.py --packets 1000000

clean:
	rm -rf build *.egg-info fastlb/*/*.so fastlb/core/_core.c fastlb/testing/_testrun.c .pytest_cache
