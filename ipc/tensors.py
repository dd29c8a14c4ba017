"""Tensors on the wire (protocol.md, "Tensors") and their validation.

A tensor travels as a msgpack map::

    {"dtype": str, "shape": [int, ...], "data": bin}

``data`` holds prod(shape) * itemsize bytes: the elements in C order, each
little-endian. bool is one byte, 0 or 1. bfloat16 is the upper 16 bits of the
IEEE float32 (sign, 8 exponent bits, 7 mantissa bits). A request may instead
send a plain (nested) msgpack array of numbers, cast here to the dtype the
model declares.

Types are exact, as msgpack gives them: a request's tensor map has exactly
the three keys (another key is refused by name, never ignored), ``dtype`` a
str, ``shape`` a list of ints (``128.0`` and ``True`` compare equal to ints
and are refused all the same), ``data`` bytes. The plain form holds ints
and floats; bools only for a bool input (which also takes 0 and 1), so that
``[1.0, True]`` is refused instead of read as ``[1.0, 1.0]``. Messages quote
what they name through ``ipc.status.brief``: a short prefix, however large
the value.

``decode_tensor``/``decode_inputs`` check one sample of a request against a
model's ``TensorSpec`` and return its raw bytes, ready to be copied into the
ring once; every complaint is an ``InvalidArgument`` whose message says what
to send instead. ``from_array``/``encode_tensor`` build the map,
``to_numpy``/``to_torch`` read it back.

This module must not import torch at import time (the front process never
loads it); torch is imported only when a torch tensor is handed in or asked
for, so bfloat16 is converted with numpy integer arithmetic here.
"""

from __future__ import annotations

import itertools
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from ipc.status import InvalidArgument, brief

if TYPE_CHECKING:
    from collections.abc import Iterable

    import torch
    from numpy.typing import NDArray

__all__ = [
    "DType", "DTYPES", "TensorSpec", "decode_tensor", "decode_inputs",
    "encode_tensor", "from_array", "to_numpy", "to_torch",
]

if sys.byteorder != "little":  # torch buffers and frombuffer views assume it
    raise ImportError("ipc.tensors supports little-endian hosts only")


@dataclass(frozen=True)
class DType:
    name: str
    itemsize: int
    is_float: bool
    numpy_name: str | None   # None for bfloat16: numpy has no such dtype


DTYPES: dict[str, DType] = {d.name: d for d in (
    DType("float32", 4, True, "float32"),
    DType("float16", 2, True, "float16"),
    DType("bfloat16", 2, True, None),
    DType("float64", 8, True, "float64"),
    DType("int64", 8, False, "int64"),
    DType("int32", 4, False, "int32"),
    DType("int16", 2, False, "int16"),
    DType("int8", 1, False, "int8"),
    DType("uint8", 1, False, "uint8"),
    DType("bool", 1, False, "bool"),
)}
_SUPPORTED = ", ".join(DTYPES)

# The numpy dtype that reads the wire bytes: explicitly little-endian, and
# for bfloat16 its bit pattern as uint16.
NP_DTYPES: dict[str, np.dtype[Any]] = {
    name: np.dtype(d.numpy_name or "uint16").newbyteorder("<") for name, d in DTYPES.items()}
_F32 = np.dtype("<f4")
_F64 = np.dtype("<f8")
_I64 = np.dtype("<i8")
_U8 = np.dtype("u1")
_U16 = np.dtype("<u2")
_U32 = np.dtype("<u4")

_frombuffer = np.frombuffer
_max = np.maximum.reduce
_np_isfinite = np.isfinite
_all_true = np.logical_and.reduce  # ndarray.all() goes through a Python-level wrapper


