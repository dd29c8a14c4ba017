"""Fallback answers and input defaults (docs/operations.md, "Degraded mode";
daemon/serving/fallback.py) on a real daemon over real sockets: a model whose
workers are all killed is answered by its fallback version, marked, until it
comes back; a flooded queue is answered by a constant, with the connection's
in-flight count and the fair shares balanced after; deadline_near, but never
for a pinned version; a canary that falls back on every request is still
rolled back; a fallback that fails too gives the ordinary error; defaulted
inputs give what the model gives in-process on the filled sample."""

from __future__ import annotations

import json
import os
import signal

import numpy as np
import psutil
import torch
from prometheus_client.parser import text_string_to_metric_families

from tests.faults import (
    DEADLINE,
    EXHAUSTED,
    INTERNAL,
    INVALID,
    OK,
    UNAVAILABLE,
    http_get,
    poll,
    server,
    sighup,
)
from tests.models import TwoInputs
from tests.wire import out_array, tensor

X = np.array([1.0, 2.0, 3.0, 4.0], np.float32)


def entry(version: str, factory: str, extra: str = "", name: str = "m") -> str:
    return f"""
[[models]]
name = "{name}"
version = "{version}"
factory = "tests.models:{factory}"
input = {{ dtype = "float32", shape = [4] }}
output = {{ dtype = "float32", shape = [4] }}
devices = ["cpu"]
threads = 1
{extra}
"""


def stats_of(d, version: str, name: str = "m") -> dict:
    with d.client() as c:
        s = c.call({"op": "stats", "model": name})
    return next(m for m in s["models"] if m["version"] == version)


def metric(port: int, family: str) -> list:
    status, body = http_get(port, "/metrics")
    assert status == 200
    for f in text_string_to_metric_families(body.decode()):
        if f.name == family:
            return f.samples
    return []


def test_killed_workers_are_answered_by_the_fallback_version_until_the_primary_is_back(
        daemon_factory):
    """Version 1 (2x) falls back to version "small" (3x). SIGKILL of version
    1's worker: its requests, those in flight included, are answered OK by
    "small", marked ``fallback: no_worker``; health says degraded and /readyz
    503 meanwhile; once the worker is back, version 1 answers again. Counted
    apart: stats, metrics, not in version 1's or "small"'s own answers."""
    cfg = (server("restart_backoff_max_s = 1.0") +
           entry("1", "two_x", '[models.fallback]\nversion = "small"\n') +
           entry("small", "raises_on_magic"))
    d = daemon_factory(cfg)
    h = d.health()
    assert h["degraded"] is False and h["fallbacks"] == [
        {"name": "m", "version": "1", "fallback": "small", "ready": True, "degraded": False}]
    (pid,) = [w["pid"] for w in h["models"] if w["version"] == "1"]
    port = h["metrics_port"]
    req = {"model": "m", "inputs": tensor(X), "key": "u1"}
    answers: list[dict] = []
    with d.client() as c:
        a = c.call(req)
        assert (a["status"], a["version"], "fallback" in a) == (OK, "1", False), a
        assert np.array_equal(out_array(a), 2 * X)
        for _ in range(8):  # in flight when the worker dies
            c.send(req)
        os.kill(pid, signal.SIGKILL)
        answers += c.recv_n(8)
        degraded = poll(lambda: (lambda h: h if h["degraded"] else None)(d.health()),
                        "health says degraded", log=d.log)
        assert degraded["ready"] is False and degraded["fallbacks"][0]["degraded"] is True
        code, body = http_get(port, "/readyz")
        assert code == 503 and b"degraded" in body, (code, body)
        during = c.call(req)  # the worker is still restarting: no ready worker
        answers.append(during)
        assert during["fallback"] == "no_worker", (during, d.health())

        def call():
            answers.append(c.call(req))
            return answers[-1] if answers[-1].get("version") == "1" else None
        back = poll(call, "version 1 answers again", log=d.log)
    assert "fallback" not in back and np.array_equal(out_array(back), 2 * X)
    assert d.health()["degraded"] is False
    for a in answers:
        assert a["status"] == OK, a
        if a["version"] == "1":  # finished before the kill
            assert "fallback" not in a
            continue
        assert (a["version"], a["fallback"], a["lane"], a["model"]) == \
            ("small", "no_worker", "stable", "m"), a
        assert np.array_equal(out_array(a), 3 * X)
    fell = sum(1 for a in answers if a.get("fallback"))
    assert fell >= 1
    s1, small = stats_of(d, "1"), stats_of(d, "small")
    assert s1["fallback"]["answered"] == {"no_worker": fell}, s1["fallback"]
    assert s1["fallback"]["version"] == "small" and s1["held"] == 0 and small["held"] == 0
    assert small["requests"] == 0 and small["batches"] >= 1  # it ran them; not its answers
    assert s1["counts"].get("0", 0) == s1["requests"]  # no error reached a caller
    samples = metric(port, "ringserve_fallback_answers")
    assert {(s.labels["version"], s.labels["reason"], s.labels["answered_by"]): s.value
            for s in samples if s.name.endswith("_total")} == {("1", "no_worker", "small"): fell}
    assert metric(port, "ringserve_degraded")[0].value == 0.0


