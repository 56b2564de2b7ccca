"""fastlb.controller.l7.steering (lrt's weights from response times) and fastlb.controller.l7.logstream's parser: pure."""

from __future__ import annotations

import pytest

from fastlb.controller.l7.logstream import Request, parse
from fastlb.controller.l7.steering import MAX_WEIGHT, Steering


def fed(samples: dict[str, float], seconds: float = 1.0, **kw) -> Steering:
    s = Steering(**kw)
    s.set_pools({"p": list(samples)})
    for i in range(round(seconds * 100)):
        for server, ms in samples.items():
            s.observe("p", server, ms, i / 100)
    return s


LAST = 0.99     # fed()'s last sample


def test_weights_follow_the_inverse_of_latency() -> None:
    s = fed({"a": 2.0, "b": 2.0, "c": 52.0})
    w = s.target_weights("p", LAST)
    assert w["a"] == w["b"] == MAX_WEIGHT
    assert w["c"] == round(MAX_WEIGHT * 2 / 52)


def test_latencies_under_the_floor_are_equal() -> None:
    s = fed({"a": 0.3, "b": 1.5})
    assert s.target_weights("p", LAST) == {"a": MAX_WEIGHT, "b": MAX_WEIGHT}


def test_weights_are_clamped_to_1() -> None:
    s = fed({"a": 1.0, "b": 5000.0})
    assert s.target_weights("p", LAST)["b"] == 1


def test_a_stale_server_decays_toward_the_pool_mean() -> None:
    s = fed({"a": 2.0, "b": 2.0, "c": 52.0})
    for t in range(100, 2000):           # c gets no more samples; a and b go on
        s.observe("p", "a", 2.0, t / 100)
        s.observe("p", "b", 2.0, t / 100)
    est = s.estimates("p", 19.99)
    assert est["c"] < 6.0 and est["a"] == pytest.approx(2.0, rel=0.01)
    fresh = fed({"a": 2.0, "b": 2.0, "c": 52.0}).estimates("p", 2.5)
    assert fresh["c"] == pytest.approx(52.0, rel=0.01)   # within stale_s of its last sample: its own estimate


def test_a_new_server_starts_at_the_pool_mean() -> None:
    s = fed({"a": 10.0})
    s.set_pools({"p": ["a", "new"]})
    assert s.estimates("p", LAST) == pytest.approx({"a": 10.0, "new": 10.0}, rel=0.01)


def test_hysteresis_writes_only_real_moves() -> None:
    s = fed({"a": 2.0, "b": 4.0})
    first = s.changes(LAST)
    assert first[("p", "a")] == MAX_WEIGHT and abs(first[("p", "b")] - MAX_WEIGHT // 2) <= 1
    for (pool, server), w in first.items():
        s.written(pool, server, w)
    assert s.changes(LAST) == {}
    for t in range(100, 110):
        s.observe("p", "b", 4.4, t / 100)       # 10 % slower: under the 20 % hysteresis
    assert s.changes(1.1) == {}


def test_unsteered_servers_are_ignored() -> None:
    s = fed({"a": 2.0})
    s.observe("p", "zzz", 100.0, LAST)
    s.observe("other", "a", 100.0, LAST)
    s.observe("p", "a", -1, LAST)             # Tr -1: no response
    assert set(s.estimates("p", LAST)) == {"a"} and s.estimates("p", LAST)["a"] == pytest.approx(2.0, rel=0.01)


def test_log_lines_parse() -> None:
    assert parse("fastlb 198.19.0.100:80 198.18.0.11:80 3 4 200\n") == \
        Request("198.19.0.100:80", "198.18.0.11:80", 3, 4, 200)
    assert parse("<134>Dec  4 19:00:00 haproxy[1]: fastlb be srv -1 5 503") == Request("be", "srv", -1, 5, 503)
    assert parse("fastlb be srv") is None and parse("something else 1 2 3") is None
    assert parse("fastlb be srv x 1 200") is None
