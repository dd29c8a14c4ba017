"""The load benchmark against its echo server: a few seconds, no daemon.

Checks that the generator gets answers in every mode, that they all say OK,
and that ``python -m bench --json`` writes the figures a script reads.
"""

from __future__ import annotations

import json
import subprocess
import sys

import psutil
import pytest

from bench import servers
from bench.load import Plan, run_load

REPO = servers.REPO
REQUEST = {"model": "demo", "inputs": {"dtype": "float32", "shape": [128], "data": bytes(512)}}


@pytest.fixture(scope="module")
def echo():
    with servers.echo(timeout=60) as e:
        yield e
    assert not psutil.pid_exists(e.pid) or psutil.Process(e.pid).status() == psutil.STATUS_ZOMBIE


def test_cli_closed_loop_json(echo, tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--target", f"{echo.host}:{echo.port}",
         "--server-pid", str(echo.pid), "--connections", "4", "--depth", "2",
         "--duration", "1", "--warmup", "0.2", "--json", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "throughput (answers/s)" in proc.stdout
    doc = json.loads(out.read_text())
    assert {"params", "ringserve", "server_stats", "echo", "ceiling", "ratios"} <= doc.keys()
    run = doc["ringserve"]
    assert {"throughput_rps", "answers", "latency_us", "statuses", "unanswered", "server_cpu",
            "server_cpu_us_per_answer", "loadgen_cpu_pct", "loadgen_cpu_pct_by_proc"} <= run.keys()
    assert set(run["latency_us"]) == {"p50", "p90", "p95", "p99", "p99.9", "max", "mean"}
    assert run["throughput_rps"] > 0
    assert set(run["statuses"]) == {"0"}
    assert run["unanswered"] == 0 and run["errors"] == []
    assert run["server_cpu"]["cpu_s"] > 0


def test_fixed_request_count(echo):
    plan = Plan(echo.host, echo.port, REQUEST, connections=3, depth=4, warmup=0.1, requests=1000,
                procs=1)
    run = run_load(plan)
    assert run["measured"] == 1000
    assert run["statuses"] == {"0": 1000}
    assert run["throughput_rps"] > 0


def test_open_loop_two_procs(echo):
    plan = Plan(echo.host, echo.port, REQUEST, connections=4, duration=1.0, warmup=0.1,
                rate=2000, procs=2)
    run = run_load(plan)
    assert set(run["statuses"]) == {"0"} and run["unanswered"] == 0 and run["dropped"] == 0
    # Poisson: 2000 expected, sd ~45; the echo server keeps up easily.
    assert 1700 < run["measured"] < 2300
    assert run["send_lag_us"] is not None and len(run["loadgen_cpu_pct_by_proc"]) == 2


def test_open_and_closed_loop_with_keys(echo):
    """Keyed frames are built per request and the echo server answers them all."""
    for rate in (None, 1500):
        plan = Plan(echo.host, echo.port, REQUEST, connections=3, depth=2, duration=0.5,
                    warmup=0.1, rate=rate, keys=50, key_dist="zipf")
        run = run_load(plan)
        assert run["measured"] > 100 and set(run["statuses"]) == {"0"}, run
        assert run["unanswered"] == 0 and run["errors"] == []
        at, lat = run["_timeline"]
        assert len(at) == len(lat) == run["measured"] and 0 <= at.min() and at.max() < 0.5
