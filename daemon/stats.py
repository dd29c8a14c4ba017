"""Per-model serving figures for the ``stats`` op: counts, latency, batches.

Recording is O(1) and allocation-free on the hot path (a counter bump and a
bounded deque append); percentiles are computed only when someone asks.
"""

from __future__ import annotations

import collections
import time

LATENCY_WINDOW = 8192  # latency percentiles cover the most recent answers
BUSY_WINDOW_S = 10.0


def percentiles(values, ps=(50, 95, 99)) -> dict:
    if not values:
        return {f"p{p}": None for p in ps}
    s = sorted(values)
    n = len(s)
    return {f"p{p}": s[min(n - 1, int(p / 100 * n))] for p in ps}


class ModelStats:
    def __init__(self):
        self.by_status: collections.Counter = collections.Counter()
        self.latency_us: collections.deque = collections.deque(maxlen=LATENCY_WINDOW)
        self.batch_sizes: collections.Counter = collections.Counter()
        self.batches = 0
        self.padded_rows = 0

    def answered(self, status: int, latency_us: int) -> None:
        self.by_status[status] += 1
        if status == 0:
            self.latency_us.append(latency_us)

    def batch(self, n: int, bucket: int) -> None:
        self.batches += 1
        self.batch_sizes[n] += 1
        self.padded_rows += bucket - n

    def snapshot(self) -> dict:
        return {
            "counts": {str(k): v for k, v in sorted(self.by_status.items())},
            "requests": sum(self.by_status.values()),
            "latency_us": percentiles(self.latency_us),
            "batches": self.batches,
            "batch_sizes": {str(k): v for k, v in sorted(self.batch_sizes.items())},
            "padded_rows": self.padded_rows,
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
