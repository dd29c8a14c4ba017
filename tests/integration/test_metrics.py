"""The Prometheus endpoint and the probes, scraped like Prometheus does and
parsed with prometheus_client's own parser."""

from __future__ import annotations

import http.client

from prometheus_client.parser import text_string_to_metric_families

import numpy as np

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
