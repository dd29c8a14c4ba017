"""The online feedback join: bounded, expiring, keyed by rid or key hash."""

from __future__ import annotations

from daemon.feedback import FeedbackJoin


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
