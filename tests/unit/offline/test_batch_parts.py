"""The batch path's pure parts: column mapping, score guardrails, checkpoint
state, output naming and the command line's option table."""

from __future__ import annotations

import io
import json
import math
import re
import time
from pathlib import Path

import numpy as np
import pytest

from daemon.offline import cli
from daemon.offline import guardrails as gr
from daemon.offline.checkpoint import Checkpoint
from daemon.offline.columns import ColumnError, expand, parse_mapping, plan_columns
from daemon.offline.progress import Progress
from daemon.offline.writers import OutputColumns
from daemon.workers.spec import TensorDecl

X128 = TensorDecl("input", "float32", (128,))
HEADER = ["id"] + [f"f{i}" for i in range(128)]


# -- columns ----------------------------------------------------------------------

def test_expand_names_and_ranges():
    assert expand("a, f0:f2,b") == ["a", "f0", "f1", "f2", "b"]
    assert expand("x008:x011") == ["x008", "x009", "x010", "x011"]
    for bad in ("f0:g3", "f3:f1", "a,,b", "f0:"):
        with pytest.raises(ColumnError):
            expand(bad)


def test_parse_mapping_flags_and_table():
    assert parse_mapping(["input=f0:f127"]) == {"input": "f0:f127"}
    assert parse_mapping({"dense": "d0:d3"}) == {"dense": "d0:d3"}
    with pytest.raises(ColumnError, match="INPUT=COLUMNS"):
        parse_mapping(["f0:f127"])
    with pytest.raises(ColumnError, match="twice"):
        parse_mapping(["a=x", "a=y"])


def test_default_mapping_takes_every_column_but_the_id():
    plan = plan_columns(HEADER, [X128], {}, "id")
    assert plan.id_index == 0 and plan.id_name == "id"
    assert plan.inputs[0].columns == tuple(range(1, 129))
    plan = plan_columns(HEADER[1:], [X128], {}, None)
    assert plan.id_index is None and plan.id_name == "row"


def test_explicit_mapping_in_any_order_and_shape():
    header = ["k"] + [f"c{i}" for i in range(8)]
    decl = TensorDecl("m", "float32", (2, 2))
    plan = plan_columns(header, [decl], {"m": "c7,c0,c3:c4"}, "k")
    assert plan.inputs[0].columns == (8, 1, 4, 5)
    assert plan.used == (0, 1, 4, 5, 8)


def test_mapping_errors_say_what_to_write():
    with pytest.raises(ColumnError, match=r"no column 'f1000'"):
        plan_columns(HEADER, [X128], {"input": "f0:f126,f1000"}, "id")
    with pytest.raises(ColumnError, match=r"did you mean 'id'"):
        plan_columns(HEADER, [X128], {}, "idd")
    with pytest.raises(ColumnError, match=r"takes 128 columns; .* give 127"):
        plan_columns(HEADER[:-1], [X128], {}, "id")
    with pytest.raises(ColumnError, match="no input 'dense'"):
        plan_columns(HEADER, [X128], {"dense": "f0:f127"}, "id")
    two = [TensorDecl("a", "float32", (1,)), TensorDecl("b", "int64", (1,))]
    with pytest.raises(ColumnError, match="map every input"):
        plan_columns(["a", "b"], two, {"a": "a"}, None)
    with pytest.raises(ColumnError, match="duplicate column names"):
        plan_columns(["a", "a"], [TensorDecl("x", "float32", (1,))], {}, None)


def test_metadata_features_are_the_default_columns_of_their_input():
    """The model metadata's features map an input that --columns does not
    (in their order, whatever the table's); --columns still wins."""
    header = ["id", "y", "x", "junk", "n"]
    two = [TensorDecl("dense", "float32", (2,)), TensorDecl("ids", "int64", (1,))]
    feats = {"dense": ("x", "y"), "ids": ("n",)}
    plan = plan_columns(header, two, {}, "id", features=feats,
                        features_from="the feature_schema of m.json")
    assert [i.columns for i in plan.inputs] == [(2, 1), (4,)]
    plan = plan_columns(header, two, {"dense": "y,junk"}, "id", features=feats)
    assert [i.columns for i in plan.inputs] == [(1, 3), (4,)]
    # one input: the features, not "every column but the id"
    plan = plan_columns(header, two[:1], {}, "id", features={"dense": ("x", "y")})
    assert plan.inputs[0].columns == (2, 1)
    with pytest.raises(ColumnError, match=r"no column 'w'.*the features of input 'dense' come from "
                                          r"the feature_schema of m\.json: map the input with "
                                          r"--columns dense="):
        plan_columns(header, two, {}, "id", features={"dense": ("x", "w"), "ids": ("n",)},
                     features_from="the feature_schema of m.json")


