"""Per-model serving figures for the ``stats`` op: counts, latency, batches.

Recording is O(1) and allocation-free on the hot path (counter bumps and a
list-slot increment); percentiles are read from running counts when someone
asks, never by sorting what was recorded.

Latency percentiles (``LatencyWindow``) come from a log-bucketed histogram
laid out like HdrHistogram's: values below 64 us have a bucket each; above
that, each power of two is split into 32 equal buckets, so a bucket is at
most 1/32 of its lower bound wide and its midpoint, which is what is
reported, is within 1/64 (1.6 %) of any value in it. A value maps to its
bucket with one ``bit_length`` and two shifts::

    v < 64:   i = v
    v >= 64:  s = v.bit_length() - 6;  i = (s << 5) + (v >> s)

896 buckets reach 2**32 us (71 minutes, past the longest deadline, 1 hour);
larger values are counted in the last bucket.

The window: two histograms, the current and the previous one, rotated on
clock epochs of ``window_s`` (10 s), so the figures cover the last 10 to 20
seconds of answers and follow the traffic. The clock is read when a batch
completes (``ModelStats.batch``, before its answers are recorded), every
256th value and at every read, never once per answer; an epoch skipped
entirely (no traffic for over a window) clears both histograms.
"""

from __future__ import annotations

import bisect
import collections
import itertools
import operator
import time
from collections.abc import Callable, Iterable
from typing import Any

LATENCY_WINDOW_S = 10.0  # latency percentiles cover the last 10-20 s of answers
BUSY_WINDOW_S = 10.0

# -- latency percentiles: log buckets over a rotating window ---------------------------------

_SUB_BITS = 5                 # 32 buckets per power of two: <= 1/32 wide, midpoint within 1/64
_EXACT = 2 << _SUB_BITS       # below 64 us every value has its own bucket
MAX_US = (1 << 32) - 1        # larger values land in the last bucket
N_BUCKETS = (((MAX_US.bit_length() - _SUB_BITS - 1) << _SUB_BITS)
             + (MAX_US >> (MAX_US.bit_length() - _SUB_BITS - 1)) + 1)
_TICK_EVERY = 256             # values recorded between two clock reads (besides batches, reads)


def bucket_of(us: int) -> int:
    """The bucket of a latency in whole microseconds (the formula above)."""
    if us < _EXACT:
        return us if us > 0 else 0
    if us > MAX_US:
        us = MAX_US
    s = us.bit_length() - _SUB_BITS - 1
    return (s << _SUB_BITS) + (us >> s)


def bucket_value(i: int) -> int:
    """What a bucket reports: its midpoint, in whole microseconds."""
    if i < _EXACT:
        return i
    s = (i >> _SUB_BITS) - 1
    lo = (i - (s << _SUB_BITS)) << s
    return lo + ((1 << s) - 1) // 2


_VALUES = tuple(bucket_value(i) for i in range(N_BUCKETS))


def percentiles_of(counts: Iterable[int],
                   ps: Iterable[int] = (50, 95, 99)) -> dict[str, int | None]:
    """``{"p50": us, ...}`` of a bucket-count list: the bucket holding the
    element of rank ``int(p / 100 * n)`` (0-based), as a sort would pick it;
    None for every p when nothing was recorded."""
    cum = list(itertools.accumulate(counts))
    n = cum[-1] if cum else 0
    if not n:
        return {f"p{p}": None for p in ps}
    return {f"p{p}": _VALUES[bisect.bisect_right(cum, min(n - 1, int(p / 100 * n)))] for p in ps}


