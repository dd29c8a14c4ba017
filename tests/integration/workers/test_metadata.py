"""Model metadata and the training-serving skew guard (docs/models.md), with
a real daemon: a tiny checkpoint saved here with ``torch.save`` and its
``.json`` beside it. Answers (worker and cache), ``health``, ``models`` and
the request log carry the data version; a feature schema that does not
match the config refuses to serve (at start, at a SIGHUP, and in a worker
restarted after the file changed under it, which then stays failed).
Also the per-input count of defaulted inputs, kept out of input drift."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import torch

from tests.conftest import REPO
from tests.faults import OK, UNAVAILABLE, http_get, poll, records, sighup
from tests.wire import out_array

X = [1.0, 2.0, 3.0, 4.0]
SCHEMA_4 = {"input": {"dtype": "float32", "shape": [4], "features": ["a", "b", "c", "d"]}}
SCHEMA_8 = {"input": {"dtype": "float32", "shape": [8]}}
MISMATCH = "input 'input' is float32[4] in the config but the model was trained on float32[8]"

CONFIG = """
[server]
host = "127.0.0.1"

[request_log]
enabled = true
dir = "logs"
key_secret = "pepper"

[[models]]
name = "lin"
version = "1"
factory = "tests.models:linear_magic"
checkpoint = "{ckpt}"
input = {{ dtype = "float32", shape = [4] }}
threads = 1
cache = {cache}
{extra}

[[models]]
name = "bare"
version = "1"
factory = "tests.models:two_x"
input = {{ dtype = "float32", shape = [4] }}
threads = 1
"""


def save_model(tmp_path, data_version="clicks-2026-11", schema=SCHEMA_4, seed=0) -> dict:
    """w.pt (a LinearMagic state_dict) and w.pt.json; the state dict."""
    from tests.models import LinearMagic
    torch.manual_seed(seed)
    state = LinearMagic().state_dict()
    torch.save(state, tmp_path / "w.pt")
    write_metadata(tmp_path, data_version, schema)
    return state


def write_metadata(tmp_path, data_version, schema=SCHEMA_4) -> str:
    doc = {"data_version": data_version, "feature_schema": schema,
           "training": {"epochs": 3, "lr": 0.01}}
    path = tmp_path / "w.pt.json"
    path.write_text(json.dumps(doc, indent=1))
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


def config(tmp_path, cache=False, extra="") -> str:
    return CONFIG.format(ckpt=tmp_path / "w.pt", cache="true" if cache else "false", extra=extra)


def linear(state: dict, x) -> np.ndarray:
    return np.asarray(x, np.float32) @ state["lin.weight"].numpy().T + state["lin.bias"].numpy()


def lin(health: dict) -> dict:
    return next(m for m in health["models"] if m["name"] == "lin")


def serve_once(cfg_path) -> subprocess.CompletedProcess:
    """``python -m daemon --config F``: an invalid file exits 2 before listening."""
    return subprocess.run([sys.executable, "-m", "daemon", "--config", str(cfg_path),
                           "--port", "0"], cwd=REPO, capture_output=True, text=True, timeout=60)


def test_answers_health_models_and_the_request_log_carry_the_metadata(tmp_path, daemon_factory):
    state = save_model(tmp_path)
    digest = "sha256:" + hashlib.sha256((tmp_path / "w.pt.json").read_bytes()).hexdigest()
    d = daemon_factory(config(tmp_path, cache=True))
    with d.client() as c:
        first = c.call({"model": "lin", "inputs": X})
        hit = c.call({"model": "lin", "inputs": X})        # the response cache answers
        bare = c.call({"model": "bare", "inputs": X})
        models = {m["name"]: m for m in c.call({"op": "models"})["models"]}
    assert first["status"] == OK and first["data_version"] == "clicks-2026-11"
    np.testing.assert_allclose(out_array(first), linear(state, X), rtol=1e-6)  # w.pt was loaded
    assert hit["timing"].get("cache") and hit["data_version"] == "clicks-2026-11"
    assert bare["status"] == OK and "data_version" in bare and bare["data_version"] is None

    health = {m["name"]: m for m in d.health()["models"]}
    assert (health["lin"]["data_version"], health["lin"]["metadata_hash"]) == \
        ("clicks-2026-11", digest)
    assert (health["bare"]["data_version"], health["bare"]["metadata_hash"]) == (None, None)
    assert models["lin"]["data_version"] == "clicks-2026-11"
    assert models["lin"]["metadata"] == {"data_version": "clicks-2026-11", "hash": digest,
                                         "feature_schema": SCHEMA_4,
                                         "training": {"epochs": 3, "lr": 0.01}}
    assert models["bare"]["metadata"] is None and models["bare"]["data_version"] is None
    # a missing metadata file is allowed, and said so in the log
    (missing,) = records(d, "model has no metadata file: its answers carry no data_version and "
                            "its inputs are not checked against a feature schema (docs/models.md)")
    assert missing["model"] == "bare@1"

    d.stop()   # flushes the request log
    logged = [json.loads(line) for f in sorted((d.dir / "logs").iterdir())
              for line in f.read_text().splitlines()]
    by_model = {(r["model"], r["cache"]): r["data_version"] for r in logged}
    assert by_model == {("lin", False): "clicks-2026-11", ("lin", True): "clicks-2026-11",
                        ("bare", False): None}


def test_a_mismatched_schema_refuses_to_serve_naming_the_input_and_both_schemas(tmp_path):
    save_model(tmp_path, schema=SCHEMA_8)
    cfg = tmp_path / "ringserve.toml"
    cfg.write_text(config(tmp_path))
    p = serve_once(cfg)
    assert p.returncode == 2, p.stderr
    assert 'models[0] ("lin").metadata: ' + MISMATCH in p.stderr, p.stderr
    assert "config inputs: {input: float32[4]}" in p.stderr
    assert f"feature_schema of {tmp_path / 'w.pt.json'}, data_version 'clicks-2026-11': " \
           "{input: float32[8]}" in p.stderr, p.stderr
    check = subprocess.run([sys.executable, "-m", "daemon", "check", str(cfg)], cwd=REPO,
                           capture_output=True, text=True, timeout=60)
    assert check.returncode == 2 and MISMATCH in check.stderr

    # require_metadata: a checkpoint without a metadata file is refused too
    os.unlink(tmp_path / "w.pt.json")
    cfg.write_text(config(tmp_path, extra="require_metadata = true"))
    p = serve_once(cfg)
    assert p.returncode == 2, p.stderr
    assert f"require_metadata is true but the model has no metadata file (there is no " \
           f"{tmp_path / 'w.pt.json'})" in p.stderr, p.stderr


def test_a_reload_with_a_mismatched_schema_is_refused_and_the_old_keeps_serving(tmp_path,
                                                                                daemon_factory):
    save_model(tmp_path, data_version="d1")
    text = config(tmp_path)
    d = daemon_factory(text)
    pid = lin(d.health())["pid"]
    write_metadata(tmp_path, "d2", SCHEMA_8)
    sighup(d, text)
    failed = poll(lambda: [r for r in records(d, "reload rejected: invalid config; still serving "
                                                 "the previous one")], "reload rejected", log=d.log)
    assert MISMATCH in failed[0]["error"] and failed[0]["key"] == 'models[0] ("lin").metadata'
    with d.client() as c:
        a = c.call({"model": "lin", "inputs": X})
        assert c.call({"op": "stats"})["reloads"] == {"ok": 0, "failed": 1}
    assert (a["status"], a["data_version"]) == (OK, "d1")
    assert lin(d.health())["pid"] == pid

    # a matching file with a new data version: that version restarts, and says so
    digest = write_metadata(tmp_path, "d2")
    sighup(d, text)
    h = d.wait_for(lambda h: h["ready"] and lin(h)["metadata_hash"] == digest, 60,
                   "the new metadata served")
    assert lin(h)["data_version"] == "d2" and lin(h)["pid"] != pid
    with d.client() as c:
        assert c.call({"model": "lin", "inputs": X})["data_version"] == "d2"


def test_a_worker_restarted_after_its_metadata_changed_fails_and_stays_failed(tmp_path,
                                                                            daemon_factory):
    """The front validated the file; it changes under the running daemon and
    the worker crashes: its restart reads the file again, refuses it (the
    schema no longer matches), and is not restarted in a loop."""
    save_model(tmp_path)
    d = daemon_factory(config(tmp_path))
    pid = lin(d.health())["pid"]
    write_metadata(tmp_path, "clicks-2026-12", SCHEMA_8)
    os.kill(pid, signal.SIGKILL)
    h = d.wait_for(lambda h: lin(h)["state"] == "failed", 60, "the restart to fail")
    w = lin(h)
    assert w["restarts"] == 1 and MISMATCH in w["error"], w
    assert w["error"].startswith("model metadata does not match the config: ")
    with d.client() as c:
        a = c.call({"model": "lin", "inputs": X})
        assert a["status"] == UNAVAILABLE and "no ready worker" in a["error"]
        assert c.call({"model": "bare", "inputs": X})["status"] == OK     # the others serve
    # health says "failed" from the worker's own message; the supervisor's
    # record follows once it has reaped the process
    poll(lambda: records(d, "worker failed to load; not restarting"), "the not-restarting record",
         log=d.log)
    assert not h["ready"]
    time.sleep(2.0)   # a crash would have been restarted by now (backoff 0.5 s, then 1 s)
    again = lin(d.health())
    assert (again["state"], again["restarts"], again["pid"]) == ("failed", 1, w["pid"])


DEFAULTED = """
[server]
host = "127.0.0.1"