FLOOD = (server("max_inflight_per_connection = 6") + """
[request_log]
enabled = true
key_secret = "k"
""" + """
[[models]]
name = "slow"
version = "1"
factory = "tests.models:slow"
input = { dtype = "float32", shape = [4] }
output = { dtype = "float32", shape = [2] }
devices = ["cpu"]
threads = 1
max_batch = 1
queue_limit = 2
[models.fallback]
outputs = [0.25, 0.75]
""")


def test_a_flooded_queue_is_answered_by_a_constant_and_the_counts_stay_balanced(
        daemon_factory):
    """queue_limit 2 on a slow model, max_inflight_per_connection 6: bursts
    of 6 pipelined requests, 40 times. Those past the queue get the constant
    (``fallback: queue_full``, ``version: fallback:constant``), each request
    exactly one answer; after, a burst of 6 is still accepted whole (the
    connection's in-flight count went back to 0) and no fair-share place is
    held. Never for a pinned version (BUSY) nor a NaN (INVALID_ARGUMENT).
    The request log marks fallback answers; feedback for one joins nothing."""
    d = daemon_factory(FLOOD, env={"RINGSERVE_TEST_SLOW_MS": "20"})
    req = {"model": "slow", "inputs": tensor(X)}
    seen: dict[int, dict] = {}
    fell = 0
    with d.client() as c:
        for burst in range(40):
            ids = [c.send(dict(req, key=f"u{burst}")) for _ in range(6)]
            for a in c.recv_n(6):
                assert a["id"] in ids and a["id"] not in seen, a
                seen[a["id"]] = a
                assert a["status"] == OK, a
                if "fallback" in a:
                    fell += 1
                    assert (a["fallback"], a["version"], a["lane"]) == \
                        ("queue_full", "fallback:constant", "stable"), a
                    assert a["outputs"]["shape"] == [2]
                    assert np.array_equal(out_array(a), np.array([0.25, 0.75], np.float32))
                    assert a["timing"] == {"queue_us": 0, "compute_us": 0, "batch": 0}
        assert fell >= 40, fell  # at least one per burst
        # every place was given back: six at once are all accepted again
        for _ in range(6):
            c.send(req)
        last = c.recv_n(6)
        assert all(a["status"] == OK for a in last), last
        fell += sum(1 for a in last if "fallback" in a)
        seen.update((a["id"], a) for a in last)
        # pinned: the ordinary refusal; a NaN: refused as bad input, never answered OK
        nan = tensor(np.array([1.0, np.nan, 3.0, 4.0], np.float32))
        for _ in range(5):  # 2 in the worker, 2 queued, 1 over
            c.send(dict(req, version="1"))
        c.send(dict(req, inputs=nan))
        out = c.recv_n(6)
        by_status = sorted(a["status"] for a in out)
        assert EXHAUSTED in by_status and INVALID in by_status, out
        assert not any("fallback" in a for a in out), out
        a_fb = next(a for a in seen.values() if "fallback" in a)
        fbk = c.call({"op": "feedback", "ref": a_fb["rid"], "outcome": 1.0})
        assert fbk["status"] == OK and fbk["joined"] is False  # never joined to KPIs
    s = stats_of(d, "1", "slow")
    assert s["fallback"]["answered"] == {"queue_full": fell}, s["fallback"]
    busy = by_status.count(EXHAUSTED)  # the pinned ones: the version's own answers
    assert s["held"] == 0 and s["counts"] == {"0": s["requests"] - busy, "8": busy}, s["counts"]
    assert s["shed"]["queue_full"] == fell + busy + 1  # + the NaN: shed, then refused

    def logged():
        recs = []
        for f in sorted((d.dir / "ringserve-requests").glob("*.jsonl")):
            recs += [json.loads(line) for line in f.read_text().splitlines() if line]
        answers = [r for r in recs if r["type"] == "answer"]
        return answers if len(answers) >= len(seen) + 5 else None
    recs = poll(logged, "request log written", log=d.log)
    marked = [r for r in recs if r.get("fallback")]
    assert len(marked) == fell
    assert all((r["status"], r["version"], r["routed"], r["fallback"], r["data_version"]) ==
               (OK, "fallback:constant", "1", "queue_full", None) for r in marked), marked[:2]
    assert not any("fallback" in r for r in recs if r["version"] == "1")