@dataclass(frozen=True)
class TensorSpec:
    """One sample of a model's input or output: dtype and shape, no batch dim."""

    dtype: str
    shape: tuple[int, ...]

    if TYPE_CHECKING:
        # Set by __post_init__, not dataclass fields: declared for the type checker only.
        @property
        def _numel(self) -> int: ...
        @property
        def _nbytes(self) -> int: ...
        @property
        def _shape_list(self) -> list[int]: ...

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"unknown dtype {brief(self.dtype)}; supported: {_SUPPORTED}")
        shape = tuple(self.shape)
        for d in shape:
            if type(d) is not int or d < 1:
                raise ValueError(f"shape {brief(list(shape))}: dimensions must be positive ints")
        object.__setattr__(self, "shape", shape)
        # Derived once: decode_tensor reads them on every request.
        numel = math.prod(shape)
        object.__setattr__(self, "_numel", numel)
        object.__setattr__(self, "_nbytes", numel * DTYPES[self.dtype].itemsize)
        object.__setattr__(self, "_shape_list", list(shape))  # what msgpack hands back

    @property
    def numel(self) -> int:
        return self._numel

    @property
    def nbytes(self) -> int:
        return self._nbytes

    def describe(self) -> str:
        return f"{self.dtype}[{', '.join(map(str, self.shape))}]"


def _as_spec(spec: object) -> TensorSpec:
    if type(spec) is not TensorSpec:
        raise TypeError(f"expected a TensorSpec, got {type(spec).__name__}")
    return spec


# --- decoding a request's tensors -------------------------------------------

_TENSOR_FORM = ('a tensor is {"dtype": str, "shape": [int...], "data": bin} '
                "or a plain (nested) list of numbers")


def decode_tensor(obj: object, spec: TensorSpec, where: str, defer_finite: bool = False) -> bytes:
    """Check one sample against ``spec``; return its raw bytes (spec.nbytes long).

    The binary form must be a map of exactly ``dtype`` (str), ``shape`` (an
    array of ints) and ``data`` (bin, i.e. ``bytes``: what msgpack gives for
    bin); it returns its ``data`` object itself (no copy). The list form
    returns new ``bytes``. Raises InvalidArgument, naming ``where``.
    ``defer_finite``: skip the NaN/Inf check of binary float16/32/64 data; the
    caller checks a whole batch at once with ``non_finite_rows`` (one numpy
    pass per batch instead of three numpy calls per request).
    """
    if type(spec) is not TensorSpec:
        spec = _as_spec(spec)
    if type(obj) is not dict:
        return _decode_list(obj, spec, where)
    if len(obj) != 3:   # a missing or an unknown key
        raise _bad_keys(obj, where)
    try:
        dtype = obj["dtype"]
        shape = obj["shape"]
        data = obj["data"]
    except KeyError:     # three keys, but not these three
        raise _bad_keys(obj, where) from None
    if dtype != spec.dtype:   # a str never equals a non-str
        raise _bad_dtype(dtype, spec, where)
    if shape != spec._shape_list and not (type(shape) is tuple and shape == spec.shape):
        raise _bad_shape(shape, spec, where)
    for d in shape:   # equal values, but 128.0 and True equal 128 and 1 too
        if type(d) is not int:
            raise _bad_shape(shape, spec, where)
    if type(data) is not bytes:
        raise InvalidArgument(f"{where}: data must be bin (raw bytes), got {_kind(data)}; "
                              "msgpack writers pack bytes as bin with use_bin_type=True")
    n = len(data)
    if n != spec._nbytes:
        d = DTYPES[spec.dtype]
        raise InvalidArgument(
            f"{where}: data holds {n} bytes, but {spec.describe()} needs {spec._nbytes} "
            f"({spec._numel} elements x {d.itemsize} bytes)")
    check = _CHECKS.get(dtype)
    if check is not None and not (defer_finite and check is _check_float):
        check(data, spec, where)
    return data


def _check_float(data: bytes, spec: TensorSpec, where: str) -> None:
    # isfinite rather than a cheaper-looking reduction (a sum, a dot with
    # zeros): those raise FP flags on Inf and overflow, which numpy turns
    # into RuntimeWarnings, and errstate to silence them costs more than it
    # saves. isfinite also beats integer views of the exponent bits (measured).
    a = _frombuffer(data, NP_DTYPES[spec.dtype])
    finite = _np_isfinite(a)
    if not _all_true(finite):
        i = int(np.flatnonzero(~finite)[0])
        raise _not_finite(i, float(a[i]), where)


DEFERRABLE = frozenset(("float16", "float32", "float64"))  # what ``defer_finite`` skips