# -- guardrails -------------------------------------------------------------------

def test_stats_exact_on_a_small_table():
    rng = np.random.default_rng(0)
    v = rng.random(1000)
    v[[3, 500]] = np.nan
    s = gr.ScoreStats(sample_size=5000)
    for i in range(0, 1000, 128):
        s.add(i, v[i:i + 128])
    fin = v[np.isfinite(v)]
    assert s.rows == 1000 and s.nonfinite == 2 and s.nan_rate == 0.002
    assert math.isclose(s.mean, fin.mean(), rel_tol=1e-12)
    for q in (0.01, 0.5, 0.99):
        assert s.quantile(q) == np.quantile(fin, q)


def test_sample_is_the_same_whatever_the_batches_and_a_restore():
    rng = np.random.default_rng(1)
    v = rng.random(20000)
    a = gr.ScoreStats(sample_size=500)
    a.add(0, v)
    b = gr.ScoreStats(sample_size=500)
    for i in range(0, 10000, 777):
        b.add(i, v[i:min(i + 777, 10000)])
    b = gr.ScoreStats.restore(json.loads(json.dumps(b.state())), b.arrays())   # a checkpoint
    for i in range(10000, 20000, 1000):
        b.add(i, v[i:i + 1000])
    assert np.array_equal(np.sort(a.sample()), np.sort(b.sample()))
    assert a.sample().size == 500 and a.rows == b.rows == 20000
    assert abs(a.quantile(0.5) - 0.5) < 0.1


def test_check_reports_each_broken_bound():
    s = gr.ScoreStats()
    s.add(0, np.array([0.1, 0.2, 0.3, np.nan]))
    ok = gr.Bounds(max_nan_rate=0.5, mean=(0.1, 0.3), quantiles=((0.5, 0.1, 0.3),))
    assert gr.check(s, ok, "p") == []
    bad = gr.Bounds(max_nan_rate=0.0, mean=(0.5, 1.0), quantiles=((0.99, 0.0, 0.25),))
    msgs = gr.check(s, bad, "p")
    assert len(msgs) == 3
    assert "1 of 4 rows are NaN" in msgs[0]
    assert "mean 0.2 is outside [0.5, 1]" in msgs[1]
    assert "quantile 0.99 is 0.298, outside [0, 0.25] (exact)" in msgs[2]
    assert gr.check(s, gr.Bounds(max_nan_rate=None), "p") == []


def test_bound_parsers():
    assert gr.parse_range("0.1:0.9", "--mean") == (0.1, 0.9)
    assert gr.parse_quantile("0.99:0:0.95") == (0.99, 0.0, 0.95)
    for bad in ("0.9:0.1", "x", "1"):
        with pytest.raises(ValueError):
            gr.parse_range(bad, "--mean")
    for bad in ("1.5:0:1", "0.5", "q:0:1"):
        with pytest.raises(ValueError, match="Q:LOW:HIGH"):
            gr.parse_quantile(bad)


# -- checkpoint -------------------------------------------------------------------

def test_checkpoint_commit_resume_and_cleanup(tmp_path):
    d = str(tmp_path / "job")
    ident = {"input": "x.csv", "size": 1}
    ck, note = Checkpoint.open(d, ident)
    assert note == "starting"
    part = ck.next_part("csv")
    open(part, "w").write("a\n")
    ck.stats_obj.add(0, np.array([0.5]))
    ck.meta = {"weights": "w"}
    ck.commit(part, 1, {"byte": 10, "rows": 1})
    (tmp_path / "job" / "part-000001.csv").write_text("half written")   # the kill
    ck2, note = Checkpoint.open(d, ident)
    assert note == "resuming after row 1"
    assert ck2.rows == 1 and ck2.position == {"byte": 10, "rows": 1}
    assert sorted(p.name for p in (tmp_path / "job").iterdir()) == \
        ["checkpoint.json", "part-000000.csv", "stats-000001.npz"]
    assert ck2.stats_obj.rows == 1 and ck2.stats_obj.mean == 0.5 and ck2.meta == {"weights": "w"}
    ck3, note = Checkpoint.open(d, {**ident, "size": 2})
    assert "another job (differs in size)" in note and ck3.rows == 0
    assert [p.name for p in (tmp_path / "job").iterdir()] == []


