"""``ringserve batch`` as a user runs it: real worker processes, real files.

Outputs are checked bit for bit against the model run in-process on the
same padded batches; a job killed with SIGKILL resumes with every row
exactly once; the final name only ever shows a whole file; failing
guardrails publish nothing and keep the previous output; bad input fails
with the line and column.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import psutil
import pytest
import torch

from tests.conftest import REPO, shm_segments

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

MODEL = """
[[models]]
name = "{name}"
version = "{version}"
factory = "{factory}"
input = {{ dtype = "float32", shape = [{width}] }}
devices = ["cpu"]
threads = 1
"""
DEMO = MODEL.format(name="demo", version="7", factory="daemon.workers.zoo:mlp_scorer", width=128)
SLOW = MODEL.format(name="slow", version="2", factory="tests.models:slow", width=4)
ISO = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


def write_table(path, x: np.ndarray, fmt: str, ids=None) -> str:
    ids = ids if ids is not None else [f"u{i}" for i in range(len(x))]
    names = [f"f{i}" for i in range(x.shape[1])]
    if fmt == "csv":
        with open(path, "w") as f:
            f.write("id," + ",".join(names) + "\n")
            for k, row in zip(ids, x, strict=False):
                f.write(k + "," + ",".join("%.9g" % v for v in row) + "\n")
    else:
        pq.write_table(pa.table({"id": ids, **{n: x[:, i] for i, n in enumerate(names)}}), path,
                       row_group_size=300)
    return str(path)


def run(config_path, *args, env=None, timeout=180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "daemon", "batch", "--config", str(config_path),
                           "--progress", "json", *map(str, args)], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})})


def summary(p: subprocess.CompletedProcess) -> dict:
    assert p.stdout.strip(), p.stderr
    return json.loads(p.stdout.strip().splitlines()[-1])


def reference(factory, x: np.ndarray, batch: int) -> np.ndarray:
    """The model in this process, on the batches the job makes: ``batch``
    rows each, the last padded with zeros."""
    from daemon.config import parse_config
    from daemon.workers.runtime import Runner
    from daemon.workers.spec import spec_for
    cfg = parse_config({"models": [{"name": "m", "factory": factory, "devices": ["cpu"],
                                    "threads": 1,
                                    "input": {"dtype": "float32", "shape": [x.shape[1]]}}]})
    spec = spec_for(cfg.models[0], "cpu", 1)
    spec.buckets = [batch]
    r = Runner(spec)
    r.load()
    if hasattr(r.model, "ms"):
        r.model.ms = 0
    outs = []
    for s in range(0, len(x), batch):
        n = min(batch, len(x) - s)
        xb = torch.zeros((batch, x.shape[1]))
        xb[:n] = torch.from_numpy(x[s:s + n])
        out = torch.empty((batch, *r.outputs[0].shape))
        r.run_batch([xb], [out], n)
        outs.append(out[:n].numpy().copy())
    return np.concatenate(outs)


def read_output(path) -> tuple[list, np.ndarray, list, list]:
    """(ids, outputs, versions, timestamps) of an output file."""
    if path.endswith(".csv"):
        with open(path, newline="") as f:
            rows = list(csv.reader(f))
        header, rows = rows[0], rows[1:]
        k = len(header) - 3
        out = np.array([[float(v) for v in r[1:1 + k]] for r in rows],
                       np.float32).reshape(len(rows), k)
        return [r[0] for r in rows], out, [r[-2] for r in rows], [r[-1] for r in rows]
    t = pq.read_table(path)
    names = t.column_names
    out = np.stack([t.column(n).to_numpy() for n in names[1:-2]], axis=1)
    ts = [v.strftime("%Y-%m-%dT%H:%M:%S.") + f"{v.microsecond // 1000:03d}Z"
          for v in t.column("scored_at").to_pylist()]
    return t.column(0).to_pylist(), out, t.column("model_version").to_pylist(), ts


def assert_no_leftovers(outdir, pid=None):
    assert [n for n in os.listdir(outdir) if n.startswith(".")] == [], os.listdir(outdir)
    if pid is not None:
        assert {s for s in shm_segments() if s.startswith(f"ringserve-{pid}-")} == set()


@pytest.fixture
def demo_config(tmp_path):
    p = tmp_path / "demo.toml"
    p.write_text(DEMO)
    return p


@pytest.mark.parametrize("fmt,workers", [("csv", 1), ("parquet", 1), ("csv", 2)])
def test_outputs_equal_the_in_process_model(tmp_path, demo_config, fmt, workers):
    """Two workers (devices = ["cpu", "cpu"]) finish batches out of order;
    the output is still in input order."""
    if workers > 1:
        demo_config.write_text(DEMO.replace('["cpu"]', '["cpu", "cpu"]'))
    x = np.random.default_rng(3).standard_normal((700, 128)).astype(np.float32)
    src = write_table(tmp_path / f"in.{fmt}", x, fmt)
    out = tmp_path / "out"
    p = run(demo_config, "--input", src, "--output", out, "--id-column", "id", "--batch-size", 64)
    assert p.returncode == 0, p.stderr
    s = summary(p)
    assert len(s["worker_busy_s"]) == workers
    digest = hashlib.sha256(open(src, "rb").read()).hexdigest()[:16]
    assert s["output"] == str(out / f"demo__7__sha256-{digest}.{fmt}")
    assert s["rows"] == 700 and s["version"] == "7" and s["weights"].startswith("sha256:")
    ids, got, versions, ts = read_output(s["output"])
    assert ids == [f"u{i}" for i in range(700)]
    assert np.array_equal(got, reference("daemon.workers.zoo:mlp_scorer", x, 64))
    assert set(versions) == {"7"} and all(ISO.match(t) for t in ts)
    events = [json.loads(ln) for ln in p.stderr.splitlines() if ln.startswith('{"ts"')]
    assert {"start", "progress", "published"} <= {e.get("event") for e in events}
    if fmt == "parquet":
        meta = json.loads(pq.read_schema(s["output"]).metadata[b"ringserve"])
        assert meta["rows"] == 700 and meta["weights"] == s["weights"]
    assert_no_leftovers(out)


def test_killed_job_resumes_with_every_row_exactly_once(tmp_path):
    cfg = tmp_path / "slow.toml"
    cfg.write_text(SLOW)
    n, batch = 2000, 50
    x = np.random.default_rng(4).standard_normal((n, 4)).astype(np.float32)
    src = write_table(tmp_path / "in.csv", x, "csv", ids=[str(i) for i in range(n)])
    out = tmp_path / "out"
    args = ["--input", src, "--output", out, "--id-column", "id", "--batch-size", batch,
            "--checkpoint-rows", 150, "--data-tag", "t1"]
    env = {**os.environ, "RINGSERVE_TEST_SLOW_MS": "25"}
    job = subprocess.Popen([sys.executable, "-m", "daemon", "batch", "--config", str(cfg),
                            "--progress", "off", *map(str, args)], cwd=REPO, env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    t_end = time.monotonic() + 120
    committed = 0
    while committed < 400:
        assert job.poll() is None and time.monotonic() < t_end, _output(job)
        for ck in out.glob(".ringserve-batch-*/checkpoint.json"):
            try:
                committed = json.loads(ck.read_text())["rows"]
            except ValueError:
                pass
        time.sleep(0.01)
    workers = psutil.Process(job.pid).children(recursive=True)
    job.send_signal(signal.SIGKILL)
    job.communicate(timeout=60)
    assert not [p for p in out.iterdir() if not p.name.startswith(".")]   # nothing published
    psutil.wait_procs(workers, timeout=30)                                  # workers leave too
    t_end = time.monotonic() + 10
    while {s for s in shm_segments() if s.startswith(f"ringserve-{job.pid}-")}:
        assert time.monotonic() < t_end, "the killed job's ring was not unlinked"
        time.sleep(0.05)

    p = run(cfg, *args, env={"RINGSERVE_TEST_SLOW_MS": "25"})
    assert p.returncode == 0, p.stderr
    s = summary(p)
    assert "resuming after row" in p.stderr
    assert s["rows"] == n and 0 < s["rows_this_run"] < n - 300
    ids, got, _, _ = read_output(s["output"])
    assert ids == [str(i) for i in range(n)]                      # each row once, in order
    assert np.array_equal(got, reference("tests.models:slow", x, batch))
    assert_no_leftovers(out)


def test_final_name_only_ever_shows_a_whole_file(tmp_path):
    cfg = tmp_path / "slow.toml"
    cfg.write_text(SLOW)
    n = 1500
    x = np.random.default_rng(5).standard_normal((n, 4)).astype(np.float32)
    src = write_table(tmp_path / "in.csv", x, "csv")
    out = tmp_path / "out"
    args = ["--input", src, "--output", out, "--id-column", "id", "--batch-size", 50,
            "--checkpoint-rows", 100]
    first = run(cfg, *args, env={"RINGSERVE_TEST_SLOW_MS": "0"})
    assert first.returncode == 0, first.stderr
    final = summary(first)["output"]
    old = open(final).read()
    job = subprocess.Popen([sys.executable, "-m", "daemon", "batch", "--config", str(cfg),
                            "--progress", "off", "--restart", *map(str, args)], cwd=REPO,
                           env={**os.environ, "RINGSERVE_TEST_SLOW_MS": "10"},
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    seen, names = set(), set()
    t_end = time.monotonic() + 120
    while job.poll() is None:
        assert time.monotonic() < t_end, "the job did not finish in 120 s"
        names |= set(os.listdir(out))
        try:
            text = open(final).read()
        except FileNotFoundError:
            text = None
        assert text is not None, "the final name vanished during the job"
        assert text.count("\n") == n + 1, "a partial file was visible under the final name"
        seen.add(text == old)
        time.sleep(0.002)
    assert job.returncode == 0, job.communicate(timeout=60)
    new = open(final).read()
    assert new != old and new.count("\n") == n + 1               # replaced, whole
    assert names - {os.path.basename(final)} <= {n for n in names if n.startswith(".")}
    assert_no_leftovers(out)


def test_failing_guardrails_publish_nothing_and_keep_the_old_output(tmp_path, demo_config):
    x = np.random.default_rng(6).standard_normal((600, 128)).astype(np.float32)
    src = write_table(tmp_path / "in.parquet", x, "parquet")
    out = tmp_path / "out"
    base = ["--input", src, "--output", out, "--id-column", "id", "--data-tag", "d1"]
    p = run(demo_config, *base)
    assert p.returncode == 0, p.stderr
    final = summary(p)["output"]
    before = open(final, "rb").read()
    mean = summary(p)["guardrails"]["mean"]

    p = run(demo_config, *base, "--mean", "0.99:1", "--quantile", "0.5:0:0.01")
    assert p.returncode == 3, p.stderr
    assert "guardrails failed, the previous demo__7__d1.parquet is unchanged" in p.stderr
    assert f"mean {mean:.6g} is outside [0.99, 1]" in p.stderr
    assert "quantile 0.5 is" in p.stderr and "(exact)" in p.stderr
    assert len(summary(p)["failed"]) == 2
    assert open(final, "rb").read() == before
    assert [n for n in os.listdir(out) if ".tmp-" in n] == []

    # the scored rows were kept: looser bounds publish them without scoring again
    p = run(demo_config, *base, "--mean", "0:1")
    assert p.returncode == 0, p.stderr
    assert summary(p)["rows_this_run"] == 0 and "publishing only" in p.stderr
    assert open(final, "rb").read() != before
    assert_no_leftovers(out)


def test_bad_input_fails_with_line_and_column(tmp_path, demo_config):
    x = np.random.default_rng(7).standard_normal((20, 128)).astype(np.float32)
    src = write_table(tmp_path / "in.csv", x, "csv")
    out = tmp_path / "out"
    p = run(demo_config, "--input", src, "--output", out, "--columns", "input=f1:f128")
    assert p.returncode == 2 and "in.csv has no column 'f128'" in p.stderr, p.stderr

    lines = open(src).read().splitlines()
    lines[5] = lines[5].replace(",", ",abc,", 1).rsplit(",", 1)[0]   # row 5: 'abc' in f0
    open(src, "w").write("\n".join(lines) + "\n")
    p = run(demo_config, "--input", src, "--output", out, "--id-column", "id")
    assert p.returncode == 2, p.stderr
    assert "in.csv line 6, column 'f0': 'abc' is not a number" in p.stderr
    assert not [n for n in os.listdir(out) if not n.startswith(".")]


def _output(job) -> tuple:
    """What a job wrote, for a failure message; a job still running is killed first."""
    if job.poll() is None:
        job.kill()
    return job.communicate(timeout=60)


def _wait_committed(job, out, rows, timeout=120.0) -> None:
    t_end = time.monotonic() + timeout
    while True:
        assert job.poll() is None and time.monotonic() < t_end, _output(job)
        for ck in out.glob(".ringserve-batch-*/checkpoint.json"):
            try:
                if json.loads(ck.read_text())["rows"] >= rows:
                    return
            except ValueError:
                pass
        time.sleep(0.01)


def test_worker_death_and_sigterm_stop_the_job_resumably(tmp_path):
    cfg = tmp_path / "slow.toml"
    cfg.write_text(SLOW)
    n = 1500
    x = np.random.default_rng(8).standard_normal((n, 4)).astype(np.float32)
    src = write_table(tmp_path / "in.csv", x, "csv", ids=[str(i) for i in range(n)])
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "daemon", "batch", "--config", str(cfg), "--progress", "off",
           "--input", src, "--output", str(out), "--id-column", "id", "--batch-size", "50",
           "--checkpoint-rows", "100", "--data-tag", "t"]
    env = {**os.environ, "RINGSERVE_TEST_SLOW_MS": "20"}

    job = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True)
    _wait_committed(job, out, 200)
    worker = psutil.Process(job.pid).children()[0]
    worker.kill()                                                   # the model's process dies
    _, err = job.communicate(timeout=60)
    assert job.returncode == 1, err
    assert f"(pid {worker.pid}) exited with code -9 while scoring" in err and "rerun" in err

    job = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True)
    _wait_committed(job, out, 700)
    job.send_signal(signal.SIGTERM)                                 # a scheduler stops the job
    _, err = job.communicate(timeout=60)
    assert job.returncode == 130 and "interrupted" in err, err

    p = run(cfg, *cmd[cmd.index("--input"):], env={"RINGSERVE_TEST_SLOW_MS": "20"})
    assert p.returncode == 0, p.stderr
    s = summary(p)
    assert 0 < s["rows_this_run"] <= n - 700
    ids, got, _, _ = read_output(s["output"])
    assert ids == [str(i) for i in range(n)]
    assert np.array_equal(got, reference("tests.models:slow", x, 50))
    assert_no_leftovers(out, job.pid)


def test_model_error_names_the_rows(tmp_path):
    cfg = tmp_path / "magic.toml"
    cfg.write_text(MODEL.format(name="magic", version="1", factory="tests.models:raises_on_magic",
                                width=4))
    x = np.ones((300, 4), np.float32)
    x[130, 0] = 777
    src = write_table(tmp_path / "in.parquet", x, "parquet")
    p = run(cfg, "--input", src, "--output", tmp_path / "out", "--id-column", "id",
            "--batch-size", 64)
    assert p.returncode == 1, p.stderr
    assert "rows 128 to 191 (batch 2 of this run): the model raised ValueError: magic value 777" \
        in p.stderr
