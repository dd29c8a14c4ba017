"""Routing: the specified hash, canary stickiness, A/B splits, pinning."""

from __future__ import annotations

import pytest

from daemon.config import parse_config
from daemon.serving.router import CANARY, STABLE, RoutingTable, UnknownExperiment, bucket


@pytest.mark.parametrize("salt,key,expected", [
    ("canary", "u1", 3025), ("canary", "u123", 3121), ("rec-exp-1", "u123", 4662),
    ("", "", 8438), ("ü-salt", "用户42", 3746)])
def test_protocol_test_vectors(salt, key, expected):
    assert bucket(salt, key) == expected


def test_separator_distinguishes_salt_and_key():
    assert bucket("a", "bc") != bucket("ab", "c")


def _cfg(rollout="", experiments=""):
    import tomllib
    text = """
[[models]]
name = "m"
version = "1"
factory = "a:b"
input = { dtype = "float32", shape = [4] }
[[models]]
name = "m"
version = "2"
factory = "a:b"
input = { dtype = "float32", shape = [4] }
[[models]]
name = "other"
factory = "a:b"
input = { dtype = "float32", shape = [4] }
""" + rollout + experiments
    return parse_config(tomllib.loads(text))


ROLLOUT = """
[[rollouts]]
model = "m"
stable = "1"
candidate = "2"
salt = "ro-salt"
stages = [0.01, 0.05, 0.10, 0.25, 1.0]
stage = {stage}
"""


def test_canary_share_and_stickiness_as_the_weight_grows():
    keys = [f"user-{i}" for i in range(100_000)]
    previous: set[str] = set()
    for stage, weight in enumerate([0.01, 0.05, 0.10, 0.25, 1.0]):
        table = RoutingTable.from_config(_cfg(ROLLOUT.format(stage=stage)))
        canary = set()
        for k in keys:
            version, lane, arm = table.route("m", k, None, None)
            assert (version, lane) in (("2", CANARY), ("1", STABLE)) and arm is None
            if lane == CANARY:
                canary.add(k)
        assert abs(len(canary) / len(keys) - weight) < 0.005, (stage, len(canary))
        assert previous <= canary, "a key left the canary when the weight rose"
        previous = canary


def test_routing_is_a_function_of_salt_and_key_only():
    t1 = RoutingTable.from_config(_cfg(ROLLOUT.format(stage=2)))
    t2 = RoutingTable.from_config(_cfg(ROLLOUT.format(stage=2)))
    for i in range(1000):
        k = f"k{i}"
        assert t1.route("m", k, None, None) == t2.route("m", k, None, None)
        assert (t1.route("m", k, None, None)[1] == CANARY) == (bucket("ro-salt", k) < 1000)


def test_rolled_back_weight_zero_sends_everyone_to_stable():
    table = RoutingTable.from_config(_cfg(ROLLOUT.format(stage=4)), weights={"m": 0.0})
    assert all(table.route("m", f"k{i}", None, None) == ("1", STABLE, None) for i in range(2000))


def test_unkeyed_requests_split_at_random():
    table = RoutingTable.from_config(_cfg(ROLLOUT.format(stage=3)))
    lanes = [table.route("m", None, None, None)[1] for _ in range(20_000)]
    assert abs(lanes.count(CANARY) / len(lanes) - 0.25) < 0.02


EXPERIMENT = """
[[experiments]]
id = "exp1"
model = "m"
salt = "exp1-salt"
coverage = {coverage}
arms = [{{ name = "control", split = 0.5 }}, {{ name = "a", split = 0.3, version = "2" }},
        {{ name = "b", split = 0.2 }}]
"""


def test_arm_split_accuracy_and_independence_from_the_rollout():
    table = RoutingTable.from_config(_cfg(ROLLOUT.format(stage=2), EXPERIMENT.format(coverage=0.8)))
    counts: dict = {}
    canary_in_b = canary_b_total = 0
    n = 100_000
    for i in range(n):
        version, lane, arm = table.route("m", f"u{i}", "exp1", None)
        counts[arm] = counts.get(arm, 0) + 1
        if arm == "a":
            assert version == "2" and lane == CANARY  # the arm's version, which is the candidate
        if arm == "b":
            canary_b_total += 1
            canary_in_b += lane == CANARY
    assert abs(counts[None] / n - 0.2) < 0.01
    for arm, share in (("control", 0.5), ("a", 0.3), ("b", 0.2)):
        assert abs(counts[arm] / n - 0.8 * share) < 0.01, (arm, counts)
    # the rollout's own salt decides the lane inside a label-only arm: ~10% canary
    assert abs(canary_in_b / canary_b_total - 0.10) < 0.02


def test_arms_are_sticky_per_key():
    table = RoutingTable.from_config(_cfg("", EXPERIMENT.format(coverage=1.0)))
    for i in range(500):
        assert len({table.route("m", f"u{i}", "exp1", None) for _ in range(3)}) == 1


def test_pinning_and_unknown_experiment():
    table = RoutingTable.from_config(_cfg(ROLLOUT.format(stage=0), EXPERIMENT.format(coverage=1.0)))
    assert table.route("m", "u1", None, "2") == ("2", CANARY, None)
    assert table.route("m", "u1", "exp1", "1") == ("1", STABLE, None)
    with pytest.raises(UnknownExperiment):
        table.route("m", "u1", "nope", None)
    with pytest.raises(UnknownExperiment):
        table.route("other", "u1", "exp1", None)  # the experiment runs on another model
    assert table.route("other", "u1", None, None) == ("1", STABLE, None)


def test_routed_counts_feed_the_sample_ratio_check_and_skip_pinned_requests():
    counts = {"m": [0, 0]}
    table = RoutingTable.from_config(_cfg(ROLLOUT.format(stage=3)), {"m": 0.25}, counts)
    for i in range(20_000):
        table.route("m", f"user-{i}", None, None)
    table.route("m", "user-1", None, "2")  # pinned: not the rollout's choice
    assert sum(counts["m"]) == 20_000
    assert abs(counts["m"][1] / 20_000 - 0.25) < 0.015
