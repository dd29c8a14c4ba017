"""Model sources, dtypes, compile, dispatch policy, connection limits and the
front's own death."""

from __future__ import annotations

import os
import signal
import time

import numpy as np
import psutil
import torch

from daemon.workers.runtime import weights_hash
from daemon.workers.zoo import mlp_scorer
from ipc.framing import encode_frame
from tests.conftest import demo_config, segment_creator, shm_segments
from tests.wire import out_array, tensor

OK, EXHAUSTED = 0, 8


def _x(n=1, seed=7):
    return np.random.default_rng(seed).standard_normal((n, 128), dtype=np.float32)


def test_checkpoint_is_loaded_and_hashed(daemon_factory, tmp_path):
    other = mlp_scorer(seed=5)
    torch.save(other.state_dict(), tmp_path / "weights.pt")
    d = daemon_factory(f"""
[[models]]
name = "demo"
version = "5"
factory = "daemon.workers.zoo:mlp_scorer"
checkpoint = "{tmp_path / 'weights.pt'}"
input = {{ dtype = "float32", shape = [128] }}
threads = 1
""")
    (w,) = d.health()["models"]
    assert w["hash"] == weights_hash(other) != weights_hash(mlp_scorer())
    x = _x()[0]
    with d.client() as c:
        ans = c.call({"model": "demo", "inputs": tensor(x)})
    assert ans["version"] == "5"
    with torch.inference_mode():
        assert np.array_equal(out_array(ans), other(torch.from_numpy(x)[None]).numpy()[0])


def test_torch_export_artifact(daemon_factory, tmp_path):
    model = mlp_scorer(seed=3)
    batch = torch.export.Dim("batch", min=1, max=4096)
    ep = torch.export.export(model, (torch.zeros(4, 128),), dynamic_shapes={"x": {0: batch}})
    torch.export.save(ep, tmp_path / "demo.pt2")
    d = daemon_factory(f"""
[[models]]
name = "exported"
artifact = "{tmp_path / 'demo.pt2'}"
input = {{ dtype = "float32", shape = [128] }}
max_batch = 8
threads = 1
""")
    xs = _x(5)
    with d.client() as c:
        answers = [c.call({"model": "exported", "inputs": tensor(x)}) for x in xs]
    with torch.inference_mode():
        want = model(torch.from_numpy(xs)).numpy()
    for a, w in zip(answers, want, strict=True):
        assert a["status"] == OK, a
        np.testing.assert_allclose(out_array(a), w, rtol=0, atol=1e-5)


def test_bfloat16_autocast_on_cpu(daemon_factory):
    d = daemon_factory(demo_config().replace('threads = 1', 'threads = 1\ndtype = "bfloat16"'))
    model = mlp_scorer()
    x = _x()[0]
    with d.client() as c:
        ans = c.call({"model": "demo", "inputs": tensor(x)})
        m = c.call({"op": "models"})["models"][0]
    assert m["dtype"] == "bfloat16"
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        want = model(torch.from_numpy(x)[None])[0]
    assert ans["outputs"]["dtype"] == str(want.dtype).removeprefix("torch.")
    got = torch.from_numpy(np.frombuffer(ans["outputs"]["data"], np.uint8).copy()).view(want.dtype)
    assert torch.equal(got, want)


def test_torch_compile_on_cpu(daemon_factory):
    """compile = "default" is honoured where asked (auto keeps it off on the
    CPU); every bucket is compiled during warm-up, before ready."""
    d = daemon_factory(demo_config(max_batch=2).replace('threads = 1',
                                                        'threads = 1\ncompile = "default"'))
    model = mlp_scorer()
    xs = _x(4)
    with d.client() as c:
        for x in xs:
            c.send({"model": "demo", "inputs": tensor(x)})
        answers = c.recv_n(4)
    with torch.inference_mode():
        want = {x.tobytes(): model(torch.from_numpy(x)[None]).numpy()[0] for x in xs}
    got = sorted(out_array(a).tolist() for a in answers)
    assert len(got) == 4 and all(a["status"] == OK for a in answers)
    np.testing.assert_allclose(np.array(got), np.array(sorted(w.tolist() for w in want.values())),
                               rtol=0, atol=1e-5)
    assert '"compile": "default"' in d.log()


def dispatch_reasons(c) -> dict:
    """Why the model's batches left the queue: {"idle" | "window" | "full" | "deadline": n}."""
    return c.call({"op": "stats"})["models"][0]["dispatch"]


def test_idle_worker_never_waits_for_the_window(daemon_factory):
    """The policy's own account, not a clock: each request found the worker
    idle and left the queue for that reason. Had it waited for the 10 ms
    window, its batch would be counted under "window"."""
    d = daemon_factory(demo_config(window_ms=10.0))
    with d.client() as c:
        for x in _x(20):
            ans = c.call({"model": "demo", "inputs": tensor(x)})
            assert ans["status"] == OK and ans["timing"]["batch"] == 1
        assert dispatch_reasons(c) == {"idle": 20}


