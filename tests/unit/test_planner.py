"""The controller's planner (fastlb.controller.planner): pure, no BPF, no root.

What goes in the tables given health, MACs and the all_down policy; which
transitions are logged; what one plan hands to the next.
"""

from __future__ import annotations

import pytest

from fastlb.config import parse_config
from fastlb.controller import planner
from fastlb.controller.planner import NO_MAC, Memory, plan

from helpers.configs import BACKENDS, VIP

MACS = {"198.18.0.11": "02:00:00:00:00:0b", "198.18.0.12": "02:00:00:00:00:0c"}
B11, B12 = b"198.18.0.11:80", b"198.18.0.12:80"


def _config(health_keys: str = ""):
    cfg = parse_config(VIP + '[vip.health]\nkind = "tcp"\n' + health_keys + BACKENDS)
    return cfg, cfg.vips[0]


def _states(vip, s11: str, s12: str) -> dict:
    return {(vip.name, B11): s11, (vip.name, B12): s12}


def test_a_failed_backend_is_down_and_an_unknown_one_waits():
    cfg, vip = _config()
    assert plan(cfg, _states(vip, "up", "down"), MACS).down == {(vip.name, B12)}
    assert plan(cfg, _states(vip, "up", "unknown"), MACS).down == {(vip.name, B12)}
    no_mac = {"198.18.0.12": MACS["198.18.0.12"]}   # no next-hop MAC: it cannot be in the tables either
    p = plan(cfg, _states(vip, "up", "up"), no_mac)
    assert p.down == {(vip.name, B11)}
    assert p.macs == {"198.18.0.11": NO_MAC, "198.18.0.12": MACS["198.18.0.12"]}
    assert p.in_table(p.effective.vips[0]) == 1


def test_without_expire_nodest_conn_a_failed_backend_only_gets_weight_0():
    cfg, vip = _config("expire_nodest_conn = false\n")
    p = plan(cfg, _states(vip, "up", "down"), MACS)
    assert p.down == frozenset() and [b.weight for b in p.effective.vips[0].backends] == [1, 0]
    assert [b.weight for b in cfg.vips[0].backends] == [1, 1]   # the config itself is not changed


@pytest.mark.parametrize("policy, in_table", [("drop", set()), ("keep", {B12})])
def test_every_backend_down_drops_or_keeps_the_last_table_and_says_so(policy, in_table):
    cfg, vip = _config(f'all_down = "{policy}"\n')
    first = plan(cfg, _states(vip, "down", "up"), MACS)
    assert first.transitions == () and first.memory.kept == {vip.name: frozenset({B12})}
    second = plan(cfg, _states(vip, "down", "down"), MACS, first.memory)
    assert {k for _, k in {(vip.name, B11), (vip.name, B12)} - second.down} == in_table
    assert [e for e, _ in second.transitions] == ["vip_no_healthy_backend"]
    assert second.transitions[0][1]["policy"] == policy
    third = plan(cfg, _states(vip, "down", "down"), MACS, second.memory)
    assert third.transitions == ()                       # logged once, at the transition
    back = plan(cfg, _states(vip, "up", "down"), MACS, third.memory)
    assert back.down == {(vip.name, B12)}
    assert back.transitions == (("vip_has_healthy_backend", {"vip": vip.name, "backends_up": 1}),)


def test_a_plan_is_pure_the_same_inputs_give_the_same_plan():
    cfg, vip = _config('all_down = "keep"\n')
    memory = Memory(kept={vip.name: frozenset({B11})}, empty=frozenset({vip.name}))
    a = plan(cfg, _states(vip, "down", "down"), MACS, memory)
    b = plan(cfg, _states(vip, "down", "down"), MACS, memory)
    assert a == b and memory == Memory(kept={vip.name: frozenset({B11})}, empty=frozenset({vip.name}))
    assert a.down == {(vip.name, B12)}    # keep: the last set (B11) stays in the table


def test_the_planner_needs_no_bpf():
    import ast
    import inspect
    tree = ast.parse(inspect.getsource(planner))
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)} | \
        {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert not {m for m in imported if m and m.startswith(("fastlb.kernel", "fastlb.dataplane", "bcc"))}


def test_a_weight_a_check_asks_for_replaces_the_configured_one_in_the_plan():
    cfg, vip = _config()
    assert planner.asked_weight(10, (None, None)) == 10
    assert planner.asked_weight(10, (3, None)) == 3            # exec: "weight 3"
    assert planner.asked_weight(10, (None, 50)) == 5           # agent: "50%"
    assert planner.asked_weight(10, (None, 1)) == 1            # a share that rounds to 0 keeps 1 ...
    assert planner.asked_weight(10, (None, 0)) == 0            # ... only drain (0 %) is 0
    p = plan(cfg, _states(vip, "up", "up"), MACS, weights={(vip.name, B12): 7})
    assert [b.weight for b in p.effective.vips[0].backends] == [1, 7] and p.in_table(p.effective.vips[0]) == 2


def test_a_slow_start_scales_the_vip_and_ramps_one_backend_linearly():
    assert planner.ramped([1, 1, 1], [None, None, None]) == [1, 1, 1]        # no ramp: untouched
    steps = [planner.ramped([1, 1, 1], [None, None, r]) for r in (0.0, 0.25, 0.5, 1.0)]
    assert [s[:2] for s in steps] == [[100, 100]] * 4                         # the others: scaled alike
    assert [s[2] for s in steps] == [1, 25, 50, 100]                          # the ramp: from 1 to its share
    assert planner.ramped([60000, 1], [None, 0.5]) == [60000, 1]              # scale bounded by the u16 weight