# -- output columns and options ----------------------------------------------------

def test_output_columns_flatten_outputs():
    cols = OutputColumns([TensorDecl("output", "float32", (2,)),
                          TensorDecl("score", "float16", (1,))], "id")
    assert cols.header == ["id", "output_0", "output_1", "score", "model_version", "scored_at"]
    assert cols.index("score") == 2
    with pytest.raises(ValueError, match="no output column 'nope'"):
        cols.index("nope")
    with pytest.raises(ValueError, match="twice"):
        OutputColumns([TensorDecl("id", "float32", (1,))], "id")
    # a model with a data version (its metadata's): a column of its own
    cols = OutputColumns([TensorDecl("score", "float32", (1,))], "id", "clicks-2026-11")
    assert cols.header == ["id", "score", "model_version", "data_version", "scored_at"]


def test_flags_win_over_the_job_file(tmp_path):
    job = tmp_path / "job.toml"
    job.write_text('[batch]\ninput = "a.csv"\noutput = "out"\nbatch_size = 128\n'
                   'columns = { input = "f0:f127" }\nmean = [0.1, 0.9]\nquantile = "0.5:0:1"\n')
    args = cli.build_parser().parse_args(["--job", str(job), "--batch-size", "64"])
    o = cli.resolve(args)
    assert o["batch_size"] == 64 and o["input"] == "a.csv" and o["mean"] == (0.1, 0.9)
    assert o["columns"] == {"input": "f0:f127"} and o["quantile"] == ["0.5:0:1"]
    assert o["max_nan_rate"] == 0.0 and o["csv_engine"] == "auto"
    job.write_text('[batch]\ninput = "a.csv"\noutput = "o"\nbatch_sise = 3\n')
    with pytest.raises(ValueError, match="did you mean 'batch_size'"):
        cli.resolve(cli.build_parser().parse_args(["--job", str(job)]))
    with pytest.raises(ValueError, match="--output is required"):
        cli.resolve(cli.build_parser().parse_args(["--input", "a.csv"]))
    args = cli.build_parser().parse_args(["--input", "a", "--output", "o", "--max-nan-rate", "off"])
    assert cli.resolve(args)["max_nan_rate"] is None


def test_docs_options_table_matches_the_code():
    doc = (Path(__file__).resolve().parents[3] / "docs" / "batch.md").read_text()
    table = doc.split("<!-- options:begin -->\n", 1)[1].split("\n<!-- options:end -->", 1)[0]
    assert table == cli.render_options(), \
        "docs/batch.md is stale: paste daemon.offline.cli.render_options() between the markers"


def test_progress_line_on_a_terminal_and_json_otherwise():
    class Tty(io.StringIO):
        def isatty(self):
            return True

    t = Tty()
    p = Progress("auto", 0.0, t)
    p.begin(0)
    time.sleep(0.01)
    p.update(500, 0.5)
    p.event("published", "out.csv", rows=1000)
    assert p.mode == "tty" and re.search(r"\r +500 rows   50\.0% .* rows/s  0:00:00  ETA 0:00:00",
                                         t.getvalue())
    assert t.getvalue().endswith("\npublished: out.csv rows=1000\n")
    s = io.StringIO()
    p = Progress("auto", 0.0, s)
    p.begin(100)                     # resumed after 100 rows: the rate counts this run's rows
    time.sleep(0.01)
    p.update(200, 0.5)
    rec = json.loads(s.getvalue())
    assert rec["event"] == "progress" and rec["rows"] == 200 and rec["fraction"] == 0.5
    assert rec["rows_per_s"] < 100 / 0.01 + 1 and rec["eta_s"] >= 0
