"""Property-based fuzz of what reads untrusted input: the frame decoder, the
tensor decoder and the config loader.

For every input: either a normal result or the module's own error
(``ProtocolError`` with a status, ``ConfigError`` with a source and a key
path), never another exception; and never more work or memory than the
input's size justifies. Work is counted, not timed: the Python lines the
call executes (``sys.settrace``), against a linear bound in the input's
size. Memory is tracemalloc's peak during the call, against a linear bound
too (Python objects cost up to ~70 bytes per byte of msgpack that makes
them: a 1-byte ``{}`` is a 64-byte dict). A bug that allocates what a
header claims, or rescans its buffer on every byte, breaks one bound or the
other on a few hundred bytes of input.

Seeded (``derandomize``) and bounded (``max_examples``), so a CI run is the
same run every time and takes seconds; failures that the fuzz found are
kept as explicit tests at the end of this file.
"""

from __future__ import annotations

import math
import os
import struct
import sys
import tomllib
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st

from daemon.config import ConfigError, load_config, parse_config
from ipc.framing import FrameDecoder, encode_frame
from ipc.status import ProtocolError, Status
from ipc.tensors import DTYPES, TensorSpec, decode_inputs, to_numpy, to_torch

REPO = Path(__file__).resolve().parents[3]

# By hand, a longer hunt: RINGSERVE_FUZZ_EXAMPLES=5000, and RINGSERVE_FUZZ_RANDOM=1
# for other inputs than CI's (hypothesis prints the seed of a failure, for
# --hypothesis-seed). CI runs the fixed, short one.
FUZZ = settings(derandomize=not os.environ.get("RINGSERVE_FUZZ_RANDOM"), database=None,
                deadline=None,
                max_examples=int(os.environ.get("RINGSERVE_FUZZ_EXAMPLES", "150")),
                # no "explain" phase: it traces lines itself, and so does Cost below
                phases=[Phase.explicit, Phase.generate, Phase.shrink],
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.filter_too_much])

# Bounds: lines executed <= LINES_FIXED + LINES_PER_BYTE * size, peak bytes
# <= MEM_FIXED + MEM_PER_BYTE * size (size: bytes of input).
LINES_FIXED, LINES_PER_BYTE = 20_000, 60
MEM_FIXED, MEM_PER_BYTE = 1 << 20, 256


class Cost:
    """Runs ``fn`` counting the Python lines it executes and the peak of
    the memory it holds; keeps its result or the exception it raised."""

    def __init__(self, fn, *args, **kwargs):
        lines = 0

        def local(frame, event, arg):
            nonlocal lines
            if event == "line":
                lines += 1
            return local

        def tracer(frame, event, arg):
            return local

        self.result = self.error = None
        old = sys.gettrace()
        started = not tracemalloc.is_tracing()
        if started:
            tracemalloc.start()
        base = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        sys.settrace(tracer)
        try:
            self.result = fn(*args, **kwargs)
        except Exception as e:   # judged by the caller
            self.error = e
        finally:
            sys.settrace(old)
            self.peak = tracemalloc.get_traced_memory()[1] - base
            if started:
                tracemalloc.stop()
        self.lines = lines

    def within(self, size: int, lines_per_byte: int = LINES_PER_BYTE,
               mem_per_byte: int = MEM_PER_BYTE) -> None:
        assert self.lines <= LINES_FIXED + lines_per_byte * size, \
            f"{self.lines} lines for {size} bytes of input"
        assert self.peak <= MEM_FIXED + mem_per_byte * size, \
            f"peak {self.peak} bytes of memory for {size} bytes of input"


def check_protocol_error(e: BaseException) -> None:
    """A ProtocolError as the server answers it: a status, a message, an id."""
    assert isinstance(e, ProtocolError), f"{type(e).__name__}: {e}"
    assert isinstance(e.status, Status) and e.status != Status.OK
    assert isinstance(e.message, str) and e.message
    assert type(e.req_id) is int and 0 <= e.req_id < 2**64
    a = e.answer()
    assert a["status"] == int(e.status) and a["error"] == e.message


