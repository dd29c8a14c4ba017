"""Per-model serving figures for the ``stats`` op: counts, latency, batches.

Recording is O(1) and allocation-free on the hot path (a counter bump and a
bounded deque append); percentiles are computed only when someone asks.
"""

from __future__ import annotations

import bisect
import collections
import itertools
import time

LATENCY_WINDOW = 8192  # latency percentiles cover the most recent answers
BUSY_WINDOW_S = 10.0


def percentiles(values, ps=(50, 95, 99)) -> dict:
    if not values:
        return {f"p{p}": None for p in ps}
    s = sorted(values)
    n = len(s)
    return {f"p{p}": s[min(n - 1, int(p / 100 * n))] for p in ps}


# Prometheus histogram bounds, in seconds as exported and in us as recorded.
DURATION_BOUNDS_S = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                     0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_DURATION_BOUNDS_US = tuple(int(b * 1e6) for b in DURATION_BOUNDS_S)
_bisect_left = bisect.bisect_left


class Histogram:
    """Cumulative-on-export bucket counts: O(log buckets) to record, no lock
    (the front is one thread), read by the Prometheus collector at scrape."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds=_DURATION_BOUNDS_US):
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one is +Inf
        self.sum = 0

    def add(self, v) -> None:
        self.counts[_bisect_left(self.bounds, v)] += 1
        self.sum += v

    @property
    def n(self) -> int:
        return sum(self.counts)

    def cumulative(self) -> list[int]:
        return list(itertools.accumulate(self.counts))


class ModelStats:
    def __init__(self, buckets=(1,)):
        self.by_route: collections.Counter = collections.Counter()  # (lane, arm, status)
        self.latency_us: collections.deque = collections.deque(maxlen=LATENCY_WINDOW)
        self.duration: dict[str, Histogram] = {}  # lane -> OK answers, arrival to answer
        self.queue_time = Histogram()    # per request: arrival to hand-over to a worker
        self.compute_time = Histogram()  # per batch, as the worker measured it
        self.batch_hist = Histogram(tuple(buckets))
        self.batch_sizes: collections.Counter = collections.Counter()
        self.dispatch: collections.Counter = collections.Counter()  # why batches left
        self.shed: collections.Counter = collections.Counter()      # why requests were refused
        self.cache: collections.Counter = collections.Counter()     # hit, miss
        self.batches = 0
        self.padded_rows = 0

    @property
    def by_status(self) -> collections.Counter:
        """Answers by status, summed over lanes and arms (read, not kept: one
        counter less per answer)."""
        out: collections.Counter = collections.Counter()
        for (_, _, status), n in self.by_route.items():
            out[status] += n
        return out

    def answered(self, status: int, latency_us: int, lane: str = "stable", arm=None) -> None:
        self.by_route[(lane, arm, status)] += 1
        if status == 0:
            self.latency_us.append(latency_us)
            h = self.duration.get(lane)
            if h is None:
                h = self.duration[lane] = Histogram()
            h.add(latency_us)

    def batch(self, n: int, bucket: int, compute_us: int = 0) -> None:
        self.batches += 1
        self.batch_sizes[n] += 1
        self.batch_hist.add(n)
        self.compute_time.add(compute_us)
        self.padded_rows += bucket - n

    def snapshot(self) -> dict:
        by_status = self.by_status
        return {
            "counts": {str(k): v for k, v in sorted(by_status.items())},
            "requests": sum(by_status.values()),
            "latency_us": percentiles(self.latency_us),
            "batches": self.batches,
            "batch_sizes": {str(k): v for k, v in sorted(self.batch_sizes.items())},
            "padded_rows": self.padded_rows,
            "dispatch": dict(self.dispatch), "shed": dict(self.shed), "cache": dict(self.cache),
        }


class BusyMeter:
    """Fraction of the recent wall time a worker spent computing, from the
    compute time it reports with each batch (per-second buckets)."""

    def __init__(self, window_s: float = BUSY_WINDOW_S):
        self.window = int(window_s)
        self.buckets = collections.deque(maxlen=self.window + 1)  # (second, busy_ns)
        self.total_ns = 0
        self.since = time.monotonic()

    def add(self, compute_ns: int, now: float | None = None) -> None:
        sec = int(now if now is not None else time.monotonic())
        self.total_ns += compute_ns
        if self.buckets and self.buckets[-1][0] == sec:
            self.buckets[-1][1] += compute_ns
        else:
            self.buckets.append([sec, compute_ns])

    def fraction(self, now: float | None = None) -> float:
        now = now if now is not None else time.monotonic()
        span = min(float(self.window), max(now - self.since, 1e-9))
        lo = now - span
        busy = sum(ns for sec, ns in self.buckets if sec >= int(lo))
        return round(min(1.0, busy / 1e9 / span), 4)