def non_finite_rows(buf: bytes | bytearray | memoryview, dtype: str, rows: int,
                    row_elems: int) -> dict[int, tuple[int, float]]:
    """Rows among the first ``rows`` of ``buf`` (rows of ``row_elems``
    ``dtype`` elements) that hold NaN or Inf: {row: (flat index of its first
    bad element within the row, that value)}. Empty when all are finite: the
    common case costs one isfinite and one all over the batch."""
    a = _frombuffer(buf, NP_DTYPES[dtype], rows * row_elems)
    finite = _np_isfinite(a)
    if _all_true(finite):
        return {}
    bad: dict[int, tuple[int, float]] = {}
    for i in np.flatnonzero(~finite).tolist():
        r = i // row_elems
        if r not in bad:
            bad[r] = (i - r * row_elems, float(a[i]))
    return bad


def not_finite_error(index: int, value: float, where: str) -> InvalidArgument:
    return _not_finite(index, value, where)


def _check_bfloat16(data: bytes, spec: TensorSpec, where: str) -> None:
    # Exponent bits all ones is Inf or NaN.
    masked = _frombuffer(data, _U16) & 0x7F80
    if _max(masked) != 0x7F80:
        return
    i = int(np.flatnonzero(masked == 0x7F80)[0])
    raise _not_finite(i, float(bf16_to_f32(_frombuffer(data, _U16)[i:i + 1])[0]), where)


def _check_bool(data: bytes, spec: TensorSpec, where: str) -> None:
    # Other byte values would reach the model as undefined bools.
    u = _frombuffer(data, _U8)
    if _max(u) > 1:
        i = int(np.flatnonzero(u > 1)[0])
        raise InvalidArgument(f"{where}: bool data must hold bytes 0 or 1; "
                              f"the byte at flat index {i} is {int(u[i])}")


_CHECKS = {"float32": _check_float, "float64": _check_float, "float16": _check_float,
           "bfloat16": _check_bfloat16, "bool": _check_bool}


def _not_finite(i: int, value: float, where: str) -> InvalidArgument:
    return InvalidArgument(f"{where}: the element at flat index {i} is {value}; "
                           "NaN and infinity are not accepted, send finite numbers")


_KEYS = ("dtype", "shape", "data")


def _bad_keys(obj: dict[Any, Any], where: str) -> InvalidArgument:
    """A tensor map without exactly the keys dtype, shape and data."""
    missing = [k for k in _KEYS if k not in obj]
    unknown = [k for k in itertools.islice(obj, len(_KEYS) + _MOST) if k not in _KEYS]
    parts = []
    if missing:
        parts.append(f"is missing {_join(missing)}")
    if unknown:
        more = len(obj) - (len(_KEYS) - len(missing)) - len(unknown)
        parts.append(f"has unknown key{'s' if len(unknown) > 1 or more else ''} "
                     f"{_join(unknown, more=more)}")
    return InvalidArgument(f"{where}: tensor map {' and '.join(parts)}; {_TENSOR_FORM}")


def _bad_dtype(dtype: object, spec: TensorSpec, where: str) -> InvalidArgument:
    if type(dtype) is not str:
        return InvalidArgument(f"{where}: dtype must be a string, got {_kind(dtype)}; "
                               f"the model's input is {spec.describe()}")
    if dtype not in DTYPES:
        return InvalidArgument(f"{where}: unknown dtype {brief(dtype)}; supported dtypes are "
                               f"{_SUPPORTED}, and the model's input is {spec.describe()}")
    return InvalidArgument(
        f"{where}: dtype {dtype} does not match the model's input {spec.describe()}; "
        f"send {spec.dtype} data or a plain list of numbers")


def _bad_shape(shape: object, spec: TensorSpec, where: str) -> InvalidArgument:
    if type(shape) is not list and type(shape) is not tuple:
        return InvalidArgument(f"{where}: shape must be an array of non-negative integers, "
                               f"got {_kind(shape)}; the model's input is {spec.describe()}")
    for i, d in enumerate(shape):
        if type(d) is not int or d < 0:   # not a float like 128.0, nor a bool
            return InvalidArgument(
                f"{where}: shape must be an array of non-negative integers, but its element "
                f"{i} is {_kind(d)}; the model's input is {spec.describe()}")
    if len(shape) == len(spec.shape) + 1 and tuple(shape[1:]) == spec.shape:
        hint = ": drop the leading batch dimension"
    else:
        hint = " (no batch dimension)"
    return InvalidArgument(
        f"{where}: shape {brief(shape)} does not match the model's input {spec.describe()}; "
        f"send one sample of shape {list(spec.shape)}{hint}")