def test_busy_worker_batches_what_arrives_within_the_window(daemon_factory):
    """While the worker runs a batch (it has a second ring slot free), what
    arrives waits for the window and then goes as one batch: counted as
    dispatched by "window", not "idle" (which is what waiting for the first
    batch to finish would give) nor "full"."""
    d = daemon_factory("""
[[models]]
name = "slow"
factory = "tests.models:slow"
input = { dtype = "float32", shape = [4] }
threads = 1
max_batch = 8
window_ms = 10.0
""", env={"RINGSERVE_TEST_SLOW_MS": "1500"})
    x = tensor(np.ones(4, np.float32))
    slow = {"model": "slow", "inputs": x, "deadline_ms": 60_000}   # (the default is 1 s)
    with d.client() as c, d.client() as probe:
        c.send(dict(slow, id=0))  # worker idle: goes at once, alone
        t_end = time.monotonic() + 60
        while dispatch_reasons(probe) != {"idle": 1}:   # it is in the worker now
            assert time.monotonic() < t_end, dispatch_reasons(probe)
            time.sleep(0.01)
        # worker busy: the three wait for the window, then go together. One
        # write, so the front reads them in one go: none can miss the window.
        c.send_raw(b"".join(encode_frame(dict(slow, id=i)) for i in (1, 2, 3)))
        answers = {a["id"]: a for a in c.recv_n(4)}
        reasons = dispatch_reasons(probe)
    assert answers[0]["timing"]["batch"] == 1
    assert [answers[i]["timing"]["batch"] for i in (1, 2, 3)] == [3, 3, 3]
    assert all(answers[i]["timing"]["bucket"] == 3 for i in (1, 2, 3))  # a default bucket
    # they left the queue when the window passed, while the first batch ran
    assert reasons == {"idle": 1, "window": 1}, reasons


def test_max_connections(daemon_factory):
    d = daemon_factory(demo_config(server="max_connections = 2"))
    a, b = d.client(), d.client()
    try:
        assert a.call({"op": "health"})["status"] == OK
        assert b.call({"op": "health"})["status"] == OK
        with d.client() as c:
            ans = c.recv()
            assert ans["status"] == EXHAUSTED and "max_connections" in ans["error"]
            assert c.closed_by_peer()
    finally:
        a.close()
        b.close()


def test_a_client_that_does_not_read_does_not_stall_others(daemon_factory):
    # Pipelining far past the default in-flight cap is the point here.
    d = daemon_factory(demo_config(queue_limit=100000,
                                   server="max_inflight_per_connection = 100000\n"))
    frame_x = tensor(_x()[0])
    lazy = d.client()
    n = 20000
    for i in range(n):  # ~14 MB of answers it does not read yet
        lazy.send({"id": i, "model": "demo", "inputs": frame_x})
    with d.client() as c:
        for _ in range(20):
            assert c.call({"model": "demo", "inputs": frame_x}, )["status"] == OK
    answers = lazy.recv_n(n)
    assert sorted(a["id"] for a in answers) == list(range(n))
    assert all(a["status"] == OK for a in answers)
    lazy.close()


def test_supervisor_killed_leaves_no_memory_or_process(daemon_factory):
    d = daemon_factory(demo_config())
    pid = d.proc.pid
    children = psutil.Process(pid).children(recursive=True)
    assert len(children) == 2, children  # one front, one worker
    # The ring is a memfd, mapped by the front and the worker, named nowhere in /dev/shm:
    # whoever is killed, nothing can be left there.
    (worker,) = d.worker_pids()
    assert "/memfd:ringserve-demo-1-0-" in open(f"/proc/{worker}/maps").read()
    ours = {pid} | {c.pid for c in children}
    assert not any(segment_creator(s) in ours for s in shm_segments())
    os.kill(pid, signal.SIGKILL)
    d.proc.wait(10)
    # every child dies with the supervisor (parent-death signal; the end of its channel)
    d.children = children
    d.assert_clean(timeout=15)


def test_model_module_beside_the_config_with_tuple_and_scalar_outputs(daemon_factory, tmp_path):
    """A user's own module next to the config file; a model returning a tuple
    whose items have per-sample shapes () and [3] and dtypes int64/float16."""
    cfg_dir = tmp_path / "d0"
    cfg_dir.mkdir()
    (cfg_dir / "usermodel.py").write_text(
        "import torch\n"
        "class M(torch.nn.Module):\n"
        "    def forward(self, x):\n"
        "        return x.sum(dim=1).to(torch.int64), (x[:, :3] * 2).to(torch.float16)\n"
        "def build():\n"
        "    return M()\n")
    d = daemon_factory("""
[[models]]
name = "user"
factory = "usermodel:build"
input = { dtype = "int32", shape = [5] }
threads = 1
""")
    with d.client() as c:
        ans = c.call({"model": "user", "inputs": [1, 2, 3, 4, 5]})
        assert ans["status"] == OK, ans
        assert ans["outputs"]["output0"]["shape"] == [] and out_array(ans, "output0").tolist() == 15
        assert ans["outputs"]["output1"]["dtype"] == "float16"
        assert out_array(ans, "output1").tolist() == [2.0, 4.0, 6.0]
        m = c.call({"op": "models"})["models"][0]
        assert m["outputs"] == {"output0": {"dtype": "int64", "shape": []},
                                "output1": {"dtype": "float16", "shape": [3]}}
