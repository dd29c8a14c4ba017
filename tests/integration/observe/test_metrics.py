"""The Prometheus endpoint and the probes, scraped like Prometheus does and
parsed with prometheus_client's own parser."""

from __future__ import annotations

import http.client
import socket
import time

import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import demo_config
from tests.wire import tensor


def get(port: int, path: str, method: str = "GET") -> tuple[int, str]:
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        c.request(method, path)
        r = c.getresponse()
        return r.status, r.read().decode()
    finally:
        c.close()


def scrape(port: int) -> dict:
    """{(name, frozenset(labels)): value} of every sample."""
    status, text = get(port, "/metrics")
    assert status == 200
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def sample(m: dict, name: str, **labels) -> float:
    hits = [v for (n, ls), v in m.items() if n == name and set(labels.items()) <= ls]
    assert hits, f"no sample {name} {labels}"
    return sum(hits)


def test_metrics_match_the_traffic_sent(daemon_factory):
    d = daemon_factory(demo_config(max_batch=8, queue_limit=1000))
    port = d.health()["metrics_port"]
    assert port and port != d.port
    assert get(port, "/healthz") == (200, "ok\n")
    assert get(port, "/readyz") == (200, "ready\n")
    assert get(port, "/nope")[0] == 404
    assert get(port, "/metrics", "POST")[0] == 405
    x = np.random.default_rng(0).random((60, 128), dtype=np.float32)
    with d.client() as c:
        for i in range(60):  # pipelined, so that batches form
            c.send({"model": "demo", "inputs": tensor(x[i])})
        answers = c.recv_n(60)
        bad = c.call({"model": "demo", "inputs": {"dtype": "float32", "shape": [3],
                                                  "data": b"\0" * 12}})
        missing = c.call({"model": "nope", "inputs": [1.0]})
    assert all(a["status"] == 0 for a in answers)
    assert (bad["status"], missing["status"]) == (3, 5)
    m = scrape(port)
    lv = dict(model="demo", version="1")
    assert sample(m, "ringserve_requests_total", **lv, lane="stable", arm="", status="OK") == 60
    assert sample(m, "ringserve_request_duration_seconds_count", **lv, lane="stable") == 60
    assert sample(m, "ringserve_request_duration_seconds_bucket", **lv, lane="stable",
                  le="+Inf") == 60
    assert sample(m, "ringserve_queue_duration_seconds_count", **lv) == 60
    with d.client() as c:
        st = next(x for x in c.call({"op": "stats"})["models"] if x["name"] == "demo")
    n_batches = sample(m, "ringserve_batch_size_count", **lv)
    assert n_batches == st["batches"] >= 1
    assert sample(m, "ringserve_batch_size_sum", **lv) == 60
    assert sample(m, "ringserve_compute_duration_seconds_count", **lv) == n_batches
    assert sum(v for (n, ls), v in m.items() if n == "ringserve_batches_total") == n_batches
    assert sample(m, "ringserve_padding_rows_total", **lv) == st["padded_rows"]
    assert sample(m, "ringserve_rejected_total", status="INVALID_ARGUMENT") == 1
    assert sample(m, "ringserve_rejected_total", status="NOT_FOUND") == 1
    assert sample(m, "ringserve_queue_depth", **lv) == 0
    assert sample(m, "ringserve_worker_ready", **lv) == 1
    assert sample(m, "ringserve_ready") == 1
    assert 0 <= sample(m, "ringserve_worker_busy_ratio", **lv) <= 1


def test_overload_is_counted_as_shed(daemon_factory):
    d = daemon_factory(demo_config(max_batch=1, queue_limit=2))
    port = d.health()["metrics_port"]
    x = tensor(np.zeros(128, np.float32))
    with d.client() as c:
        for _ in range(200):
            c.send({"model": "demo", "inputs": x})
        answers = c.recv_n(200)
    busy = sum(a["status"] == 8 for a in answers)
    assert busy > 0
    m = scrape(port)
    assert sample(m, "ringserve_shed_total", model="demo", reason="queue_full") == busy
    assert sample(m, "ringserve_requests_total", model="demo", status="RESOURCE_EXHAUSTED") == busy
    assert sample(m, "ringserve_requests_total", model="demo", status="OK") == 200 - busy


EVERY_FAMILY = """
[server]
host = "127.0.0.1"
max_connections_per_client = 4

[request_log]
enabled = true

[auth]
tokens_file = "{tokens}"
exempt_ops = ["health", "stats"]

[[models]]
name = "m"
version = "1"
factory = "tests.models:two_x"
input = {{ dtype = "float32", shape = [3] }}
threads = 1
max_batch = 4
queue_limit = 8
cache = true
drift = true
drift_freeze_after = 50
drift_sample_rate = 1.0

[[models]]
name = "m"
version = "2"
factory = "tests.models:raises_on_magic"
input = {{ dtype = "float32", shape = [3] }}
output = {{ dtype = "float32", shape = [3] }}
threads = 1
fallback = {{ outputs = 0.0, on = ["model_error"] }}

[[models]]
name = "two"
factory = "tests.models:two_inputs"
inputs.ids = {{ dtype = "int64", shape = [3] }}
inputs.dense = {{ dtype = "float32", shape = [2], default = [0.5, -1.25] }}
threads = 1

[[rollouts]]
model = "m"
stable = "1"
candidate = "2"
salt = "ro"
stages = [0.5, 1.0]
stage = 0

[[guardrails]]
model = "m"
interval_s = 0.2
min_samples = 100000

[[shadows]]
model = "m"
candidate = "2"
sample_rate = 1.0
"""
TOKEN = "metrics-test-token-0123456789"


