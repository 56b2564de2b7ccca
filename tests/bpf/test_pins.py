"""fastlb's bpffs: the pin folders of namespaces that are gone are collected."""

from __future__ import annotations

import os

import pytest

from fastlb.kernel import pins

pytestmark = pytest.mark.root


def test_pin_folders_of_a_dead_namespace_are_collected_and_live_ones_kept():
    base = pins.ensure_bpffs()
    dead = [base / "net1" / "eth9", base / "decap-net2" / "eth9"]   # no namespace has inode 1 or 2
    live = base / f"net{os.stat('/proc/self/ns/net').st_ino}" / "lbtest0"
    created_live_parent = not live.parent.exists()
    for folder in (*dead, live):
        folder.mkdir(parents=True, exist_ok=True)
    try:
        removed = pins.collect_stale(base)
        assert {p.name for p in removed} >= {"net1", "decap-net2"}
        assert not any(d.parent.exists() for d in dead)
        assert live.exists()
    finally:
        live.rmdir()
        if created_live_parent:
            live.parent.rmdir()


def test_every_named_namespace_counts_as_live():
    for name in os.listdir("/run/netns") if os.path.isdir("/run/netns") else []:
        assert os.stat(f"/run/netns/{name}").st_ino in pins.live_netns_inodes()
    assert os.stat("/proc/self/ns/net").st_ino in pins.live_netns_inodes()
