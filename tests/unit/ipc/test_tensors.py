"""Tensor encoding and validation against a model's declared inputs."""

from __future__ import annotations

import subprocess
import sys

import msgpack
import numpy as np
import pytest
import torch

from ipc.framing import FrameDecoder, encode_frame
from ipc.status import InvalidArgument, Status
from ipc.tensors import (
    DTYPES,
    TensorSpec,
    decode_inputs,
    decode_tensor,
    encode_tensor,
    from_array,
    to_numpy,
    to_torch,
)

# numpy's floating-point warnings must never leak out of validation.
pytestmark = pytest.mark.filterwarnings("error")

ALL = list(DTYPES)
FLOATS = [n for n, d in DTYPES.items() if d.is_float]
INTS = ["int64", "int32", "int16", "int8", "uint8"]
TORCH = {n: getattr(torch, n) for n in ALL}


def sample(dtype: str, shape=(2, 3)) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    if dtype == "bool":
        return torch.rand(shape, generator=g) > 0.5
    if DTYPES[dtype].is_float:
        return (torch.randn(shape, generator=g) * 100).to(TORCH[dtype])
    info = torch.iinfo(TORCH[dtype])
    return torch.randint(info.min, info.max, shape, generator=g, dtype=TORCH[dtype])


def wire(obj):
    """Through msgpack and back, as the server sees it."""
    return msgpack.unpackb(msgpack.packb(obj, use_bin_type=True), raw=False)


def reject(obj, spec, where="inputs") -> str:
    with pytest.raises(InvalidArgument) as ei:
        decode_tensor(obj, spec, where)
    assert ei.value.status == Status.INVALID_ARGUMENT
    assert not ei.value.fatal
    assert ei.value.message.startswith(where + ":")
    return ei.value.message


# --- tables and specs ------------------------------------------------------------

def test_dtype_table():
    assert ALL == ["float32", "float16", "bfloat16", "float64", "int64", "int32", "int16",
                   "int8", "uint8", "bool"]
    for name, d in DTYPES.items():
        assert d.name == name
        assert d.itemsize == torch.empty(0, dtype=TORCH[name]).element_size()
        assert d.is_float == TORCH[name].is_floating_point
        if name == "bfloat16":
            assert d.numpy_name is None
        else:
            assert np.dtype(d.numpy_name).itemsize == d.itemsize


def test_spec():
    s = TensorSpec("float32", (2, 64))
    assert (s.numel, s.nbytes, s.describe()) == (128, 512, "float32[2, 64]")
    assert TensorSpec("int64", [8]).shape == (8,)   # normalised to a tuple
    assert TensorSpec("int64", [8]) == TensorSpec("int64", (8,))
    assert hash(TensorSpec("int64", [8])) == hash(TensorSpec("int64", (8,)))
    assert TensorSpec("bool", ()).nbytes == 1
    for bad in [("float8", (1,)), ("float32", (0,)), ("float32", (-1,)), ("float32", (1.0,)),
                ("float32", (True,))]:
        with pytest.raises(ValueError):
            TensorSpec(*bad)


# --- round trips ---------------------------------------------------------------------

@pytest.mark.parametrize("dtype", ALL)
def test_round_trip_from_torch(dtype):
    t = sample(dtype)
    spec = TensorSpec(dtype, (2, 3))
    m = wire(from_array(t))
    assert m["dtype"] == dtype and m["shape"] == [2, 3]
    raw = decode_tensor(m, spec, "inputs")
    assert raw is m["data"]   # the binary form is returned, not copied
    assert len(raw) == spec.nbytes
    if dtype == "bfloat16":
        bits = t.view(torch.int16).numpy().view("<u2").ravel()
        assert np.array_equal(np.frombuffer(raw, "<u2"), bits)
    else:
        assert np.array_equal(np.frombuffer(raw, DTYPES[dtype].numpy_name).reshape(2, 3), t.numpy())
    back = to_torch(m)
    assert back.dtype == t.dtype and torch.equal(back, t)
    back[0, 0] = back[0, 1]   # writable, owns its memory


