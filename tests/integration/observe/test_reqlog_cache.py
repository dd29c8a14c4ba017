"""The request log (complete, secret-free, rotated, flushed on SIGTERM) and
the response cache (hits equal the worker's answers, never stale across a
version change), through the real daemon."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import time

import numpy as np

from daemon.serving.router import bucket
from tests.wire import out_array

SECRET = "s3cret-pepper"
LOGGED = """
[request_log]
enabled = true
dir = "logs"
key_secret = "%s"
sample_rate = 1.0
%s

[[models]]
name = "m"
version = "1"
factory = "tests.models:two_x"
input = { dtype = "float32", shape = [3] }
threads = 1

[[models]]
name = "m"
version = "2"
factory = "tests.models:raises_on_magic"
input = { dtype = "float32", shape = [3] }
threads = 1

[[rollouts]]
model = "m"
stable = "1"
candidate = "2"
salt = "ro"
stages = [0.5]

[[experiments]]
id = "e1"
model = "m"
salt = "e1"
arms = [{ name = "control", split = 0.5 }, { name = "treat", split = 0.5 }]
"""


def read_log(directory) -> tuple[list[dict], list[str]]:
    files = sorted(os.listdir(directory))
    records = []
    for f in files:
        for line in (directory / f).read_text().splitlines():
            records.append(json.loads(line))  # every line whole
    return records, files


def key_hash(key: str) -> str:
    secret = hashlib.blake2b(SECRET.encode()).digest()
    return hashlib.blake2b(key.encode(), key=secret, digest_size=16).hexdigest()


def test_every_answer_and_feedback_is_logged_without_raw_keys_or_secret(daemon_factory):
    d = daemon_factory(LOGGED % (SECRET, ""))
    sent = {}
    with d.client() as c:
        for i in range(60):
            key = f"alice-{i}@example.com"
            x = [float(i), 1.0, 2.0]
            a = c.call({"model": "m", "inputs": x, "key": key, "exp": "e1"})
            assert a["status"] == 0
            sent[a["rid"]] = (key, x, a)
        magic = c.call({"model": "m", "inputs": [777.0, 0.0, 0.0], "key": "bob", "version": "2"})
        assert magic["status"] == 13
        # A NaN found in its batch (the deferred check) is refused, and logged like any answer
        nan = {"dtype": "float32", "shape": [3],
               "data": np.array([np.nan, 1.0, 2.0], np.float32).tobytes()}
        refused = c.call({"model": "m", "inputs": nan, "key": "carol", "version": "1"})
        assert refused["status"] == 3 and "NaN" in refused["error"], refused
        rids = list(sent)
        for rid in rids[:10]:
            assert c.call({"op": "feedback", "ref": rid, "outcome": 1.0})["joined"] is True
        assert c.call({"op": "feedback", "ref": "alice-20@example.com", "outcome": 0.5})["joined"]
        assert c.call({"op": "feedback", "ref": 12345, "outcome": 1.0})["joined"] is False
    assert d.stop() == 0  # SIGTERM flushes the log
    records, _ = read_log(d.dir / "logs")
    answers = {r["rid"]: r for r in records if r["type"] == "answer"}
    feedback = [r for r in records if r["type"] == "feedback"]
    assert len(answers) == 62 and len(feedback) == 12
    for rid, (key, x, a) in sent.items():
        r = answers[rid]
        assert r["key"] == key_hash(key)
        assert (r["exp"], r["arm"], r["lane"], r["model"], r["version"], r["status"]) == (
            "e1", a["arm"], a["lane"], "m", a["version"], 0)
        assert r["arm"] == ("control" if bucket("e1", key) < 5000 else "treat")
        assert r["score"] == float(out_array(a)[0])
        assert r["batch"] == a["timing"]["batch"] and r["latency_us"] >= r["queue_us"] >= 0
        expect = hashlib.blake2b(np.array(x, np.float32).tobytes(), digest_size=8).hexdigest()
        assert r["features"] == expect and r["cache"] is False
    err = answers[magic["rid"]]
    assert (err["status"], err["version"], err["lane"], err["score"]) == (13, "2", "canary", None)
    bad = answers[refused["rid"]]
    assert (bad["status"], bad["version"], bad["score"]) == (3, "1", None)
    joined = [f for f in feedback if f["joined"]]
    assert len(joined) == 11 and {f["rid"] for f in joined} == set(rids[:10]) | {rids[20]}
    assert all(f["lane"] == answers[f["rid"]]["lane"] for f in joined)
    unjoined = [f for f in feedback if not f["joined"]]
    assert unjoined == [dict(unjoined[0], rid=None, model=None, version=None, lane=None, arm=None)]
    # the raw keys and the secret are nowhere on disk: not in the request
    # log, the decision log, the state file or the daemon's own log
    for path in [*(d.dir / "logs").iterdir(), *d.dir.iterdir()]:
        if path.is_file() and path != d.config_path:
            text = path.read_text(errors="replace")
            assert "alice" not in text and "bob" not in text and SECRET not in text, path


def test_the_log_rotates_by_size_keeps_max_files_and_drops_nothing_counted(daemon_factory):
    d = daemon_factory(LOGGED % (SECRET, "max_file_bytes = 4096\nmax_files = 3"))
    with d.client() as c:
        for i in range(300):
            c.send({"model": "m", "inputs": [1.0, 2.0, 3.0], "key": f"k{i}"})
        assert all(a["status"] == 0 for a in c.recv_n(300))
        # until the writer thread has taken every record (it wakes every 50 ms)
        t_end = time.monotonic() + 60
        while (st := c.call({"op": "stats"})["request_log"])["buffered"] or \
                st["written"] + st["dropped"] < 300:
            assert time.monotonic() < t_end, st
            time.sleep(0.05)
    assert st["written"] + st["dropped"] == 300 and st["dropped"] == 0
    assert d.stop() == 0
    records, files = read_log(d.dir / "logs")
    assert len(files) == 3 and all(f.endswith(".jsonl") for f in files)
    assert all(os.path.getsize(d.dir / "logs" / f) <= 4096 for f in files)
    assert 0 < len(records) < 300  # the older files were deleted, whole


CACHED = """
[[models]]
name = "m"
version = "%s"
factory = "tests.models:%s"
input = { dtype = "float32", shape = [3] }
threads = 1
cache = true
cache_ttl_s = %s
"""


def test_cache_hits_equal_the_workers_answer_and_a_new_version_is_never_stale(daemon_factory):
    d = daemon_factory(CACHED % ("1", "two_x", "60"))
    x = [1.5, 2.5, 3.5]
    with d.client() as c:
        first = c.call({"model": "m", "inputs": x})
        hits = [c.call({"model": "m", "inputs": x}) for _ in range(3)]
        other = c.call({"model": "m", "inputs": [9.0, 9.0, 9.0]})
        assert first["timing"]["batch"] == 1 and "cache" not in first["timing"]
        for h in hits:
            assert h["timing"] == {"queue_us": 0, "compute_us": 0, "batch": 0, "cache": True}
            assert h["outputs"] == first["outputs"] and h["version"] == "1"
        assert out_array(other).tolist() == [18.0, 18.0, 18.0]
        st = c.call({"op": "stats"})["models"][0]
        assert (st["cache"]["hit"], st["cache"]["miss"], st["cache"]["entries"]) == (3, 2, 2)
        assert st["counts"] == {"0": 5}

        # a new version (x*3) behind the same name: the old answer is never served
        ttl = 3.0
        d.config_path.write_text(CACHED % ("2", "raises_on_magic", ttl))
        os.kill(d.proc.pid, signal.SIGHUP)
        t_end = time.monotonic() + 60
        while c.call({"op": "stats"})["reloads"]["ok"] < 1:
            assert time.monotonic() < t_end, d.log()
            time.sleep(0.05)
        t_put = time.monotonic()   # before the answer is cached: its age is at most now - t_put
        new = c.call({"model": "m", "inputs": x})
        assert (new["version"], out_array(new).tolist()) == ("2", [4.5, 7.5, 10.5])
        assert "cache" not in new["timing"]
        again = c.call({"model": "m", "inputs": x})
        if time.monotonic() - t_put < ttl:   # (on a machine stalled for 3 s, not a question)
            assert again["timing"].get("cache") is True
        # Past cache_ttl_s it is a miss again, and never before: poll for the
        # miss, then check the entry had lived at least its TTL (the clocks
        # say "at least", which no stall can make false).
        t_end = time.monotonic() + 60
        while (late := c.call({"model": "m", "inputs": x}))["timing"].get("cache"):
            assert time.monotonic() < t_end, "the cached answer never expired"
            time.sleep(0.05)
        assert time.monotonic() - t_put >= ttl
        assert (late["version"], out_array(late).tolist()) == ("2", [4.5, 7.5, 10.5])


def test_ringserve_report_reads_the_daemons_own_log(daemon_factory):
    import subprocess
    import sys

    from tests.conftest import REPO
    d = daemon_factory(LOGGED % (SECRET, ""))
    with d.client() as c:
        for i in range(200):
            a = c.call({"model": "m", "inputs": [1.0, 2.0, 3.0], "key": f"u{i}", "exp": "e1"})
            # the treatment arm converts: outcome 1, control 0
            c.call({"op": "feedback", "ref": a["rid"], "outcome": float(a["arm"] == "treat")})
    assert d.stop() == 0
    out = d.dir / "report.json"
    r = subprocess.run([sys.executable, "-m", "daemon", "report", "--log", str(d.dir / "logs"),
                        "--exp", "e1", "--control", "control", "--json", str(out)],
                       cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "treat" in r.stdout and "control" in r.stdout
    doc = json.loads(out.read_text())
    (exp,) = doc["experiments"]
    arms = {a["name"]: a for a in exp["arms"]}
    assert arms["treat"]["answers"] + arms["control"]["answers"] == 200
    assert (arms["treat"]["kpi"]["mean"], arms["control"]["kpi"]["mean"]) == (1.0, 0.0)
    assert arms["treat"]["vs_control"]["diff"] == 1.0 and exp["srm"]["mismatch"] is False
    assert doc["join"]["joined"] == 200
