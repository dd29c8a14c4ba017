"""``ringserve batch`` and model metadata (docs/models.md, docs/batch.md):
the output is named after the model's data version and carries it in a
column (and, in Parquet, in the file's metadata); the metadata's
``features`` choose and order the input columns; a checkpoint made under
another data version is discarded. Real workers, real files."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from tests.conftest import REPO
from tests.faults import start_note, summary

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

CONFIG = """
[[models]]
name = "lm"
version = "3"
factory = "tests.models:linear_magic"
checkpoint = "w.pt"
input = { dtype = "float32", shape = [4] }
devices = ["cpu"]
threads = 1
"""
FEATURES = ["a", "b", "c", "d"]


def setup(tmp_path, data_version: str) -> tuple:
    """lm.toml, w.pt and w.pt.json in tmp_path; the state dict and the metadata hash."""
    from tests.models import LinearMagic
    torch.manual_seed(0)
    state = LinearMagic().state_dict()
    torch.save(state, tmp_path / "w.pt")
    digest = write_metadata(tmp_path, data_version)
    (tmp_path / "lm.toml").write_text(CONFIG)
    return state, digest


def write_metadata(tmp_path, data_version: str) -> str:
    meta = tmp_path / "w.pt.json"
    meta.write_text(json.dumps({"data_version": data_version, "feature_schema": {
        "input": {"dtype": "float32", "shape": [4], "features": FEATURES}}}))
    return "sha256:" + hashlib.sha256(meta.read_bytes()).hexdigest()


def write_table(tmp_path, n: int, fmt: str) -> tuple[str, np.ndarray]:
    """Columns in another order than the features, and one the model does
    not take (z): only the metadata's features can map them. Returns the
    path and the features in the model's order."""
    rng = np.random.default_rng(3)
    cols = {name: rng.standard_normal(n).astype(np.float32) for name in ["d", "z", "b", "a", "c"]}
    path = tmp_path / f"in.{fmt}"
    if fmt == "csv":
        with open(path, "w") as f:
            f.write("id," + ",".join(cols) + "\n")
            for i in range(n):
                f.write(f"u{i}," + ",".join("%.9g" % cols[c][i] for c in cols) + "\n")
    else:
        pq.write_table(pa.table({"id": [f"u{i}" for i in range(n)], **cols}), path)
    return str(path), np.stack([cols[c] for c in FEATURES], axis=1)


def batch(tmp_path, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "daemon", "batch", "--config",
                           str(tmp_path / "lm.toml"), "--progress", "json", *map(str, args)],
                          cwd=REPO, capture_output=True, text=True, timeout=180)


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_output_name_columns_and_file_metadata_carry_the_data_version(tmp_path, fmt):
    state, digest = setup(tmp_path, "clicks-2026-11")
    src, x = write_table(tmp_path, 300, fmt)
    out = tmp_path / "out"
    p = batch(tmp_path, "--input", src, "--output", out, "--id-column", "id", "--data-tag", "t1",
              "--batch-size", 64)
    assert p.returncode == 0, p.stderr
    s = summary(p)
    final = out / f"lm__3__clicks-2026-11__t1.{fmt}"
    assert s["output"] == str(final) and os.listdir(out) == [final.name]
    assert (s["data_version"], s["metadata_hash"]) == ("clicks-2026-11", digest)
    want = x @ state["lin.weight"].numpy().T + state["lin.bias"].numpy()
    if fmt == "csv":
        lines = final.read_text().splitlines()
        assert lines[0] == "id,output,model_version,data_version,scored_at"
        rows = [r.split(",") for r in lines[1:]]
        ids, scores = [r[0] for r in rows], np.array([float(r[1]) for r in rows], np.float32)
        assert {(r[2], r[3]) for r in rows} == {("3", "clicks-2026-11")}
    else:
        t = pq.read_table(final)
        assert t.column_names == ["id", "output", "model_version", "data_version", "scored_at"]
        ids, scores = t.column("id").to_pylist(), t.column("output").to_numpy()
        assert set(t.column("data_version").to_pylist()) == {"clicks-2026-11"}
        desc = json.loads(t.schema.metadata[b"ringserve"])
        assert (desc["data_version"], desc["metadata_hash"]) == ("clicks-2026-11", digest)
    assert ids == [f"u{i}" for i in range(300)]
    # the columns are the metadata's features, in its order (a, b, c, d; z unread)
    np.testing.assert_allclose(scores, want[:, 0], rtol=1e-5, atol=1e-6)


def test_a_changed_data_version_discards_the_checkpoint(tmp_path):
    """A job stopped by its guardrails keeps a finished checkpoint, which a
    rerun would publish without scoring; under another data version it is
    discarded and the job scores every row again, under the new name."""
    setup(tmp_path, "d1")
    src, _ = write_table(tmp_path, 200, "csv")
    out = tmp_path / "out"
    args = ["--input", src, "--output", out, "--id-column", "id", "--data-tag", "t1",
            "--batch-size", 50]
    p = batch(tmp_path, *args, "--mean", "100:200")
    assert p.returncode == 3 and "guardrails failed" in p.stderr, p.stderr
    write_metadata(tmp_path, "d2")
    p = batch(tmp_path, *args)
    assert p.returncode == 0, p.stderr
    note = start_note(p)
    assert note.startswith("the checkpoint is for another job (differs in data_version, "
                           "metadata_hash); starting afresh"), note
    s = summary(p)
    assert s["rows_this_run"] == 200 and s["data_version"] == "d2"
    assert os.listdir(out) == ["lm__3__d2__t1.csv"]
    assert {r.split(",")[3] for r in (out / "lm__3__d2__t1.csv").read_text().splitlines()[1:]} \
        == {"d2"}
    # the same data version again: the finished job would be resumed, not rescored
    p = batch(tmp_path, *args, "--mean", "100:200")
    assert p.returncode == 3
    p = batch(tmp_path, *args)
    assert p.returncode == 0 and start_note(p) == "resuming a finished job (publishing only)", \
        p.stderr
    assert summary(p)["rows_this_run"] == 0