class LatencyWindow:
    """Latency percentiles of the last ``window_s`` to ``2 * window_s``
    seconds, from two rotating log-bucketed histograms (module docstring).
    ``clock`` returns seconds (``time.monotonic``; tests pass a fake)."""

    __slots__ = ("window_s", "clock", "cur", "prev", "epoch", "countdown")

    def __init__(self, window_s: float = LATENCY_WINDOW_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.window_s = window_s
        self.clock = clock
        self.cur = [0] * N_BUCKETS
        self.prev = [0] * N_BUCKETS
        self.epoch = int(clock() // window_s)
        self.countdown = _TICK_EVERY

    def add(self, us: int) -> None:
        """Record one latency in whole microseconds (an int)."""
        if us >= _EXACT:
            s = us.bit_length() - _SUB_BITS - 1
            us = (s << _SUB_BITS) + (us >> s)
        elif us < 0:
            us = 0
        try:  # free in 3.11 when nothing is raised: cheaper than comparing with MAX_US
            self.cur[us] += 1
        except IndexError:  # above MAX_US
            self.cur[-1] += 1
        self.countdown -= 1
        if not self.countdown:
            self.tick()

    def tick(self) -> None:
        """Rotate if the clock has entered a new epoch since the last tick."""
        self.countdown = _TICK_EVERY
        epoch = int(self.clock() // self.window_s)
        if epoch != self.epoch:
            self.prev = self.cur if epoch == self.epoch + 1 else [0] * N_BUCKETS
            self.cur = [0] * N_BUCKETS
            self.epoch = epoch

    def percentiles(self, ps: Iterable[int] = (50, 95, 99)) -> dict[str, int | None]:
        self.tick()
        return percentiles_of(map(operator.add, self.cur, self.prev), ps)

    @property
    def n(self) -> int:
        """Values in the window (as of the last tick)."""
        return sum(self.cur) + sum(self.prev)

    def merge(self, other: "LatencyWindow") -> None:
        """Add another process's window (the fronts of one machine: epochs
        are read from CLOCK_MONOTONIC, which every process shares, so the
        same epoch is the same 10 s everywhere)."""
        self.tick()
        other.tick()
        d = self.epoch - other.epoch
        pairs: tuple[tuple[list[int], list[int]], ...]
        if d == 0:
            pairs = ((self.cur, other.cur), (self.prev, other.prev))
        elif d == 1:
            pairs = ((self.prev, other.cur),)
        else:
            return
        for mine, theirs in pairs:
            for i, n in enumerate(theirs):
                if n:
                    mine[i] += n


# Prometheus histogram bounds, in seconds as exported and in us as recorded.
DURATION_BOUNDS_S = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                     0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_DURATION_BOUNDS_US = tuple(int(b * 1e6) for b in DURATION_BOUNDS_S)
_bisect_left = bisect.bisect_left


class Histogram:
    """Cumulative-on-export bucket counts: O(log buckets) to record, no lock
    (the front is one thread), read by the Prometheus collector at scrape."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[int, ...] = _DURATION_BOUNDS_US) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one is +Inf
        self.sum = 0

    def add(self, v: int) -> None:
        self.counts[_bisect_left(self.bounds, v)] += 1
        self.sum += v

    @property
    def n(self) -> int:
        return sum(self.counts)

    def cumulative(self) -> list[int]:
        return list(itertools.accumulate(self.counts))

    def merge(self, other: "Histogram") -> None:
        self.counts = [a + b for a, b in zip(self.counts, other.counts, strict=True)]
        self.sum += other.sum


class ModelStats:
    def __init__(self, buckets: Iterable[int] = (1,)) -> None:
        # (lane, arm, status) -> answers
        self.by_route: collections.Counter[tuple[str, str | None, int]] = collections.Counter()
        self.latency = LatencyWindow()  # OK answers, all lanes: the stats op's percentiles
        self.duration: dict[str, Histogram] = {}  # lane -> OK answers, arrival to answer
        self.queue_time = Histogram()    # per request: arrival to hand-over to a worker
        self.compute_time = Histogram()  # per batch, as the worker measured it
        self.batch_hist = Histogram(tuple(buckets))
        self.batch_sizes: collections.Counter[int] = collections.Counter()
        self.dispatch: collections.Counter[str] = collections.Counter()  # why batches left
        self.shed: collections.Counter[str] = collections.Counter()  # why requests were refused
        self.cache: collections.Counter[str] = collections.Counter()  # hit, miss
        # input name -> accepted requests that left it out and took its default
        self.defaulted: collections.Counter[str] = collections.Counter()
        self.batches = 0
        self.padded_rows = 0

    def merge(self, o: "ModelStats", windows: bool = True) -> None:
        """Add another front's figures of the same version (the machine's
        stats and /metrics: daemon/observe/figures.py). ``windows`` False leaves the
        latency window alone (a dead front's recent latencies are not recent)."""
        self.by_route.update(o.by_route)
        if windows:
            self.latency.merge(o.latency)
        for lane, h in o.duration.items():
            mine = self.duration.get(lane)
            if mine is None:
                mine = self.duration[lane] = Histogram()
            mine.merge(h)
        self.queue_time.merge(o.queue_time)
        self.compute_time.merge(o.compute_time)
        if self.batch_hist.bounds == o.batch_hist.bounds:
            self.batch_hist.merge(o.batch_hist)
        self.batch_sizes.update(o.batch_sizes)
        for counts, more in ((self.dispatch, o.dispatch), (self.shed, o.shed),
                             (self.cache, o.cache), (self.defaulted, o.defaulted)):
            counts.update(more)
        self.batches += o.batches
        self.padded_rows += o.padded_rows

    @property
    def by_status(self) -> collections.Counter[int]:
        """Answers by status, summed over lanes and arms (read, not kept: one
        counter less per answer)."""
        out: collections.Counter[int] = collections.Counter()
        for (_, _, status), n in self.by_route.items():
            out[status] += n
        return out

    def answered(self, status: int, latency_us: int, lane: str = "stable",
                 arm: str | None = None) -> None:
        self.by_route[(lane, arm, status)] += 1
        if status == 0:
            # LatencyWindow.add, inlined: this runs once per answer, and the call
            # cost as much as the recording (test_stats holds the two equal).
            w = self.latency
            if latency_us >= _EXACT:
                s = latency_us.bit_length() - _SUB_BITS - 1
                i = (s << _SUB_BITS) + (latency_us >> s)
            else:
                i = latency_us if latency_us > 0 else 0
            try:
                w.cur[i] += 1
            except IndexError:  # above MAX_US
                w.cur[-1] += 1
            w.countdown -= 1
            if not w.countdown:
                w.tick()
            h = self.duration.get(lane)
            if h is None:
                h = self.duration[lane] = Histogram()
            h.add(latency_us)

    def batch(self, n: int, bucket: int, compute_us: int = 0) -> None:
        self.latency.tick()  # before the batch's answers are recorded: they land in this epoch
        self.batches += 1
        self.batch_sizes[n] += 1
        self.batch_hist.add(n)
        self.compute_time.add(compute_us)
        self.padded_rows += bucket - n

    def snapshot(self) -> dict[str, Any]:
        by_status = self.by_status
        return {
            "counts": {str(k): v for k, v in sorted(by_status.items())},
            "requests": sum(by_status.values()),
            "latency_us": self.latency.percentiles(),
            "batches": self.batches,
            "batch_sizes": {str(k): v for k, v in sorted(self.batch_sizes.items())},
            "padded_rows": self.padded_rows,
            "dispatch": dict(self.dispatch), "shed": dict(self.shed), "cache": dict(self.cache),
            "defaulted": dict(self.defaulted),
        }


class BusyMeter:
    """Fraction of the recent wall time a worker spent computing, from the
    compute time it reports with each batch (per-second buckets)."""

    def __init__(self, window_s: float = BUSY_WINDOW_S) -> None:
        self.window = int(window_s)
        # [second, busy_ns]
        self.buckets: collections.deque[list[int]] = collections.deque(maxlen=self.window + 1)
        self.total_ns = 0
        self.since = time.monotonic()

    def add(self, compute_ns: int, now: float | None = None) -> None:
        sec = int(now if now is not None else time.monotonic())
        self.total_ns += compute_ns
        if self.buckets and self.buckets[-1][0] == sec:
            self.buckets[-1][1] += compute_ns
        else:
            self.buckets.append([sec, compute_ns])

    def merge(self, o: "BusyMeter") -> None:
        """Add another front's share of the same worker's batches."""
        self.total_ns += o.total_ns
        self.since = min(self.since, o.since)
        by_sec = {sec: ns for sec, ns in self.buckets}
        for sec, ns in o.buckets:
            by_sec[sec] = by_sec.get(sec, 0) + ns
        self.buckets.clear()
        for sec in sorted(by_sec)[-(self.window + 1):]:
            self.buckets.append([sec, by_sec[sec]])

    def fraction(self, now: float | None = None) -> float:
        now = now if now is not None else time.monotonic()
        span = min(float(self.window), max(now - self.since, 1e-9))
        lo = now - span
        busy = sum(ns for sec, ns in self.buckets if sec >= int(lo))
        return round(min(1.0, busy / 1e9 / span), 4)
