"""Rollouts end to end on a real daemon (docs/operations.md, "Rollouts and
guardrails"): a healthy canary advances to its last stage and is promoted;
a slow canary is rolled back by ``max_p95_ms`` after ``failing_checks``
failing checks in a row; a candidate that crashes ``max_restarts`` times is
rolled back by the hard floor."""

from __future__ import annotations

import json
import time

from daemon.serving.router import bucket
from tests.faults import OK, X4, decisions, model, poll, server, slow_model
from tests.load import SteadyLoad


def rollout(stages: str, extra: str = "") -> str:
    return (f'\n[[rollouts]]\nmodel = "m"\nstable = "1"\ncandidate = "2"\nsalt = "ro"\n'
            f"stages = {stages}\n{extra}\n")


def guard(extra: str) -> str:
    # latency_margin: two processes on a loaded 2-core machine differ in
    # latency for real; these tests are about other rules
    return f'\n[[guardrails]]\nmodel = "m"\ninterval_s = 0.2\nlatency_margin = 10.0\n{extra}\n'


def keyed(i: int) -> dict:
    return {"model": "m", "inputs": X4, "key": f"u{i}"}


def rollout_state(d) -> dict:
    with d.client() as c:
        return c.call({"op": "stats"})["rollouts"][0]


def wait_status(d, status: str, timeout: float = 60.0) -> dict:
    return poll(lambda: (lambda r: r if r["status"] == status else None)(rollout_state(d)),
                f"rollout {status}", timeout=timeout, log=d.log)


def checks(d) -> list[dict]:
    return [r for r in decisions(d) if r["event"] == "check"]


def test_a_healthy_canary_advances_to_its_last_stage_and_is_promoted(daemon_factory):
    d = daemon_factory(server() + model(version="1") + model(version="2") + rollout(
        "[0.5, 1.0]", "auto_advance = true\nmin_dwell_s = 0.3\nmin_samples = 20") +
        guard("min_samples = 20\nalpha = 0.001"))
    with SteadyLoad(d.port, keyed, conns=2) as load:
        ro = wait_status(d, "promoted")
        t_promoted = time.monotonic()
        load.wait_answers(len(load.answers) + 50)
    assert load.sent == len(load.answers) and load.statuses() == {OK: len(load.answers)}
    assert (ro["weight"], ro["stage"]) == (1.0, 1)
    events = [(r["event"], r.get("weight")) for r in decisions(d)
              if r["event"] in ("advance", "promote", "rollback")]
    assert events == [("advance", 1.0), ("promote", 1.0)]
    (promote,) = [r for r in decisions(d) if r["event"] == "promote"]
    assert promote["candidate"] == "2" and promote["canary_answers"] >= 20
    state = json.loads((d.dir / "ringserve.state.json").read_text())
    assert state["rollouts"]["m"]["status"] == "promoted"
    after = [a for t, _, a in load.answers if t > t_promoted]
    assert after and {(a["version"], a["lane"]) for a in after} == {("2", "canary")}


def test_a_canary_over_max_p95_ms_is_rolled_back_after_failing_checks(daemon_factory):
    # Both versions take 30 ms a batch: the canary is no slower than stable
    # (the relative rules hold), but its p95 is over the absolute limit.
    d = daemon_factory(server() + slow_model(name="m", version="1", max_batch=8) +
                       slow_model(name="m", version="2", max_batch=8) + rollout("[0.5]") +
                       guard("min_samples = 10\nmax_p95_ms = 5.0\nfailing_checks = 2\n"
                             "alpha = 0.001"),
                       env={"RINGSERVE_TEST_SLOW_MS": "30"})
    with SteadyLoad(d.port, keyed, conns=3) as load:
        ro = wait_status(d, "rolled_back")
        t_back = time.monotonic()
        load.wait_answers(len(load.answers) + 50)
    assert load.sent == len(load.answers) and load.statuses() == {OK: len(load.answers)}
    assert ro["weight"] == 0.0 and "max_p95_ms 5.0" in ro["reason"], ro
    verdicts = [r["verdict"] for r in checks(d)]
    # the absolute limit rolls back only after failing_checks failing checks in a row
    assert verdicts[-2:] == ["fail", "rollback"], verdicts
    assert set(verdicts) <= {"hold", "pass", "fail", "rollback"}
    fail, back = checks(d)[-2:]
    assert fail["measured"]["failing_checks"] == 1 and back["measured"]["failing_checks"] == 2
    assert back["measured"]["window"]["canary"]["p95_us"] > 5000
    after = [a for t, _, a in load.answers if t > t_back]
    assert after and {a["version"] for a in after} == {"1"}


def test_a_candidate_that_crashes_max_restarts_times_is_rolled_back(daemon_factory):
    """The candidate's worker dies while loading, every time: it is never
    ready, so the rollout must not wait for it to warm up before the hard
    floor acts (its canary keys get UNAVAILABLE, no ready worker, meanwhile)."""
    d = daemon_factory(server("restart_backoff_max_s = 0.5") + model(version="1") +
                       model(version="2", factory="crash_on_load") + rollout("[0.5]") +
                       guard("max_restarts = 2"), wait_ready=False)
    d.wait_for(lambda h: any(m["version"] == "1" and m["ready"] for m in h["models"]),
               what="stable ready")
    ro = wait_status(d, "rolled_back")
    assert ro["weight"] == 0.0 and "crashed 2 times" in ro["reason"], ro
    (rb,) = [r for r in decisions(d) if r["event"] == "rollback"]
    assert rb["measured"]["candidate_restarts"] >= 2 and rb["thresholds"]["max_restarts"] == 2
    canary = [k for k in (f"k{i}" for i in range(200)) if bucket("ro", k) < 5000][:20]
    with d.client() as c:
        for k in canary:  # the canary's keys are back on the stable version
            a = c.call({"model": "m", "inputs": X4, "key": k})
            assert (a["status"], a["version"], a["lane"]) == (OK, "1", "stable"), a
    state = json.loads((d.dir / "ringserve.state.json").read_text())
    assert state["rollouts"]["m"]["status"] == "rolled_back"