# --- values and frames ----------------------------------------------------------

scalars = st.one_of(
    st.none(), st.booleans(),
    st.integers(min_value=-2**63, max_value=2**64 - 1),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20), st.binary(max_size=40))
values = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=6),
                            st.dictionaries(st.text(max_size=8), inner, max_size=6)),
    max_leaves=30)
requests = st.fixed_dictionaries(
    {"id": st.integers(0, 2**53)},
    optional={"op": st.sampled_from(["infer", "health", "stats", "models", "feedback", "x"]),
              "model": st.text(max_size=10), "key": st.text(max_size=10),
              "deadline_ms": st.integers(-5, 2**40), "inputs": values, "extra": values})


def msgpack_headers() -> st.SearchStrategy[bytes]:
    """A msgpack str/bin/array/map/ext header that claims a length (up to
    2**32 - 1) the bytes after it may not hold: the claim must not be
    allocated before it is checked."""
    return st.builds(
        lambda tag, n, tail: tag + struct.pack(">I", n) + tail,
        st.sampled_from([b"\xdb", b"\xc6", b"\xdd", b"\xdf", b"\xc9\x01"]),
        st.one_of(st.integers(0, 64), st.integers(0, 2**32 - 1), st.just(2**32 - 1)),
        st.binary(max_size=16))


@st.composite
def byte_streams(draw) -> bytes:
    """Frames as a stream: valid ones, mutated ones, lying lengths, noise."""
    parts = []
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["valid", "mutated", "truncated", "header", "noise",
                                     "lying_length"]))
        if kind == "noise":
            parts.append(draw(st.binary(max_size=64)))
            continue
        if kind == "header":   # a frame whose body is a lying msgpack header
            body = draw(msgpack_headers())
            parts.append(struct.pack(">I", len(body)) + body)
            continue
        frame = bytearray(encode_frame(draw(requests)))
        if kind == "mutated":
            for _ in range(draw(st.integers(1, 4))):
                i = draw(st.integers(0, len(frame) - 1))
                op = draw(st.sampled_from(["flip", "delete", "insert"]))
                if op == "flip":
                    frame[i] = draw(st.integers(0, 255))
                elif op == "delete" and len(frame) > 1:
                    del frame[i]
                else:
                    frame[i:i] = draw(st.binary(min_size=1, max_size=4))
        elif kind == "truncated":
            frame = frame[:draw(st.integers(0, len(frame) - 1))]
        elif kind == "lying_length":
            frame[:4] = struct.pack(">I", draw(st.integers(0, 2**32 - 1)))
        parts.append(bytes(frame))
    return b"".join(parts)


def split(data: bytes, how, draw_cuts) -> list[bytes]:
    if how == "whole":
        return [data]
    if how == "bytes":
        return [data[i:i + 1] for i in range(len(data))]
    cuts = sorted(set(draw_cuts))
    return [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]


def decode_all(chunks: list[bytes], max_frame_bytes: int) -> list:
    dec = FrameDecoder(max_frame_bytes)
    out = []
    for c in chunks:
        out += dec.feed(c)
    return out


def comparable(items: list) -> list:
    """Items as the peer would see them: maps (NaN made comparable), or
    (error class, status, id, fatal, message)."""
    return [_canon(x) if isinstance(x, dict) else (type(x), x.status, x.req_id, x.fatal, x.message)
            for x in items]


