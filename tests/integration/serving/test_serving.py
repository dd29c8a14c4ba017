"""The serving core end to end: a real daemon, real sockets, real workers."""

from __future__ import annotations

import os
import signal
import time

import numpy as np
import psutil
import pytest
import torch

from daemon.workers.zoo import mlp_scorer
from tests.conftest import demo_config
from tests.wire import out_array, tensor

OK, INVALID, DEADLINE, NOT_FOUND, EXHAUSTED, INTERNAL, UNAVAILABLE = 0, 3, 4, 5, 8, 13, 14


def samples(n: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 128), dtype=np.float32)


@pytest.fixture(scope="module")
def model():
    return mlp_scorer()


def test_exact_outputs_sequential(daemon_factory, model):
    """One request at a time: each runs alone (bucket 1), and the answer is
    bit for bit what the model gives in-process for that batch."""
    d = daemon_factory(demo_config())
    xs = samples(20)
    with d.client() as c:
        for x in xs:
            ans = c.call({"model": "demo", "inputs": tensor(x)})
            assert ans["status"] == OK, ans
            assert ans["model"] == "demo" and ans["version"] == "1" and ans["lane"] == "stable"
            assert ans["timing"]["batch"] == 1 and ans["timing"]["bucket"] == 1
            assert set(ans["timing"]) >= {"queue_us", "compute_us", "batch"}
            with torch.inference_mode():
                want = model(torch.from_numpy(x)[None]).numpy()[0]
            got = out_array(ans)
            assert got.shape == (2,) and got.dtype == np.float32
            assert np.array_equal(got, want)


def test_pipelined_batches_match_in_process(daemon_factory, model):
    """Many requests in flight: they are batched (batch > 1), answered by id
    in any order, and every answer equals the in-process model on the same
    zero-padded batch within float32 rounding."""
    d = daemon_factory(demo_config(max_batch=16, window_ms=5.0))
    xs = samples(300, seed=2)
    with d.client() as c:
        ids = [c.send({"id": 1000 + i, "model": "demo", "inputs": tensor(x)})
               for i, x in enumerate(xs)]
        answers = {a["id"]: a for a in c.recv_n(len(ids))}
    assert sorted(answers) == sorted(ids)
    with torch.inference_mode():
        want = model(torch.from_numpy(xs)).numpy()
    batches = []
    for i in range(len(xs)):
        a = answers[1000 + i]
        assert a["status"] == OK, a
        batches.append(a["timing"]["batch"])
        np.testing.assert_allclose(out_array(a), want[i], rtol=0, atol=1e-5)
        assert a["timing"]["bucket"] >= a["timing"]["batch"]
    assert max(batches) > 1, "no batching under 300 pipelined requests"
    # padded row results: the same row alone vs inside a zero-padded bucket
    with torch.inference_mode():
        padded = torch.zeros(16, 128)
        padded[:3] = torch.from_numpy(xs[:3])
        np.testing.assert_allclose(model(padded)[:3].numpy(), want[:3], rtol=0, atol=1e-5)


def test_every_batch_is_bit_for_bit_the_in_process_batch(daemon_factory, model):
    """One worker takes the queue in order, so the requests of a pipelined
    burst form consecutive batches: each answer's ``timing`` says its batch
    size and bucket, which is enough to rebuild every batch. Each one, run
    in-process at its bucket (zero-padded) with the worker's one thread,
    gives exactly the bytes the daemon answered."""
    d = daemon_factory(demo_config(max_batch=16, window_ms=5.0))
    xs = samples(400, seed=4)
    with d.client() as c:
        for i, x in enumerate(xs):
            c.send({"id": i, "model": "demo", "inputs": tensor(x)})
        answers = {a["id"]: a for a in c.recv_n(len(xs))}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        i, sizes = 0, []
        while i < len(xs):
            t = answers[i]["timing"]
            n, bucket = t["batch"], t["bucket"]
            members = [answers[j]["timing"] for j in range(i, i + n)]
            assert all((m["batch"], m["bucket"]) == (n, bucket) for m in members), (i, members)
            padded = torch.zeros(bucket, 128)
            padded[:n] = torch.from_numpy(xs[i:i + n])
            with torch.inference_mode():
                want = model(padded)[:n].numpy()
            for j in range(n):
                assert np.array_equal(out_array(answers[i + j]), want[j]), (i, j, n, bucket)
            sizes.append(n)
            i += n
    finally:
        torch.set_num_threads(threads)
    assert max(sizes) > 1, "no batching under 400 pipelined requests"