def test_deadline_near_falls_back_and_a_pinned_version_gets_its_deadline(daemon_factory):
    """A 150 ms model: once its recent p95 is known, a request with 40 ms of
    budget is answered by the constant at once (``deadline_near``); the same
    request pinned to the version waits and gets DEADLINE_EXCEEDED."""
    cfg = server() + """
[[models]]
name = "slow"
version = "1"
factory = "tests.models:slow"
input = { dtype = "float32", shape = [4] }
output = { dtype = "float32", shape = [2] }
devices = ["cpu"]
threads = 1
[models.fallback]
outputs = 0.5
on = ["deadline_near"]
"""
    d = daemon_factory(cfg, env={"RINGSERVE_TEST_SLOW_MS": "150"})
    req = {"model": "slow", "inputs": tensor(X)}
    with d.client() as c:
        # 450 ms of answers: past the 100 ms after which the threshold is re-read
        for _ in range(3):
            assert c.call(req)["status"] == OK
        before = c.call({"op": "stats", "model": "slow"})["models"][0]
        a = c.call(dict(req, deadline_ms=40))
        assert (a["status"], a.get("fallback"), a["version"]) == \
            (OK, "deadline_near", "fallback:constant"), a
        assert np.array_equal(out_array(a), np.array([0.5, 0.5], np.float32))
        after = c.call({"op": "stats", "model": "slow"})["models"][0]
        # answered at intake: it never queued for the model, nor counts as its answer
        assert (after["requests"], after["shed"], after["dispatch"]) == \
            (before["requests"], before["shed"], before["dispatch"]), (before, after)
        pinned = c.call(dict(req, deadline_ms=40, version="1"))
        assert pinned["status"] == DEADLINE and "fallback" not in pinned, pinned
        # a budget above the p95 is served by the model itself
        assert "fallback" not in c.call(dict(req, deadline_ms=2000))
    assert stats_of(d, "1", "slow")["fallback"]["answered"] == {"deadline_near": 1}


def test_a_faulty_canary_with_a_fallback_is_still_rolled_back(daemon_factory):
    """The candidate raises on every request sent (777 in the first feature)
    and falls back to the stable version on model_error: callers in the
    canary lane get OK answers from version 1, marked, in the canary lane;
    the guardrail counts each as a canary failure and rolls it back (hard
    floor), after which the lane is gone."""
    cfg = (server() + entry("1", "two_x") +
           entry("2", "raises_on_magic",
                 '[models.fallback]\nversion = "1"\non = ["model_error"]\n') + """
[[rollouts]]
model = "m"
stable = "1"
candidate = "2"
salt = "s"
stages = [0.5, 1.0]

[[guardrails]]
model = "m"
interval_s = 0.2
min_samples = 100000
hard_min_samples = 20
hard_error_rate = 0.5
""")
    d = daemon_factory(cfg)
    x = np.array([777.0, 1.0, 2.0, 3.0], np.float32)
    canary = []
    with d.client() as c:
        for i in range(120):
            a = c.call({"model": "m", "inputs": tensor(x), "key": f"user-{i}"})
            assert a["status"] == OK, a  # no caller saw the candidate fail
            assert np.array_equal(out_array(a), 2 * x)
            if a["lane"] == "canary":
                canary.append(a)
        assert len(canary) >= 20
        assert all((a["version"], a["fallback"]) == ("1", "model_error") for a in canary)

        def rolled_back():
            s = c.call({"op": "stats", "model": "m"})
            ro = s["rollouts"][0]
            return ro if ro["status"] == "rolled_back" else None
        ro = poll(rolled_back, "rollback", log=d.log)
        assert "canary error rate" in ro["reason"], ro
        after = [c.call({"model": "m", "inputs": tensor(x), "key": f"user-{i}"})
                 for i in range(40)]
    assert all(a["lane"] == "stable" and "fallback" not in a for a in after), after[:3]
    s2 = stats_of(d, "2")
    assert s2["fallback"]["answered"] == {"model_error": len(canary)}
    assert s2["held"] == 0 and stats_of(d, "1")["held"] == 0


