"""``python -m bench.gpu_check --cpu-smoke``: every step of the GPU check
that the CPU can run (in-process timings, the daemon under load, kill -9 of
its worker), with a JSON file that has every step and a status, and nothing
left behind; a budget that stops the run; SIGTERM in the middle."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import REPO

STATUSES = {"ok", "partial", "skipped", "failed", "error", "interrupted"}
STEPS = ["env", "cuda_tests", "inprocess_demo", "daemon_demo", "kill9", "inprocess_encoder",
         "daemon_encoder", "leaks"]


def _run(tmp_path, *args, timeout=150):
    out = tmp_path / "gpu-check.json"
    t0 = time.monotonic()
    p = subprocess.run([sys.executable, "-m", "bench.gpu_check", "--cpu-smoke", "--out", str(out),
                        *args], cwd=REPO, capture_output=True, text=True, timeout=timeout)
    return p, json.loads(out.read_text()), time.monotonic() - t0


@pytest.mark.timeout(240)
def test_cpu_smoke_runs_every_step_and_reports_each(tmp_path):
    p, doc, took = _run(tmp_path, "--budget-s", "150")
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-4000:]
    assert list(doc["steps"]) == STEPS
    assert all(s["status"] in STATUSES for s in doc["steps"].values()), doc["summary"]
    assert doc["mode"] == "cpu-smoke" and doc["summary"]["exit_code"] == 0
    assert doc["summary"]["front_path"] in ("pure", "compiled")
    assert doc["finished"] and took < 120, took
    steps = doc["steps"]
    # without CUDA test_cuda.py skips (with it, as on a GPU host, it passes)
    assert steps["cuda_tests"]["status"] in ("skipped", "ok"), steps["cuda_tests"]
    for model in ("demo", "encoder"):
        cells = steps[f"inprocess_{model}"]["cells"]
        assert len(cells) == 3 * 2 * 3   # modes x dtypes x buckets, each with a status
        assert all(c["status"] in STATUSES for c in cells)
        eager = [c for c in cells if c["mode"] == "eager"]
        assert [c["status"] for c in eager] == ["ok"] * 6, eager
        assert all(c["run_batch_us"] > 0 and c["forward_us"] > 0 for c in eager)
        d = steps[f"daemon_{model}"]
        assert d["status"] == "ok" and d["device"] == "cpu", d
        assert [r["bucket"] for r in d["runs"]] == [1, 8, 16]
        for r in d["runs"]:
            assert r["status"] == "ok" and r["throughput_rps"] > 0 and r["unanswered"] == 0
            assert r["ratio"] is not None and r["inprocess_rps"] > 0, r
        assert d["worker"]["pinned"] is False and d["worker"]["h2d"] is None
        assert d["segments_left"] == []
    k = steps["kill9"]
    assert k["status"] == "ok" and all(v for n, v in k["checks"].items()), k
    assert k["load"]["statuses"].get("14", 0) > 0 and k["restart"]["restarts"] == 1
    leaks = steps["leaks"]
    assert (leaks["status"], leaks["processes_left"], leaks["segments_left"]) == ("ok", [], [])
    assert "daemon / in-process (target >= 0.8)" in p.stdout


def test_a_short_budget_stops_the_run_and_says_so(tmp_path):
    p, doc, took = _run(tmp_path, "--budget-s", "12", "--models", "demo", timeout=60)
    assert p.returncode == 3, p.stdout[-4000:] + p.stderr[-4000:]
    assert took < 40
    assert doc["steps"]["env"]["status"] == "ok"
    skipped = [n for n, s in doc["steps"].items() if s["status"] == "skipped"
               and "budget" in s.get("reason", "")]
    assert skipped, doc["steps"]
    assert doc["steps"]["leaks"]["status"] == "ok"
    assert doc["summary"]["incomplete"] and doc["summary"]["exit_code"] == 3


@pytest.mark.timeout(120)
def test_sigterm_mid_run_keeps_what_was_measured_and_stops_everything(tmp_path):
    out = tmp_path / "gpu-check.json"
    proc = subprocess.Popen([sys.executable, "-m", "bench.gpu_check", "--cpu-smoke",
                             "--out", str(out), "--models", "demo"], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        t_end = time.monotonic() + 90
        while True:   # the file is rewritten as the run goes: wait for the daemon step
            try:
                doc = json.loads(out.read_text())
            except (FileNotFoundError, ValueError):
                doc = None
            if doc and doc["steps"]["daemon_demo"]["status"] == "running":
                break
            assert proc.poll() is None and time.monotonic() < t_end, doc
            time.sleep(0.1)
        os.kill(proc.pid, signal.SIGTERM)
        stdout, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
    assert proc.returncode == 3, stdout[-4000:]
    doc = json.loads(out.read_text())
    steps = doc["steps"]
    assert steps["inprocess_demo"]["status"] == "ok"   # measured before the signal: kept
    assert steps["daemon_demo"] == {**steps["daemon_demo"], "status": "interrupted",
                                    "reason": "SIGTERM"}
    assert steps["kill9"] == {"status": "skipped", "reason": "the run was interrupted"}
    assert steps["leaks"]["status"] == "ok", steps["leaks"]