@pytest.mark.parametrize("dtype", [n for n in ALL if n != "bfloat16"])
def test_round_trip_from_numpy(dtype):
    a = sample(dtype).numpy()
    m = from_array(a)
    assert isinstance(m["data"], memoryview)   # a view of the array, no copy
    assert np.shares_memory(np.frombuffer(m["data"], np.uint8), a)
    raw = decode_tensor(wire(m), TensorSpec(dtype, (2, 3)), "inputs")
    assert np.array_equal(np.frombuffer(raw, a.dtype).reshape(a.shape), a)
    assert np.array_equal(to_numpy(wire(m)), a)
    assert to_numpy(wire(m)).dtype == a.dtype


def test_from_array_fixes_layout_and_byte_order():
    a = np.arange(12, dtype=">i4").reshape(3, 4).T   # big-endian and not contiguous
    m = from_array(a)
    assert m["dtype"] == "int32" and m["shape"] == [4, 3]
    assert bytes(m["data"]) == np.ascontiguousarray(a, dtype="<i4").tobytes()
    t = torch.arange(12, dtype=torch.float32).reshape(3, 4).T
    assert bytes(from_array(t)["data"]) == t.contiguous().numpy().tobytes()


def test_from_array_torch_extras():
    t = torch.ones(3, requires_grad=True) * 2
    assert from_array(t)["dtype"] == "float32"
    assert from_array(torch.tensor(2.5, dtype=torch.bfloat16))["shape"] == []
    assert bytes(from_array(torch.empty(0, 4))["data"]) == b""
    with pytest.raises(ValueError, match="no protocol dtype"):
        from_array(torch.zeros(2, dtype=torch.complex64))
    with pytest.raises(ValueError, match="no protocol dtype"):
        from_array(np.zeros(2, dtype=np.uint32))
    with pytest.raises(TypeError):
        from_array("text")


def test_from_list_and_scalars():
    assert from_array([1.5, 2.5])["dtype"] == "float64"
    assert from_array([[1, 2]])["shape"] == [1, 2]
    assert from_array([True])["dtype"] == "bool"
    m = from_array(3)
    assert m["shape"] == [] and to_numpy(m) == 3


def test_bfloat16_to_numpy_is_float32():
    t = torch.tensor([1.5, -2.25, 3.0e38, 1e-40], dtype=torch.bfloat16)
    a = to_numpy(wire(from_array(t)))
    assert a.dtype == np.float32
    assert np.array_equal(a, t.float().numpy())


def test_to_numpy_is_zero_copy():
    data = np.arange(4, dtype="<f4").tobytes()
    a = to_numpy({"dtype": "float32", "shape": [2, 2], "data": data})
    assert np.shares_memory(a, np.frombuffer(data, np.uint8))


def test_to_numpy_and_to_torch_check_the_map():
    for bad in [{"dtype": "float32", "shape": [2]},
                {"dtype": "float99", "shape": [1], "data": b"1234"},
                {"dtype": "float32", "shape": [3], "data": b"12345678"},
                {"dtype": "float32", "shape": "3", "data": b"123456789012"},
                [1.0, 2.0]]:
        for f in (to_numpy, to_torch):
            with pytest.raises(InvalidArgument):
                f(bad)
    assert to_torch({"dtype": "int8", "shape": [0, 3], "data": b""}).shape == (0, 3)


def test_encode_tensor_keeps_memoryview():
    shm = bytearray(64)
    view = memoryview(shm)[8:16]
    m = encode_tensor("float32", (2,), view)
    assert m == {"dtype": "float32", "shape": [2], "data": view} and m["data"] is view
    shm[8:16] = np.array([1.0, 2.0], "<f4").tobytes()
    (got,) = FrameDecoder().feed(encode_frame({"id": 1, "outputs": m}))
    assert to_numpy(got["outputs"]).tolist() == [1.0, 2.0]
    with pytest.raises(ValueError):
        encode_tensor("float32", (3,), view)
    with pytest.raises(ValueError):
        encode_tensor("complex64", (1,), view)