def test_non_finite_rows_inside_a_batch_are_refused_alone(daemon_factory, model):
    """The NaN/Inf check runs once per batch: the bad rows of a pipelined
    burst get INVALID_ARGUMENT naming their element, every other row its
    correct answer, and the bad rows never count as the model's answers."""
    d = daemon_factory(demo_config(max_batch=16, window_ms=5.0))
    xs = samples(64, seed=9)
    bad = {3: (7, np.nan), 17: (0, np.inf), 18: (127, -np.inf), 40: (64, np.nan)}
    for row, (i, v) in bad.items():
        xs[row, i] = v
    with d.client() as c:
        for i, x in enumerate(xs):
            c.send({"id": 1 + i, "model": "demo", "inputs": tensor(x)})
        answers = {a["id"]: a for a in c.recv_n(len(xs))}
        stats = c.call({"op": "stats"})
    with torch.inference_mode():
        want = model(torch.from_numpy(np.nan_to_num(xs))).numpy()
    batched = []
    for row in range(len(xs)):
        a = answers[1 + row]
        if row in bad:
            i, v = bad[row]
            assert a["status"] == INVALID, a
            assert a["error"] == (f"inputs: the element at flat index {i} is {float(v)}; "
                                  "NaN and infinity are not accepted, send finite numbers")
            assert "outputs" not in a
        else:
            assert a["status"] == OK, a
            np.testing.assert_allclose(out_array(a), want[row], rtol=0, atol=1e-5)
            batched.append(a["timing"]["batch"])
    assert max(batched) > 1
    m = stats["models"][0]
    assert m["counts"] == {"0": 60} and stats["rejected"] == {"3": 4}


def test_list_inputs_are_cast(daemon_factory, model):
    d = daemon_factory(demo_config())
    x = samples(1, seed=3)[0]
    with d.client() as c:
        ans = c.call({"model": "demo", "inputs": [float(v) for v in x]})
    assert ans["status"] == OK, ans
    with torch.inference_mode():
        want = model(torch.from_numpy(x)[None]).numpy()[0]
    assert np.array_equal(out_array(ans), want)


