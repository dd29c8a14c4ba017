"""The guardrail rule on synthetic streams, and how saved rollout state and a
new config combine (daemon/rollout/guardrails.py, daemon/rollout/controller.py)."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from daemon.config import RolloutConfig, default_guardrail
from daemon.rollout.controller import (
    ACTIVE,
    ROLLED_BACK,
    DecisionLog,
    atomic_write_json,
    load_state,
    resolve,
    weight_of,
)
from daemon.rollout.guardrails import (
    CANARY,
    STABLE,
    Guardrail,
    LatencyHistogram,
    msprt_log_lr,
    proportion_test,
    srm_p_value,
)


def simulate(seed, err_s=0.01, err_c=0.01, lat_c=1.0, per_check=200, checks=60, weight=0.5,
             canary_share=None, **cfg):
    """Feed both lanes ``per_check`` answers per check; the answers seen by
    the canary when it was rolled back (None if never) and the last verdict.
    Absolute limits are off unless given, so the relative tests are measured."""
    rng = np.random.default_rng(seed)
    cfg = dataclasses.replace(default_guardrail("m"), **{"failing_checks": 1000,
                                                        "max_error_rate": 1.0, **cfg})
    g = Guardrail(cfg, weight, 0.0)
    seen = 0
    v = None
    for k in range(1, checks + 1):
        for lane, err, scale in ((STABLE, err_s, 1.0), (CANARY, err_c, lat_c)):
            e = int(rng.binomial(per_check, err))
            g.current[lane].add_many(e, rng.lognormal(np.log(2000), 0.5, per_check - e) * scale)
        share = weight if canary_share is None else canary_share
        g.routed[1] += int(rng.binomial(2 * per_check, share))
        g.routed[0] = 2 * per_check * k - g.routed[1]
        seen += per_check
        v = g.check(float(k))
        if v.action == "rollback":
            return seen, v
    return None, v


def test_aa_streams_roll_back_at_most_alpha_of_the_time():
    # 200 A/A stages, each checked 60 times (continuous monitoring): the
    # sequential tests must keep the false-rollback rate at or below alpha.
    alpha = 0.05
    rolled = sum(simulate(seed, alpha=alpha)[0] is not None for seed in range(200))
    assert rolled / 200 <= alpha, rolled


def test_a_doubled_error_rate_is_caught_within_a_bounded_sample():
    seen = [simulate(s, err_c=0.02, per_check=500, checks=40)[0] for s in range(20)]
    assert all(n is not None for n in seen), seen
    assert max(seen) <= 20_000 and float(np.median(seen)) <= 5_000, seen


def test_a_20_percent_slower_canary_is_caught_within_a_bounded_sample():
    seen = [simulate(s, lat_c=1.2)[0] for s in range(20)]
    assert all(n is not None for n in seen), seen
    assert max(seen) <= 6_000, seen
    _, v = simulate(0, lat_c=1.2)
    assert "slower than" in " ".join(v.reasons) and v.measured["tests"]["latency"]["log_lr"] > 0


def test_too_little_data_holds_and_never_fails():
    # A canary that errs every time, but with fewer answers than either
    # floor needs: hold, not rollback.
    cfg = dataclasses.replace(default_guardrail("m"), min_samples=100, hard_min_samples=50)
    g = Guardrail(cfg, 0.1, 0.0)
    for _ in range(10):
        g.observe(CANARY, 13, 1000)
    v = g.check(1.0)
    assert v.action == "hold" and "min_samples" in v.reasons[0]
    empty = Guardrail(cfg, 0.1, 0.0).check(1.0)
    assert empty.action == "hold"


def test_the_hard_floor_rolls_back_at_once():
    cfg = dataclasses.replace(default_guardrail("m"), hard_min_samples=20, hard_error_rate=0.5)
    g = Guardrail(cfg, 0.1, 0.0)
    for i in range(30):
        g.observe(CANARY, 13 if i % 3 else 0, 1000)
    v = g.check(1.0)
    assert v.action == "rollback" and "hard_error_rate" in v.reasons[0]
    g = Guardrail(cfg, 0.1, 0.0)
    assert g.check(1.0, candidate_failed=True).action == "rollback"
    g.restarts = cfg.max_restarts
    assert "crashed" in g.check(2.0).reasons[0]


def test_absolute_limits_need_consecutive_failures_and_a_pass_resets_the_count():
    cfg = dataclasses.replace(default_guardrail("m"), min_samples=50, max_error_rate=0.1,
                              failing_checks=3, window_s=1.5, hard_error_rate=0.9)
    g = Guardrail(cfg, 1.0, 0.0)  # weight 1: no stable lane, absolute limits only

    def feed(errors, t):
        for i in range(100):
            g.observe(CANARY, 13 if i < errors else 0, 1000)
        return g.check(t).action

    assert [feed(20, 1), feed(20, 2)] == ["fail", "fail"]
    assert feed(0, 3) == "pass"  # window of checks 2-3: 10 % errors, not above 0.1
    assert g.failing == 0
    assert [feed(30, 4), feed(30, 5), feed(30, 6)] == ["fail", "fail", "rollback"]


def test_a_sample_ratio_mismatch_freezes_decisions():
    # The canary gets 30 % of routed traffic at weight 0.5 and errs twice as
    # often: the comparison is biased, so no relative rollback, only a report.
    _, v = simulate(1, err_c=0.02, per_check=500, checks=10, canary_share=0.3)
    assert v.action == "hold" and v.srm and "sample-ratio mismatch" in v.reasons[0]


def test_statistics_building_blocks():
    assert msprt_log_lr(0.0, 1.0, 1.0) < 0 and msprt_log_lr(5.0, 1.0, 1.0) > 3
    assert proportion_test(0, 100, 5, 100, 0.0, 0.05)[1] == 0.0  # canary better: never significant
    assert proportion_test(30, 1000, 10, 1000, 0.0, 0.02)[1] > np.log(20)
    assert srm_p_value(500, 1000, 0.5) == 1.0 and srm_p_value(300, 1000, 0.5) < 1e-9
    h = LatencyHistogram()
    for us in range(1, 10001):
        h.add(us)
    assert 9000 <= h.quantile_us(0.95) <= 9500 * 1.05


# -- rollout state --------------------------------------------------------------

def rollout(**kw) -> RolloutConfig:
    base = dict(model="m", stable="1", candidate="2", salt="s", stages=(0.01, 0.05, 0.1, 0.25, 1.0),
                stage=0, auto_advance=True, min_dwell_s=0.0, min_samples=0, retry=0)
    return RolloutConfig(**{**base, **kw})


def test_a_rolled_back_rollout_stays_rolled_back_until_a_new_candidate_or_retry():
    saved = dict(resolve(rollout(), None, 0.0), status=ROLLED_BACK, reason="errors")
    assert weight_of(resolve(rollout(), saved, 1.0)) == 0.0
    assert weight_of(resolve(rollout(stage=3), saved, 1.0)) == 0.0  # a stage edit is not a retry
    assert resolve(rollout(retry=1), saved, 1.0)["status"] == ACTIVE
    fresh = resolve(rollout(candidate="3"), saved, 1.0)
    assert fresh["status"] == ACTIVE and weight_of(fresh) == 0.01


def test_editing_the_stage_list_keeps_the_weight_reached():
    saved = dict(resolve(rollout(), None, 0.0), stage=2)  # auto-advanced to 0.10
    st = resolve(rollout(stages=(0.01, 0.02, 0.05, 0.10, 0.5, 1.0)), saved, 1.0)
    assert (st["stage"], weight_of(st)) == (3, 0.10)
    st = resolve(rollout(stages=(0.01, 0.07, 0.2, 1.0)), saved, 1.0)
    assert weight_of(st) == 0.07  # the last stage not above the weight reached
    same = resolve(rollout(), saved, 1.0)
    assert (same["stage"], same["since"]) == (2, 0.0)  # nothing changed, nothing reset


def test_moving_the_configured_stage_is_obeyed():
    saved = dict(resolve(rollout(), None, 0.0), stage=2)
    st = resolve(rollout(stage=4), saved, 1.0)
    assert (st["stage"], st["config_stage"], weight_of(st)) == (4, 4, 1.0)


def test_state_file_and_decision_log_are_written_whole(tmp_path):
    path = str(tmp_path / "s.json")
    assert load_state(path) == {}
    atomic_write_json(path, {"format": 1, "rollouts": {"m": {"status": "rolled_back"}}})
    assert load_state(path) == {"m": {"status": "rolled_back"}}
    assert [p.name for p in tmp_path.iterdir()] == ["s.json"]  # no temporary left behind
    (tmp_path / "bad.json").write_text("{not json")
    assert load_state(str(tmp_path / "bad.json")) == {}
    d = DecisionLog(str(tmp_path / "d.jsonl"))
    d.write({"event": "check", "verdict": "hold"})
    d.write({"event": "rollback"})
    d.close()
    lines = [json.loads(x) for x in (tmp_path / "d.jsonl").read_text().splitlines()]
    assert [x["event"] for x in lines] == ["check", "rollback"] and all("ts" in x for x in lines)


@pytest.mark.parametrize("stage", [0, 2])
def test_fresh_state_is_the_configured_stage(stage):
    st = resolve(rollout(stage=stage), None, 5.0)
    assert (st["status"], st["stage"], st["since"]) == (ACTIVE, stage, 5.0)


def test_a_kpi_drop_from_feedback_rolls_back_and_an_equal_kpi_does_not():
    def run(canary_p, seed):
        rng = np.random.default_rng(seed)
        cfg = dataclasses.replace(default_guardrail("m"), kpi=True, min_samples=100,
                                  latency_margin=10.0)
        g = Guardrail(cfg, 0.5, 0.0)
        for k in range(1, 41):
            for lane, p in ((STABLE, 0.10), (CANARY, canary_p)):
                g.current[lane].add_many(0, np.full(300, 1000.0))
                for x in rng.binomial(1, p, 300):
                    g.outcome(lane, float(x))
            g.routed[0] += 300
            g.routed[1] += 300
            v = g.check(float(k))
            if v.action == "rollback":
                return v
        return v
    dropped = run(0.07, 0)  # click rate 10 % -> 7 %
    assert dropped.action == "rollback" and "KPI" in dropped.reasons[0]
    assert sum(run(0.10, s).action == "rollback" for s in range(20)) <= 2


def test_a_sample_ratio_mismatch_does_not_shield_a_canary_past_its_absolute_limits():
    _, v = simulate(2, err_c=0.3, per_check=500, checks=10, canary_share=0.3,
                    max_error_rate=0.1, failing_checks=2, hard_error_rate=0.9)
    assert v.action == "rollback" and v.srm and "max_error_rate" in " ".join(v.reasons)


def test_state_rules_from_review():
    # a rolled-back canary is not resumed by a new stable or salt, only by
    # a new candidate or retry
    saved = dict(resolve(rollout(), None, 0.0), status=ROLLED_BACK)
    assert weight_of(resolve(rollout(stable="1b"), saved, 1.0)) == 0.0
    assert weight_of(resolve(rollout(salt="t"), saved, 1.0)) == 0.0
    # inserting a stage and bumping `stage` to keep the same weight is not a move
    advanced = dict(resolve(rollout(), None, 0.0), stage=3)  # 0.25
    st = resolve(rollout(stages=(0.005, 0.01, 0.05, 0.10, 0.25, 1.0), stage=1), advanced, 1.0)
    assert weight_of(st) == 0.25


def test_an_unreadable_state_file_is_set_aside_not_lost(tmp_path):
    path = tmp_path / "s.json"
    path.write_text("[]")
    assert load_state(str(path)) == {}
    assert not path.exists() and (tmp_path / "s.json.corrupt").read_text() == "[]"
