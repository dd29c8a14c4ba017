"""``ringserve batch`` resume paths (docs/batch.md, "Resume after a crash",
"Guardrails on the scores", "Exit codes") with real workers and files: a
checkpoint is used only by the same job (model version, weights, batch size,
columns, output format), an input changed under a resume exits 1,
``--checkpoint-s`` commits by time alone, and NaN scores fail the default
``--max-nan-rate 0`` with exit 3."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import numpy as np
import psutil
import pytest
import torch

from tests.conftest import REPO, shm_segments
from tests.faults import poll, start_note, summary

pytest.importorskip("pyarrow")

MODEL = """
[[models]]
name = "lm"
version = "{version}"
factory = "tests.models:{factory}"
{checkpoint}
input = {{ dtype = "float32", shape = [4] }}
devices = ["cpu"]
threads = 1
"""


def config(tmp_path, version="1", factory="linear_magic", weights=True):
    p = tmp_path / "lm.toml"
    p.write_text(MODEL.format(version=version, factory=factory,
                              checkpoint='checkpoint = "w.pt"' if weights else ""))
    return p


def save_weights(tmp_path, seed: int) -> dict:
    from tests.models import LinearMagic
    torch.manual_seed(seed)
    state = LinearMagic().state_dict()
    torch.save(state, tmp_path / "w.pt")
    return state


def linear(state: dict, x: np.ndarray) -> np.ndarray:
    w, b = state["lin.weight"].numpy(), state["lin.bias"].numpy()
    return x @ w.T + b


def write_csv(path, x: np.ndarray, cells: dict | None = None) -> str:
    """id, f0..f{k-1}; ``cells`` {(row, col): text} overrides a value."""
    cells = cells or {}
    with open(path, "w") as f:
        f.write("id," + ",".join(f"f{i}" for i in range(x.shape[1])) + "\n")
        for r, row in enumerate(x):
            vals = [cells.get((r, c), "%.9g" % v) for c, v in enumerate(row)]
            f.write(f"{r}," + ",".join(vals) + "\n")
    return str(path)


def batch(cfg, *args, env=None, timeout=120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "daemon", "batch", "--config", str(cfg),
                           "--progress", "json", *map(str, args)], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})})


def read_csv_scores(path) -> tuple[list[str], np.ndarray]:
    lines = open(path).read().splitlines()[1:]
    return [r.split(",")[0] for r in lines], np.array([float(r.split(",")[1]) for r in lines],
                                                      np.float32)


def same_size_and_mtime(path, text: str) -> None:
    """Rewrite ``path`` with ``text`` (same length) and put its mtime back:
    the job's identity (path, size, mtime) cannot tell; only the content hash can."""
    st = os.stat(path)
    assert len(text.encode()) == st.st_size
    with open(path, "w") as f:
        f.write(text)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_a_checkpoint_is_used_only_by_the_same_job(tmp_path):
    """Each run stops at the batch holding the 777 (exit 1) with the rows
    before it committed; the next run resumes only if nothing that makes
    the rows changed."""
    save_weights(tmp_path, 0)
    cfg = config(tmp_path)
    n = 600
    x = np.random.default_rng(1).standard_normal((n, 5)).astype(np.float32)
    x[420, 0] = 777  # f0 of row 420
    src = write_csv(tmp_path / "in.csv", x)
    out = tmp_path / "out"
    args = ["--input", src, "--output", out, "--id-column", "id", "--columns", "input=f0:f3",
            "--checkpoint-rows", 100]

    def run(*extra, cfg=cfg):
        p = batch(cfg, *args, *extra)
        assert p.returncode in (0, 1), p.stderr
        return p

    p = run("--batch-size", 50)
    assert p.returncode == 1 and "rows 400 to 449" in p.stderr, p.stderr
    # the same job: resumed (after a multiple of the batch size; a batch
    # finished beside the failing one may not have been written)
    p = run("--batch-size", 50)
    note = start_note(p)
    assert p.returncode == 1 and note.startswith("resuming after row "), p.stderr
    assert int(note.rsplit(" ", 1)[1]) in (350, 400) and "rows 400 to 449" in p.stderr
    p = run("--batch-size", 40)
    assert "differs in batch_size" in start_note(p) and "rows 400 to 439" in p.stderr, p.stderr
    save_weights(tmp_path, 1)  # same version, other weights
    p = run("--batch-size", 40)
    assert "starting afresh" in start_note(p) and "weight" in start_note(p), start_note(p)
    p = run("--batch-size", 40, cfg=config(tmp_path, version="2"))
    assert start_note(p) == "starting", p.stderr  # another version: another job
    p = run("--batch-size", 40, "--output-format", "parquet", cfg=config(tmp_path, version="2"))
    assert start_note(p) == "starting", p.stderr
    # other columns (without the 777): from the first row, and it finishes
    p = batch(config(tmp_path, version="2"), *args[:-4], "--columns", "input=f1:f4",
              "--batch-size", 40, "--output-format", "parquet", "--checkpoint-rows", 100)
    assert p.returncode == 0 and "differs in columns" in start_note(p), p.stderr
    assert summary(p)["rows_this_run"] == n