# --- the plain-list form ----------------------------------------------------

# Integer ranges, as Python ints; bool takes 0 and 1 (or False and True).
_INT_RANGE = {name: (int(np.iinfo(NP_DTYPES[name]).min), int(np.iinfo(NP_DTYPES[name]).max))
              for name, d in DTYPES.items() if not d.is_float and name != "bool"}
_INT_RANGE["bool"] = (0, 1)
_EXACT_IN_F64 = 2**53   # beyond it, ints that numpy turned into float64 lost digits


def _decode_list(obj: object, spec: TensorSpec, where: str) -> bytes:
    t = type(obj)
    if t is not list and t is not tuple and not (spec.shape == () and t in (int, float, bool)):
        raise InvalidArgument(f"{where}: expected a tensor, got {_kind(obj)}; {_TENSOR_FORM}")
    # The nesting and the leaves' types are checked here, before numpy sees
    # a value: numpy would read [1, True] as int64 [1, 1], "1.5" as a number
    # when told the dtype, and a string anywhere as a string array as wide
    # as the longest one times the number of leaves (a 200 KB frame of one
    # 2,000-character string and 100,000 short ones is 800 MB of memory).
    leaves, kinds, shape = _scan(obj, len(spec.shape) + 1)
    if leaves is None or kinds is None:   # None together
        raise InvalidArgument(f"{where}: the list is not a regular array of numbers (a level "
                              f"mixes lists with other values, or it nests deeper than "
                              f"{len(spec.shape) + 1}); send nested lists of shape "
                              f"{list(spec.shape)}")
    numbers = _BOOL_OK if spec.dtype == "bool" else _NUMBERS
    if not kinds <= numbers:
        _check_leaves(leaves, spec, where, numbers)   # raises, naming the first
    if shape != spec.shape:
        if shape is None:
            raise InvalidArgument(f"{where}: the list is not a regular array of numbers (its "
                                  f"rows differ in length); send nested lists of shape "
                                  f"{list(spec.shape)}")
        raise InvalidArgument(
            f"{where}: list of shape {list(shape)} does not match the model's input "
            f"{spec.describe()}; send one sample (no batch dimension)")

    a: NDArray[Any] | None
    if DTYPES[spec.dtype].is_float:   # ints and floats (no bools: refused above)
        try:
            a = _fromiter(leaves, _F64, len(leaves))
        except OverflowError:   # an int beyond float64
            i = next(i for i, v in enumerate(leaves) if abs(v) > sys.float_info.max)
            raise _out_of_range(i, leaves[i], spec, where) from None
        return _cast_float(a, spec, where)

    a = None
    if kinds == _INTS:   # the common case, without numpy's type discovery
        try:
            a = _fromiter(leaves, _I64, len(leaves))
        except OverflowError:   # beyond int64: numpy picks uint64 or objects
            pass
    if a is None:
        a = np.array(leaves)   # int64, uint64, float64, bool, or objects beyond 64 bits
    kind = a.dtype.kind
    if kind == "b":   # all booleans, for a bool input
        return a.tobytes()
    if kind not in "iuf":
        return _exact_ints(leaves, spec, where)
    if kind == "f":
        finite = _np_isfinite(a)
        if not _all_true(finite):
            i = int(np.flatnonzero(~finite)[0])
            raise _not_finite(i, float(a[i]), where)
        if _max(np.abs(a)) >= _EXACT_IN_F64:   # ints numpy turned into floats lost digits
            return _exact_ints(leaves, spec, where)
    return _cast_int(a, spec, where, kind)


_NUMBERS = frozenset((int, float))          # what a list may hold for a numeric input
_BOOL_OK = frozenset((int, float, bool))    # ... for a bool input (0/1, whole floats)
_SEQS = frozenset((list, tuple))            # msgpack arrays
_INTS = {int}
_fromiter = np.fromiter


