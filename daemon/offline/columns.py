"""Which table columns feed which model input.

A model input of shape ``[128]`` takes 128 columns, one per element; a shape
``[4, 8]`` takes 32, in C order. The mapping is written per input as
``NAME=SPEC`` (``--columns input=f0:f127``), where SPEC is a comma-separated
list of items, each one column name or a range ``f0:f127`` (the same prefix
on both ends, numeric suffixes, both ends included, zero padding kept:
``x000:x127``). Without a mapping, an input whose model metadata lists its
``features`` (daemon/workers/metadata.py) takes those columns, in that order; else a
model with one input takes every column except the id column, in table
order, when their number is right.

``plan_columns`` checks everything against the table's header and raises
``ColumnError`` with a message that says what to write instead. Pure Python,
no I/O.
"""

from __future__ import annotations

import difflib
import math
import re
from dataclasses import dataclass

from daemon.workers.spec import TensorDecl

_RANGE = re.compile(r"^(.*?)(\d+)$")


class ColumnError(ValueError):
    """The columns cannot feed the model as asked."""


@dataclass(frozen=True)
class InputColumns:
    decl: TensorDecl
    columns: tuple[int, ...]     # indices into the header, len == numel

    @property
    def numel(self) -> int:
        return math.prod(self.decl.shape)


@dataclass(frozen=True)
class ColumnPlan:
    header: tuple[str, ...]
    inputs: tuple[InputColumns, ...]       # in the model's input order
    id_index: int | None                    # None: the row number is the id
    id_name: str                            # the id column's name in the output

    @property
    def used(self) -> tuple[int, ...]:
        """Every column read, sorted: the id column and the inputs' columns."""
        cols = {c for i in self.inputs for c in i.columns}
        if self.id_index is not None:
            cols.add(self.id_index)
        return tuple(sorted(cols))


def expand(spec: str) -> list[str]:
    """``"a, f0:f2,b"`` -> ``["a", "f0", "f1", "f2", "b"]``."""
    out: list[str] = []
    for item in spec.split(","):
        item = item.strip()
        if not item:
            raise ColumnError(f"empty column name in {spec!r}")
        if ":" in item:
            lo, _, hi = item.partition(":")
            m_lo, m_hi = _RANGE.match(lo.strip()), _RANGE.match(hi.strip())
            if not (m_lo and m_hi) or m_lo.group(1) != m_hi.group(1):
                raise ColumnError(f"{item!r} is not a column range: write FIRST:LAST with the "
                                  "same prefix and numeric suffixes, like f0:f127")
            prefix, a, b = m_lo.group(1), m_lo.group(2), m_hi.group(2)
            if int(b) < int(a):
                raise ColumnError(f"column range {item!r} runs backwards")
            width = len(a) if len(a) == len(b) and a.startswith("0") else 0
            out.extend(f"{prefix}{i:0{width}d}" for i in range(int(a), int(b) + 1))
        else:
            out.append(item)
    return out


def parse_mapping(items) -> dict[str, str]:
    """``["input=f0:f127", ...]`` (flags) or a dict (job file) -> {input: spec}."""
    if isinstance(items, dict):
        return {str(k): str(v) for k, v in items.items()}
    out = {}
    for item in items or ():
        name, eq, spec = item.partition("=")
        if not eq or not name.strip() or not spec.strip():
            raise ColumnError(f"--columns {item!r}: write INPUT=COLUMNS, like input=f0:f127")
        if name.strip() in out:
            raise ColumnError(f"--columns names input {name.strip()!r} twice")
        out[name.strip()] = spec.strip()
    return out


def _describe(decl: TensorDecl) -> str:
    return f"{decl.name!r} ({decl.dtype}{list(decl.shape)})"


def _unknown(name: str, header, source: str) -> ColumnError:
    near = difflib.get_close_matches(name, header, n=3)
    hint = f"; did you mean {', '.join(map(repr, near))}?" if near else ""
    shown = ", ".join(header[:12]) + (f", ... ({len(header)} columns)" if len(header) > 12 else "")
    return ColumnError(f"{source} has no column {name!r}{hint} (its columns: {shown})")


def plan_columns(header, inputs: list[TensorDecl], mapping: dict[str, str],
                 id_column: str | None, source: str = "the table", *,
                 features: dict[str, tuple[str, ...]] | None = None,
                 features_from: str = "the model's metadata") -> ColumnPlan:
    """``features``: input name -> its column names from the model's
    metadata (``features_from`` names the file in messages), the default of
    an input that ``mapping`` does not name."""
    features = features or {}
    header = tuple(header)
    index = {}
    for i, name in enumerate(header):
        index.setdefault(name, i)
    if len(index) != len(header):
        dup = sorted({n for n in header if header.count(n) > 1})
        raise ColumnError(f"{source} has duplicate column names: {', '.join(map(repr, dup))}")
    id_index = None
    if id_column is not None:
        if id_column not in index:
            raise _unknown(id_column, header, source)
        id_index = index[id_column]
    names = {d.name for d in inputs}
    for k in mapping:
        if k not in names:
            raise ColumnError(f"the model has no input {k!r}; its inputs: "
                              f"{', '.join(_describe(d) for d in inputs)}")
    planned = []
    for decl in inputs:
        need = math.prod(decl.shape)
        if decl.name in mapping:
            cols = expand(mapping[decl.name])
            for c in cols:
                if c not in index:
                    raise _unknown(c, header, source)
            how = f"--columns {decl.name}={mapping[decl.name]}"
        elif decl.name in features:
            cols = list(features[decl.name])
            for c in cols:
                if c not in index:
                    raise ColumnError(f"{_unknown(c, header, source)}; the features of input "
                                      f"{decl.name!r} come from {features_from}: map the input "
                                      f"with --columns {decl.name}=... to read other columns")
            how = f"the features of {features_from}"
        elif len(inputs) == 1:
            cols = [c for c in header if c != id_column]
            how = "the table's columns" + (f" other than the id column {id_column!r}"
                                           if id_column else "")
        else:
            raise ColumnError(f"map every input to columns: --columns {decl.name}=FIRST:LAST "
                              f"(the model takes {', '.join(_describe(d) for d in inputs)})")
        if len(cols) != need:
            hint = ""
            if decl.name not in mapping:
                hint = f"; choose them with --columns {decl.name}=FIRST:LAST"
                if id_column is None and len(cols) == need + 1:
                    hint += f", or name the id column with --id-column {header[0]!r}"
            raise ColumnError(f"input {_describe(decl)} takes {need} columns; {how} "
                              f"give{'s' if len(cols) == 1 else ''} {len(cols)}{hint}")
        planned.append(InputColumns(decl, tuple(index[c] for c in cols)))
    return ColumnPlan(header, tuple(planned), id_index, id_column or "row")
