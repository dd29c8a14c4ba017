"""Reading a table in chunks: CSV (numpy, or pyarrow when installed) and
Parquet (pyarrow).

A reader yields ``Chunk``s: the ids of some rows and, per model input, an
array ``[rows, *shape]`` in the input's wire dtype (bfloat16 as its uint16
bits), ready to be copied once into a ring slot. Memory is bounded by the
chunk size, never by the table.

A chunk can say where the input stands after its first ``k`` rows
(``position_after``): a small JSON-able dict that ``chunks(start=...)``
resumes from. For CSV it is the byte offset (and line number) of the next
row, so a resume seeks instead of parsing again; for Parquet it is the row
count, found through the row-group index.

CSV is cut into blocks of whole lines (``BLOCK_BYTES``) read from the file;
a block is parsed by ``np.loadtxt`` or by ``pyarrow.csv`` (measured on the
demo table, 128 float32 columns, one core: numpy ~32k rows/s, pyarrow
~81k rows/s, so ``engine="auto"`` takes pyarrow when it is installed). A row
may not hold a newline inside a quoted field. Blank lines are skipped. When
a fast parser rejects a block, ``_locate`` walks it again with the csv
module to name the line, the column and the value.
"""

from __future__ import annotations

import csv
import io
import os
from dataclasses import dataclass
from typing import Iterator

import numpy as np

from ipc.tensors import NP_DTYPES, f32_to_bf16

from .columns import ColumnPlan

BLOCK_BYTES = 4 << 20          # CSV bytes parsed per chunk (~3.5k rows of the demo table)
PARQUET_BATCH_ROWS = 65536     # Parquet rows per chunk (measured: 2x the rows/s of 16384)


class InputError(ValueError):
    """The input table cannot be read or does not fit the model."""


def pyarrow_modules():
    """(pyarrow, pyarrow.parquet, pyarrow.csv, pyarrow.compute), or a clear error."""
    try:
        import pyarrow
        import pyarrow.compute
        import pyarrow.csv
        import pyarrow.parquet
    except ImportError:
        raise InputError("Parquet needs pyarrow: pip install 'ringserve[parquet]'") from None
    return pyarrow, pyarrow.parquet, pyarrow.csv, pyarrow.compute


@dataclass
class Chunk:
    ids: object                  # list, numpy array or pyarrow Array; one per row
    arrays: list[np.ndarray]     # per model input, [rows, *shape], wire dtype
    rows: int
    _where: object               # (reader, state) for position_after

    def position_after(self, k: int) -> dict:
        reader, state = self._where
        return reader.position_after(state, k)


# -- dtypes ---------------------------------------------------------------------

def parse_dtype(wire: str) -> np.dtype:
    """What a column is parsed as before it becomes the wire dtype: floats
    are parsed straight to float32/64 (correct rounding, no double rounding
    for float32), integers and bool as int64 and range-checked."""
    if wire == "float64":
        return np.dtype(np.float64)
    if wire in ("float32", "float16", "bfloat16"):
        return np.dtype(np.float32)
    return np.dtype(np.int64)


def to_wire(a: np.ndarray, wire: str, what) -> np.ndarray:
    """Parsed values -> the input's wire dtype; ``what(flat_index)`` names an
    element for the error message."""
    if wire in ("float32", "float64"):
        return a
    if wire == "float16":
        return a.astype(np.float16)
    if wire == "bfloat16":
        return f32_to_bf16(np.ascontiguousarray(a))
    lo, hi = ((0, 1) if wire == "bool"
              else (np.iinfo(NP_DTYPES[wire]).min, np.iinfo(NP_DTYPES[wire]).max))
    if a.size and (a.min() < lo or a.max() > hi):
        i = int(np.flatnonzero((a < lo) | (a > hi))[0])
        raise InputError(f"{what(i)} is {a.flat[i]}, out of range for {wire} ({lo}..{hi})")
    return a.astype(NP_DTYPES[wire])


class _Groups:
    """The plan's inputs grouped by parse dtype: one parse per group, then
    each input is a slice (or a gather) of its group's columns."""

    def __init__(self, plan: ColumnPlan):
        by: dict[np.dtype, list] = {}
        for k, inp in enumerate(plan.inputs):
            by.setdefault(parse_dtype(inp.decl.dtype), []).append(k)
        self.groups = []
        for dt, ks in by.items():
            cols = sorted({c for k in ks for c in plan.inputs[k].columns})
            pos = {c: i for i, c in enumerate(cols)}
            picks = []
            for k in ks:
                p = [pos[c] for c in plan.inputs[k].columns]
                contiguous = p == list(range(p[0], p[0] + len(p)))
                picks.append((k, slice(p[0], p[0] + len(p)) if contiguous else p))
            self.groups.append((dt, cols, picks))
        self.plan = plan

    def split(self, parsed: list[np.ndarray], rows: int, what) -> list[np.ndarray]:
        """``parsed[g]``: [rows, len(cols of g)] -> per-input wire arrays."""
        out: list = [None] * len(self.plan.inputs)
        for (_, _, picks), a in zip(self.groups, parsed, strict=True):
            for k, pick in picks:
                inp = self.plan.inputs[k]
                x = a[:, pick].reshape(rows, *inp.decl.shape)
                out[k] = to_wire(x, inp.decl.dtype, lambda i, inp=inp: what(inp, i))
        return out


