"""daemon/offline/readers.py on real files: both CSV engines agree, chunking
and resuming lose and repeat no row, and bad input names its line and
column."""

from __future__ import annotations

import numpy as np
import pytest

from daemon.offline.columns import plan_columns
from daemon.offline.readers import CsvReader, InputError, ParquetReader, open_reader
from daemon.workers.spec import TensorDecl

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

X4 = TensorDecl("input", "float32", (4,))
ENGINES = ("numpy", "pyarrow")


def table(n=50, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, 4)).astype(np.float32)


def write_csv(path, x, ids=None, extra=""):
    ids = ids or [f"r{i}" for i in range(len(x))]
    with open(path, "w") as f:
        f.write("key,a,b,c,d\n")
        for k, row in zip(ids, x, strict=False):
            f.write(k + "," + ",".join("%.9g" % v for v in row) + "\n")
        f.write(extra)
    return str(path)


def read_all(reader, plan, start=None):
    ids, xs, positions = [], [], []
    for c in reader.chunks(plan, start):
        ids += list(c.ids.to_pylist() if hasattr(c.ids, "to_pylist") else c.ids)
        xs.append(c.arrays[0])
        positions.append(c.position_after(c.rows))
    return ids, (np.concatenate(xs) if xs else np.empty((0, 4), np.float32)), positions


@pytest.mark.parametrize("engine", ENGINES)
def test_csv_exact_values_across_small_blocks(tmp_path, engine):
    x = table(200)
    path = write_csv(tmp_path / "t.csv", x, extra="\n")          # a trailing blank line
    r = CsvReader(path, engine=engine, block_bytes=700)          # ~10 rows per block, lines cut
    plan = plan_columns(r.header, [X4], {}, "key")
    ids, got, _ = read_all(r, plan)
    assert ids == [f"r{i}" for i in range(200)]
    assert got.dtype == np.float32 and np.array_equal(got, x)


@pytest.mark.parametrize("engine", ENGINES)
def test_csv_resume_from_any_row(tmp_path, engine):
    x = table(120)
    path = write_csv(tmp_path / "t.csv", x)
    r = CsvReader(path, engine=engine, block_bytes=1000)
    plan = plan_columns(r.header, [X4], {}, "key")
    chunks = list(r.chunks(plan))
    for c in (chunks[0], chunks[3]):
        for k in (0, 1, c.rows - 1, c.rows):
            pos = c.position_after(k)
            ids, got, _ = read_all(CsvReader(path, engine=engine, block_bytes=1000), plan, pos)
            first = pos["rows"]
            assert ids == [f"r{i}" for i in range(first, 120)]
            assert np.array_equal(got, x[first:])


def test_csv_ids_are_row_numbers_without_an_id_column_and_quotes_work(tmp_path):
    p = tmp_path / "q.csv"
    p.write_text('key,a,b,c,d\n"x,1",1,2,3,4\r\n"y",5,6,7,"8"\r\n')
    for engine in ENGINES:
        r = CsvReader(str(p), engine=engine)
        ids, got, _ = read_all(r, plan_columns(r.header, [X4], {}, "key"))
        assert ids == ["x,1", "y"] and got.tolist() == [[1, 2, 3, 4], [5, 6, 7, 8]]
        r = CsvReader(str(p), engine=engine)
        ids, _, _ = read_all(r, plan_columns(r.header, [X4], {"input": "a,b,c,d"}, None))
        assert [int(i) for i in ids] == [0, 1]


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("bad,where", [
    ("r9,1,2,abc,4\n", "line 10, column 'c': 'abc' is not a number"),
    ("r9,1,2,,4\n", "line 10, column 'c': empty is not a number"),
    ("r9,1,2,3\n", "line 10: 4 fields, but the header names 5 columns"),
])
def test_csv_bad_value_names_line_and_column(tmp_path, engine, bad, where):
    path = write_csv(tmp_path / "t.csv", table(8), extra=bad)
    r = CsvReader(path, engine=engine, block_bytes=64)
    plan = plan_columns(r.header, [X4], {}, "key")
    with pytest.raises(InputError, match=where):
        read_all(r, plan)


def test_integer_input_out_of_range(tmp_path):
    p = tmp_path / "i.csv"
    p.write_text("a\n1\n300\n")
    for engine in ENGINES:
        r = CsvReader(str(p), engine=engine)
        plan = plan_columns(r.header, [TensorDecl("x", "uint8", (1,))], {}, None)
        with pytest.raises(InputError, match=r"line 3, column 'a' is 300, out of range for uint8"):
            read_all(r, plan)
        p.write_text("a\n1\n2.5\n")
        with pytest.raises(InputError, match=r"'2.5' is not an integer"):
            read_all(CsvReader(str(p), engine=engine), plan)
        p.write_text("a\n1\n300\n")


def test_parquet_reads_casts_and_resumes(tmp_path):
    x = table(300).astype(np.float64)        # float64 columns feed a float32 input
    t = pa.table({"key": pa.array([f"k{i}" for i in range(300)]),
                  **{n: x[:, i] for i, n in enumerate("abcd")}})
    path = str(tmp_path / "t.parquet")
    pq.write_table(t, path, row_group_size=70)
    r = ParquetReader(path, batch_rows=50)
    assert r.total_rows() == 300
    plan = plan_columns(r.header, [X4], {}, "key")
    ids, got, _ = read_all(r, plan)
    assert ids == [f"k{i}" for i in range(300)]
    assert np.array_equal(got, x.astype(np.float32))
    for first in (0, 69, 70, 71, 299, 300):
        ids, got, _ = read_all(ParquetReader(path, batch_rows=50), plan, {"rows": first})
        assert ids == [f"k{i}" for i in range(first, 300)]
        assert np.array_equal(got, x[first:].astype(np.float32))


def test_parquet_bad_columns(tmp_path):
    path = str(tmp_path / "b.parquet")
    pq.write_table(pa.table({"a": [1.0, None], "b": ["x", "y"], "c": [1.5, 2.0]}), path)
    r = ParquetReader(path)
    with pytest.raises(InputError, match=r"column 'b' is string, not numeric"):
        read_all(r, plan_columns(r.header, [TensorDecl("x", "float32", (1,))], {"x": "b"}, None))
    with pytest.raises(InputError, match=r"row 1 \(0-based\), column 'a': missing value"):
        read_all(r, plan_columns(r.header, [TensorDecl("x", "float32", (1,))], {"x": "a"}, None))
    with pytest.raises(InputError, match=r"column 'c': cannot feed input 'x' \(int64\)"):
        read_all(r, plan_columns(r.header, [TensorDecl("x", "int64", (1,))], {"x": "c"}, None))


def test_open_reader_errors(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        open_reader(str(tmp_path / "nope.csv"))
    (tmp_path / "x.bin").write_text("a\n1\n")
    with pytest.raises(InputError, match="--format csv or parquet"):
        open_reader(str(tmp_path / "x.bin"))
    (tmp_path / "x.parquet").write_text("not parquet")
    with pytest.raises(InputError, match="not a Parquet file|cannot read"):
        open_reader(str(tmp_path / "x.parquet"))
