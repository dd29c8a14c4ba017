"""The online feedback join: bounded, expiring, keyed by rid or key hash."""

from __future__ import annotations

from daemon.observe.feedback import FeedbackJoin


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_join_by_rid_and_by_key_and_kpi():
    j = FeedbackJoin(clock=Clock())
    j.answered(1, "m", "1", "stable", "a", "alice")
    j.answered(2, "m", "2", "canary", "b", "bob")
    j.answered(3, "m", "1", "stable", "a", "alice")  # alice's latest
    assert j.record(2, 1.0) == ("m", "2", "canary", "b")
    assert j.record("alice", 3.0) == ("m", "1", "stable", "a")
    assert j.record(1, 1.0) == ("m", "1", "stable", "a")
    assert j.record(99, 1.0) is None and j.record("carol", 1.0) is None
    snap = {(k["lane"], k["arm"]): k for k in j.snapshot()}
    assert snap[("stable", "a")]["n"] == 2 and snap[("stable", "a")]["mean"] == 2.0
    assert snap[("canary", "b")]["mean"] == 1.0
    assert (j.joined, j.unjoined) == (3, 2)


def test_raw_keys_are_not_stored():
    j = FeedbackJoin()
    j.answered(1, "m", "1", "stable", None, "secret-user-id")
    assert all(isinstance(k, bytes) and b"secret" not in k for k in j.by_key)


def test_expiry_window_and_size_bound():
    clock = Clock()
    j = FeedbackJoin(window_s=10, max_entries=100, clock=clock)
    for rid in range(50):
        j.answered(rid, "m", "1", "stable", None, f"k{rid}")
    clock.t = 11
    j.answered(50, "m", "1", "stable", None, None)
    assert list(j.by_rid) == [50]  # the old ones expired
    assert j.record(3, 1.0) is None and j.record("k3", 1.0) is None
    for rid in range(51, 400):
        j.answered(rid, "m", "1", "stable", None, f"k{rid}")
    assert len(j.by_rid) <= 100 and len(j.by_key) <= 2 * 100 + 1024
    assert j.record(399, 1.0) is not None


def test_the_bound_keeps_the_newest_answers_in_order():
    """Past max_entries the oldest answers go first, one per new answer, and
    the rest still join (the bound is hit within a minute at full load)."""
    t = [0.0]
    j = FeedbackJoin(window_s=3600, max_entries=1000, clock=lambda: t[0])
    for rid in range(1, 50_001):
        t[0] += 0.001
        j.answered(rid, "m", "1", "stable" if rid % 2 else "canary", None, None)
    assert len(j.by_rid) == len(j.order) == len(j.times) == 1000
    assert list(j.order) == list(range(49_001, 50_001))
    assert j.record(49_000, 1.0) is None and j.unjoined == 1
    assert j.record(50_000, 1.0) == ("m", "1", "canary", None)
    # the window expires by time as well: an hour later one new answer is all that is left
    t[0] += 3601
    j.answered(60_000, "m", "1", "stable", None, "k")
    assert list(j.order) == [60_000] and j.record("k", 0.5) == ("m", "1", "stable", None)