# -- CSV ------------------------------------------------------------------------

class CsvReader:
    kind = "csv"

    def __init__(self, path: str, delimiter: str = ",", engine: str = "auto",
                 threads: bool = False, block_bytes: int = BLOCK_BYTES):
        self.path = path
        self.source = os.path.basename(path)
        self.delim = delimiter
        self.threads = threads
        self.block_bytes = block_bytes
        if engine == "auto":
            try:
                import pyarrow.csv  # noqa: F401
                engine = "pyarrow"
            except ImportError:
                engine = "numpy"
        if engine == "pyarrow":
            pyarrow_modules()
        elif engine != "numpy":
            raise InputError(f"unknown CSV engine {engine!r}; use auto, numpy or pyarrow")
        self.engine = engine
        try:
            self.size = os.path.getsize(path)
            with open(path, "rb") as f:
                first = f.readline()
        except OSError as e:
            raise InputError(f"cannot read {path}: {e.strerror or e}") from None
        self.data_start = len(first)
        text = first.decode("utf-8", "replace").lstrip("\ufeff").rstrip("\r\n")
        if not text.strip():
            raise InputError(f"{self.source}: the first line must be a header naming the columns")
        self.header = tuple(h.strip() for h in next(csv.reader([text], delimiter=delimiter)))
        self.plan: ColumnPlan | None = None

    def total_rows(self) -> int | None:
        return None

    def fraction(self, position: dict) -> float:
        span = self.size - self.data_start
        return (1.0 if span <= 0
                else (position.get("byte", self.data_start) - self.data_start) / span)

    def start_position(self) -> dict:
        return {"byte": self.data_start, "rows": 0}

    def position_after(self, state, k: int) -> dict:
        block, byte0, rows0, nrows = state
        if k == nrows:
            return {"byte": byte0 + len(block), "rows": rows0 + k}
        off, seen = 0, 0
        while seen < k:
            end = block.index(b"\n", off) + 1
            if block[off:end].strip():
                seen += 1
            off = end
        return {"byte": byte0 + off, "rows": rows0 + k}

    def _line_at(self, byte: int) -> int:
        """1-based line number of the line starting at ``byte`` (errors only)."""
        line, pos = 1, 0
        with open(self.path, "rb") as f:
            while pos < byte:
                data = f.read(min(8 << 20, byte - pos))
                if not data:
                    break
                line += data.count(b"\n")
                pos += len(data)
        return line

    def chunks(self, plan: ColumnPlan, start: dict | None = None) -> Iterator[Chunk]:
        self.plan = plan
        self._groups = _Groups(plan)
        if self.engine == "pyarrow":
            self._arrow_setup()
        pos = start or self.start_position()
        byte, rows = pos["byte"], pos["rows"]
        with open(self.path, "rb") as f:
            f.seek(byte)
            carry = b""
            while True:
                data = f.read(self.block_bytes)
                if not data:
                    block, carry = carry, b""
                else:
                    buf = carry + data if carry else data
                    cut = buf.rfind(b"\n") + 1
                    if cut == 0:
                        carry = buf    # a line longer than a block: read on
                        continue
                    block, carry = buf[:cut], buf[cut:]
                if not block:
                    return
                chunk = self._parse(block, byte, rows)
                if chunk.rows:
                    yield chunk
                byte += len(block)
                rows += chunk.rows
                if not data:
                    return

    def _parse(self, block: bytes, byte0: int, rows0: int) -> Chunk:
        try:
            ids, parsed, n = (self._arrow_block if self.engine == "pyarrow"
                              else self._numpy_block)(block)
        except InputError:
            raise
        except Exception as e:   # the parser's own complaint: find the cell ourselves
            raise self._locate(block, self._line_at(byte0), e) from None
        what = lambda inp, i: self._element(block, self._line_at(byte0), inp, i)  # noqa: E731
        arrays = self._groups.split(parsed, n, what)
        if ids is None:
            ids = np.arange(rows0, rows0 + n, dtype=np.int64)
        return Chunk(ids, arrays, n, (self, (block, byte0, rows0, n)))

    # numpy: one np.loadtxt per parse dtype; ids cut from the lines by hand
    def _numpy_block(self, block: bytes):
        parsed = []
        for dt, cols, _ in self._groups.groups:
            a = np.loadtxt(io.BytesIO(block), delimiter=self.delim, dtype=dt, comments=None,
                           usecols=cols, ndmin=2, quotechar='"')
            parsed.append(a)
        n = parsed[0].shape[0] if parsed else 0
        ids = None
        if self.plan.id_index is not None:
            ids = self._ids(block)
            if len(ids) != n:
                raise ValueError(f"found {len(ids)} ids for {n} rows")
        return ids, parsed, n

    def _ids(self, block: bytes) -> list[str]:
        k, d = self.plan.id_index, self.delim.encode()
        lines = [ln for ln in block.split(b"\n") if ln.strip()]
        if b'"' in block:
            rows = csv.reader((ln.decode("utf-8", "replace") for ln in lines), delimiter=self.delim)
            return [r[k].strip() for r in rows]
        return [ln.split(d, k + 1)[k].strip().decode("utf-8", "replace") for ln in lines]

    # pyarrow: one read_csv of the block with the used columns typed
    def _arrow_setup(self) -> None:
        pa, _, pcsv, pc = pyarrow_modules()
        plan = self.plan
        types = {}
        for dt, cols, _ in self._groups.groups:
            for c in cols:
                types[plan.header[c]] = pa.float64() if dt == np.float64 else \
                    pa.float32() if dt == np.float32 else pa.int64()
        include = [plan.header[c] for c in plan.used]
        if plan.id_index is not None:
            types[plan.header[plan.id_index]] = pa.string()
        self._pa = pa
        self._trim = pc.utf8_trim_whitespace
        self._read_csv = pcsv.read_csv
        self._ropts = pcsv.ReadOptions(column_names=list(plan.header), use_threads=self.threads)
        self._popts = pcsv.ParseOptions(delimiter=self.delim)
        self._copts = pcsv.ConvertOptions(column_types=types, include_columns=include,
                                          null_values=[], strings_can_be_null=False,
                                          quoted_strings_can_be_null=False)

    def _arrow_block(self, block: bytes):
        t = self._read_csv(self._pa.py_buffer(block), read_options=self._ropts,
                           parse_options=self._popts, convert_options=self._copts)
        n = t.num_rows
        h = self.plan.header
        parsed = []
        for _, cols, _ in self._groups.groups:
            parsed.append(np.stack([t.column(h[c]).to_numpy() for c in cols], axis=1))
        ids = None
        if self.plan.id_index is not None:
            ids = self._trim(t.column(h[self.plan.id_index]))
        return ids, parsed, n

    # errors
    def _rows(self, block: bytes, line0: int):
        """(line number, fields) of each non-blank line of a block."""
        text = block.decode("utf-8", "replace")
        for i, ln in enumerate(text.split("\n")):
            if ln.strip():
                yield line0 + i, next(csv.reader([ln.rstrip("\r")], delimiter=self.delim))

    def _element(self, block: bytes, line0: int, inp, i: int) -> str:
        row, col = divmod(i, inp.numel)
        for r, (line, _) in enumerate(self._rows(block, line0)):
            if r == row:
                return f"{self.source} line {line}, column {self.plan.header[inp.columns[col]]!r}"
        return f"{self.source}, input {inp.decl.name!r}"  # pragma: no cover

    def _locate(self, block: bytes, line0: int, err: Exception) -> InputError:
        plan = self.plan
        width = len(plan.header)
        for line, fields in self._rows(block, line0):
            if len(fields) != width:
                return InputError(f"{self.source} line {line}: {len(fields)} fields, but the "
                                  f"header names {width} columns")
            for inp in plan.inputs:
                conv = float if parse_dtype(inp.decl.dtype).kind == "f" else int
                for c in inp.columns:
                    v = fields[c].strip()
                    try:
                        conv(v)
                    except ValueError:
                        kind = "a number" if conv is float else "an integer"
                        shown = "empty" if not v else repr(v)
                        return InputError(
                            f"{self.source} line {line}, column {plan.header[c]!r}: {shown} is not "
                            f"{kind} (it feeds input {inp.decl.name!r}, {inp.decl.dtype})")
        last = line0 + block.count(b"\n")
        return InputError(f"{self.source} lines {line0}-{last}: cannot parse: {err}")


