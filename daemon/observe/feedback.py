"""Online join of outcomes (``feedback`` op) to the answers they follow.

Every OK answer is remembered for ``WINDOW_S`` by its ``rid`` (and, when the
request had a routing key, by a hash of the key, pointing at its latest rid):
model, version, lane and arm. A ``feedback`` request names an earlier answer
by ``ref`` (a rid, or the routing key itself) and reports an ``outcome``
(click 0/1, purchase value, label); it is joined to that answer's lane and
arm and added to the running KPI of that (model, version, lane, arm), so
A/B reports and the KPI guardrails need no offline job.

Memory is bounded twice: entries older than the window are dropped as new
ones arrive, and at most ``max_entries`` are kept (oldest first out). Keys
are kept only as a hash (the raw user key is never stored).
"""

from __future__ import annotations

import collections
import hashlib
import math
import time
from collections.abc import Callable
from typing import Any

WINDOW_S = 3600.0
MAX_ENTRIES = 1_000_000

# What an answer is joined to: (model, version, lane, arm).
Group = tuple[str, str, str, str | None]


def key_hash(key: str) -> bytes:
    return hashlib.blake2b(key.encode("utf-8"), digest_size=12).digest()


class Kpi:
    __slots__ = ("n", "sum", "sumsq")

    def __init__(self) -> None:
        self.n = 0
        self.sum = 0.0
        self.sumsq = 0.0

    def add(self, x: float) -> None:
        self.n += 1
        self.sum += x
        self.sumsq += x * x

    def snapshot(self) -> dict[str, Any]:
        if not self.n:
            return {"n": 0, "mean": None, "stderr": None}
        mean = self.sum / self.n
        var = max(0.0, self.sumsq / self.n - mean * mean)
        return {"n": self.n, "mean": mean,
                "stderr": math.sqrt(var / self.n) if self.n > 1 else None}


class FeedbackJoin:
    """The remembered answers: ``by_rid`` for lookups, and the answer order in
    two deques for expiry. The order is not taken from the dict: popping a
    dict's oldest entries over and over leaves deleted slots at its front,
    and every ``next(iter(dict))`` then walks over all of them (measured: once
    the bound was reached, three quarters of the front's time went there)."""

    def __init__(self, window_s: float = WINDOW_S, max_entries: int = MAX_ENTRIES,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.window_s = window_s
        self.max_entries = max_entries
        self.clock = clock
        self.by_rid: dict[int, Group] = {}   # rid -> (model, version, lane, arm)
        self.order: collections.deque[int] = collections.deque()   # rids, oldest first
        self.times: collections.deque[float] = collections.deque()   # their answer times
        self.by_key: dict[bytes, int] = {}   # key hash -> latest rid
        self.kpis: dict[Group, Kpi] = {}     # (model, version, lane, arm) -> Kpi
        self.joined = 0
        self.unjoined = 0
        self.last_rid: int | None = None  # the rid the latest ``record`` joined to (None: unjoined)

    def answered(self, rid: int, model: str, version: str, lane: str, arm: str | None,
                 key: str | None,
                 now: float | None = None) -> None:
        """Remember an OK answer for later feedback. ``now``: the clock read
        once for a whole batch (the window is an hour; microseconds do not matter)."""
        if now is None:
            now = self.clock()
        self.by_rid[rid] = (model, version, lane, arm)
        self.order.append(rid)
        self.times.append(now)
        if key is not None:
            self.by_key[key_hash(key)] = rid
        if len(self.order) > self.max_entries or self.times[0] < now - self.window_s:
            self._expire(now)

    def _expire(self, now: float) -> None:
        by_rid, order, times = self.by_rid, self.order, self.times
        horizon = now - self.window_s
        while order and (times[0] < horizon or len(order) > self.max_entries):
            times.popleft()
            by_rid.pop(order.popleft(), None)
        if len(self.by_key) > 2 * len(by_rid) + 1024:
            self.by_key = {k: r for k, r in self.by_key.items() if r in by_rid}

    def record(self, ref: int | str, outcome: float, count_miss: bool = True) -> Group | None:
        """Join an outcome; returns the (model, version, lane, arm) it joined
        to, or None when ``ref`` matches no remembered answer (counted as
        unjoined unless ``count_miss`` is False: another front may join it)."""
        rid = ref if isinstance(ref, int) else self.by_key.get(key_hash(ref))
        group = self.by_rid.get(rid) if rid is not None else None
        self.last_rid = rid if group is not None else None
        if group is None:
            self.unjoined += count_miss
            return None
        kpi = self.kpis.get(group)
        if kpi is None:
            kpi = self.kpis[group] = Kpi()
        kpi.add(outcome)
        self.joined += 1
        return group

    def snapshot(self, model: str | None = None) -> list[dict[str, Any]]:
        return [dict(model=m, version=v, lane=lane, arm=arm, **k.snapshot())
                for (m, v, lane, arm), k in sorted(self.kpis.items(), key=lambda e: str(e[0]))
                if model is None or m == model]
