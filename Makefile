# fastlb: every target sets up what it needs first (scripts/setup.sh is
# idempotent: a few seconds when nothing changed).
#   sudo make setup   Debian packages, kernel headers for BCC, .venv, fastlb on PATH
#   sudo make test    set up, then the test suite but for the slow tests (what CI runs first)
#   sudo make test-slow  set up, then the slow tests: every benchmark in smoke mode (CI runs it next)
#   sudo make demo    set up, then a namespace lab balancing real connections
#   sudo make bench   set up, then the benchmarks; writes docs/BENCHMARKS.md
#   sudo make fuzz    set up, then a million fuzzed frames against the data plane's rules
#   sudo make deb     dist/fastlb_VERSION_ARCH.deb with Debian's toolchain (debian/), then lintian
#   sudo make vm-test the .deb installed and run in a Debian 12 VM (tests/vm/; about 15 min)

VENV   := .venv
PY     := $(VENV)/bin/python
PYTEST := $(PY) -m pytest

.PHONY: setup test test-slow demo bench fuzz deb vm-test clean

setup:
	@./scripts/setup.sh

test: setup
	$(PYTEST) -q -m "not slow"
	FASTLB_PURE_PYTHON=1 $(PYTEST) -q tests/unit/test_core.py

test-slow: setup
	$(PYTEST) -q -m slow

demo: setup
	$(VENV)/bin/fastlb lab demo

bench: setup
	$(PY) bench/run.py

fuzz: setup
	$(PY) fuzz/run.py --packets 1000000

deb:
	@./scripts/build-deb.sh

vm-test: setup deb
	@./tests/vm/run.sh

clean:
	rm -rf build dist *.egg-info fastlb/*/*.so fastlb/core/_core.c fastlb/testing/_testrun.c .pytest_cache
