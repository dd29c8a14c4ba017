"""The frame codec: splitting, limits, bad bodies, and the round trip."""

from __future__ import annotations

import struct

import msgpack
import numpy as np
import pytest

from ipc.framing import (
    DEFAULT_MAX_FRAME_BYTES,
    FrameDecoder,
    FrameLimits,
    encode_body,
    encode_frame,
)
from ipc.status import InvalidArgument, ResourceExhausted, Status


def raw_frame(body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + body


def req(i: int, **extra) -> dict:
    data = bytes([i % 256] * 3)
    tensor = {"dtype": "uint8", "shape": [3], "data": data}
    return {"id": i, "model": "m", "inputs": tensor, **extra}


def test_whole_frame():
    d = FrameDecoder()
    assert d.feed(encode_frame(req(1))) == [req(1)]
    assert d.buffered == 0


def test_several_frames_in_one_feed():
    msgs = [req(i) for i in range(5)]
    d = FrameDecoder()
    assert d.feed(b"".join(encode_frame(m) for m in msgs)) == msgs
    assert d.buffered == 0


@pytest.mark.parametrize("kind", [bytes, bytearray, memoryview])
def test_accepts_bytes_like(kind):
    assert FrameDecoder().feed(kind(encode_frame(req(7)))) == [req(7)]


def test_byte_by_byte():
    msgs = [req(i) for i in range(3)]
    stream = b"".join(encode_frame(m) for m in msgs)
    d = FrameDecoder()
    got = []
    for i in range(len(stream)):
        got += d.feed(stream[i:i + 1])
    assert got == msgs
    assert d.buffered == 0


def test_split_at_every_offset():
    # Two frames, cut in two at every possible place (inside a header, on
    # the boundary, inside a body): the same two maps come out.
    msgs = [req(1, key="a" * 40), req(2)]
    stream = b"".join(encode_frame(m) for m in msgs)
    for cut in range(len(stream) + 1):
        d = FrameDecoder()
        got = d.feed(stream[:cut])
        got += d.feed(stream[cut:])
        assert got == msgs, cut
        assert d.buffered == 0


def test_split_in_three_at_every_offset_pair():
    stream = encode_frame(req(1)) + encode_frame(req(2))
    for a in range(0, len(stream), 3):
        for b in range(a, len(stream) + 1, 5):
            d = FrameDecoder()
            got = d.feed(stream[:a]) + d.feed(stream[a:b]) + d.feed(stream[b:])
            assert got == [req(1), req(2)], (a, b)


def test_trailing_partial_frame_is_kept():
    one, two = encode_frame(req(1)), encode_frame(req(2))
    d = FrameDecoder()
    assert d.feed(one + two[:10]) == [req(1)]
    assert d.buffered == 10
    assert d.feed(b"") == []
    assert d.buffered == 10
    assert d.feed(two[10:]) == [req(2)]
    assert d.buffered == 0


def test_partial_header_is_kept():
    frame = encode_frame(req(1))
    d = FrameDecoder()
    assert d.feed(frame[:3]) == []
    assert d.buffered == 3
    assert d.feed(frame[3:]) == [req(1)]


def test_caller_buffer_may_be_reused_after_feed():
    # The fast path decodes from the caller's buffer; nothing may point into
    # it afterwards (an event loop reuses its receive buffer).
    frame = encode_frame(req(3))
    buf = bytearray(frame + frame[:7])
    d = FrameDecoder()
    got = d.feed(buf)
    buf[:] = b"\xff" * len(buf)
    buf.extend(b"more")   # would raise BufferError if a view were still exported
    assert got == [req(3)]
    assert d.feed(frame[7:]) == [req(3)]


def test_oversize_is_fatal_and_kills_the_decoder():
    d = FrameDecoder(max_frame_bytes=1000)
    ok = encode_frame(req(1))
    items = d.feed(ok + struct.pack(">I", 9000) + b"x" * 50)
    assert items[0] == req(1)
    err = items[1]
    assert isinstance(err, ResourceExhausted)
    assert err.status == Status.RESOURCE_EXHAUSTED
    assert err.fatal
    assert "9000" in err.message and "1000" in err.message
    assert "server.max_frame_bytes" in err.message
    assert len(items) == 2
    assert d.dead
    assert d.feed(ok) == []
    assert d.buffered == 0


def test_oversize_detected_from_header_alone():
    d = FrameDecoder()
    n = DEFAULT_MAX_FRAME_BYTES + 1
    header = struct.pack(">I", n)
    assert d.feed(header[:2]) == []
    (err,) = d.feed(header[2:])
    assert isinstance(err, ResourceExhausted) and err.fatal
    assert str(n) in err.message and str(DEFAULT_MAX_FRAME_BYTES) in err.message


def test_frame_of_exactly_the_limit_is_accepted():
    body = msgpack.packb({"id": 1, "pad": "x" * 100})
    d = FrameDecoder(max_frame_bytes=len(body))
    assert d.feed(raw_frame(body)) == [{"id": 1, "pad": "x" * 100}]


def test_garbage_body_is_non_fatal_with_id_0():
    d = FrameDecoder()
    items = d.feed(raw_frame(b"\xc1\xc1\xc1") + encode_frame(req(5)))
    err, ok = items
    assert isinstance(err, InvalidArgument)
    assert err.status == Status.INVALID_ARGUMENT
    assert not err.fatal
    assert err.req_id == 0
    assert "msgpack" in err.message
    assert ok == req(5)
    assert not d.dead


def test_truncated_body_keeps_the_stream():
    body = msgpack.packb({"id": 9, "model": "m"})
    d = FrameDecoder()
    err, ok = d.feed(raw_frame(body[:-2]) + encode_frame(req(1)))
    assert isinstance(err, InvalidArgument) and not err.fatal
    assert err.req_id == 9   # the id came before the damage
    assert ok == req(1)


def test_int_key_is_an_error_carrying_the_id():
    body = msgpack.packb({"id": 42, 7: "x"})
    (err,) = FrameDecoder().feed(raw_frame(body))
    assert isinstance(err, InvalidArgument) and not err.fatal
    assert err.req_id == 42
    assert "int" in err.message


def test_int_key_before_the_id():
    body = msgpack.packb({7: "x", "model": "m", "id": 43})
    (err,) = FrameDecoder().feed(raw_frame(body))
    assert isinstance(err, InvalidArgument)
    assert err.req_id == 43


def test_nested_int_key_is_an_error():
    body = msgpack.packb({"id": 44, "inputs": {1: 2}})
    (err,) = FrameDecoder().feed(raw_frame(body))
    assert isinstance(err, InvalidArgument) and err.req_id == 44


@pytest.mark.parametrize("bad_id", [-1, "7", 1.5, None, True])
def test_unreadable_id_gives_0(bad_id):
    body = msgpack.packb({"id": bad_id, 7: "x"})
    (err,) = FrameDecoder().feed(raw_frame(body))
    assert isinstance(err, InvalidArgument) and err.req_id == 0


def test_ext_type_is_an_error():
    body = msgpack.packb({"id": 3, "x": msgpack.ExtType(5, b"ab")})
    (err,) = FrameDecoder().feed(raw_frame(body))
    assert isinstance(err, InvalidArgument) and not err.fatal
    assert err.req_id == 3
    assert "ext" in err.message


def test_invalid_utf8_is_an_error():
    body = b"\x82\xa2id\x05\xa1k\xa2\xff\xfe"   # {"id": 5, "k": <2 bytes, not UTF-8>}
    (err,) = FrameDecoder().feed(raw_frame(body))
    assert isinstance(err, InvalidArgument)
    assert err.req_id == 5


def test_trailing_bytes_inside_a_frame():
    body = msgpack.packb({"id": 11}) + b"\x01"
    d = FrameDecoder()
    err, ok = d.feed(raw_frame(body) + encode_frame(req(2)))
    assert isinstance(err, InvalidArgument) and not err.fatal
    assert err.req_id == 11
    assert "after" in err.message
    assert ok == req(2)


def test_two_maps_in_one_frame():
    body = msgpack.packb({"id": 1}) + msgpack.packb({"id": 2})
    (err,) = FrameDecoder().feed(raw_frame(body))
    assert isinstance(err, InvalidArgument) and err.req_id == 1


def test_empty_frame():
    d = FrameDecoder()
    err, ok = d.feed(raw_frame(b"") + encode_frame(req(1)))
    assert isinstance(err, InvalidArgument) and not err.fatal
    assert err.req_id == 0
    assert "empty" in err.message
    assert ok == req(1)


def test_empty_frame_split():
    d = FrameDecoder()
    assert d.feed(b"\x00\x00") == []
    (err,) = d.feed(b"\x00\x00")
    assert isinstance(err, InvalidArgument)
    assert d.buffered == 0


@pytest.mark.parametrize("value, word", [([1, 2], "array"), (5, "integer"), ("s", "string"),
                                         (None, "nil"), (b"b", "bin"), (True, "boolean")])
def test_non_map_body(value, word):
    d = FrameDecoder()
    err, ok = d.feed(raw_frame(msgpack.packb(value, use_bin_type=True)) + encode_frame(req(1)))
    assert isinstance(err, InvalidArgument) and not err.fatal
    assert err.req_id == 0
    assert word in err.message and "map" in err.message
    assert ok == req(1)


def test_huge_declared_length_inside_small_frame():
    # A str header claiming 4 GiB inside a 10-byte frame: refused, not allocated.
    body = b"\x81\xa2id\xdb\xff\xff\xff\xff"
    (err,) = FrameDecoder().feed(raw_frame(body))
    assert isinstance(err, InvalidArgument) and not err.fatal


def test_deep_nesting_does_not_escape():
    body = b"\x81\xa1x" + b"\x91" * 100_000 + b"\xc0"
    (err,) = FrameDecoder().feed(raw_frame(body))
    assert isinstance(err, InvalidArgument)


def test_error_answer_shape():
    (err,) = FrameDecoder().feed(raw_frame(b"\xc1"))
    ans = err.answer()
    assert ans["id"] == 0 and ans["status"] == 3 and ans["error"]


def test_round_trip_with_memoryview_values():
    arr = np.arange(6, dtype=np.float32)
    shm_like = bytearray(b"\x00" * 4 + arr.tobytes() + b"\x00" * 4)
    msg = {"id": 2**40, "status": 0, "outputs": {
        "a": {"dtype": "float32", "shape": [6], "data": memoryview(shm_like)[4:28]},
        "b": {"dtype": "float32", "shape": [6], "data": memoryview(arr)},   # format 'f'
        "c": {"dtype": "uint8", "shape": [2], "data": bytearray(b"\x01\x02")},
    }, "timing": {"queue_us": 1, "compute_us": 2, "batch": 3}, "arm": None}
    frame = encode_frame(msg)
    (got,) = FrameDecoder().feed(frame)
    for k in "abc":
        assert type(got["outputs"][k]["data"]) is bytes   # bin, not str or array
    assert got["outputs"]["a"]["data"] == arr.tobytes()
    assert got["outputs"]["b"]["data"] == arr.tobytes()
    assert got["outputs"]["c"]["data"] == b"\x01\x02"
    assert got["id"] == 2**40 and got["arm"] is None
    assert frame[:4] == struct.pack(">I", len(frame) - 4)
    assert encode_body(msg) == frame[4:]


def test_encode_frame_recovers_after_a_packing_error():
    with pytest.raises(TypeError):
        encode_frame({"x": object()})
    assert FrameDecoder().feed(encode_frame(req(1))) == [req(1)]


def test_large_frame_in_chunks():
    blob = bytes(range(256)) * 8192   # 2 MiB
    frame = encode_frame({"id": 1, "data": blob})
    d = FrameDecoder()
    got = []
    for i in range(0, len(frame), 65536):
        got += d.feed(frame[i:i + 65536])
        if i + 65536 < len(frame):
            assert d.buffered == i + 65536
    assert got == [{"id": 1, "data": blob}]


def test_bad_max_frame_bytes():
    with pytest.raises(ValueError):
        FrameDecoder(max_frame_bytes=0)


def test_buffered_counts_the_unfinished_frame_and_the_backlog():
    """``buffered`` (what the front's memory budget adds up) follows every
    way bytes are kept: a partial frame, a partial header, the undecoded rest
    after max_items, and nothing once whole frames are taken or dropped."""
    f1, f2 = encode_frame({"id": 1}), encode_frame({"id": 2})
    d = FrameDecoder()
    assert d.feed(f1) == [{"id": 1}] and d.buffered == 0
    assert d.feed(f1[:2]) == [] and d.buffered == 2 and d.partial == 2
    assert d.feed(f1[2:5]) == [] and d.buffered == 5
    assert d.feed(f1[5:] + f2[:3]) == [{"id": 1}] and d.buffered == 3 and d.partial == 3
    assert d.feed(f2[3:] + f1 + f2, max_items=1) == [{"id": 2}]
    assert d.buffered == len(f1) + len(f2) and d.backlog and d.partial == 0
    assert d.feed(b"", max_items=1) == [{"id": 1}] and d.buffered == len(f2)
    assert d.feed(b"") == [{"id": 2}] and d.buffered == 0 and not d.backlog
    d.feed(f1[:7])
    assert d.drop() == 7 and d.buffered == 0 and d.feed(f1) == []


def test_frame_limits_bound_what_one_body_may_hold():
    lim = FrameLimits(max_str=8, max_array=4, max_map=4, max_elements=16, max_depth=3)
    d = FrameDecoder(limits=lim)
    ok, long_str, long_array, many = (
        {"id": 1, "a": [1, 2]}, {"id": 2, "s": "x" * 9}, {"id": 3, "a": [0] * 5},
        {"id": 4, "a": [[0, 0, 0, 0]] * 4, "pad": b"p" * 40})
    deep = {"id": 5, "a": [[[[1]]]], "pad": b"p" * 40}
    out = d.feed(b"".join(encode_frame(m) for m in (ok, long_str, long_array, many, deep)))
    assert out[0] == ok
    assert [type(e) for e in out[1:]] == [InvalidArgument] * 4
    assert [e.req_id for e in out[1:]] == [2, 3, 4, 5]
    assert "elements" in out[3].message and "nested deeper" in out[4].message
