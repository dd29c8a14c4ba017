"""Output rows: part files while the job runs, one published file at the end.

Every output row is the input row's id, the model's outputs (one column per
element: ``score`` for a one-element output, ``output_0``, ``output_1``, ...
otherwise, in C order), the model version, the version of the data the model
was trained on (``data_version``, from its metadata: only when it has one)
and the time its batch was scored::

    id,output_0,output_1,model_version,data_version,scored_at
    17,0.731944442,0.268055588,1,clicks-2026-11-30,2025-01-31T12:00:00.123Z

CSV floats are written with enough digits to read back to the same bits
(float32 ``%.9g``, float16 ``%.5g``, float64 ``repr``); bfloat16 outputs are
widened to float32, exactly. In Parquet the outputs keep their dtype
(bfloat16 widened to float32), ``scored_at`` is a UTC timestamp in ms, and
the file's key-value metadata ``ringserve`` holds the job's description
(model, version, weights hash, data version and metadata hash, data tag,
input).

``publish`` merges the parts into ``.NAME.tmp-PID`` beside the final name,
fsyncs it, renames it to NAME and fsyncs the directory: a reader of NAME
sees the old file or the new one, never a part of one.
"""

from __future__ import annotations

import glob
import json
import math
import os
import shutil
import time
from itertools import repeat

import numpy as np

from ipc.tensors import bf16_to_f32

from .checkpoint import fsync_dir
from .readers import pyarrow_modules

ROW_GROUP_ROWS = 1 << 17
# Dictionary-encode only the version column: trying it on scores and ids
# (the default) made writing 5x slower for nothing (measured, 1M rows).
PARQUET_OPTIONS = {"use_dictionary": ["model_version", "data_version"],
                   "compression": "snappy"}
_FMT = {"float32": "%.9g", "float16": "%.5g", "bfloat16": "%.9g"}


class OutputColumns:
    """Names and sources of the output columns, from the model's outputs;
    ``data_version``: the model's (its metadata's), a column when not None."""

    def __init__(self, outputs, id_name: str, data_version: str | None = None):
        self.outputs = list(outputs)
        self.id_name = id_name
        self.data_version = data_version
        self.names: list[str] = []
        for d in self.outputs:
            n = math.prod(d.shape)
            self.names += [d.name] if n == 1 else [f"{d.name}_{i}" for i in range(n)]
        self.header = [id_name, *self.names, "model_version",
                       *(("data_version",) if data_version is not None else ()), "scored_at"]
        seen = set()
        for h in self.header:
            if h in seen:
                raise ValueError(f"output column {h!r} appears twice (the id column and an "
                                 "output share a name?); pick another --id-column name")
            seen.add(h)

    def columns(self, outs: list[np.ndarray]) -> list[np.ndarray]:
        """Per-output arrays [n, *shape] -> one 1-D array per output column."""
        cols = []
        for d, a in zip(self.outputs, outs, strict=True):
            if d.dtype == "bfloat16":
                a = bf16_to_f32(a)
            flat = a.reshape(a.shape[0], -1)
            cols += [flat[:, i] for i in range(flat.shape[1])]
        return cols

    def dtypes(self) -> list[str]:
        return [d.dtype for d in self.outputs for _ in range(max(1, math.prod(d.shape)))]

    def index(self, name: str) -> int:
        if name not in self.names:
            raise ValueError(f"no output column {name!r}; the outputs are: {', '.join(self.names)}")
        return self.names.index(name)


def iso_ms(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t * 1000) % 1000:03d}Z"


def _id_strings(pieces) -> list:
    out = []
    for p in pieces:
        out.extend(p.to_pylist() if hasattr(p, "to_pylist") else
                   p.tolist() if isinstance(p, np.ndarray) else p)
    return [x if isinstance(x, str) else "" if x is None else str(x) for x in out]


def _texts(col: np.ndarray, fmt: str | None) -> list[str]:
    vals = col.tolist()
    if fmt:
        return list(map(fmt.__mod__, vals))
    if col.dtype.kind == "f":
        return list(map(repr, vals))          # float64: the shortest exact text
    return list(map(str, map(int, vals)))     # integers; bool as 0/1


def _quote(field: str) -> str:
    if any(c in field for c in ',"\n\r'):
        return '"' + field.replace('"', '""') + '"'
    return field


class CsvPart:
    ext = "csv"

    def __init__(self, path: str, cols: OutputColumns, version: str):
        self.path = path
        self.cols = cols
        self.version = version
        self._fmt = [_FMT.get(dt) for dt in cols.dtypes()]
        self.f = open(path, "w", newline="")
        self.rows = 0

    def write(self, id_pieces, columns: list[np.ndarray], scored_at: float) -> None:
        """One batch: its ids (pieces) and its output columns (``OutputColumns.columns``)."""
        ids = _id_strings(id_pieces)
        joined = "".join(ids)
        if "," in joined or '"' in joined or "\n" in joined or "\r" in joined:
            ids = [_quote(x) for x in ids]
        texts = [_texts(c, fmt) for c, fmt in zip(columns, self._fmt, strict=False)]
        dv = self.cols.data_version
        tail = f"{self.version},{iso_ms(scored_at)}" if dv is None else \
            f"{self.version},{dv},{iso_ms(scored_at)}"
        self.f.write("\n".join(map(",".join, zip(ids, *texts, repeat(tail)))))
        self.f.write("\n")
        self.rows += len(ids)

    def close(self) -> None:
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()