def _scan(obj: object, limit: int) -> tuple[list[Any] | None, set[type] | None,
                                             tuple[int, ...] | None]:
    """(leaves in C order, the set of their types, shape) of a nested list.

    Goes down through levels of nothing but lists, one C-level pass a level
    (``set(map(type, ...))``, ``chain``; no recursion, no per-leaf Python
    code). ``shape`` is None when rows of one level differ in length; all
    three are None when a level mixes lists with other values or the list
    nests deeper than ``limit``.
    """
    if type(obj) is not list and type(obj) is not tuple:
        return [obj], {type(obj)}, ()   # a scalar sample
    items: Sequence[Any] = obj
    shape: list[int] | None = [len(obj)]
    for _ in range(limit):
        kinds = set(map(type, items))
        if kinds.isdisjoint(_SEQS):
            if type(items) is not list:
                items = list(items)
            return items, kinds, (tuple(shape) if shape is not None else None)
        if not kinds <= _SEQS:
            break
        if shape is not None:
            lens = set(map(len, items))
            shape = shape + [lens.pop()] if len(lens) == 1 else None
        items = list(_chain(items))
    return None, None, None


def _check_leaves(leaves: list[Any], spec: TensorSpec, where: str,
                  numbers: frozenset[type]) -> None:
    """InvalidArgument for the first leaf whose type is not one of ``numbers``."""
    for i, v in enumerate(leaves):
        if type(v) not in numbers:
            if type(v) is bool:
                raise InvalidArgument(
                    f"{where}: the element at flat index {i} is the boolean {v}; the model's "
                    f"input is {spec.describe()}: send numbers (only a bool input takes "
                    "booleans)")
            raise InvalidArgument(f"{where}: the element at flat index {i} is {_kind(v)}, "
                                  f"not a number; the model's input is {spec.describe()}")


_chain = itertools.chain.from_iterable


def _cast_float(a: NDArray[Any], spec: TensorSpec, where: str) -> bytes:
    """float64 values -> the float dtype's bytes; NaN/Inf and values beyond
    the dtype's range are refused (one finiteness pass, over the result)."""
    bf16 = spec.dtype == "bfloat16"
    if bf16:   # NaN must not reach the bit rounding, which can make it finite
        finite = _np_isfinite(a)
        if not _all_true(finite):
            i = int(np.flatnonzero(~finite)[0])
            raise _not_finite(i, float(a[i]), where)
    with np.errstate(over="ignore"):
        if bf16:
            # Through float32 first, as torch does for Python floats.
            out = f32_to_bf16(a.astype(_F32))
            finite = (out & 0x7F80) != 0x7F80
        else:
            out = a.astype(NP_DTYPES[spec.dtype])
            finite = _np_isfinite(out)
    if not _all_true(finite):
        i = int(np.flatnonzero(~finite)[0])
        v = float(a[i])
        if not math.isfinite(v):
            raise _not_finite(i, v, where)
        raise _out_of_range(i, v, spec, where)
    return out.tobytes()


def _cast_int(a: NDArray[Any], spec: TensorSpec, where: str, kind: str) -> bytes:
    """Ints, or floats below 2**53, to an integer (or bool) dtype, exactly."""
    if kind == "f":
        whole = a == np.trunc(a)
        if not whole.all():
            i = int(np.flatnonzero(~whole)[0])
            raise _not_integer(i, float(a.flat[i]), spec, where)
    lo, hi = _INT_RANGE[spec.dtype]
    # Compared as Python ints: numpy would compare uint64 with int64 in float64.
    if not (lo <= int(a.min()) and int(a.max()) <= hi):
        i = next(i for i, v in enumerate(a.flat) if not lo <= int(v) <= hi)
        raise _out_of_range(i, a.flat[i].item(), spec, where)
    return a.astype(NP_DTYPES[spec.dtype]).tobytes()


def _exact_ints(values: list[Any], spec: TensorSpec, where: str) -> bytes:
    """The slow, exact path for ints that numpy could not hold losslessly."""
    lo, hi = _INT_RANGE[spec.dtype]
    ints = []
    for i, v in enumerate(values):
        if type(v) is float:
            if not math.isfinite(v):
                raise _not_finite(i, v, where)
            if not v.is_integer():
                raise _not_integer(i, v, spec, where)
            v = int(v)
        if not lo <= v <= hi:
            raise _out_of_range(i, v, spec, where)
        ints.append(v)
    return np.array(ints, dtype=NP_DTYPES[spec.dtype]).tobytes()


