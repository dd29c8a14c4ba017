"""The CUDA logic that a machine without a GPU can prove, against a real
daemon: a CUDA device where there is none (the daemon's workers run with
``CUDA_VISIBLE_DEVICES=""``, so this holds on a GPU host too), what a CPU
worker reports about pinning and compiled graphs, the graphs compiled at
warm-up, and RINGSERVE_REQUIRE turning test_cuda.py's skips into failures."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import numpy as np
import psutil
import pytest

from tests.conftest import REPO, demo_config
from tests.wire import tensor

UNAVAILABLE = 14

CUDA_ON_CPU = """
[server]
host = "127.0.0.1"

[[models]]
name = "gpu"
factory = "daemon.workers.zoo:mlp_scorer"
input = { dtype = "float32", shape = [128] }
devices = ["cuda:0"]
"""


def test_cuda_device_without_cuda_fails_once_and_health_says_why(daemon_factory):
    d = daemon_factory(CUDA_ON_CPU, wait_ready=False, env={"CUDA_VISIBLE_DEVICES": ""})
    h = d.wait_for(lambda h: h["models"][0]["state"] == "failed", 60, "the load failure")
    (w,) = h["models"]
    assert w["ready"] is False and h["ready"] is False
    assert w["error"] == ("device 'cuda:0' is configured but CUDA is not available on this "
                          "machine; use devices = [\"cpu\"]"), w
    try:
        psutil.Process(w["pid"]).wait(60)   # returns once the front has reaped it
    except psutil.NoSuchProcess:
        pass
    # Past the first restart's backoff (0.5 s): still the same failed worker.
    time.sleep(1.0)
    (w2,) = d.health()["models"]
    assert (w2["state"], w2["restarts"], w2["pid"]) == ("failed", 0, w["pid"]), w2
    assert "CUDA is not available" in w2["error"]
    assert "worker failed to load; not restarting" in d.log()
    assert d.log().count('"worker started"') == 1
    with d.client() as c:
        ans = c.call({"model": "gpu", "inputs": tensor(np.zeros(128, np.float32))})
    assert ans["status"] == UNAVAILABLE and "no ready worker" in ans["error"], ans


@pytest.mark.timeout(240)
def test_compile_warm_up_compiles_every_bucket_before_ready(daemon_factory):
    """compile = "default" on the CPU: the worker reports, with ready, one
    graph per bucket (so every bucket was compiled before ready), and serving
    every batch size afterwards compiles nothing more. A CPU worker is never
    pinned and has no H2D figures."""
    cfg = demo_config(max_batch=4).replace('threads = 1', 'threads = 1\ncompile = "default"\n'
                                           'buckets = [1, 2, 4]')
    d = daemon_factory(cfg)
    (w,) = d.health()["models"]
    assert w["ready"] and w["compile"] == "default" and w["pinned"] is False, w
    with d.client() as c:
        (ws,) = c.call({"op": "stats"})["models"][0]["workers"]
    assert ws["compiled"] == {"graphs": 3, "cudagraph_skips": 0}, ws
    assert ws["h2d"] is None and ws["pinned"] is False
    xs = np.random.default_rng(0).standard_normal((7, 128), dtype=np.float32)
    with d.client() as c:
        for n in (1, 2, 4):   # batches of each bucket
            for x in xs[:n]:
                c.send({"model": "demo", "inputs": tensor(x)})
            assert all(a["status"] == 0 for a in c.recv_n(n))
        time.sleep(1.2)   # the worker reports every 0.5 s when its figures change
        (ws,) = c.call({"op": "stats"})["models"][0]["workers"]
    assert ws["compiled"] == {"graphs": 3, "cudagraph_skips": 0}, ws
    assert ws["batches"] >= 3


def test_require_cuda_turns_the_cuda_tests_skips_into_failures():
    env = dict(os.environ, RINGSERVE_REQUIRE="node,cuda", CUDA_VISIBLE_DEVICES="")
    p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                        "tests/integration/workers/test_cuda.py"], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 1, p.stdout[-3000:]
    assert "4 failed" in p.stdout and "skipped" not in p.stdout.splitlines()[-1], p.stdout[-3000:]
    assert "RINGSERVE_REQUIRE names cuda, but CUDA is not available" in p.stdout
    p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                        "tests/integration/workers/test_cuda.py"], cwd=REPO,
                       env=dict(env, RINGSERVE_REQUIRE="node"), capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0 and "4 skipped" in p.stdout, p.stdout[-3000:]