# -- Parquet --------------------------------------------------------------------

class ParquetReader:
    kind = "parquet"

    def __init__(self, path: str, threads: bool = False, batch_rows: int = PARQUET_BATCH_ROWS):
        pa, pq, _, pc = pyarrow_modules()
        self.threads = threads
        self._pa, self._pc = pa, pc
        self.path = path
        self.source = os.path.basename(path)
        self.batch_rows = batch_rows
        try:
            self.file = pq.ParquetFile(path, memory_map=True)
        except OSError as e:
            raise InputError(f"cannot read {path} as Parquet: {e}") from None
        except pa.ArrowException as e:
            raise InputError(f"{path} is not a Parquet file: {e}") from None
        self.schema = self.file.schema_arrow
        self.header = tuple(self.schema.names)
        self.size = os.path.getsize(path)
        self.plan: ColumnPlan | None = None

    def total_rows(self) -> int:
        return self.file.metadata.num_rows

    def fraction(self, position: dict) -> float:
        total = self.total_rows()
        return 1.0 if not total else position["rows"] / total

    def start_position(self) -> dict:
        return {"rows": 0}

    def position_after(self, state, k: int) -> dict:
        return {"rows": state + k}

    def _check_types(self, plan: ColumnPlan) -> None:
        types = self._pa.types
        for inp in plan.inputs:
            for c in inp.columns:
                t = self.schema.field(c).type
                if not (types.is_integer(t) or types.is_floating(t) or types.is_boolean(t)):
                    raise InputError(f"{self.source}: column {plan.header[c]!r} is {t}, not "
                                     f"numeric (it feeds input {inp.decl.name!r}, "
                                     f"{inp.decl.dtype})")

    def chunks(self, plan: ColumnPlan, start: dict | None = None) -> Iterator[Chunk]:
        self.plan = plan
        self._check_types(plan)
        pa, pc = self._pa, self._pc
        skip = (start or {}).get("rows", 0)
        meta = self.file.metadata
        first, row = 0, 0
        while first < meta.num_row_groups and row + meta.row_group(first).num_rows <= skip:
            row += meta.row_group(first).num_rows
            first += 1
        skip -= row
        names = [plan.header[c] for c in plan.used]
        groups = list(range(first, meta.num_row_groups))
        if not groups:
            return
        for batch in self.file.iter_batches(batch_size=self.batch_rows, row_groups=groups,
                                            columns=names, use_threads=self.threads):
            if skip:
                if skip >= batch.num_rows:
                    skip -= batch.num_rows
                    row += batch.num_rows
                    continue
                batch, row, skip = batch.slice(skip), row + skip, 0
            n = batch.num_rows
            arrays = []
            for inp in plan.inputs:
                wire = inp.decl.dtype
                target = pa.float64() if wire == "float64" else pa.float32() \
                    if parse_dtype(wire).kind == "f" else pa.int64()
                cols = []
                for c in inp.columns:
                    col = batch.column(plan.header[c])
                    name = plan.header[c]
                    if col.null_count:
                        i = int(np.flatnonzero(col.is_null().to_numpy(zero_copy_only=False))[0])
                        raise InputError(f"{self.source} row {row + i} (0-based), column "
                                         f"{name!r}: missing value (null)")
                    if col.type != target:
                        try:
                            col = pc.cast(col, target, safe=target != pa.float32())
                        except pa.ArrowInvalid as e:
                            raise InputError(f"{self.source} column {name!r}: cannot feed input "
                                             f"{inp.decl.name!r} ({wire}): {e}") from None
                    cols.append(col.to_numpy())
                # measured: one np.stack beats 128 strided column writes ~2x
                a = np.stack(cols, axis=1)
                what = lambda i, inp=inp, r0=row: (  # noqa: E731
                    f"{self.source} row {r0 + i // inp.numel} (0-based), column "
                    f"{plan.header[inp.columns[i % inp.numel]]!r}")
                arrays.append(to_wire(a, wire, what).reshape(n, *inp.decl.shape))
            if plan.id_index is not None:
                ids = batch.column(plan.header[plan.id_index])
            else:
                ids = np.arange(row, row + n, dtype=np.int64)
            yield Chunk(ids, arrays, n, (self, row))
            row += n


def open_reader(path: str, fmt: str | None = None, *, delimiter: str = ",",
                engine: str = "auto", threads: bool = False):
    """``threads``: let pyarrow parse with its thread pool (worth it only
    where cores are left over after the workers' torch threads)."""
    fmt = fmt or input_format(path)
    if not os.path.isfile(path):
        raise InputError(f"input {path} does not exist or is not a file")
    if fmt == "csv":
        return CsvReader(path, delimiter, engine, threads)
    if fmt == "parquet":
        return ParquetReader(path, threads)
    raise InputError(f"unknown input format {fmt!r}; use csv or parquet")


def input_format(path: str) -> str:
    ext = os.path.splitext(path)[1].lower()
    if ext in (".parquet", ".pq"):
        return "parquet"
    if ext in (".csv", ".txt", ".tsv"):
        return "csv"
    raise InputError(f"cannot tell the format of {path} from its name; "
                     "pass --format csv or parquet")