def _not_integer(i: int, value: float, spec: TensorSpec, where: str) -> InvalidArgument:
    return InvalidArgument(f"{where}: the element at flat index {i} is {value}, not an "
                           f"integer; the model's input is {spec.describe()}")


def _out_of_range(i: int, value: object, spec: TensorSpec, where: str) -> InvalidArgument:
    d = spec.dtype
    if d in _INT_RANGE:
        lo, hi = _INT_RANGE[d]
        bounds = f"{d} holds {lo}..{hi}"
    else:
        bounds = f"{d} cannot represent it"
    return InvalidArgument(f"{where}: the element at flat index {i} is {brief(value)}, out of "
                           f"range for the model's input {spec.describe()} ({bounds})")


def f32_to_bf16(a: NDArray[Any]) -> NDArray[Any]:
    """float32 -> bfloat16 bits, rounding to nearest even (as torch does).

    NaN must not reach it (rounding could carry a NaN's payload into Inf);
    callers reject NaN first.
    """
    u = a.view(_U32)
    return ((u + (0x7FFF + ((u >> 16) & 1))) >> 16).astype(_U16)


def bf16_to_f32(u: NDArray[Any]) -> NDArray[Any]:
    """bfloat16 bits (uint16) -> float32, exactly."""
    return (u.astype(_U32) << 16).view(_F32)


# --- a request's `inputs` field -----------------------------------------------

_WHERE: dict[str, str] = {}   # name -> "inputs['name']", built once per declared name


def input_where(name: str) -> str:
    """How errors name the input ``name`` of a model with named inputs."""
    return _where(name)


def _where(name: str) -> str:
    w = _WHERE.get(name)
    if w is None:
        w = _WHERE[name] = f"inputs[{name!r}]"
    return w


def decode_inputs(obj: object, specs: tuple[tuple[str, TensorSpec], ...], single: bool,
                  defer_finite: bool = False) -> list[bytes]:
    """Validate a request's ``inputs``; return the raw bytes of each, in spec order.

    ``single``: the model declares one unnamed input, sent as a bare tensor
    (a map {name: tensor} with that one name is accepted too). Otherwise
    ``inputs`` is a map with exactly the declared names. ``defer_finite``:
    see ``decode_tensor``.
    """
    if single:
        name, spec = specs[0]
        if type(obj) is dict and not ("data" in obj and "dtype" in obj):
            if len(obj) == 1 and name in obj:
                return [decode_tensor(obj[name], spec, _where(name), defer_finite)]
            if not any(k in obj for k in ("dtype", "shape", "data")):
                raise InvalidArgument(
                    f"inputs: the model takes one input {spec.describe()}, sent as a tensor "
                    f"(or as {{{name!r}: tensor}}); got a map of {_keys(obj)}")
        return [decode_tensor(obj, spec, "inputs", defer_finite)]

    if type(obj) is not dict or ("data" in obj and "dtype" in obj):
        raise InvalidArgument(f"inputs: the model takes named inputs {_expected(specs)}; "
                              "send a map of name to tensor")
    if len(obj) != len(specs):
        raise _names_error(obj, specs)
    out = []
    for name, spec in specs:
        t = obj.get(name, _MISSING)
        if t is _MISSING:
            raise _names_error(obj, specs)
        out.append(decode_tensor(t, spec, _where(name), defer_finite))
    return out


_MISSING = object()


def _expected(specs: Sequence[tuple[str, object]], most: int = 6) -> str:
    shown = ", ".join(f"{name!r} {_as_spec(spec).describe()}" for name, spec in specs[:most])
    if len(specs) > most:
        shown += f" and {len(specs) - most} more (see the models op)"
    return shown


def _keys(obj: dict[Any, Any]) -> str:
    """A peer's map's keys, for a message: the first few, and how many more."""
    return _join(list(itertools.islice(obj, _MOST)), more=max(0, len(obj) - _MOST))


def _names_error(obj: dict[Any, Any], specs: Sequence[tuple[str, object]]) -> InvalidArgument:
    declared = [name for name, _ in specs]
    missing = [n for n in declared if n not in obj]
    unknown = list(itertools.islice((k for k in obj if k not in declared), _MOST))
    more = len(obj) - (len(declared) - len(missing)) - len(unknown)
    parts = []
    if missing:
        parts.append(f"missing {_join(missing)}")
    if unknown:
        parts.append(f"unknown {_join(unknown, more=more)}")
    return InvalidArgument(f"inputs: {'; '.join(parts)}; the model takes {_expected(specs)}")