def test_bad_inputs_get_precise_errors_and_daemon_keeps_serving(daemon_factory):
    d = daemon_factory(demo_config(server="max_frame_bytes = 65536"))
    good = tensor(samples(1)[0])
    nan = samples(1)[0]
    nan[5] = np.nan
    cases = [
        ({"model": "nope", "inputs": good}, NOT_FOUND, "nope"),
        ({"model": "demo", "version": "9", "inputs": good}, NOT_FOUND, "version"),
        ({"inputs": good}, INVALID, "model"),
        ({"model": "demo"}, INVALID, "inputs"),
        ({"model": "demo", "inputs": tensor(samples(1)[0].astype(np.float64))}, INVALID, "float64"),
        ({"model": "demo", "inputs": tensor(np.zeros(127, np.float32))}, INVALID, "127"),
        ({"model": "demo", "inputs": tensor(np.zeros((1, 128), np.float32))}, INVALID, "shape"),
        ({"model": "demo", "inputs": dict(good, data=good["data"][:-4])}, INVALID, "508"),
        ({"model": "demo", "inputs": tensor(nan)}, INVALID, "5"),
        ({"model": "demo", "inputs": "hello"}, INVALID, "inputs"),
        ({"model": "demo", "inputs": good, "deadline_ms": -1}, INVALID, "deadline_ms"),
        ({"model": "demo", "inputs": good, "v": 7}, INVALID, "version"),
        ({"op": "dance"}, INVALID, "unknown op"),
    ]
    with d.client() as c:
        for i, (msg, status, needle) in enumerate(cases):
            ans = c.call(dict(msg, id=50 + i))
            assert ans["id"] == 50 + i
            assert ans["status"] == status, (msg, ans)
            assert needle in ans["error"], (needle, ans["error"])
        # garbage inside an intact frame: INVALID_ARGUMENT with id 0, connection lives
        c.send_raw(len(b"\xc1\xc1junk").to_bytes(4, "big") + b"\xc1\xc1junk")
        ans = c.recv()
        assert ans["status"] == INVALID and ans["id"] == 0
        c.send_raw((3).to_bytes(4, "big") + b"\x93\x01\x02")  # an array, not a map
        assert c.recv()["status"] == INVALID
        assert c.call({"id": 7, "model": "demo", "inputs": good})["status"] == OK
    with d.client() as c:
        # an oversize frame: RESOURCE_EXHAUSTED, then the daemon closes
        c.send_raw((1 << 20).to_bytes(4, "big") + b"\x80" * 100)
        ans = c.recv()
        assert ans["status"] == EXHAUSTED and "65536" in ans["error"]
        assert c.closed_by_peer()
    with d.client() as c:
        c.send_raw(b"\xff\xff\xff\xff garbage that is not a frame at all")
        assert c.recv()["status"] == EXHAUSTED
    with d.client() as c:  # everyone else is still served
        assert c.call({"model": "demo", "inputs": good})["status"] == OK
    s = d.client().call({"op": "stats"})
    assert s["rejected"] == {str(INVALID): 13, str(NOT_FOUND): 2, str(EXHAUSTED): 2}


def test_health_models_stats(daemon_factory):
    d = daemon_factory(demo_config(max_batch=8))
    with d.client() as c:
        h = c.call({"op": "health"})
        assert h["status"] == OK and h["live"] is True and h["ready"] is True
        (w,) = h["models"]
        assert w["name"] == "demo" and w["version"] == "1" and w["device"] == "cpu"
        assert w["ready"] is True and w["state"] == "ready" and w["lane"] == "stable"
        from daemon.workers.runtime import weights_hash
        assert w["hash"] == weights_hash(mlp_scorer())
        m = c.call({"op": "models"})["models"][0]
        assert m["input"] == {"dtype": "float32", "shape": [128]}
        assert m["output"] == {"dtype": "float32", "shape": [2]}
        assert m["batching"]["max_batch"] == 8 and m["batching"]["buckets"] == [1, 2, 3, 4, 6, 8]
        for x in samples(10):
            assert c.call({"model": "demo", "inputs": tensor(x)})["status"] == OK
        s = c.call({"op": "stats"})
        (ms,) = s["models"]
        assert ms["counts"] == {"0": 10} and ms["requests"] == 10
        assert ms["latency_us"]["p50"] > 0 and ms["latency_us"]["p99"] >= ms["latency_us"]["p50"]
        assert ms["queue_depth"] == 0
        assert sum(int(k) * v for k, v in ms["batch_sizes"].items()) == 10
        assert 0 <= ms["workers"][0]["busy"] <= 1 and ms["workers"][0]["batches"] >= 1


SLOW = """
[server]
host = "127.0.0.1"
deadline_ms = 10000

[[models]]
name = "slow"
factory = "tests.models:slow"
input = {{ dtype = "float32", shape = [4] }}
devices = {devices}
threads = 1
max_batch = {max_batch}
queue_limit = {queue_limit}
"""


def slow_config(max_batch=1, queue_limit=4, devices='["cpu"]'):
    return SLOW.format(max_batch=max_batch, queue_limit=queue_limit, devices=devices)


