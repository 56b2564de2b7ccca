"""Shared fixtures.

The XDP program is compiled once per test session (BCC compiles at every
load, a second or more) into a scratch pin folder (fastlb.testing.testbed); tests
configure it through the maps. Root-only tests carry the ``root`` or
``netns`` marker and are skipped, with the reason, when not run as root.
"""

from __future__ import annotations

import os
import uuid

import pytest

IS_ROOT = os.geteuid() == 0


def pytest_collection_modifyitems(config, items):
    if IS_ROOT:
        return
    skip = pytest.mark.skip(reason="needs root (bpf(), network namespaces): run sudo make test")
    for item in items:
        if "root" in item.keywords or "netns" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def runid() -> str:
    return uuid.uuid4().hex[:6]


@pytest.fixture(scope="session")
def loaded(runid):
    """The real XDP program, loaded (not attached) for BPF_PROG_TEST_RUN."""
    if not IS_ROOT:
        pytest.skip("needs root")
    from fastlb.kernel.layout import Sizes
    from fastlb.testing.testbed import Testbed
    sizes = Sizes(max_vips=16, max_backends=64, ring_size=65537, conntrack_size=4096)
    with Testbed(sizes, name=f"test-{runid}") as bed:
        yield bed