# --- building and reading tensor maps -----------------------------------------

def encode_tensor(dtype: str, shape: Iterable[int],
                  data: bytes | bytearray | memoryview) -> dict[str, Any]:
    """The wire map. ``data`` (bytes, bytearray or a C-contiguous memoryview,
    e.g. a slice of shared memory) is kept as-is; msgpack packs it as bin."""
    d = DTYPES.get(dtype)
    if d is None:
        raise ValueError(f"unknown dtype {brief(dtype)}; supported: {_SUPPORTED}")
    shape = list(shape)
    n = data.nbytes if type(data) is memoryview else len(data)
    want = _numel(shape) * d.itemsize
    if n != want:
        raise ValueError(f"{n} bytes of data do not make a {dtype}{brief(shape)} tensor "
                         f"({_count(want)} bytes)")
    return {"dtype": dtype, "shape": shape, "data": data}


_NP_KIND = {("f", 4): "float32", ("f", 2): "float16", ("f", 8): "float64",
            ("i", 8): "int64", ("i", 4): "int32", ("i", 2): "int16", ("i", 1): "int8",
            ("u", 1): "uint8", ("b", 1): "bool"}


def from_array(x: object) -> dict[str, Any]:
    """A numpy array, CPU torch tensor, list or number -> wire map.

    The map's data is a memoryview of the array's own buffer when it is
    already C-contiguous little-endian (no copy); it keeps the array alive.
    """
    if type(x).__module__.startswith("torch"):
        return _from_torch(x)
    if not isinstance(x, np.ndarray):
        if not isinstance(x, (list, tuple, int, float, bool, np.generic)):
            raise TypeError(f"expected a numpy array, torch tensor or list, got "
                            f"{type(x).__name__}")
        x = np.asarray(x)
    dt = x.dtype
    name = _NP_KIND.get((dt.kind, dt.itemsize))
    if name is None:
        if dt.name != "bfloat16" or dt.itemsize != 2:   # ml_dtypes' bfloat16 is welcome
            raise ValueError(f"numpy dtype {dt} has no protocol dtype; supported: {_SUPPORTED}")
        name, x = "bfloat16", x.view(_U16)
    elif dt.byteorder == ">":
        x = x.astype(dt.newbyteorder("<"))
    if not x.flags.c_contiguous:
        x = np.ascontiguousarray(x)
    return {"dtype": name, "shape": list(x.shape), "data": _byte_view(x)}


def _byte_view(x: NDArray[Any]) -> memoryview:
    if x.size == 0:
        return memoryview(b"")   # memoryview.cast refuses zeros in the shape
    # x.data is memoryview(x); numpy declares no __buffer__ for Python < 3.12.
    return x.data.cast("B")


def _from_torch(x: object) -> dict[str, Any]:
    import torch

    if not isinstance(x, torch.Tensor):
        raise TypeError(f"expected a torch.Tensor, got {type(x).__name__}")
    if x.device.type != "cpu":
        raise ValueError(f"tensor is on {x.device}; move it to the CPU first (.cpu())")
    name = str(x.dtype).removeprefix("torch.")
    if name not in DTYPES:
        raise ValueError(f"torch dtype {x.dtype} has no protocol dtype; supported: {_SUPPORTED}")
    t = x.detach().resolve_conj().resolve_neg().contiguous()
    # numpy has no bfloat16: hand over its bits.
    a = t.view(torch.int16).numpy() if name == "bfloat16" else t.numpy()
    return {"dtype": name, "shape": list(t.shape), "data": _byte_view(a)}