def test_a_fallback_version_that_fails_too_gives_the_ordinary_error(daemon_factory):
    """Both versions raise on 777: the caller gets INTERNAL (what version 1
    gives without a fallback), naming both failures, counted as version 1's
    answer and as a failed fallback; other inputs are served as usual."""
    cfg = (server() +
           entry("1", "raises_on_magic",
                 '[models.fallback]\nversion = "1b"\non = ["model_error"]\n') +
           entry("1b", "raises_on_magic"))
    d = daemon_factory(cfg)
    bad = tensor(np.array([777.0, 0, 0, 0], np.float32))
    with d.client() as c:
        a = c.call({"model": "m", "inputs": bad})
        assert a["status"] == INTERNAL and "fallback" not in a, a
        assert "version '1' failed" in a["error"] and "version '1b'" in a["error"], a
        ok = c.call({"model": "m", "inputs": tensor(X)})
        assert ok["status"] == OK and ok["version"] == "1" and "fallback" not in ok
    s = stats_of(d, "1")
    assert s["counts"] == {"0": 1, "13": 1} and s["fallback"]["failed"] == {"model_error": 1}
    assert s["held"] == 0 and stats_of(d, "1b")["held"] == 0


def test_no_fallback_while_no_worker_of_the_fallback_is_ready_either(daemon_factory):
    """The fallback version failed to load: the primary's refusal is the
    ordinary UNAVAILABLE, counted as refused by the fallback."""
    cfg = (server() +
           entry("1", "crash_on_load", '[models.fallback]\nversion = "small"\n') +
           entry("small", "broken"))
    d = daemon_factory(cfg, wait_ready=False)
    d.wait_for(lambda h: any(w["state"] == "failed" for w in h["models"]), what="failed")
    with d.client() as c:
        a = c.call({"model": "m", "inputs": tensor(X)})
    assert a["status"] == UNAVAILABLE and "fallback" not in a, a
    assert d.health()["degraded"] is False
    assert stats_of(d, "1")["fallback"]["refused"].get("no_worker", 0) >= 1


DEFAULTS = server() + """
[[models]]
name = "two"
factory = "tests.models:two_inputs"
devices = ["cpu"]
threads = 1
[models.inputs]
ids = { dtype = "int64", shape = [3] }
dense = { dtype = "float32", shape = [2], default = [0.5, -1.25] }

[[models]]
name = "one"
factory = "tests.models:two_x"
input = { dtype = "float32", shape = [4], default = 1.5 }
devices = ["cpu"]
threads = 1
"""


def test_defaulted_inputs_equal_the_in_process_model_on_the_filled_sample(daemon_factory):
    d = daemon_factory(DEFAULTS)
    ids = np.array([3, -4, 10], np.int64)
    dense = np.array([0.5, -1.25], np.float32)
    with torch.inference_mode():
        want = TwoInputs()(torch.from_numpy(ids)[None], torch.from_numpy(dense)[None])
    with d.client() as c:
        a = c.call({"model": "two", "inputs": {"ids": tensor(ids)}})
        assert a["status"] == OK and a["defaulted"] == ["dense"], a
        assert np.array_equal(out_array(a, "score"), want["score"][0].numpy())
        assert np.array_equal(out_array(a, "twice"), want["twice"][0].numpy())
        # both sent: no defaulted field; the same answer
        full = c.call({"model": "two", "inputs": {"ids": tensor(ids), "dense": tensor(dense)}})
        assert full["status"] == OK and "defaulted" not in full
        assert np.array_equal(out_array(full, "score"), out_array(a, "score"))
        # ids has no default: INVALID_ARGUMENT, as without defaults
        miss = c.call({"model": "two", "inputs": {"dense": tensor(dense)}})
        assert miss["status"] == INVALID and "ids" in miss["error"], miss
        # a default does not excuse a wrong input
        wrong = c.call({"model": "two", "inputs": {"ids": tensor(ids.astype(np.int32))}})
        assert wrong["status"] == INVALID, wrong
        # the one input of a model omitted altogether
        one = c.call({"model": "one"})
        assert one["status"] == OK and one["defaulted"] == ["input"], one
        assert np.array_equal(out_array(one), np.full(4, 3.0, np.float32))
        bad = c.call({"model": "one", "inputs": {"dtype": "float32", "shape": [4]}})
        assert bad["status"] == INVALID and "data" in bad["error"], bad  # its own error
        models = c.call({"op": "models"})["models"]
    two = next(m for m in models if m["name"] == "two")
    assert "default" not in two["inputs"]["ids"]
    assert two["inputs"]["dense"]["default"] == tensor(dense)


