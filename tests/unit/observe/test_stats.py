"""Latency percentiles from running log-bucketed counts (daemon/observe/stats.py):
accuracy against exact percentiles of the same data, and the window."""

from __future__ import annotations

import random

import pytest

from daemon.observe.stats import (
    MAX_US,
    N_BUCKETS,
    LatencyWindow,
    ModelStats,
    bucket_of,
    bucket_value,
    percentiles_of,
)

PS = (50, 95, 99)
REL_ERR = 1 / 64  # half a bucket's width over its lower bound (module docstring)


class FakeClock:
    def __init__(self, t: float = 1000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def exact(values, ps=PS) -> dict:
    """What the stats op used to compute: a sort, the element at rank int(p/100*n)."""
    s = sorted(values)
    n = len(s)
    return {f"p{p}": s[min(n - 1, int(p / 100 * n))] for p in ps}


def test_buckets_are_contiguous_and_their_midpoints_map_back():
    assert N_BUCKETS == bucket_of(MAX_US) + 1 == 896
    prev_value = -1
    for i in range(N_BUCKETS):
        v = bucket_value(i)
        assert bucket_of(v) == i and v > prev_value
        prev_value = v
    # every value of a bucket is within REL_ERR of what the bucket reports
    for lo_exp in range(6, 32):
        for v in (1 << lo_exp, (1 << lo_exp) + 1, (1 << (lo_exp + 1)) - 1, 3 << (lo_exp - 1)):
            assert abs(bucket_value(bucket_of(v)) - v) <= REL_ERR * v, v
    assert [bucket_of(v) for v in range(64)] == list(range(64))  # exact below 64 us
    assert bucket_of(MAX_US + 12345) == bucket_of(10 ** 15) == N_BUCKETS - 1
    assert bucket_of(0) == bucket_of(-5) == 0


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("dist", ["lognormal", "uniform", "bimodal", "small"])
def test_percentiles_are_within_the_bucket_error_of_exact_ones(seed, dist):
    rng = random.Random(seed)
    n = rng.choice([1, 7, 100, 5000, 40000])
    if dist == "lognormal":
        values = [int(rng.lognormvariate(7.5, 1.2)) for _ in range(n)]   # ~1.8 ms median, long tail
    elif dist == "uniform":
        values = [rng.randint(0, 2_000_000) for _ in range(n)]
    elif dist == "bimodal":
        values = [rng.choice([rng.randint(300, 400), rng.randint(50_000, 90_000)])
                  for _ in range(n)]
    else:
        values = [rng.randint(0, 80) for _ in range(n)]
    w = LatencyWindow(clock=FakeClock())
    for v in values:
        w.add(v)
    got, want = w.percentiles(), exact(values)
    assert set(got) == {"p50", "p95", "p99"}
    for k in got:
        assert isinstance(got[k], int)
        assert abs(got[k] - want[k]) <= REL_ERR * want[k], (k, got[k], want[k])
    assert w.n == n


def test_percentiles_of_nothing_are_none_and_extremes_clamp():
    w = LatencyWindow(clock=FakeClock())
    assert w.percentiles() == {"p50": None, "p95": None, "p99": None}
    assert percentiles_of([]) == {"p50": None, "p95": None, "p99": None}
    w.add(10 ** 12)  # 11 days: counted in the last bucket, reported as about 2**32 us
    assert abs(w.percentiles()["p99"] - MAX_US) <= REL_ERR * MAX_US


def test_the_window_follows_the_last_one_to_two_periods():
    clock = FakeClock(100.0)  # epochs of 10 s: [100, 110) is one
    w = LatencyWindow(window_s=10.0, clock=clock)
    for _ in range(100):
        w.add(1000)
    clock.t = 109.9
    assert w.percentiles()["p50"] == bucket_value(bucket_of(1000))
    clock.t = 110.0  # next epoch: the old answers are the previous histogram, still counted
    w.tick()  # as a completed batch does, before its answers are recorded
    for _ in range(300):
        w.add(5000)
    assert w.n == 400
    assert w.percentiles()["p50"] == bucket_value(bucket_of(5000))
    assert w.percentiles()["p95"] == bucket_value(bucket_of(5000))
    assert w.percentiles(ps=(10,))["p10"] == bucket_value(bucket_of(1000))
    clock.t = 120.5  # one more epoch: the 1000s are gone, the 5000s are the previous histogram
    assert w.percentiles() == {f"p{p}": bucket_value(bucket_of(5000)) for p in PS}
    assert w.n == 300
    clock.t = 131.0
    w.tick()
    w.add(20)
    assert w.percentiles() == {f"p{p}": 20 for p in PS} and w.n == 1
    clock.t = 200.0  # several epochs without a tick: nothing recent is left
    assert w.percentiles() == {"p50": None, "p95": None, "p99": None} and w.n == 0


def test_rotation_needs_no_clock_read_per_value():
    reads = []

    def clock():
        reads.append(1)
        return 5.0

    w = LatencyWindow(clock=clock)
    reads.clear()
    for _ in range(1000):
        w.add(700)
    assert len(reads) == 1000 // 256  # every 256th value checks the clock


def test_model_stats_rotates_at_each_batch_and_keeps_the_stats_fields():
    clock = FakeClock(50.0)
    s = ModelStats((1, 2, 4))
    s.latency = LatencyWindow(window_s=10.0, clock=clock)
    s.batch(2, 2, 300)
    s.answered(0, 400)
    s.answered(0, 400)
    s.answered(8, 5)  # not OK: counted, not in the percentiles
    snap = s.snapshot()
    assert snap["latency_us"] == {f"p{p}": bucket_value(bucket_of(400)) for p in PS}
    assert snap["counts"] == {"0": 2, "8": 1} and snap["requests"] == 3
    clock.t = 75.0  # two epochs later, a batch completes: its answers alone are the window
    s.batch(1, 1, 300)
    s.answered(0, 9000)
    assert s.snapshot()["latency_us"] == {f"p{p}": bucket_value(bucket_of(9000)) for p in PS}


def test_model_stats_records_exactly_as_the_window_does():
    """ModelStats.answered inlines LatencyWindow.add: the same buckets, the
    same clock reads."""
    rng = random.Random(7)
    values = ([0, 1, 63, 64, 65, 127, 128, MAX_US, MAX_US + 1, 10 ** 13, -3]
              + [rng.randint(0, 1 << rng.randint(1, 40)) for _ in range(3000)])
    clock = FakeClock()
    w = LatencyWindow(clock=clock)
    s = ModelStats()
    s.latency = LatencyWindow(clock=clock)
    for v in values:
        clock.t += 0.004  # crosses epochs on the way, so the clock reads must match too
        w.add(v)
        s.answered(0, v)
    assert s.latency.cur == w.cur and s.latency.prev == w.prev
    assert s.latency.countdown == w.countdown and s.latency.epoch == w.epoch
