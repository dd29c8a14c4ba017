"""The request log under pressure (docs/operations.md, "Request log"), on a
real daemon: when the writer falls behind its bounded buffer, records are
dropped and counted, never silently; with ``sample_rate < 1`` only a share
of answers is logged, and feedback always is."""

from __future__ import annotations

import json

from prometheus_client.parser import text_string_to_metric_families

from tests.faults import OK, X4, http_get, model, poll, server

REQLOG = '\n[request_log]\nenabled = true\nkey_secret = "pepper"\n{extra}\n'


def logged(d) -> list[dict]:
    out = []
    for f in sorted((d.dir / "ringserve-requests").iterdir()):
        for line in f.read_text().splitlines():
            out.append(json.loads(line))  # every line is whole
    return out


def pipelined(c, n: int, chunk: int = 500) -> list[dict]:
    """n infer answers, sent ``chunk`` at a time (below the per-connection
    in-flight cap), so batches of up to max_batch finish at once."""
    answers = []
    for s in range(0, n, chunk):
        k = min(chunk, n - s)
        for i in range(k):
            c.send({"id": s + i + 1, "model": "m", "inputs": X4, "key": f"u{s + i}"})
        answers += c.recv_n(k)
    assert sorted(a["id"] for a in answers) == list(range(1, n + 1))
    return answers


def settled(d, expected: int | None = None):
    """The log's figures once the writer has taken everything buffered (every
    record of the answers already read was buffered before they were sent)."""
    def check():
        with d.client() as c:
            r = c.call({"op": "stats"})["request_log"]
        done = r["buffered"] == 0 and (expected is None or r["written"] + r["dropped"] == expected)
        return r if done else None
    return poll(check, f"{expected} records written or dropped", log=d.log)


def test_a_full_buffer_drops_records_and_counts_every_one(daemon_factory):
    d = daemon_factory(server() + REQLOG.format(extra="buffer = 16") + model())
    n = 3000
    with d.client() as c:
        answers = pipelined(c, n)
    assert {a["status"] for a in answers} == {OK}
    r = settled(d, n)  # each answer was sampled (rate 1): written or dropped, none lost
    assert r["dropped"] > 0 and r["written"] > 0, r
    records = logged(d)
    assert len(records) == r["written"] and {x["type"] for x in records} == {"answer"}
    rids = [x["rid"] for x in records]
    assert len(set(rids)) == len(rids) and set(rids) <= {a["rid"] for a in answers}
    status, body = http_get(d.health()["metrics_port"], "/metrics")
    assert status == 200
    fam = {f.name: f for f in text_string_to_metric_families(body.decode())}
    got = {s.labels["result"]: s.value
           for s in fam["ringserve_request_log_records"].samples if s.name.endswith("_total")}
    assert got == {"written": r["written"], "dropped": r["dropped"]}


def test_sample_rate_logs_a_share_of_answers_and_every_feedback(daemon_factory):
    d = daemon_factory(server() + REQLOG.format(extra="sample_rate = 0.3") + model())
    n = 1000
    with d.client() as c:
        answers = pipelined(c, n)
        for a in answers[:10]:
            fb = c.call({"op": "feedback", "ref": a["rid"], "outcome": 1.0})
            assert fb["status"] == OK and fb["joined"] is True
    r = settled(d)
    assert r["dropped"] == 0 and r["sample_rate"] == 0.3
    kinds = [x["type"] for x in logged(d)]
    sampled = kinds.count("answer")
    assert kinds.count("feedback") == 10      # feedback is always logged
    assert 150 <= sampled <= 450, sampled      # 300 expected; 10 standard deviations either side
    assert r["written"] == sampled + 10
