"""A client in another language: ``tests/node/client.mjs`` (JavaScript,
written from docs/protocol.md alone, msgpack decoded with the library's
default options, so every integer is a double) against a real daemon.

Skipped when ``node`` or ``tests/node/node_modules`` (``npm ci --prefix
tests/node``) is missing, unless ``RINGSERVE_REQUIRE`` names ``node``, as
CI's does: then a missing Node fails the test.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess

import numpy as np
import pytest
import torch

from daemon.workers.zoo import mlp_scorer
from tests.conftest import REPO, demo_config

NODE_DIR = REPO / "tests" / "node"
REQUIRED = "node" in os.environ.get("RINGSERVE_REQUIRE", "").replace(" ", "").split(",")


def node_or_skip() -> str:
    node = shutil.which("node")
    missing = ("node is not on PATH" if node is None else
               f"{NODE_DIR / 'node_modules'} is missing (npm ci --prefix tests/node)"
               if not (NODE_DIR / "node_modules" / "@msgpack" / "msgpack").is_dir() else None)
    if missing and REQUIRED:
        pytest.fail(f"RINGSERVE_REQUIRE names node, but {missing}")
    if missing:
        pytest.skip(missing)
    return node


def f32(b64: str) -> np.ndarray:
    return np.frombuffer(base64.b64decode(b64), dtype="<f4")


def test_node_client_health_infer_pipelined_feedback(daemon_factory):
    node = node_or_skip()
    d = daemon_factory(demo_config(max_batch=16, window_ms=5.0))
    p = subprocess.run([node, str(NODE_DIR / "client.mjs"), str(d.port)], cwd=NODE_DIR,
                       capture_output=True, text=True, timeout=60)
    assert p.stdout.strip(), f"no summary (exit {p.returncode}): {p.stderr}"
    s = json.loads(p.stdout)
    assert p.returncode == 0 and s["ok"] and s["errors"] == [], s["errors"] or p.stderr
    model = mlp_scorer()

    assert s["health"] == {"status": 0, "live": True, "ready": True, "models": ["demo"]}

    one = s["infer"]
    assert (one["status"], one["model"], one["version"], one["lane"]) == (0, "demo", "1", "stable")
    assert one["rid_safe"] and one["rid"] > 0
    assert one["timing"]["batch"] == 1 and one["timing"]["bucket"] == 1
    x = f32(one["input"])
    with torch.inference_mode():  # alone in its batch: bit for bit the in-process answer
        want = model(torch.from_numpy(x.copy())[None]).numpy()[0]
    assert np.array_equal(f32(one["output"]), want)

    pl = s["pipelined"]
    assert (pl["sent"], pl["answered"], pl["ids_matched"]) == (32, 32, True)
    ids = [a["id"] for a in pl["answers"]]
    assert ids == list(range(100, 132))
    xs = np.stack([f32(a["input"]) for a in pl["answers"]])
    assert len({r.tobytes() for r in xs}) == 32  # distinct inputs: ids are really matched
    with torch.inference_mode():
        want = model(torch.from_numpy(xs)).numpy()
    for a, w in zip(pl["answers"], want, strict=True):  # batched: equal within float32 rounding
        np.testing.assert_allclose(f32(a["output"]), w, rtol=0, atol=1e-5)
    assert pl["max_batch"] > 1, "32 pipelined requests were never batched"

    fb = s["feedback"]
    assert fb["ref"] == one["rid"]
    assert (fb["status"], fb["joined"]) == (0, True), fb
    assert (fb["model"], fb["version"], fb["lane"]) == ("demo", "1", "stable")