class ParquetPart:
    ext = "parquet"

    def __init__(self, path: str, cols: OutputColumns, version: str):
        self.pa, self.pq, _, _ = pyarrow_modules()
        self.path = path
        self.cols = cols
        self.version = version
        self.writer = None
        self._batches: list = []
        self._buffered = 0
        self.rows = 0

    def _ids(self, pieces):
        pa = self.pa
        arrs = [p if isinstance(p, (pa.Array, pa.ChunkedArray)) else pa.array(p) for p in pieces]
        arrs = [c for a in arrs for c in (a.chunks if isinstance(a, pa.ChunkedArray) else [a])]
        return arrs[0] if len(arrs) == 1 else pa.concat_arrays(arrs)

    def write(self, id_pieces, columns: list[np.ndarray], scored_at: float) -> None:
        pa = self.pa
        n = columns[0].shape[0]
        arrays = [self._ids(id_pieces), *(pa.array(c) for c in columns),
                  pa.array(repeat(self.version, n), pa.string()),
                  *((pa.array(repeat(self.cols.data_version, n), pa.string()),)
                    if self.cols.data_version is not None else ()),
                  pa.array(np.full(n, int(scored_at * 1000), "datetime64[ms]"),
                           pa.timestamp("ms", tz="UTC"))]
        batch = pa.RecordBatch.from_arrays(arrays, names=self.cols.header)
        if self.writer is None:
            self.writer = self.pq.ParquetWriter(self.path, batch.schema, **PARQUET_OPTIONS)
        self._batches.append(batch)
        self._buffered += n
        self.rows += n
        if self._buffered >= ROW_GROUP_ROWS:
            self._flush()

    def _flush(self) -> None:
        if self._batches:
            self.writer.write_table(self.pa.Table.from_batches(self._batches),
                                    row_group_size=ROW_GROUP_ROWS)
            self._batches, self._buffered = [], 0

    def close(self) -> None:
        if self.writer is None:
            return
        self._flush()
        self.writer.close()
        with open(self.path, "rb+") as f:
            os.fsync(f.fileno())


PARTS = {"csv": CsvPart, "parquet": ParquetPart}


def temp_name(final: str) -> str:
    d, base = os.path.split(final)
    return os.path.join(d, f".{base}.tmp-{os.getpid()}")


def remove_stale_temps(final: str) -> None:
    d, base = os.path.split(final)
    for p in glob.glob(os.path.join(glob.escape(d), f".{glob.escape(base)}.tmp-*")):
        try:
            pid = int(p.rsplit("-", 1)[1])
            os.kill(pid, 0)
            if pid != os.getpid():
                continue  # another live job writes it
        except (ValueError, ProcessLookupError):
            pass
        except PermissionError:
            continue
        os.unlink(p)


def publish(parts: list[str], fmt: str, cols: OutputColumns, final: str, meta: dict) -> None:
    """Merge the parts into a temporary file and rename it to ``final``."""
    remove_stale_temps(final)
    tmp = temp_name(final)
    try:
        if fmt == "csv":
            with open(tmp, "wb") as out:
                out.write((",".join(map(_quote, cols.header)) + "\n").encode())
                for p in parts:
                    with open(p, "rb") as f:
                        shutil.copyfileobj(f, out, 8 << 20)
                out.flush()
                os.fsync(out.fileno())
        else:
            _merge_parquet(parts, cols, tmp, meta)
        os.replace(tmp, final)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    fsync_dir(os.path.dirname(final) or ".")


def _merge_parquet(parts: list[str], cols: OutputColumns, tmp: str, meta: dict) -> None:
    pa, pq, _, _ = pyarrow_modules()
    files = [pq.ParquetFile(p) for p in parts]
    if files:
        schema = files[0].schema_arrow
    else:   # no rows: an empty file that still has the columns
        schema = pa.schema([(cols.header[0], pa.string())] +
                           [(n, pa.float32()) for n in cols.names] +
                           [("model_version", pa.string())] +
                           ([("data_version", pa.string())] if cols.data_version is not None
                            else []) +
                           [("scored_at", pa.timestamp("ms", tz="UTC"))])
    schema = schema.with_metadata({"ringserve": json.dumps(meta, sort_keys=True)})
    with pq.ParquetWriter(tmp, schema, **PARQUET_OPTIONS) as w:
        for f in files:
            for g in range(f.num_row_groups):
                w.write_table(f.read_row_group(g).replace_schema_metadata(schema.metadata))
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
