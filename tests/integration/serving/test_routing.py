"""Canary lanes, A/B arms, pinning and feedback through the real daemon."""

from __future__ import annotations

from daemon.serving.router import bucket
from tests.wire import out_array

ROUTED = """
[[models]]
name = "m"
version = "1"
factory = "tests.models:raises_on_magic"
input = { dtype = "float32", shape = [3] }
threads = 1

[[models]]
name = "m"
version = "2"
factory = "tests.models:two_x"
input = { dtype = "float32", shape = [3] }
threads = 1

[[rollouts]]
model = "m"
stable = "1"
candidate = "2"
salt = "ro"
stages = [0.1, 0.5, 1.0]
stage = 1

[[experiments]]
id = "e1"
model = "m"
salt = "e1-salt"
arms = [{ name = "control", split = 0.5 }, { name = "treat", split = 0.5 }]
"""


def test_lanes_and_arms_follow_the_specified_hash(daemon_factory):
    d = daemon_factory(ROUTED)
    x = [1.0, 2.0, 3.0]
    with d.client() as c:
        for i in range(200):
            key = f"user-{i}"
            ans = c.call({"model": "m", "inputs": x, "key": key, "exp": "e1"})
            assert ans["status"] == 0, ans
            canary = bucket("ro", key) < 5000
            assert ans["lane"] == ("canary" if canary else "stable")
            assert ans["version"] == ("2" if canary else "1")
            # version 1 multiplies by 3, version 2 by 2: the answer is the lane's model's
            assert out_array(ans).tolist() == ([2.0, 4.0, 6.0] if canary else [3.0, 6.0, 9.0])
            assert ans["arm"] == ("control" if bucket("e1-salt", key) < 5000 else "treat")
        pinned = c.call({"model": "m", "inputs": x, "key": "user-1", "version": "2"})
        assert (pinned["version"], pinned["lane"], pinned["arm"]) == ("2", "canary", None)
        no_arm = c.call({"model": "m", "inputs": x, "key": "user-1"})
        assert no_arm["arm"] is None
        bad = c.call({"model": "m", "inputs": x, "exp": "nope"})
        assert bad["status"] == 5 and "experiment 'nope'" in bad["error"]
        h = c.call({"op": "health"})
        assert ({(w["version"], w["lane"]) for w in h["models"]}
                == {("1", "stable"), ("2", "canary")})


def test_feedback_joins_outcomes_to_lane_and_arm(daemon_factory):
    d = daemon_factory(ROUTED)
    x = [1.0, 2.0, 3.0]
    with d.client() as c:
        rids = {}
        for i in range(40):
            ans = c.call({"model": "m", "inputs": x, "key": f"u{i}", "exp": "e1"})
            rids[f"u{i}"] = ans
        # by rid: canary answers convert (1.0), stable ones do not (0.0)
        for ans in rids.values():
            fb = c.call({"op": "feedback", "ref": ans["rid"],
                         "outcome": 1.0 if ans["lane"] == "canary" else 0.0})
            assert fb["status"] == 0 and fb["joined"] is True
            assert ((fb["lane"], fb["arm"], fb["version"])
                    == (ans["lane"], ans["arm"], ans["version"]))
        # by routing key: joined to that key's latest answer
        fb = c.call({"op": "feedback", "ref": "u3", "outcome": 1})
        assert fb["joined"] is True and fb["lane"] == rids["u3"]["lane"]
        miss = c.call({"op": "feedback", "ref": 12345, "outcome": 1})
        assert miss["status"] == 0 and miss["joined"] is False
        bad = c.call({"op": "feedback", "ref": 1, "outcome": float("nan")})
        assert bad["status"] == 3 and "outcome" in bad["error"]
        stats = c.call({"op": "stats"})
    kpis = {(k["lane"], k["arm"]): k for k in stats["kpis"]}
    lanes = {(a["lane"], a["arm"]) for a in rids.values()}
    assert set(kpis) == lanes
    for (lane, _arm), k in kpis.items():
        assert k["mean"] == (1.0 if lane == "canary" else 0.0)
    assert sum(k["n"] for k in kpis.values()) == 41
    assert stats["feedback"] == {"joined": 41, "unjoined": 1}
    (ro,) = stats["rollouts"]
    assert (ro["model"], ro["stable"], ro["candidate"], ro["weight"]) == ("m", "1", "2", 0.5)
    assert (ro["stage"], ro["stages"], ro["status"]) == (1, [0.1, 0.5, 1.0], "active")
