"""The CUDA path: a worker's own stream, the shared-memory ring registered as
pinned memory, async copies, one synchronise per batch, torch.compile per
bucket, a worker killed and restarted. Runs only where CUDA is available
(the GPU machines); on the CPU the same worker code is exercised by every
other integration test, and tests/integration/workers/test_device_paths.py covers
the CUDA logic that needs no GPU.

Skipped without CUDA, unless ``RINGSERVE_REQUIRE`` names ``cuda`` (as
``python -m bench.gpu_check`` sets it on a GPU host): then a missing CUDA
fails every test here instead of skipping it.
"""

from __future__ import annotations

import os
import signal
import time

import numpy as np
import pytest
import torch

from daemon.workers.zoo import mlp_scorer
from tests.conftest import shm_segments
from tests.wire import out_array, tensor

REQUIRED = "cuda" in os.environ.get("RINGSERVE_REQUIRE", "").replace(" ", "").split(",")


def cuda_or_skip() -> None:
    """First in every test (not a fixture: a fixture's failure reads as an
    error of the set-up, this reads as the test's own failure)."""
    if not torch.cuda.is_available():
        why = (f"CUDA is not available (torch {torch.__version__}, built for CUDA "
               f"{torch.version.cuda}; "
               f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r})")
        if REQUIRED:
            pytest.fail(f"RINGSERVE_REQUIRE names cuda, but {why}")
        pytest.skip(f"needs a CUDA device: {why}")


# Three buckets, so that compile = "auto" (default on CUDA) compiles three
# graphs at warm-up rather than the ten of max_batch 32's default buckets.
CFG = """
[metrics]
port = 0

[[models]]
name = "demo"
factory = "daemon.workers.zoo:mlp_scorer"
input = {{ dtype = "float32", shape = [128] }}
devices = ["cuda:0"]
compile = "{compile}"
dtype = "{dtype}"
max_batch = 32
buckets = [1, 8, 32]
"""


def _infer_all(d, xs):
    with d.client() as c:
        for i, x in enumerate(xs):
            c.send({"id": i, "model": "demo", "inputs": tensor(x)})
        return {a["id"]: a for a in c.recv_n(len(xs))}


# reduce-overhead runs in python -m bench.gpu_check (in-process against eager,
# and the daemon under load), which keeps this file to about a minute.
@pytest.mark.parametrize("compile_mode,dtype", [("off", "float32"), ("auto", "float32"),
                                                ("off", "bfloat16")])
def test_cuda_worker_matches_in_process(daemon_factory, compile_mode, dtype):
    cuda_or_skip()
    d = daemon_factory(CFG.format(compile=compile_mode, dtype=dtype))
    (w,) = d.health()["models"]
    assert w["device"] == "cuda:0" and w["ready"]
    assert w["pinned"] is True, w   # the ring slot is registered, as the driver sees it
    assert w["compile"] == ("default" if compile_mode == "auto" else compile_mode)
    model = mlp_scorer().cuda()
    xs = np.random.default_rng(0).standard_normal((64, 128), dtype=np.float32)
    answers = _infer_all(d, xs)
    with torch.inference_mode(), torch.autocast("cuda", dtype=getattr(torch, dtype),
                                                enabled=dtype != "float32"):
        want = model(torch.from_numpy(xs).cuda()).float().cpu().numpy()
    tol = 1e-5 if dtype == "float32" else 2e-2
    for i in range(len(xs)):
        assert answers[i]["status"] == 0, answers[i]
        out = answers[i]["outputs"]
        if out["dtype"] == "bfloat16":  # numpy has no bfloat16: go through torch
            got = torch.frombuffer(bytearray(out["data"]), dtype=torch.bfloat16).float().numpy()
        else:
            got = out_array(answers[i])
        np.testing.assert_allclose(got, want[i], rtol=0, atol=tol)
    # The worker's own figures: H2D time per batch from the ring slot, and
    # (compiled) one graph per bucket, all built before ready.
    with d.client() as c:
        t_end = time.monotonic() + 10
        while True:
            (ws,) = c.call({"op": "stats"})["models"][0]["workers"]
            if ws["h2d"] and ws["h2d"]["batches"] >= ws["batches"]:
                break
            assert time.monotonic() < t_end, ws
            time.sleep(0.1)
    assert ws["pinned"] is True and ws["h2d"]["mean_us"] > 0, ws
    assert set(ws["h2d"]["by_bucket"]) <= {"1", "8", "32"}
    if compile_mode == "off":
        assert ws["compiled"] is None
    else:
        assert ws["compiled"]["graphs"] == 3, ws   # no recompile after ready


def test_kill_9_of_a_cuda_worker_under_load(daemon_factory):
    """Requests in flight when the worker dies get UNAVAILABLE, the worker
    comes back on the GPU, and its old segment is gone."""
    cuda_or_skip()
    d = daemon_factory(CFG.format(compile="off", dtype="float32"))
    (w,) = d.health()["models"]
    before = {s for s in shm_segments() if s.startswith(f"ringserve-{d.proc.pid}-")}
    xs = np.random.default_rng(1).standard_normal((256, 128), dtype=np.float32)
    with d.client() as c:
        for i, x in enumerate(xs):
            c.send({"id": i, "model": "demo", "inputs": tensor(x)})
        os.kill(w["pid"], signal.SIGKILL)
        answers = c.recv_n(len(xs))
    assert {a["status"] for a in answers} <= {0, 14}, {a["status"] for a in answers}
    h = d.wait_for(lambda h: h["models"][0]["ready"] and h["models"][0]["pid"] != w["pid"],
                   60, "restarted")
    assert h["models"][0]["restarts"] == 1 and h["models"][0]["pinned"] is True
    now = {s for s in shm_segments() if s.startswith(f"ringserve-{d.proc.pid}-")}
    assert not (before & now) and len(now) == 1, (before, now)
    with d.client() as c:
        assert c.call({"model": "demo", "inputs": tensor(xs[0])})["status"] == 0
