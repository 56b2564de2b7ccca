"""fastlb.l7.steering (lrt's weights from response times) and fastlb.l7.logstream's parser: pure."""

from __future__ import annotations

import pytest

from fastlb.l7.logstream import Request, parse
from fastlb.l7.steering import MAX_WEIGHT, Steering


def fed(samples: dict[str, float], seconds: float = 1.0, **kw) -> Steering:
    s = Steering(**kw)
    s.set_pools({"p": list(samples)})
    t = 0.0
    while t < seconds:
        for server, ms in samples.items():
            s.observe("p", server, ms, t)
        t += 0.01
    return s


def test_weights_follow_the_inverse_of_latency() -> None:
    s = fed({"a": 2.0, "b": 2.0, "c": 52.0})
    w = s.target_weights("p", 1.0)
    assert w["a"] == w["b"] == MAX_WEIGHT
    assert w["c"] == round(MAX_WEIGHT * 2 / 52)


def test_latencies_under_the_floor_are_equal() -> None:
    s = fed({"a": 0.3, "b": 1.5})
    assert s.target_weights("p", 1.0) == {"a": MAX_WEIGHT, "b": MAX_WEIGHT}


def test_weights_are_clamped_to_1() -> None:
    s = fed({"a": 1.0, "b": 5000.0})
    assert s.target_weights("p", 1.0)["b"] == 1


def test_a_stale_server_decays_toward_the_pool_mean() -> None:
    s = fed({"a": 2.0, "b": 2.0, "c": 52.0})
    for t in range(100, 1000):           # c gets no more samples; a and b go on
        s.observe("p", "a", 2.0, t / 100)
        s.observe("p", "b", 2.0, t / 100)
    est = s.estimates("p", 10.0)
    assert est["c"] < 6.0 and est["a"] == pytest.approx(2.0, rel=0.01)
    fresh = s.estimates("p", 1.5)        # within stale_s of its last sample: still its own estimate
    assert fresh["c"] > 40


def test_a_new_server_starts_at_the_pool_mean() -> None:
    s = fed({"a": 10.0})
    s.set_pools({"p": ["a", "new"]})
    assert s.estimates("p", 1.0) == pytest.approx({"a": 10.0, "new": 10.0}, rel=0.01)


def test_hysteresis_writes_only_real_moves() -> None:
    s = fed({"a": 2.0, "b": 4.0})
    first = s.changes(1.0)
    assert first[("p", "a")] == MAX_WEIGHT and abs(first[("p", "b")] - MAX_WEIGHT // 2) <= 1
    for (pool, server), w in first.items():
        s.written(pool, server, w)
    assert s.changes(1.0) == {}
    for t in range(100, 110):
        s.observe("p", "b", 4.4, t / 100)       # 10 % slower: under the 20 % hysteresis
    assert s.changes(1.1) == {}


def test_unsteered_servers_are_ignored() -> None:
    s = fed({"a": 2.0})
    s.observe("p", "zzz", 100.0, 1.0)
    s.observe("other", "a", 100.0, 1.0)
    s.observe("p", "a", -1, 1.0)             # Tr -1: no response
    assert set(s.estimates("p", 1.0)) == {"a"} and s.estimates("p", 1.0)["a"] == pytest.approx(2.0, rel=0.01)


def test_log_lines_parse() -> None:
    assert parse("fastlb 198.19.0.100:80 198.18.0.11:80 3 4 200\n") == \
        Request("198.19.0.100:80", "198.18.0.11:80", 3, 4, 200)
    assert parse("<134>Dec  4 19:00:00 haproxy[1]: fastlb be srv -1 5 503") == Request("be", "srv", -1, 5, 503)
    assert parse("fastlb be srv") is None and parse("something else 1 2 3") is None
    assert parse("fastlb be srv x 1 200") is None