def test_queue_limit_sheds_with_resource_exhausted(daemon_factory):
    d = daemon_factory(slow_config(max_batch=1, queue_limit=4),
                       env={"RINGSERVE_TEST_SLOW_MS": "50"})
    x = tensor(np.ones(4, np.float32))
    with d.client() as c:
        for i in range(40):
            c.send({"id": i, "model": "slow", "inputs": x})
        answers = c.recv_n(40)
    assert sorted(a["id"] for a in answers) == list(range(40))  # nothing lost
    by = {}
    for a in answers:
        by.setdefault(a["status"], []).append(a)
    assert set(by) == {OK, EXHAUSTED}, {k: len(v) for k, v in by.items()}
    assert len(by[OK]) >= 5  # 1 in the worker's slots + 4 queued, at least
    assert "queue_limit = 4" in by[EXHAUSTED][0]["error"]


def test_deadline_exceeded_in_queue_and_in_worker(daemon_factory):
    d = daemon_factory(slow_config(max_batch=1, queue_limit=100),
                       env={"RINGSERVE_TEST_SLOW_MS": "300"})
    x = tensor(np.ones(4, np.float32))
    with d.client() as c:
        c.send({"id": 1, "model": "slow", "inputs": x, "deadline_ms": 100})  # runs, too slow
        c.send({"id": 2, "model": "slow", "inputs": x, "deadline_ms": 50})  # queued behind it
        c.send({"id": 3, "model": "slow", "inputs": x, "deadline_ms": 5000})
        answers = {a["id"]: a for a in c.recv_n(3)}
    assert answers[1]["status"] == DEADLINE and "in the worker" in answers[1]["error"]
    assert answers[2]["status"] == DEADLINE
    assert answers[3]["status"] == OK


def test_model_error_is_internal_and_batch_scoped(daemon_factory):
    cfg = """
[[models]]
name = "magic"
factory = "tests.models:raises_on_magic"
input = { dtype = "float32", shape = [3] }
threads = 1
max_batch = 1
"""
    d = daemon_factory(cfg)
    with d.client() as c:
        bad = c.call({"model": "magic", "inputs": [777.0, 0.0, 0.0]})
        good = c.call({"model": "magic", "inputs": [1.0, 2.0, 3.0]})
    assert bad["status"] == INTERNAL and "magic value 777" in bad["error"]
    assert good["status"] == OK and out_array(good).tolist() == [3.0, 6.0, 9.0]


def test_named_inputs_and_outputs(daemon_factory):
    cfg = """
[[models]]
name = "two"
factory = "tests.models:two_inputs"
inputs = { ids = { dtype = "int64", shape = [4] }, dense = { dtype = "float32", shape = [3] } }
threads = 1
"""
    d = daemon_factory(cfg)
    with d.client() as c:
        ans = c.call({"model": "two", "inputs": {"ids": tensor(np.arange(4, dtype=np.int64)),
                                                 "dense": [1.0, 2.0, 3.5]}})
        assert ans["status"] == OK, ans
        assert out_array(ans, "score").tolist() == [12.5]
        assert out_array(ans, "twice").tolist() == [2.0, 4.0, 7.0]
        m = c.call({"op": "models"})["models"][0]
        assert m["inputs"] == {"ids": {"dtype": "int64", "shape": [4]},
                               "dense": {"dtype": "float32", "shape": [3]}}
        assert set(m["outputs"]) == {"score", "twice"}
        missing = c.call({"model": "two", "inputs": {"ids": [1, 2, 3, 4]}})
        assert missing["status"] == INVALID and "dense" in missing["error"]


def test_worker_that_cannot_load_is_reported_not_restarted(daemon_factory):
    cfg = demo_config() + """
[[models]]
name = "broken"
factory = "tests.models:broken"
input = { dtype = "float32", shape = [4] }
threads = 1
"""
    d = daemon_factory(cfg, wait_ready=False)
    h = d.wait_for(lambda h: any(m["state"] == "failed" for m in h["models"]) and
                   any(m["ready"] for m in h["models"]), what="broken worker reported")
    broken = [m for m in h["models"] if m["name"] == "broken"][0]
    assert "broken on purpose" in broken["error"] and broken["ready"] is False
    assert h["ready"] is False
    # The front decides whether to restart when it reaps the worker (one
    # callback): once the process is gone, that decision is in health.
    try:
        psutil.Process(broken["pid"]).wait(60)   # returns once the front has reaped it
    except psutil.NoSuchProcess:
        pass
    h = d.health()
    broken = [m for m in h["models"] if m["name"] == "broken"][0]
    assert broken["restarts"] == 0 and broken["state"] == "failed"
    with d.client() as c:
        ans = c.call({"model": "broken", "inputs": [1.0, 2.0, 3.0, 4.0]})
        assert ans["status"] == UNAVAILABLE and "no ready worker" in ans["error"]
        assert c.call({"model": "demo", "inputs": tensor(samples(1)[0])})["status"] == OK