def _parts(obj: object) -> tuple[str, list[int] | tuple[int, ...],
                                 bytes | bytearray | memoryview]:
    """Validated (dtype, shape, data) of a wire map read by to_numpy/to_torch."""
    if type(obj) is not dict:
        raise InvalidArgument(f"expected a tensor map, got {_kind(obj)}; {_TENSOR_FORM}")
    try:
        dtype, shape, data = obj["dtype"], obj["shape"], obj["data"]
    except KeyError:
        raise _bad_keys(obj, "tensor") from None
    d = DTYPES.get(dtype) if type(dtype) is str else None
    if d is None:
        raise InvalidArgument(f"tensor: unknown dtype {brief(dtype)}; supported: {_SUPPORTED}")
    if type(shape) not in (list, tuple) or any(type(s) is not int or s < 0 for s in shape):
        raise InvalidArgument(f"tensor: shape must be an array of non-negative integers, "
                              f"got {brief(shape)}")
    if len(shape) > _MAX_DIMS or _numel([s for s in shape if s]) > _HUGE:
        # numpy and torch cannot make such an array, even an empty one
        raise InvalidArgument(f"tensor: shape {brief(list(shape))} has more than {_MAX_DIMS} "
                              f"dimensions or more than {_HUGE} elements in its non-zero ones")
    if type(data) not in (bytes, bytearray, memoryview):
        raise InvalidArgument(f"tensor: data must be bin (raw bytes), got {_kind(data)}")
    n = data.nbytes if type(data) is memoryview else len(data)
    want = _numel(shape) * d.itemsize
    if n != want:
        raise InvalidArgument(f"tensor: data holds {n} bytes, but {dtype}{brief(list(shape))} "
                              f"needs {_count(want)}")
    return dtype, shape, data


def to_numpy(obj: object) -> NDArray[Any]:
    """Wire map -> numpy array viewing ``data`` (no copy; read-only for bytes).

    bfloat16, which numpy lacks, comes back upcast to float32 (exact, but a
    new array). Raises InvalidArgument for a malformed map.
    """
    dtype, shape, data = _parts(obj)
    if dtype == "bfloat16":
        return bf16_to_f32(_frombuffer(data, _U16)).reshape(shape)
    return _frombuffer(data, NP_DTYPES[dtype]).reshape(shape)


def to_torch(obj: object) -> torch.Tensor:
    """Wire map -> torch tensor of the same dtype, bfloat16 included.

    The bytes are copied once, into memory the tensor owns and may write:
    torch cannot honour a read-only buffer such as ``bytes``.
    """
    import torch

    dtype, shape, data = _parts(obj)
    tdtype = getattr(torch, dtype)
    if _numel(shape) == 0:   # frombuffer refuses an empty buffer
        return torch.empty(tuple(shape), dtype=tdtype)
    return torch.frombuffer(bytearray(data), dtype=tdtype).reshape(tuple(shape))


# --- message helpers -------------------------------------------------------------

# Error messages quote what they name through ``ipc.status.brief``: a short
# prefix, never the whole of a peer's 7 MiB string or 100k-element shape,
# and lists of names stop after _MOST of them.
_MOST = 3


def _join(names: Sequence[object], most: int = _MOST, more: int = 0) -> str:
    """Up to ``most`` of ``names``, each brief; ``more``: how many others
    were not even collected (beyond ``names``)."""
    shown = ", ".join(brief(n, 40) for n in names[:most])
    more += max(0, len(names) - most)
    return f"{shown} and {more} more" if more else shown


_HUGE = 1 << 62   # elements; past it no tensor is real and the exact count does not matter
_MAX_DIMS = 32     # numpy 1.x's limit (2.x has 64); no model's output comes near it


def _numel(shape: Iterable[int]) -> int:
    """prod(shape) of a list of non-negative ints, or _HUGE + 1 once it passes
    _HUGE: a peer's 100k-element shape must not cost seconds of bignum maths
    (nor make an int too long to print)."""
    if 0 in shape:
        return 0
    n = 1
    for d in shape:
        n *= d
        if n > _HUGE:
            return _HUGE + 1
    return n


def _count(n: int) -> str:
    return str(n) if n <= _HUGE else f"more than {_HUGE}"


def _kind(v: object) -> str:
    """What a wire value is, for messages ("the string 'abc'", "a map")."""
    t = type(v)
    if v is None:
        return "nil"
    if t is str or t is bool or t is int or t is float:
        return f"the {_TYPE_WORDS[t]} {brief(v)}"
    return _TYPE_WORDS.get(t) or f"a value of type {t.__name__}"


_TYPE_WORDS = {str: "string", bool: "boolean", int: "integer", float: "float",
               dict: "a map", list: "an array", tuple: "an array", bytes: "bin"}