# --- the list form -----------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [n for n in ALL if n != "bool"])
def test_list_cast_matches_torch(dtype):
    if DTYPES[dtype].is_float:
        values = [[0.0, 1.0, -2.0], [3.0, 100.0, -7.0]]
    elif dtype != "uint8":
        values = [[0, 1, -2], [3, 100, -7]]
    else:
        values = [[0, 1, 2], [3, 100, 255]]
    raw = decode_tensor(values, TensorSpec(dtype, (2, 3)), "inputs")
    want = torch.tensor(values).to(TORCH[dtype])
    assert raw == want.view(torch.uint8).numpy().tobytes()


def test_list_bfloat16_rounding_matches_torch():
    # Ties, carries into the exponent, subnormals, and values that need
    # float32 rounding first, compared bit for bit with torch.
    g = torch.Generator().manual_seed(1)
    ties = [1.0 + 2**-8, 1.0 + 3 * 2**-8, -(1.0 + 2**-8), 1.0 + 2**-8 + 2**-20]
    edge = [0.0, -0.0, 1e-40, -1e-40, 3.3895e38, 65504.0, 1.00390625, 2**-133, 255.5, 0.1]
    rnd = (torch.randn(200, generator=g) * torch.logspace(-30, 30, 200)).tolist()
    values = ties + edge + rnd
    raw = decode_tensor(values, TensorSpec("bfloat16", (len(values),)), "inputs")
    want = torch.tensor(values).to(torch.bfloat16)
    assert raw == want.view(torch.int16).numpy().tobytes()


def test_list_bfloat16_from_ints_matches_torch():
    values = [0, 1, 257, 65535, -300, 2**40 + 1]
    raw = decode_tensor(values, TensorSpec("bfloat16", (6,)), "inputs")
    want = torch.tensor(values, dtype=torch.float32).to(torch.bfloat16)
    assert raw == want.view(torch.int16).numpy().tobytes()


def test_list_bool():
    spec = TensorSpec("bool", (4,))
    assert decode_tensor([True, False, True, True], spec, "inputs") == b"\x01\x00\x01\x01"
    assert decode_tensor([1, 0, 0, 1], spec, "inputs") == b"\x01\x00\x00\x01"
    msg = reject([1, 0, 2, 1], spec)
    assert "index 2" in msg and "0..1" in msg


def test_list_ints_accept_whole_floats_only():
    spec = TensorSpec("int64", (3,))
    assert decode_tensor([1.0, 2, -3.0], spec, "inputs") == np.array([1, 2, -3], "<i8").tobytes()
    msg = reject([1, 2.5, 3], spec)
    assert "index 1" in msg and "2.5" in msg and "not an integer" in msg


@pytest.mark.parametrize("dtype", INTS)
def test_list_integer_overflow(dtype):
    info = np.iinfo(dtype)
    spec = TensorSpec(dtype, (3,))
    assert np.array_equal(np.frombuffer(decode_tensor([int(info.min), 0, int(info.max)], spec, "x"),
                                        dtype), [info.min, 0, info.max])
    for bad, idx in [([0, int(info.max) + 1, 0], 1), ([0, 0, int(info.min) - 1], 2)]:
        msg = reject(bad, spec, "x")
        assert f"index {idx}" in msg and str(bad[idx]) in msg and "out of range" in msg
        assert f"{info.min}..{info.max}" in msg


