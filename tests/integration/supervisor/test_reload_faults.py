"""SIGHUP reloads that go wrong (docs/operations.md, "Reload" and
"Authentication and rate limits"), on a real daemon: a new version that does
not warm up within ``start_timeout_s``, a tokens file that does not parse,
SIGHUPs that arrive during a reload, a host/port change, and rate buckets
that must survive a reload."""

from __future__ import annotations

import os
import time

import psutil

from tests.faults import (
    EXHAUSTED,
    OK,
    X4,
    decisions,
    log_records,
    model,
    poll,
    records,
    server,
    sighup,
)
from tests.load import SteadyLoad
from tests.wire import WireClient

INFER = {"model": "m", "inputs": X4}
ALICE = "alice-token-0123456789abcdef"


def reloads(d) -> list[dict]:
    return [r for r in decisions(d) if r["event"] == "reload"]


def stats(d, **extra) -> dict:
    with d.client() as c:
        return c.call({"op": "stats", **extra})


def test_a_new_version_not_warm_within_start_timeout_rejects_the_reload(daemon_factory):
    base = server() + model(version="1")
    d = daemon_factory(base)
    (v1_pid,) = d.worker_pids()
    hangs = server("start_timeout_s = 2.0") + model(version="1") + \
        model(version="2", factory="slow_load")
    with SteadyLoad(d.port, lambda i: dict(INFER), conns=2) as load:
        load.wait_answers(20)
        sighup(d, hangs)
        (rec,) = poll(lambda: reloads(d), "rejected reload", log=d.log)
        n = len(load.answers)
        load.wait_answers(n + 20)
    assert load.sent == len(load.answers) and load.statuses() == {OK: len(load.answers)}
    assert rec["ok"] is False
    (err,) = rec["errors"]
    assert err.startswith("m@2/cpu#0: ") and "did not become ready within 2.0 s" in err, rec
    s = stats(d)
    assert s["reloads"] == {"ok": 0, "failed": 1}
    assert [(m["version"], m["pid"]) for m in d.health()["models"]] == [("1", v1_pid)]
    # the hung worker was killed, not left loading: the only worker is v1's
    poll(lambda: [p.pid for p in psutil.Process(d.proc.pid).children()
                  if "daemon.workers.child" in " ".join(p.cmdline())] == [v1_pid],
         "hung worker gone", timeout=30, log=d.log)


def test_a_tokens_file_that_does_not_parse_rejects_the_reload_and_old_tokens_keep_working(
        daemon_factory, tmp_path):
    tokens = tmp_path / "tokens"
    tokens.write_text(f"alice:{ALICE}\n")
    os.chmod(tokens, 0o600)
    config = server() + model() + f'\n[auth]\ntokens_file = "{tokens}"\nexempt_ops = ["health"]\n'
    d = daemon_factory(config)
    with d.client() as c:
        assert c.call(dict(INFER, token=ALICE))["status"] == OK
        tokens.write_text(f"alice:{ALICE}\nthis line has no separator\n")
        sighup(d)
        (rec,) = poll(lambda: reloads(d), "rejected reload", log=d.log)
        assert rec["ok"] is False and rec["key"] == "auth.tokens_file", rec
        assert "line 2: must be NAME:TOKEN" in rec["error"] and ALICE not in rec["error"]
        # the authenticated connection keeps working, and so does the old token on a new one
        assert c.call(dict(INFER))["status"] == OK
        assert c.call({"op": "stats"})["reloads"] == {"ok": 0, "failed": 1}
    with d.client() as c:
        assert c.call(dict(INFER, token=ALICE))["status"] == OK
    assert ALICE not in d.log()
    d.token = ALICE


def test_sighups_during_a_reload_coalesce_into_one_more(daemon_factory):
    base = server() + model(version="1")
    d = daemon_factory(base, env={"RINGSERVE_TEST_LOAD_S": "1.5"})
    with_v2 = base + model(version="2", factory="slow_load")  # takes 1.5 s to load
    with_v3 = with_v2 + model(version="3")
    with SteadyLoad(d.port, lambda i: dict(INFER), conns=1) as load:
        sighup(d, with_v2)
        poll(lambda: any(r.get("worker", "").startswith("m@2/")
                         for r in records(d, "worker started")),
             "the first reload's new worker", log=d.log)
        d.config_path.write_text(with_v3)
        for _ in range(3):
            sighup(d)
        poll(lambda: (lambda s: s if s["reloads"]["ok"] == 2 else None)(stats(d)),
             "the coalesced reload", log=d.log)
        # and no third: every SIGHUP of the three went into that one
        t_end = time.monotonic() + 1.0
        while time.monotonic() < t_end:
            assert stats(d)["reloads"] == {"ok": 2, "failed": 0}
            time.sleep(0.1)
    assert load.sent == len(load.answers) and load.statuses() == {OK: len(load.answers)}
    first, second = reloads(d)
    assert (first["ok"], first["started"]) == (True, ["m@2"])
    assert (second["ok"], second["started"], sorted(second["kept"])) == \
        (True, ["m@3"], ["m@1", "m@2"])
    assert sorted(m["version"] for m in d.health()["models"]) == ["1", "2", "3"]
    d.children = psutil.Process(d.proc.pid).children(recursive=True)


def test_a_host_port_change_is_ignored_with_a_warning_and_rate_buckets_survive(daemon_factory):
    rate = "\n[rate_limit]\nrequests_per_s = 0.1\nburst = 3\n"
    d = daemon_factory(server() + model() + rate)
    with d.client() as c:
        assert [c.call(dict(INFER))["status"] for _ in range(4)] == [OK] * 3 + [EXHAUSTED]
        moved = server("max_connections = 500").replace('"127.0.0.1"', '"127.0.0.2"') \
            .replace("[server]\n", "[server]\nport = 7999\n")
        sighup(d, moved + model() + rate)
        (rec,) = poll(lambda: reloads(d), "reload", log=d.log)
        assert rec["ok"] is True
        # the bucket that was empty before the reload is still empty (0.1/s refills
        # one request in 10 s): a reload is no way around a rate limit
        a = c.call(dict(INFER))
        assert a["status"] == EXHAUSTED and "rate limit" in a["error"], a
    (warn,) = [r for r in log_records(d) if "changes need a restart" in r.get("msg", "")
               and "still listening on the old address" in r["msg"]]
    assert warn["level"] == "warning" and "server.host" in warn["msg"]
    # still on the old address, with the same bucket for this client address
    with WireClient("127.0.0.1", d.port) as c2:
        assert c2.call({"op": "health"})["status"] == OK
        assert c2.call(dict(INFER))["status"] == EXHAUSTED
        s = c2.call({"op": "stats"})
    assert s["status"] == EXHAUSTED