def test_cold_start_is_answered_by_a_constant_until_the_model_is_warm(daemon_factory):
    """A model that takes 3 s to load, with a constant fallback, a response
    cache and a shadow: requests from the first one are answered
    (``no_worker``, the constant), never cached nor mirrored; health is
    degraded and not ready meanwhile; then the model answers (a cache miss:
    the constant was not kept), and that answer is mirrored."""
    cfg = (server() + entry("1", "slow_load", "cache = true\nfallback = { outputs = -1.0 }") +
           entry("2", "two_x") +
           '[[shadows]]\nmodel = "m"\ncandidate = "2"\nsample_rate = 1.0\n')
    d = daemon_factory(cfg, env={"RINGSERVE_TEST_LOAD_S": "3"}, wait_ready=False)
    with d.client() as c:
        a = c.call({"model": "m", "inputs": tensor(X), "key": "u"})
        h = d.health()
        assert (a["status"], a["fallback"], a["version"]) == \
            (OK, "no_worker", "fallback:constant"), a
        assert np.array_equal(out_array(a), np.full(4, -1.0, np.float32))
        assert h["ready"] is False and h["degraded"] is True, h
        d.wait_ready()
        warm = c.call({"model": "m", "inputs": tensor(X), "key": "u"})
        assert warm["status"] == OK and "fallback" not in warm and warm["version"] == "1"
        assert np.array_equal(out_array(warm), 2 * X) and "cache" not in warm["timing"]
        hit = c.call({"model": "m", "inputs": tensor(X), "key": "u"})
        assert hit["timing"].get("cache") is True and np.array_equal(out_array(hit), 2 * X)
        shadows = poll(lambda: (lambda s: s if s["shadows"][0]["answers"] else None)(
            c.call({"op": "stats"})), "the shadow's answer", log=d.log)["shadows"][0]
    assert shadows["mirrored"] == 1 and shadows["answers"] == {"0": 1}, shadows  # warm only
    assert stats_of(d, "1")["cache"]["miss"] == 2  # the fallback's request, then warm
    assert d.health()["degraded"] is False


def test_a_reload_points_the_fallback_at_the_new_fallback_version(daemon_factory):
    """SIGHUP with a changed "small" entry: version 1 is kept (its entry did
    not change) and, once the old "small" is retired, its fallback answers
    from the new "small" workers."""
    primary = entry("1", "two_x", '[models.fallback]\nversion = "small"\non = ["no_worker"]\n')
    d = daemon_factory(server() + primary + entry("small", "raises_on_magic"))
    old = {w["version"]: w["pid"] for w in d.health()["models"]}
    sighup(d, server() + primary + entry("small", "raises_on_magic", "max_batch = 8"))

    def reloaded():
        h = d.health()
        pids = {w["version"]: w["pid"] for w in h["models"]}
        gone = not psutil.pid_exists(old["small"])  # the old "small" retired and stopped
        return h if h["ready"] and pids["small"] != old["small"] and gone else None
    h = poll(reloaded, "reload", log=d.log)
    assert {w["version"]: w["pid"] for w in h["models"]}["1"] == old["1"]  # kept
    os.kill(old["1"], signal.SIGKILL)
    with d.client() as c:
        a = poll(lambda: (lambda a: a if "fallback" in a or a.get("status") else None)(
            c.call({"model": "m", "inputs": tensor(X)})), "a fallback answer", log=d.log)
    assert (a["status"], a["fallback"], a["version"]) == (OK, "no_worker", "small"), a
    assert np.array_equal(out_array(a), 3 * X)
    small = stats_of(d, "small")
    assert small["batches"] >= 1 and small["held"] == 0