def test_list_beyond_64_bits():
    spec = TensorSpec("int64", (2,))
    msg = reject([1, 2**70], spec)
    assert "index 1" in msg and str(2**70) in msg
    msg = reject([-1, 2**63], spec)
    assert "index 1" in msg and str(2**63) in msg
    assert reject([2**64 + 1, 1], TensorSpec("uint8", (2,)))
    # Mixed floats and big ints become float64 in numpy: the exact path keeps digits.
    big = 2**62 + 1
    assert decode_tensor([1.0, big], spec, "inputs") == np.array([1, big], "<i8").tobytes()
    # ...and for floats they are simply numbers.
    out = decode_tensor([1.5, 2**70], TensorSpec("float64", (2,)), "inputs")
    assert np.frombuffer(out, "<f8").tolist() == [1.5, float(2**70)]
    assert "out of range" in reject([1.5, 10**400], TensorSpec("float64", (2,)))


def test_list_float_out_of_range():
    msg = reject([1.0, 1e300], TensorSpec("float32", (2,)))
    assert "index 1" in msg and "out of range" in msg
    assert "index 0" in reject([70000.0, 1.0], TensorSpec("float16", (2,)))
    assert "index 1" in reject([1.0, 3.5e38], TensorSpec("bfloat16", (2,)))