def test_kill_9_worker_answers_unavailable_then_recovers(daemon_factory):
    d = daemon_factory(slow_config(max_batch=1, queue_limit=100),
                       env={"RINGSERVE_TEST_SLOW_MS": "200"})
    (pid,) = d.worker_pids()
    x = tensor(np.ones(4, np.float32))
    with d.client() as c:
        for i in range(5):
            c.send({"id": i, "model": "slow", "inputs": x})
        with d.client() as probe:   # until the first is in the worker (a second waits queued)
            t_end = time.monotonic() + 60
            while probe.call({"op": "stats"})["models"][0]["workers"][0]["in_flight_batches"] < 1:
                assert time.monotonic() < t_end, d.log()
                time.sleep(0.01)
        os.kill(pid, signal.SIGKILL)
        answers = c.recv_n(5)
        assert sorted(a["id"] for a in answers) == list(range(5))
        assert all(a["status"] in (OK, UNAVAILABLE) for a in answers), answers
        assert any(a["status"] == UNAVAILABLE and "exited" in a["error"] for a in answers)
        h = d.wait_for(lambda h: h["ready"], what="restart")
        assert h["models"][0]["restarts"] == 1 and h["models"][0]["pid"] != pid
        assert c.call({"model": "slow", "inputs": x})["status"] == OK
    # the dead generation's ring went with it; the new generation maps its own
    # (a memfd: named nowhere in /dev/shm)
    import re
    maps = open(f"/proc/{h['models'][0]['pid']}/maps").read()
    mapped = set(re.findall(r"memfd:(ringserve-\S+)", maps))
    rings = {m for m in mapped if not m.startswith("ringserve-status-")}
    assert len(rings) == 1 and "g2-f0g1" in next(iter(rings)), mapped
    assert {m for m in mapped if m.startswith("ringserve-status-")} == {"ringserve-status-w1g2"}
    # (the restarted worker is in the daemon's tree: the teardown checks it exits)
    assert any(p.pid == h["models"][0]["pid"] for p in d.children)


def test_sigterm_drains_every_accepted_request(daemon_factory):
    d = daemon_factory(slow_config(max_batch=4, queue_limit=1000),
                       env={"RINGSERVE_TEST_SLOW_MS": "20"})
    x = tensor(np.ones(4, np.float32))
    c = d.client()
    n = 200
    for i in range(n):
        c.send({"id": i, "model": "slow", "inputs": x})
    first = c.recv()
    d.proc.send_signal(signal.SIGTERM)
    answers = [first] + c.recv_n(n - 1)
    assert sorted(a["id"] for a in answers) == list(range(n))
    assert all(a["status"] == OK for a in answers), [a for a in answers if a["status"]][:3]
    assert d.proc.wait(60) == 0
    c.close()
    d.assert_clean()


def test_two_workers_share_one_queue(daemon_factory):
    d = daemon_factory(slow_config(max_batch=1, queue_limit=100, devices='["cpu", "cpu"]'),
                       env={"RINGSERVE_TEST_SLOW_MS": "30"})
    x = tensor(np.ones(4, np.float32))
    with d.client() as c:
        for i in range(20):
            c.send({"id": i, "model": "slow", "inputs": x})
        assert all(a["status"] == OK for a in c.recv_n(20))
        s = c.call({"op": "stats"})["models"][0]
    assert len(s["workers"]) == 2 and all(w["batches"] >= 3 for w in s["workers"]), s["workers"]