def _canon(v):
    if isinstance(v, float) and math.isnan(v):
        return ("NaN",)
    if isinstance(v, dict):
        return {k: _canon(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_canon(x) for x in v]
    return v


@FUZZ
@given(data=byte_streams(), max_frame=st.sampled_from([64, 4096, 8 << 20]),
       cuts=st.lists(st.integers(0, 4096), max_size=12))
@example(data=b"\x00\x00\x00\x05\xdd\x00\x0f\xff\xff", max_frame=8 << 20, cuts=[])
@example(data=b"\x00\x00\x00\x05\xdb\xff\xff\xff\xff", max_frame=8 << 20, cuts=[])
@example(data=b"\x00\x00\x00\x05\xdf\xff\xff\xff\xff", max_frame=8 << 20, cuts=[])
@example(data=b"\x00\x80\x00\x00" + b"\x80" * 10, max_frame=8 << 20, cuts=[2])
@example(data=b"\xff\xff\xff\xff garbage", max_frame=4096, cuts=[])
def test_frame_decoder_never_raises_and_chunking_does_not_matter(data, max_frame, cuts):
    cuts = [c for c in cuts if c < len(data)]
    results = {}
    for how in ("whole", "bytes", "chunks"):
        chunks = split(data, how, cuts)
        cost = Cost(decode_all, chunks, max_frame)
        assert cost.error is None, f"feed({how}) raised {cost.error!r} on {data!r}"
        # byte by byte calls feed once per byte: allow the calls themselves
        cost.within(len(data), lines_per_byte=LINES_PER_BYTE * (4 if how == "bytes" else 1))
        for item in cost.result:
            if isinstance(item, dict):
                assert all(type(k) is str for k in item)
            else:
                check_protocol_error(item)
        results[how] = comparable(cost.result)
    assert results["bytes"] == results["whole"] == results["chunks"]


@FUZZ
@given(msgs=st.lists(requests, min_size=1, max_size=5))
def test_valid_frames_come_back_as_sent_or_as_a_refusal(msgs):
    data = b"".join(encode_frame(m) for m in msgs)
    cost = Cost(decode_all, [data], 8 << 20)
    assert cost.error is None, repr(cost.error)
    cost.within(len(data))
    assert len(cost.result) == len(msgs)
    for got, sent in zip(cost.result, msgs, strict=True):
        if isinstance(got, dict):
            assert _canon(got) == _canon(sent)
        else:   # FrameLimits may refuse what msgpack could carry (nesting, sizes)
            check_protocol_error(got)
            assert got.status == Status.INVALID_ARGUMENT and not got.fatal


# --- tensors ----------------------------------------------------------------------

dtypes = st.sampled_from(sorted(DTYPES))
specs = st.builds(TensorSpec, dtypes, st.lists(st.integers(1, 5), max_size=3).map(tuple))
huge_ints = st.one_of(st.integers(-2**70, 2**70), st.sampled_from([0, -1, 2**31, 2**32, 2**63,
                                                                   2**64, 2**64 - 1]))
odd_values = st.one_of(values, huge_ints, st.floats(), st.sampled_from([True, False, None]))
shapes = st.one_of(
    st.lists(st.integers(0, 6), max_size=4),
    st.lists(huge_ints, max_size=40),            # huge dims, and more than numpy's 32/64
    st.lists(odd_values, max_size=4),            # floats, bools, None, maps as dims
    odd_values)


@st.composite
def tensor_maps(draw, spec: TensorSpec | None = None):
    """A tensor map, right for ``spec`` or wrong in any one way or several."""
    dtype = spec.dtype if spec is not None else draw(dtypes)
    shape = list(spec.shape) if spec is not None else draw(st.lists(st.integers(0, 4), max_size=3))
    n = math.prod(shape) * DTYPES[dtype].itemsize
    m = {"dtype": dtype, "shape": shape, "data": draw(st.binary(min_size=n, max_size=n))}
    for _ in range(draw(st.integers(0, 3))):
        how = draw(st.sampled_from(["dtype", "shape", "data_len", "data_type", "drop", "extra"]))
        if how == "dtype":
            m["dtype"] = draw(st.one_of(dtypes, odd_values))
        elif how == "shape":
            m["shape"] = draw(shapes)
        elif how == "data_len":   # a byte length that lies
            d = m["data"] if isinstance(m.get("data"), bytes) else b""
            m["data"] = draw(st.one_of(st.just(d[:-1]), st.just(d + b"\x00"),
                                       st.binary(max_size=64)))
        elif how == "data_type":
            m["data"] = draw(odd_values)
        elif how == "drop" and m:
            del m[draw(st.sampled_from(sorted(m)))]
        else:
            m[draw(st.text(max_size=6))] = draw(odd_values)
    return m


def nested_lists(spec: TensorSpec):
    """Plain-list inputs: the right shape or not, numbers or anything else."""
    leaf = st.one_of(st.integers(-2**70, 2**70), st.floats(), st.booleans(), odd_values)

    def of_shape(shape):
        if not shape:
            return leaf
        return st.lists(of_shape(shape[1:]), min_size=shape[0], max_size=shape[0])
    ragged = st.recursive(leaf, lambda inner: st.lists(inner, max_size=5), max_leaves=40)
    return st.one_of(of_shape(list(spec.shape)), ragged)


@st.composite
def inputs_cases(draw):
    named = draw(st.booleans())
    k = draw(st.integers(1, 3)) if named else 1
    names = draw(st.lists(st.text(min_size=1, max_size=6), min_size=k, max_size=k, unique=True))
    ss = tuple((name, draw(specs)) for name in names)

    def one(spec):
        return draw(st.one_of(tensor_maps(spec), tensor_maps(), nested_lists(spec), odd_values))
    if named:
        obj = {name: one(spec) for name, spec in ss}
        if draw(st.booleans()):
            obj = draw(st.one_of(odd_values, st.just({**obj, "dtype": "float32"}),
                                 st.just({k: v for k, v in list(obj.items())[1:]})))
    else:
        obj = one(ss[0][1])
        if draw(st.booleans()):
            obj = {ss[0][0]: obj}
    return obj, ss, not named


def wire_size(obj) -> int:
    """About the bytes msgpack takes for ``obj`` (ints past 64 bits, which
    msgpack cannot carry, counted by their length; tuples as arrays)."""
    if obj is None or isinstance(obj, bool):
        return 1
    if isinstance(obj, int):
        return 1 if -32 <= obj < 128 else max(9, (obj.bit_length() + 7) // 8 + 1)
    if isinstance(obj, float):
        return 9
    if isinstance(obj, (str, bytes, bytearray, memoryview)):
        n = len(obj) if not isinstance(obj, str) else len(obj.encode("utf-8", "surrogatepass"))
        return n + (1 if n < 32 else 5)
    if isinstance(obj, (list, tuple)):
        return 1 + sum(wire_size(x) for x in obj)
    if isinstance(obj, dict):
        return 1 + sum(wire_size(k) + wire_size(v) for k, v in obj.items())
    return len(repr(obj))


@FUZZ
@given(case=inputs_cases(), defer=st.booleans())
def test_decode_inputs_answers_bytes_or_invalid_argument(case, defer):
    obj, ss, single = case
    cost = Cost(decode_inputs, obj, ss, single, defer)
    if cost.error is not None:
        check_protocol_error(cost.error)
        assert cost.error.status == Status.INVALID_ARGUMENT
        assert len(cost.error.message) < 2000, "an error message that quotes too much"
    else:
        assert len(cost.result) == len(ss)
        for raw, (_, spec) in zip(cost.result, ss, strict=True):
            assert len(raw) == spec.nbytes
    cost.within(wire_size(obj))


@FUZZ
@given(obj=st.one_of(tensor_maps(), odd_values), reader=st.sampled_from(["numpy", "torch"]))
@example(obj={"dtype": "float32", "shape": [2**62, 2**62, 0], "data": b""}, reader="numpy")
@example(obj={"dtype": "uint8", "shape": [1] * 70, "data": b"\x00"}, reader="numpy")
def test_wire_tensor_to_array_answers_an_array_or_invalid_argument(obj, reader):
    cost = Cost(to_numpy if reader == "numpy" else to_torch, obj)
    if cost.error is not None:
        check_protocol_error(cost.error)
    else:
        a = cost.result
        assert list(a.shape) == list(obj["shape"])
        assert isinstance(a, np.ndarray if reader == "numpy" else torch.Tensor)
    cost.within(wire_size(obj))


# --- the config loader ------------------------------------------------------------------

def _sources() -> list[str]:
    texts = [(REPO / "configs/default.toml").read_text(),
             (REPO / "bench/configs/encoder.toml").read_text()]
    texts.append("""
[server]
host = "127.0.0.1"
deadline_ms = 250

[request_log]
enabled = true
dir = "logs"
key_secret = "pepper"

[[models]]
name = "m"
version = "1"
factory = "tests.models:two_x"
input = { dtype = "float32", shape = [3] }
threads = 1

[[models]]
name = "m"
version = "2"
factory = "tests.models:raises_on_magic"
inputs = { ids = { dtype = "int64", shape = [4] }, dense = { dtype = "float32", shape = [3] } }
max_batch = 8
buckets = [1, 4, 8]

[[rollouts]]
model = "m"
stable = "1"
candidate = "2"
salt = "ro"
stages = [0.1, 0.5, 1.0]

[[experiments]]
id = "e1"
model = "m"
salt = "e1"
arms = [{ name = "control", split = 0.5 }, { name = "treat", split = 0.5 }]

[[shadows]]
model = "m"
candidate = "2"
sample_rate = 0.5

[[guardrails]]
model = "m"
interval_s = 0.2
""")
    return texts


SOURCES = _sources()
toml_values = st.one_of(
    st.integers(-2**70, 2**70).map(str), st.floats().map(repr),
    st.sampled_from(["true", "false", "inf", "-inf", "nan", '""', "[]", "{}", "1979-05-27",
                     "07:32:00", '"daemon.workers.zoo:mlp_scorer"', '"cpu"', '["cpu", "cuda:0"]',
                     '"../x.pt"', '"~"', '"."', '"/nonexistent/file"', "[1, 2, 3]",
                     '{ dtype = "float32", shape = [128] }', "0.5", "-1", "4097", "0"]),
    st.text(max_size=12).map(lambda s: '"' + s.replace("\\", "\\\\").replace('"', '\\"')
                             .replace("\n", "\\n") + '"'),
    st.integers(1, 3000).map(lambda d: "[" * d + "]" * d),           # deep nesting
    st.integers(1, 3000).map(lambda d: "{a=" * d + "1" + "}" * d),
    st.integers(300, 4300).map(lambda n: "1" * n),                   # past the float range
    st.integers(4000, 6000).map(lambda n: "1" * n),                  # past int()'s 4300 digits
    st.integers(1, 6000).map(lambda n: "0x" + "f" * n))              # hex: no digit limit


@st.composite
def toml_texts(draw) -> str:
    lines = draw(st.sampled_from(SOURCES)).splitlines()
    for _ in range(draw(st.integers(0, 5))):
        if not lines:
            break
        i = draw(st.integers(0, len(lines) - 1))
        how = draw(st.sampled_from(["value", "delete", "dup", "key", "insert", "truncate",
                                    "bytes"]))
        line = lines[i]
        if how == "value" and "=" in line:
            lines[i] = line.split("=", 1)[0] + "= " + draw(toml_values)
        elif how == "delete":
            del lines[i]
        elif how == "dup":
            lines.insert(i, line)
        elif how == "key" and "=" in line:
            lines[i] = draw(st.from_regex(r"[a-z_]{1,12}", fullmatch=True)) + " =" + \
                line.split("=", 1)[1]
        elif how == "insert":
            lines.insert(i, draw(st.sampled_from(["[server]", "[[models]]", "[nope]", "[[x]]",
                                                  "a = 1", "[metrics]", "[auth]"])))
        elif how == "truncate":
            lines[i] = line[:draw(st.integers(0, len(line)))]
        else:
            lines[i] = draw(st.text(max_size=20))
    return "\n".join(lines) + "\n"


def check_config_error(e: BaseException, source: str) -> None:
    assert isinstance(e, ConfigError), f"{type(e).__name__}: {e}"
    assert str(e).startswith(source) and e.source == source
    assert e.key is None or isinstance(e.key, str)   # ('' names the key "" of a file)


@FUZZ
@given(text=toml_texts(), raw=st.booleans())
@example(text="a = " + "[" * 3000 + "]" * 3000 + "\n", raw=False)
@example(text="a = " + "{a=" * 3000 + "1" + "}" * 3000 + "\n", raw=False)
@example(text="[server]\nport = " + "1" * 5000 + "\n", raw=False)
@example(text="server = 0x" + "f" * 5000 + "\n", raw=False)
def test_load_config_answers_a_config_or_a_config_error(tmp_path_factory, text, raw):
    path = tmp_path_factory.mktemp("cfg") / "ringserve.toml"
    data = text.encode("utf-8", "surrogatepass")
    if raw:   # bytes that need not be UTF-8 at all
        data = data[: len(data) // 2] + b"\xff\xfe" + data[len(data) // 2:]
    path.write_bytes(data)
    cost = Cost(load_config, path)
    if cost.error is not None:
        check_config_error(cost.error, str(path))
    # The checks quote values in messages: allow the config's own size, plus
    # reading the demo model's module text is not part of it (nothing is imported).
    cost.within(len(data), lines_per_byte=200)


# TOML's integers have no size limit (hex ones not even int()'s 4300 digits)
config_values = st.one_of(odd_values, st.sampled_from([10**400, -10**400, 2**20000, 10**4000]),
                          st.lists(st.sampled_from([1, 2**64, 10**400]), min_size=1, max_size=5))


def _mutated_dicts(draw, doc):
    if isinstance(doc, dict) and doc and draw(st.booleans()):
        k = draw(st.sampled_from(sorted(doc)))
        doc = dict(doc)
        how = draw(st.sampled_from(["replace", "drop", "recurse", "add"]))
        if how == "replace":
            doc[k] = draw(config_values)
        elif how == "drop":
            del doc[k]
        elif how == "add":
            doc[draw(st.text(max_size=8))] = draw(config_values)
        else:
            doc[k] = _mutated_dicts(draw, doc[k])
    elif isinstance(doc, list) and doc and draw(st.booleans()):
        doc = list(doc)
        i = draw(st.integers(0, len(doc) - 1))
        doc[i] = _mutated_dicts(draw, doc[i]) if draw(st.booleans()) else draw(config_values)
    elif draw(st.integers(0, 9)) == 0:
        doc = draw(config_values)
    return doc


@st.composite
def config_dicts(draw):
    doc = tomllib.loads(draw(st.sampled_from(SOURCES)))
    for _ in range(draw(st.integers(1, 4))):
        doc = _mutated_dicts(draw, doc)
    return doc


@FUZZ
@given(doc=config_dicts())
@example(doc={"server": {"host": [[[[]]]] * 3}})
@example(doc={"models": [{"name": "m", "factory": "a:b", "input": {"dtype": "float32",
                                                                   "shape": [1] * 5000}}]})
def test_parse_config_answers_a_config_or_a_config_error(doc):
    cost = Cost(parse_config, doc, "<fuzz>")
    if cost.error is not None:
        check_config_error(cost.error, "<fuzz>")
    cost.within(wire_size(doc), lines_per_byte=200)


def _deep(depth: int):
    v: list = []
    for _ in range(depth):
        v = [v]
    return v


@pytest.mark.parametrize("depth", [50, 5000])
def test_parse_config_with_deeply_nested_values(depth):
    """parse_config's callers hand it any dict (tomllib's output, a test's,
    a reload's): a value nested deeper than the recursion limit is a
    ConfigError like any other wrong value."""
    with pytest.raises(ConfigError) as ei:
        parse_config({"server": {"host": _deep(depth)}}, "<deep>")
    check_config_error(ei.value, "<deep>")
    assert ei.value.key == "server.host"


# --- what the fuzz found, kept as plain tests ---------------------------------------------
#
# Each failed first as a fuzz example. The config ones are fixed in
# daemon/config.py; the tensor readers' (numpy's ValueError, torch's
# RuntimeError/TypeError escaping to_numpy/to_torch) by ipc/tensors.py's
# owner in fc31c6b, which refuses such shapes itself.

@pytest.mark.parametrize("depth", [600, 3000])
@pytest.mark.parametrize("kind", ["array", "inline table"])
def test_load_config_with_values_nested_too_deeply_for_tomllib(tmp_path, depth, kind):
    """tomllib recurses per level: at the daemon's recursion limit (1000, not
    the 2048 hypothesis runs under) 600 levels raised RecursionError."""
    value = "[" * depth + "]" * depth if kind == "array" else "{a=" * depth + "1" + "}" * depth
    path = tmp_path / "deep.toml"
    path.write_text(f"[server]\nhost = {value}\n")
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(1000)
    try:
        with pytest.raises(ConfigError) as ei:
            load_config(path)
    finally:
        sys.setrecursionlimit(limit)
    check_config_error(ei.value, str(path))
    assert "nested too deeply" in str(ei.value) or ei.value.key == "server.host"


def test_load_config_with_an_integer_of_5000_digits(tmp_path):
    """tomllib lets int() raise ValueError past 4300 decimal digits."""
    path = tmp_path / "big.toml"
    path.write_text("[server]\nport = " + "1" * 5000 + "\n")
    with pytest.raises(ConfigError) as ei:
        load_config(path)
    check_config_error(ei.value, str(path))
    assert "4300 digits" in str(ei.value) and "set_int_max_str_digits" not in str(ei.value)


def test_parse_config_quoting_a_huge_integer():
    """A 20,000-bit hex integer where a table belongs: repr() of it raised
    ValueError while the error message was being written."""
    with pytest.raises(ConfigError) as ei:
        parse_config({"server": 1 << 20000}, "<big>")
    check_config_error(ei.value, "<big>")
    assert "an integer of 20001 bits" in str(ei.value)


def test_parse_config_with_a_float_setting_past_the_float_range():
    """An integer of 400 digits for a float setting: math.isfinite raised
    OverflowError, which the loader did not turn into a ConfigError."""
    with pytest.raises(ConfigError) as ei:
        parse_config({"server": {"drain_timeout_s": 10**400}}, "<big>")
    check_config_error(ei.value, "<big>")
    assert ei.value.key == "server.drain_timeout_s"


@pytest.mark.parametrize("shape", [[10**1000] * 5, [2**20000], [2**62, 2**62]])
def test_parse_config_with_tensor_dimensions_thousands_of_digits_long(shape):
    """Sizes computed from such a shape overflowed float division
    (OverflowError) or int-to-text conversion (ValueError) while the ring
    slot's error message was being written."""
    doc = {"models": [{"name": "m", "factory": "a:b",
                       "input": {"dtype": "float32", "shape": shape}}]}
    with pytest.raises(ConfigError) as ei:
        parse_config(doc, "<big>")
    check_config_error(ei.value, "<big>")
    assert ei.value.key == 'models[0] ("m").input.shape'


UNHOLDABLE = [
    pytest.param({"dtype": "float32", "shape": [2**64, 0], "data": b""}, id="dim-past-uint64"),
    pytest.param({"dtype": "float32", "shape": [2**63 - 1, 0], "data": b""}, id="dim-2**63-1"),
    pytest.param({"dtype": "float32", "shape": [2**62, 2**62, 0], "data": b""},
                 id="product-past-2**63"),
    pytest.param({"dtype": "uint8", "shape": [1] * 70, "data": b"\x00"}, id="70-dims"),
]


@pytest.mark.parametrize("obj", UNHOLDABLE)
def test_to_numpy_refuses_shapes_numpy_cannot_make(obj):
    """ipc.tensors.to_numpy (a client reading an answer) checked that the
    shape's dimensions are non-negative ints and that the bytes match, then
    reshaped: numpy's ValueError escaped for these, not InvalidArgument."""
    with pytest.raises(ProtocolError):
        to_numpy(obj)


@pytest.mark.parametrize("obj", UNHOLDABLE)
def test_to_torch_refuses_shapes_torch_cannot_make(obj):
    """As to_numpy: torch.empty raised TypeError (a dim past int64) or
    RuntimeError (the storage size overflows) instead."""
    with pytest.raises(ProtocolError):
        to_torch(obj)