@pytest.mark.parametrize("dtype", FLOATS + INTS + ["bool"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_list_rejects_non_finite(dtype, bad):
    msg = reject([0.0, 1.0, bad], TensorSpec(dtype, (3,)))
    assert "index 2" in msg


def test_list_shape_and_content_errors():
    spec = TensorSpec("float32", (2, 2))
    assert "[2, 2]" in reject([[1.0, 2.0], [3.0]], spec)           # ragged
    msg = reject([1.0, 2.0, 3.0, 4.0], spec)                       # flat instead of nested
    assert "[4]" in msg and "float32[2, 2]" in msg
    assert "batch" in reject([[[1.0, 2.0], [3.0, 4.0]]], spec)
    msg = reject([[1.0, "2"], [3.0, 4.0]], spec)
    assert "index 1" in msg and "string" in msg
    msg = reject([[1.0, 2.0], [None, 4.0]], spec)
    assert "index 2" in msg and "nil" in msg
    msg = reject([[1.0, 2.0], [3.0, {"a": 1}]], spec)
    assert "index 3" in msg and "map" in msg
    assert "booleans" in reject([[True, False], [True, True]], spec)
    assert "booleans" in reject([True, False], TensorSpec("int8", (2,)))
    assert "index 0" in reject([b"ab", b"cd"], TensorSpec("uint8", (2,)))


def test_scalar_spec():
    spec = TensorSpec("float32", ())
    assert decode_tensor(2.5, spec, "inputs") == np.float32(2.5).tobytes()
    assert decode_tensor({"dtype": "float32", "shape": [], "data": b"\x00" * 4}, spec, "i")


def test_not_a_tensor():
    spec = TensorSpec("float32", (2,))
    for obj, word in [("abc", "string"), (3, "integer"), (None, "nil"), (b"xx", "bin")]:
        msg = reject(obj, spec)
        assert word in msg and "list of numbers" in msg


# --- the binary form: what is wrong, said precisely -----------------------------

SPEC = TensorSpec("float32", (128,))
GOOD = {"dtype": "float32", "shape": [128], "data": bytes(512)}


def test_binary_ok_forms():
    assert decode_tensor(GOOD, SPEC, "inputs") is GOOD["data"]
    assert decode_tensor({**GOOD, "shape": (128,)}, SPEC, "inputs") is GOOD["data"]
    assert decode_tensor(wire(GOOD), SPEC, "inputs") == GOOD["data"]


def test_binary_fields_have_their_exact_msgpack_types():
    """dtype a str, shape an array of ints (no 128.0, no True), data bin:
    values that merely compare equal are refused, naming the field."""
    for shape, word in [([128.0], "float 128.0"), ([True], "boolean True"),
                        ((128.0,), "float 128.0"), ("128", "string '128'"),
                        ({"0": 128}, "map"), ([[128]], "array")]:
        msg = reject({**GOOD, "shape": shape}, SPEC)
        assert "shape must be an array of non-negative integers" in msg and word in msg
    one = TensorSpec("float32", (1, 4))
    msg = reject({"dtype": "float32", "shape": [True, 4], "data": bytes(16)}, one)
    assert "element 0 is the boolean True" in msg
    # only bin: msgpack gives bytes for bin; str, arrays, bytearray, memoryview are refused
    for data in (bytearray(512), memoryview(bytes(512)), "\x00" * 512, [0] * 512, 512):
        msg = reject({**GOOD, "data": data}, SPEC)
        assert "data must be bin" in msg
    for dtype in (b"float32", ["float32"], 1, None, True):
        msg = reject({**GOOD, "dtype": dtype}, SPEC)
        assert "dtype must be a string" in msg


def test_binary_unknown_keys_are_refused_by_name():
    msg = reject({**GOOD, "order": "F"}, SPEC)
    assert "has unknown key 'order'" in msg and "missing" not in msg
    msg = reject({"dtype": "float32", "shape": [128], "dat": bytes(512)}, SPEC)
    assert "missing 'data'" in msg and "unknown key 'dat'" in msg
    many = {**GOOD, **{f"k{i}": i for i in range(100)}}
    msg = reject(many, SPEC)
    assert "unknown keys 'k0', 'k1', 'k2' and 97 more" in msg
    # through decode_inputs too, for a single input sent bare
    msg = reject_inputs({**F4, "byteorder": "<"}, ONE, True)
    assert msg.startswith("inputs:") and "'byteorder'" in msg
    msg = reject_inputs({"ids": {**I2, "x": 1}, "dense": F4}, TWO, False)
    assert msg.startswith("inputs['ids']:") and "'x'" in msg


def test_wrong_dtype():
    msg = reject({**GOOD, "dtype": "float64", "data": bytes(1024)}, SPEC)
    assert msg == ("inputs: dtype float64 does not match the model's input float32[128]; "
                   "send float32 data or a plain list of numbers")


def test_unknown_dtype_lists_supported():
    msg = reject({**GOOD, "dtype": "float8"}, SPEC)
    assert "'float8'" in msg and all(n in msg for n in ALL)
    assert "string" in reject({**GOOD, "dtype": 4}, SPEC)


def test_wrong_shape():
    msg = reject({**GOOD, "shape": [64, 2]}, SPEC)
    assert "[64, 2]" in msg and "float32[128]" in msg and "no batch dimension" in msg
    msg = reject({**GOOD, "shape": [1, 128]}, SPEC)
    assert "drop the leading batch dimension" in msg
    assert "integers" in reject({**GOOD, "shape": "128"}, SPEC)
    assert "integers" in reject({**GOOD, "shape": [-128]}, SPEC)


def test_wrong_size():
    msg = reject({**GOOD, "data": bytes(510)}, SPEC, "inputs['x']")
    assert msg.startswith("inputs['x']: ")
    assert "510" in msg and "512" in msg and "128" in msg


def test_data_not_bin():
    msg = reject({**GOOD, "data": "\x00" * 512}, SPEC)
    assert "bin" in msg and "use_bin_type" in msg
    assert "array" in reject({**GOOD, "data": [0.0] * 128}, SPEC)


@pytest.mark.parametrize("drop", [("dtype",), ("shape",), ("data",), ("shape", "data")])
def test_missing_keys_named(drop):
    msg = reject({k: v for k, v in GOOD.items() if k not in drop}, SPEC)
    for k in drop:
        assert repr(k) in msg
    for k in {"dtype", "shape", "data"} - set(drop):
        assert repr(k) not in msg.split(";")[0]


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("n", [1, 7, 16, 33, 128, 1000])
def test_binary_rejects_non_finite(dtype, n):
    spec = TensorSpec(dtype, (n,))
    ok = torch.linspace(-100, 100, n).to(TORCH[dtype])
    assert decode_tensor(wire(from_array(ok)), spec, "inputs")
    for pos in sorted({0, n // 2, n - 1}):
        for bad in (float("nan"), float("inf"), float("-inf")):
            t = ok.clone()
            t[pos] = bad
            msg = reject(wire(from_array(t)), spec)
            assert f"flat index {pos} " in msg
            assert ("nan" if bad != bad else "inf") in msg


def test_binary_non_finite_reports_the_first():
    t = torch.zeros(2, 4)
    t[1, 3] = float("nan")
    t[1, 1] = float("inf")
    assert "flat index 5 " in reject(wire(from_array(t)), TensorSpec("float32", (2, 4)))


def test_binary_large_finite_values_pass():
    # Finite values whose sum would overflow are still fine.
    for dtype in FLOATS:
        t = torch.full((64,), torch.finfo(TORCH[dtype]).max, dtype=TORCH[dtype])
        assert decode_tensor(wire(from_array(t)), TensorSpec(dtype, (64,)), "inputs")


def test_binary_bool_bytes_must_be_0_or_1():
    spec = TensorSpec("bool", (3,))
    assert decode_tensor({"dtype": "bool", "shape": [3], "data": b"\x00\x01\x01"}, spec, "i")
    msg = reject({"dtype": "bool", "shape": [3], "data": b"\x00\x01\x02"}, spec)
    assert "index 2" in msg


# --- a request's inputs ----------------------------------------------------------------

ONE = (("input", TensorSpec("float32", (4,))),)
TWO = (("ids", TensorSpec("int64", (2,))), ("dense", TensorSpec("float32", (4,))))
F4 = {"dtype": "float32", "shape": [4], "data": bytes(16)}
I2 = {"dtype": "int64", "shape": [2], "data": bytes(16)}


def reject_inputs(obj, specs, single) -> str:
    with pytest.raises(InvalidArgument) as ei:
        decode_inputs(obj, specs, single)
    return ei.value.message


def test_single_input_forms():
    assert decode_inputs(F4, ONE, True) == [F4["data"]]
    want = np.arange(1, 5, dtype="<f4").tobytes()
    assert decode_inputs([1.0, 2.0, 3.0, 4.0], ONE, True) == [want]
    assert decode_inputs({"input": F4}, ONE, True) == [F4["data"]]
    msg = reject_inputs({"input": {**F4, "shape": [5]}}, ONE, True)
    assert msg.startswith("inputs['input']:")
    msg = reject_inputs({**F4, "shape": [5]}, ONE, True)
    assert msg.startswith("inputs:")


def test_single_input_wrong_name_or_incomplete_tensor():
    msg = reject_inputs({"x": F4}, ONE, True)
    assert "'x'" in msg and "'input'" in msg and "float32[4]" in msg
    msg = reject_inputs({"shape": [4], "data": bytes(16)}, ONE, True)
    assert "'dtype'" in msg


def test_named_inputs():
    got = decode_inputs({"dense": F4, "ids": I2}, TWO, False)
    assert got[0] is I2["data"] and got[1] is F4["data"]   # spec order, not map order
    got = decode_inputs({"ids": [1, 2], "dense": [0.5] * 4}, TWO, False)
    assert got[0] == np.array([1, 2], "<i8").tobytes()


def test_named_inputs_missing_and_unknown():
    msg = reject_inputs({"ids": I2}, TWO, False)
    assert "missing 'dense'" in msg and "'ids' int64[2]" in msg and "'dense' float32[4]" in msg
    msg = reject_inputs({"ids": I2, "dense": F4, "extra": F4}, TWO, False)
    assert "unknown 'extra'" in msg and "missing" not in msg
    msg = reject_inputs({"ids": I2, "dens": F4}, TWO, False)
    assert "missing 'dense'" in msg and "unknown 'dens'" in msg


def test_named_inputs_need_a_map():
    for obj in (F4, [1.0, 2.0], "x"):
        msg = reject_inputs(obj, TWO, False)
        assert "map of name to tensor" in msg and "'ids'" in msg


def test_named_input_error_names_the_input():
    msg = reject_inputs({"ids": [1, 2**63], "dense": F4}, TWO, False)
    assert msg.startswith("inputs['ids']:") and "index 1" in msg


def test_specs_must_be_tensor_specs():
    class Shape:   # a look-alike is local misuse, not a peer error
        def __init__(self, dtype, shape):
            self.dtype, self.shape = dtype, shape
    with pytest.raises(TypeError, match="expected a TensorSpec"):
        decode_inputs(F4, (("input", Shape("float32", (4,))),), True)


def test_module_does_not_import_torch():
    code = "import sys, ipc.tensors, ipc.framing; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0


# --- booleans in the list form ---------------------------------------------------------------

@pytest.mark.parametrize("dtype", FLOATS + INTS)
@pytest.mark.parametrize("n", [3, 300])   # below and above the numpy pre-check
def test_list_booleans_among_numbers_are_refused_for_numeric_inputs(dtype, n):
    spec = TensorSpec(dtype, (n,))
    values = [2] * n
    assert decode_tensor(values, spec, "inputs")
    for pos, b in [(0, True), (n - 1, False), (n // 2, True)]:
        bad = list(values)
        bad[pos] = b
        msg = reject(bad, spec)   # numpy alone would read it as 1 or 0
        assert f"flat index {pos} is the boolean {b}" in msg and "only a bool input" in msg
    floats = [2.5 if DTYPES[dtype].is_float else 2.0] * (n - 1) + [True]
    assert f"flat index {n - 1} is the boolean True" in reject(floats, spec)


def test_list_booleans_nested_and_beyond_64_bits():
    spec = TensorSpec("int64", (2, 2))
    assert "flat index 3 is the boolean False" in reject([[1, 2], [3, False]], spec)
    # numpy makes objects of a big int: the slow path refuses the bool too
    msg = reject([2**70, True], TensorSpec("int64", (2,)))
    assert "flat index 1 is the boolean True" in msg
    msg = reject([2**70, True], TensorSpec("float64", (2,)))
    assert "flat index 1 is the boolean True" in msg
    big = TensorSpec("float32", (2, 200))   # 400 leaves, nested: the pre-check, then the scan
    rows = [[0.5] * 200, [0.5] * 199 + [True]]
    assert "flat index 399 is the boolean True" in reject(rows, big)
    rows = [[1.0] * 200, [0.0] * 200]       # 0s and 1s that are numbers pass the scan
    assert decode_tensor(rows, big, "inputs")


def test_list_bool_input_takes_booleans_and_0_1():
    spec = TensorSpec("bool", (3,))
    assert decode_tensor([True, 1, 0], spec, "inputs") == b"\x01\x01\x00"
    assert decode_tensor([True, False, True], spec, "inputs") == b"\x01\x00\x01"
    assert decode_tensor([1.0, 0.0, 1], spec, "inputs") == b"\x01\x00\x01"
    assert "index 1" in reject([True, 0.5, 0], spec)


# --- messages stay short, however large what they quote -----------------------------------

HUGE_STR = "x" * (7 << 20)         # 7 MiB
HUGE_SHAPE = list(range(100_000))


def short(e: InvalidArgument) -> str:
    frame = encode_frame(e.answer())
    assert len(frame) < 512, (len(frame), e.message[:600])
    return e.message


def refusal(fn, *args) -> str:
    with pytest.raises(InvalidArgument) as ei:
        fn(*args)
    return short(ei.value)


@pytest.mark.parametrize("field, value", [
    ("dtype", HUGE_STR), ("dtype", [HUGE_STR] * 1000), ("dtype", {HUGE_STR: HUGE_STR}),
    ("shape", HUGE_SHAPE), ("shape", HUGE_SHAPE[1:] + [0.5]), ("shape", HUGE_STR),
    ("shape", [[[[[[[1]]]]]]] * 1000), ("shape", [HUGE_STR]),
    ("data", HUGE_STR), ("data", bytes(7 << 20)), ("data", [HUGE_STR] * 100),
    (HUGE_STR, 1),
])
def test_binary_errors_are_short_for_huge_fields(field, value):
    obj = {**GOOD, field: value}
    msg = refusal(decode_tensor, obj, SPEC, "inputs")
    assert msg.startswith("inputs: ")


def test_missing_and_unknown_keys_errors_are_short():
    many = {f"{HUGE_STR[:1000]}{i}": 0 for i in range(1000)}
    refusal(decode_tensor, {**GOOD, **many}, SPEC, "inputs")
    refusal(decode_tensor, many, SPEC, "inputs")
    refusal(decode_inputs, many, ONE, True)
    refusal(decode_inputs, {**many, "ids": I2, "dense": F4}, TWO, False)
    refusal(decode_inputs, {HUGE_STR: F4, "ids": I2}, TWO, False)
    refusal(decode_inputs, {"input": {**F4, HUGE_STR: 1}}, ONE, True)


@pytest.mark.parametrize("value", [
    [HUGE_STR] * 4, [1.0, 2.0, 3.0, HUGE_STR], [1.0] * 100_000, [[1.0] * 4] * 10_000,
    [1.0, 2.0, 3.0, {HUGE_STR: HUGE_STR}], [1.0, 2.0, 3.0, [HUGE_STR] * 3], HUGE_STR,
    [1.0, 2.0, 3.0, 10**300], [1.0, 2.0, 3.0, -(2**64 - 1)], [[1.0] * 1000, [1.0]] * 100,
])
def test_list_errors_are_short_for_huge_inputs(value):
    refusal(decode_tensor, value, TensorSpec("float16", (4,)), "inputs")
    refusal(decode_tensor, value, TensorSpec("int8", (4,)), "inputs")


def test_reading_a_huge_malformed_answer_tensor_is_short():
    for obj in ({"dtype": HUGE_STR, "shape": [1], "data": b"x"},
                {"dtype": "uint8", "shape": HUGE_SHAPE[1:], "data": b"x"},
                {"dtype": "uint8", "shape": [HUGE_STR], "data": b"x"},
                {"dtype": "uint8", "shape": [1], "data": HUGE_STR},
                {HUGE_STR: 1}, [HUGE_STR]):
        refusal(to_numpy, obj)


@pytest.mark.parametrize("shape", [[2**64, 0], [2**63 - 1, 0], [2**62, 2**62, 0], [1] * 70])
def test_reading_a_shape_no_array_can_have_is_refused(shape):
    """An answer's shape with zero elements (so the byte count matches) that
    numpy or torch still cannot make: refused, not their own exception."""
    obj = {"dtype": "uint8", "shape": shape, "data": b"" if 0 in shape else b"\x00"}
    for read in (to_numpy, to_torch):
        assert "dimensions or more than" in refusal(read, obj)


def test_list_nested_whole_floats_for_an_int_input():
    """A 2-D list of floats for an integer input: the range check on the
    values reduced one axis only and raised numpy's ValueError (INTERNAL)."""
    spec = TensorSpec("int32", (2, 2))
    assert decode_tensor([[2.0, 3.0], [4.0, -5.0]], spec, "inputs") == \
        np.array([2, 3, 4, -5], "<i4").tobytes()
    assert "index 3" in reject([[2.0, 3.0], [4.0, 2.0**60]], spec)
    assert "not an integer" in reject([[2.0, 3.0], [4.5, 1.0]], spec)


def test_list_of_strings_is_refused_before_numpy_sizes_a_string_array():
    """numpy would make one 2,000-wide string cell per leaf: 800 MB for this
    200 KB of msgpack. The leaves' types are checked first."""
    import tracemalloc
    obj = ["x" * 2000] + ["a"] * 100_000
    tracemalloc.start()
    try:
        msg = reject(obj, TensorSpec("float32", (100_001,)))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert "flat index 0 is the string 'xxx" in msg
    assert peak < 20 << 20, peak