[[models]]
name = "d"
version = "1"
factory = "tests.models:two_x"
inputs = { x = { dtype = "float32", shape = [4], default = [0, 0, 0, 1] } }
threads = 1
drift = true
drift_sample_rate = 1.0
drift_freeze_after = 1000
"""


def test_defaulted_inputs_are_counted_per_input_and_kept_out_of_the_drift_monitor(daemon_factory):
    """(Issue 13 part 2 on part 1's input defaults.) The monitor sees only the
    rows clients sent; the defaulted ones are counted, per input."""
    d = daemon_factory(DEFAULTED)
    with d.client() as c:
        sent = [c.call({"model": "d", "inputs": {"x": [1.0, 2.0, 3.0, float(i)]}})
                for i in range(5)]
        left_out = [c.call({"model": "d", "inputs": {}}) for _ in range(3)] + \
            [c.call({"model": "d"})]
        stats = c.call({"op": "stats"})["models"][0]
    assert all(a["status"] == OK and "defaulted" not in a for a in sent)
    assert all(a["status"] == OK and list(a["defaulted"]) == ["x"] for a in left_out)
    assert out_array(left_out[0]).tolist() == [0.0, 0.0, 0.0, 2.0]
    assert stats["defaulted"] == {"x": 4}
    assert stats["drift"]["rows_seen"] == 5
    status, body = http_get(d.health()["metrics_port"], "/metrics")
    assert status == 200
    assert 'ringserve_defaulted_inputs_total{input="x",model="d",version="1"} 4.0' in \
        body.decode(), [line for line in body.decode().splitlines() if "defaulted" in line]