def test_changed_weights_are_not_published_from_a_finished_checkpoint(tmp_path):
    """A checkpoint that holds every row (kept by failing guardrails) is
    published without starting the model; not once the weights changed."""
    save_weights(tmp_path, 0)
    cfg = config(tmp_path)
    n = 300
    x = np.random.default_rng(2).standard_normal((n, 4)).astype(np.float32)
    src = write_csv(tmp_path / "in.csv", x)
    out = tmp_path / "out"
    args = ["--input", src, "--output", out, "--id-column", "id", "--batch-size", 64]
    p = batch(cfg, *args, "--mean", "100:200")
    assert p.returncode == 3 and "guardrails failed" in p.stderr, p.stderr
    new = save_weights(tmp_path, 1)
    p = batch(cfg, *args)
    assert p.returncode == 0, p.stderr
    assert "publishing only" not in start_note(p), start_note(p)
    s = summary(p)
    assert s["rows_this_run"] == n
    ids, got = read_csv_scores(s["output"])
    assert ids == [str(i) for i in range(n)]
    np.testing.assert_allclose(got, linear(new, x)[:, 0], rtol=1e-5, atol=1e-6)


def test_nan_scores_fail_the_default_guardrail_and_a_changed_input_exits_1(tmp_path):
    save_weights(tmp_path, 0)
    cfg = config(tmp_path)
    n = 200
    x = np.random.default_rng(3).standard_normal((n, 4)).astype(np.float32)
    src = write_csv(tmp_path / "in.csv", x, cells={(7, 2): "nan"})
    out = tmp_path / "out"
    args = ["--input", src, "--output", out, "--id-column", "id", "--batch-size", 64]
    p = batch(cfg, *args)  # the default --max-nan-rate 0
    assert p.returncode == 3, p.stderr
    assert "1 of 200 rows are NaN or infinite" in p.stderr and "max_nan_rate 0" in p.stderr
    assert not [f for f in os.listdir(out) if not f.startswith(".")]  # nothing published

    original = open(src).read()
    i = original.index("\n7,") + 3  # row 7's first value: flip its first digit
    changed = original[:i] + ("1" if original[i] != "1" else "2") + original[i + 1:]
    same_size_and_mtime(src, changed)
    p = batch(cfg, *args, "--max-nan-rate", "off")
    assert p.returncode == 1 and "changed since the checkpoint was written" in p.stderr, p.stderr
    assert not [f for f in os.listdir(out) if not f.startswith(".")]

    same_size_and_mtime(src, original)  # the data the rows were scored from: publishable
    p = batch(cfg, *args, "--max-nan-rate", "off")
    assert p.returncode == 0 and "publishing only" in start_note(p), p.stderr
    assert summary(p)["rows_this_run"] == 0 and summary(p)["guardrails"]["nan_rate"] == 1 / n


def test_checkpoint_s_commits_by_time_and_a_changed_input_stops_the_resume(tmp_path):
    cfg = config(tmp_path, factory="slow", weights=False)
    n, rows = 3000, 50
    x = np.random.default_rng(4).standard_normal((n, 4)).astype(np.float32)
    src = write_csv(tmp_path / "in.csv", x)
    out = tmp_path / "out"
    args = ["--input", src, "--output", str(out), "--id-column", "id", "--batch-size", str(rows),
            "--checkpoint-s", "0.05"]  # and no --checkpoint-rows: commits by time alone
    env = {**os.environ, "RINGSERVE_TEST_SLOW_MS": "20"}
    job = subprocess.Popen([sys.executable, "-m", "daemon", "batch", "--config", str(cfg),
                            "--progress", "off", *args], cwd=REPO, env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        def committed():
            assert job.poll() is None, job.communicate()
            for ck in out.glob(".ringserve-batch-*/checkpoint.json"):
                try:
                    return json.loads(ck.read_text())["rows"]
                except ValueError:
                    pass
            return 0
        poll(committed, "a checkpoint by time", timeout=120, every=0.01)
        workers = psutil.Process(job.pid).children()
        job.kill()
    finally:
        job.communicate(timeout=60)
    psutil.wait_procs(workers, timeout=30)
    poll(lambda: not {s for s in shm_segments() if s.startswith(f"ringserve-{job.pid}-")},
         "the killed job's ring unlinked", timeout=10)
    (ck,) = out.glob(".ringserve-batch-*/checkpoint.json")
    done = json.loads(ck.read_text())["rows"]
    assert 0 < done < n and done % rows == 0

    original = open(src).read()
    i = original.rindex("\n") - 1  # the last value's last digit
    changed = original[:i] + ("1" if original[i] != "1" else "2") + original[i + 1:]
    same_size_and_mtime(src, changed)
    p = batch(cfg, *args, env={"RINGSERVE_TEST_SLOW_MS": "0"})
    assert p.returncode == 1 and "changed since the checkpoint was written" in p.stderr, p.stderr
    assert not [f for f in os.listdir(out) if not f.startswith(".")]

    same_size_and_mtime(src, original)
    p = batch(cfg, *args, env={"RINGSERVE_TEST_SLOW_MS": "0"})
    assert p.returncode == 0, p.stderr
    assert start_note(p).startswith("resuming after row "), p.stderr
    s = summary(p)
    assert s["rows"] == n and s["rows_this_run"] < n
    ids, _ = read_csv_scores(s["output"])
    assert ids == [str(i) for i in range(n)]  # every row once, in order
    assert job.returncode == -signal.SIGKILL
