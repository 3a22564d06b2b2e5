"""The client's circuit breaker, on an injected clock."""

from __future__ import annotations

import pytest

from distribkv.breaker import Breaker


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_failed_node_is_down_for_twice_as_long_each_time_up_to_the_cap():
    clock = Clock()
    breaker = Breaker(2.0, 5.0, clock=clock)
    assert breaker.claim("a:1", 1.0) is None
    periods = []
    for _ in range(4):
        down = breaker.failed("a:1", "timed out")
        periods.append(down.retry_in)
        # Requests under way when it went down fail too: the same failure, no longer down.
        clock.now += 0.5
        assert breaker.failed("a:1", "refused").until == down.until
        assert breaker.claim("a:1", 1.0) == breaker.down("a:1")
        clock.now += down.retry_in - 0.51
        assert breaker.down("a:1") is not None
        clock.now += 0.01
        assert breaker.claim("a:1", 1.0) is None  # this request is the probe
    assert periods == [2.0, 4.0, 5.0, 5.0]
    assert "a:1 is marked down (timed out, 4 times in a row)" in down.describe()
    breaker.succeeded("a:1")
    assert breaker.failed("a:1", "refused").retry_in == 2.0  # success forgot the failures


def test_one_probe_at_a_time_until_it_reports_or_its_time_is_over():
    clock = Clock()
    breaker = Breaker(1.0, 8.0, clock=clock)
    breaker.failed("a:1", "refused")
    clock.now += 1.0
    assert breaker.claim("a:1", 3.0) is None
    # Others keep away while the probe is under way, and are told for how long at most.
    other = breaker.claim("a:1", 3.0)
    assert other is not None and other.retry_in == 3.0
    breaker.released("a:1")  # the probe was cut short: it proved nothing
    assert breaker.claim("a:1", 3.0) is None
    clock.now += 3.0  # a probe that never reported frees the node when its time is over
    assert breaker.claim("a:1", 3.0) is None
    breaker.succeeded("a:1")
    assert breaker.down("a:1") is None and breaker.snapshot() == []


def test_its_memory_is_bounded():
    clock = Clock()
    breaker = Breaker(1.0, 1.0, capacity=3, clock=clock)
    for i in range(10):
        clock.now += 0.1
        breaker.failed(f"n:{i}", "refused")
    assert [d.address for d in breaker.snapshot()] == ["n:7", "n:8", "n:9"]


def test_bad_down_times_are_refused():
    with pytest.raises(ValueError, match="first <= most"):
        Breaker(3.0, 2.0)
    with pytest.raises(ValueError, match="0 < first"):
        Breaker(0.0, 2.0)
