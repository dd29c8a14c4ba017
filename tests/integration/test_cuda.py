"""The CUDA path: a worker's own stream, the shared-memory ring registered as
pinned memory, async copies, one synchronise per batch. Runs only where
CUDA is available (the GPU machines); on the CPU the same worker code is
exercised by every other integration test."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from daemon.zoo import mlp_scorer
from tests.wire import out_array, tensor

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

CFG = """
[[models]]
name = "demo"
factory = "daemon.zoo:mlp_scorer"
input = {{ dtype = "float32", shape = [128] }}
devices = ["cuda:0"]
compile = "{compile}"
dtype = "{dtype}"
max_batch = 32
"""


@pytest.mark.parametrize("compile_mode,dtype", [("off", "float32"), ("auto", "float32"),
                                                ("off", "bfloat16")])
def test_cuda_worker_matches_in_process(daemon_factory, compile_mode, dtype):
    d = daemon_factory(CFG.format(compile=compile_mode, dtype=dtype))
    (w,) = d.health()["models"]
    assert w["device"] == "cuda:0" and w["ready"]
    model = mlp_scorer().cuda()
    xs = np.random.default_rng(0).standard_normal((64, 128), dtype=np.float32)
    with d.client() as c:
        for i, x in enumerate(xs):
            c.send({"id": i, "model": "demo", "inputs": tensor(x)})
        answers = {a["id"]: a for a in c.recv_n(len(xs))}
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