def test_every_documented_family_is_scraped_with_its_documented_labels(daemon_factory, tmp_path):
    """One daemon that exercises everything docs/operations.md's metrics table
    lists (a rollout with guardrails, a shadow, the cache, drift, the request
    log, auth, overload, a per-address connection cap), scraped: every family
    has samples, and their label names are the documented ones."""
    from tests.unit.observe.test_metrics_docs import documented
    (tmp_path / "tokens").write_text(f"tester:{TOKEN}\n")
    (tmp_path / "tokens").chmod(0o600)
    d = daemon_factory(EVERY_FAMILY.format(tokens=tmp_path / "tokens"), token=TOKEN)
    port = d.health()["metrics_port"]
    rng = np.random.default_rng(3)
    x = rng.standard_normal((400, 3), dtype=np.float32)
    with d.client() as c:
        assert c.call({"model": "m", "inputs": tensor(x[0])})["status"] == 16  # no token yet
        assert c.call({"op": "auth", "token": TOKEN})["status"] == 0
        for chunk in range(0, 300, 4):  # keyed: both lanes, mirrored to the shadow, drift rows
            for i in range(chunk, chunk + 4):
                c.send({"model": "m", "inputs": tensor(x[i]), "key": f"u{i}"})
            assert all(a["status"] == 0 for a in c.recv_n(4))
        magic = tensor(np.array([777, 0, 0], np.float32))  # the candidate raises on it
        a = c.call({"model": "m", "inputs": magic, "key": "u1"})  # u1: in the canary
        assert (a["status"], a["lane"], a.get("fallback")) == (0, "canary", "model_error"), a
        ids = tensor(np.array([1, 2, 3], np.int64))  # dense left out: its default
        a = c.call({"model": "two", "inputs": {"ids": ids}})
        assert a["status"] == 0 and a["defaulted"] == ["dense"], a
        for _ in range(2):  # the same bytes twice: a cache miss, then a hit
            assert c.call({"model": "m", "version": "1", "inputs": tensor(x[0])})["status"] == 0
        for i in range(300, 400):  # pipelined past queue_limit: shed as queue_full
            c.send({"model": "m", "version": "1", "inputs": tensor(x[i])})
        assert any(a["status"] == 8 for a in c.recv_n(100))
    held = [d.client() for _ in range(4)]  # a fifth from this address: closed by the server
    try:
        assert all(h.call({"op": "health"})["status"] == 0 for h in held)
        with d.client() as extra:
            bye = extra.recv()
        assert (bye["id"], bye["status"]) == (0, 8), bye
    finally:
        for h in held:
            h.close()

    def families() -> dict[str, list]:
        status, text = get(port, "/metrics")
        assert status == 200
        out: dict[str, list] = {}
        for fam in text_string_to_metric_families(text):
            name = fam.name + ("_total" if fam.type == "counter" else "")
            out[name] = fam.samples
        return out

    docs = documented()
    deadline = time.monotonic() + 30  # guardrail checks, shadow answers, drift: all after the fact
    while True:
        fams = families()
        empty = sorted(n for n in docs if not fams.get(n))
        if not empty or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert not empty, f"documented families without samples: {empty}\n{d.log()}"
    for name, (_, labels) in docs.items():
        seen = {frozenset(k for k in s.labels if k != "le") for s in fams[name]}
        assert seen == {frozenset(labels)}, (name, seen, labels)


def test_metrics_connections_are_capped_and_idle_ones_time_out(daemon_factory):
    """Real sockets: with [metrics] max_connections = 4, four connections
    that send nothing hold the endpoint; a fifth is answered 503 and closed;
    once two go, a scrape works again; the server closes the two left after
    its read timeout (daemon/supervisor/metrics.py READ_TIMEOUT_S)."""
    from daemon.supervisor.metrics import READ_TIMEOUT_S
    d = daemon_factory(demo_config() + "\n[metrics]\nmax_connections = 4\n")
    port = d.health()["metrics_port"]
    assert get(port, "/healthz") == (200, "ok\n")

    def connect() -> socket.socket:
        s = socket.create_connection(("127.0.0.1", port), timeout=READ_TIMEOUT_S + 5)
        return s

    def read_all(s: socket.socket) -> bytes:
        out = b""
        while chunk := s.recv(65536):
            out += chunk
        return out

    t0 = time.monotonic()
    idle = [connect() for _ in range(4)]
    time.sleep(0.3)  # let the front accept them all
    with connect() as fifth:  # over the cap: 503 at once, then closed by the server
        fifth.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        answer = read_all(fifth)
    assert answer.startswith(b"HTTP/1.1 503 ") and answer.endswith(b"too many connections\n")
    assert time.monotonic() - t0 < READ_TIMEOUT_S - 1, "the refusal waited for a timeout"
    for s in idle[:2]:
        s.close()
    t_end = time.monotonic() + 5  # the front sees them go on its next loop turn
    while (got := get(port, "/metrics"))[0] != 200 and time.monotonic() < t_end:
        time.sleep(0.05)
    assert got[0] == 200 and "ringserve_ready 1.0" in got[1]
    for s in idle[2:]:  # sent nothing: closed by the server at its read timeout
        assert read_all(s) == b""
        s.close()
    waited = time.monotonic() - t0
    assert READ_TIMEOUT_S - 0.5 <= waited <= READ_TIMEOUT_S + 3, waited
    assert get(port, "/healthz") == (200, "ok\n")
