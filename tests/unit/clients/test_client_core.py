"""The clients' sans-IO core: requests, answers, errors, retries, the budget."""

from __future__ import annotations

import math
import random

import msgpack
import numpy as np
import pytest
import torch

from clients import _core, errors
from clients._core import (
    Call,
    InferResult,
    InFlight,
    Packed,
    Retry,
    RetryPolicy,
    encode_inputs,
    error_from_answer,
    feedback_request,
    infer_request,
    infer_result,
    op_request,
    plain_answer,
)
from ipc.framing import FrameDecoder
from ipc.status import Status
from ipc.tensors import from_array

ALL_ERRORS = {
    3: errors.InvalidArgument, 4: errors.DeadlineExceeded, 5: errors.NotFound,
    8: errors.ResourceExhausted, 13: errors.Internal, 14: errors.Unavailable,
    16: errors.Unauthenticated,
}


def decode_frame(chunks) -> dict:
    (msg,) = FrameDecoder().feed(b"".join(bytes(c) for c in chunks))
    assert type(msg) is dict, msg
    return msg


# --- answers -> results and errors ----------------------------------------------------

def test_every_status_has_its_class():
    assert {int(s) for s in Status} - {0} == set(ALL_ERRORS)
    for status, cls in ALL_ERRORS.items():
        answer = {"id": 4, "status": status, "error": f"went wrong {status}", "rid": 99}
        e = error_from_answer(answer)
        assert type(e) is cls and isinstance(e, errors.RingserveError)
        assert not isinstance(e, errors.ClientError)
        assert e.status == status and e.status is Status(status) and cls.status == status
        assert e.message == f"went wrong {status}" and e.answer is answer and e.rid == 99
        assert str(e) == f"{Status(status).name}: went wrong {status}"
        with pytest.raises(cls):
            infer_result(answer)
        with pytest.raises(cls):
            plain_answer(answer)


def test_unknown_status_and_missing_message():
    e = error_from_answer({"id": 1, "status": 99})
    assert type(e) is errors.RingserveError and e.status == 99 and e.rid is None
    assert "no message" in e.message and str(e).startswith("status 99:")
    with pytest.raises(errors.ClientError, match="status"):
        plain_answer({"id": 1})


def test_errors_pickle():
    import pickle
    e = error_from_answer({"id": 1, "status": 8, "error": "full", "rid": 3})
    back = pickle.loads(pickle.dumps(e))
    assert type(back) is errors.ResourceExhausted and back.message == "full" and back.rid == 3


def test_local_errors_are_not_status_errors():
    for cls in (errors.ConnectFailed, errors.ConnectionLost, errors.ClientTimeout):
        assert issubclass(cls, errors.ClientError) and not issubclass(cls, errors.RingserveError)
    assert issubclass(errors.ConnectionLost, ConnectionError)
    assert issubclass(errors.ClientTimeout, TimeoutError)


def _answer(outputs) -> dict:
    return {"id": 1, "status": 0, "outputs": outputs, "model": "m", "version": "2",
            "lane": "canary", "arm": "b", "rid": 12,
            "timing": {"queue_us": 5, "compute_us": 7, "batch": 3, "bucket": 4}}


def test_infer_result_one_tensor_numpy_and_torch():
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    wire = dict(from_array(x), data=x.tobytes())
    r = infer_result(_answer(wire), attempts=3)
    assert isinstance(r, InferResult) and r.attempts == 3
    assert isinstance(r.outputs, np.ndarray) and r.outputs.dtype == np.float32
    np.testing.assert_array_equal(r.outputs, x)
    assert (r.model, r.version, r.lane, r.arm, r.rid) == ("m", "2", "canary", "b", 12)
    assert r.timing["batch"] == 3 and r.answer["id"] == 1
    assert "float32[2, 3]" in repr(r) and "data" not in repr(r)
    t = infer_result(_answer(wire), as_torch=True).outputs
    assert isinstance(t, torch.Tensor) and t.dtype == torch.float32
    assert torch.equal(t, torch.from_numpy(x))


def test_infer_result_named_outputs_and_bfloat16():
    b = torch.tensor([1.5, -2.0], dtype=torch.bfloat16)
    named = {"score": dict(from_array(np.array([0.5], np.float32)), data=b"\x00\x00\x00?"),
             "half": dict(from_array(b), data=bytes(from_array(b)["data"]))}
    r = infer_result(_answer(named))
    assert set(r.outputs) == {"score", "half"}
    assert r.outputs["score"].tolist() == [0.5]
    assert r.outputs["half"].dtype == np.float32 and r.outputs["half"].tolist() == [1.5, -2.0]
    t = infer_result(_answer(named), as_torch=True).outputs
    assert t["half"].dtype == torch.bfloat16 and t["half"].tolist() == [1.5, -2.0]


def test_infer_result_says_when_a_fallback_answered_and_what_was_defaulted():
    x = np.array([0.25, 0.75], np.float32)
    wire = dict(from_array(x), data=x.tobytes())
    plain = infer_result(_answer(wire))
    assert plain.fallback is None and plain.defaulted == () and "fallback" not in repr(plain)
    r = infer_result(dict(_answer(wire), version="fallback:constant", fallback="queue_full",
                          defaulted=["dense"]))
    assert (r.fallback, r.version, r.defaulted, r.lane) == (
        "queue_full", "fallback:constant", ("dense",), "canary")
    assert "fallback='queue_full'" in repr(r)
    np.testing.assert_array_equal(r.outputs, x)


def test_malformed_answer_tensor_is_a_client_error():
    with pytest.raises(errors.ClientError, match="malformed"):
        infer_result(_answer({"dtype": "float32", "shape": [2], "data": b"\x00"}))


# --- building requests --------------------------------------------------------------------

def test_infer_request_fields_and_misuse():
    msg = infer_request("demo", [1.0, 2.0], key="u1", exp="e", version=3, deadline_ms=250)
    assert msg == {"model": "demo", "inputs": [1.0, 2.0], "key": "u1", "exp": "e",
                   "version": "3", "deadline_ms": 250}
    assert infer_request("demo", [1]) == {"model": "demo", "inputs": [1]}
    bad = [
        (dict(model=None), TypeError), (dict(model=""), ValueError),
        (dict(key=5), TypeError), (dict(exp=b"x"), TypeError), (dict(version=1.5), TypeError),
        (dict(deadline_ms=0), ValueError), (dict(deadline_ms=3_600_001), ValueError),
        (dict(deadline_ms=1.5), TypeError), (dict(deadline_ms=True), TypeError),
        (dict(inputs=None), TypeError), (dict(inputs="abc"), TypeError),
        (dict(inputs={}), ValueError),
        (dict(inputs={1: [1.0]}), TypeError), (dict(inputs={"a": {"b": 1}}), TypeError),
        (dict(inputs=np.array(["a"])), ValueError),
    ]
    for kw, exc in bad:
        args = dict(model="demo", inputs=[1.0])
        args.update(kw)
        with pytest.raises(exc):
            infer_request(**args)


def test_inputs_are_not_copied():
    x = np.arange(4, dtype=np.float32)
    t = encode_inputs(x)
    assert t["dtype"] == "float32" and t["shape"] == [4]
    assert isinstance(t["data"], memoryview) and t["data"].obj is x   # a view of x itself
    tt = torch.arange(3, dtype=torch.int64)
    w = encode_inputs({"ids": tt, "dense": [1.0, 2.0], "raw": t})
    assert w["ids"]["dtype"] == "int64" and bytes(w["ids"]["data"]) == tt.numpy().tobytes()
    assert w["dense"] == [1.0, 2.0] and w["raw"] is t   # lists and wire maps go as they are
    strided = np.arange(8, dtype=np.float32)[::2]
    assert bytes(encode_inputs(strided)["data"]) == strided.tobytes()
    big_endian = np.arange(3, dtype=">i4")
    assert bytes(encode_inputs(big_endian)["data"]) == big_endian.astype("<i4").tobytes()


def test_other_ops_and_feedback():
    assert op_request("health") == {"op": "health"}
    assert op_request("stats", "demo") == {"op": "stats", "model": "demo"}
    with pytest.raises(ValueError):
        op_request("dance")
    assert feedback_request(12, 1) == {"op": "feedback", "ref": 12, "outcome": 1}
    assert feedback_request("u1", 0.5, "demo")["model"] == "demo"
    for ref, outcome, exc in [(-1, 1, ValueError), ("", 1, ValueError), (1.5, 1, TypeError),
                              (None, 1, TypeError), (1, "yes", TypeError),
                              (1, math.nan, TypeError), (1, True, TypeError)]:
        with pytest.raises(exc):
            feedback_request(ref, outcome)


# --- frames ----------------------------------------------------------------------------------

def test_packed_frame_puts_id_first_and_adds_the_deadline():
    msg = {"model": "demo", "inputs": [1.0, 2.0], "key": "u"}
    p = Packed(msg)
    chunks = p.frame(7)
    assert len(chunks) == 1
    assert decode_frame(chunks) == dict(msg, id=7)
    got = decode_frame(p.frame(2**64 - 1, deadline_ms=120))
    assert got == dict(msg, id=2**64 - 1, deadline_ms=120)
    # id is the first key, where the server salvages it from a frame it cannot decode
    u = msgpack.Unpacker()
    u.feed(b"".join(bytes(c) for c in p.frame(9))[4:])
    assert u.read_map_header() == 4 and u.unpack() == "id" and u.unpack() == 9
    with pytest.raises(ValueError):
        Packed({"id": 1})


def test_large_frame_is_two_buffers_without_a_join():
    x = np.random.default_rng(0).standard_normal(100_000).astype(np.float32)
    chunks = Packed({"model": "m", "inputs": encode_inputs(x)}).frame(3, 50)
    assert len(chunks) == 2
    msg = decode_frame(chunks)
    assert msg["id"] == 3 and msg["deadline_ms"] == 50
    assert np.array_equal(np.frombuffer(msg["inputs"]["data"], np.float32), x)


def test_unpackable_input_fails_when_the_call_is_made():
    msg = infer_request("m", [np.float32(1.0)])   # numpy scalars have no msgpack form
    with pytest.raises(TypeError):
        Call(msg, plain_answer, policy=None, timeout=1.0, now=0.0)


# --- the in-flight table -------------------------------------------------------------------------

def test_inflight_ids_matching_and_refusal():
    f = InFlight()
    a, b = object(), object()
    assert f.add(a) == 1 and f.add(b) == 2 and len(f) == 2
    assert f.match({"id": 2, "status": 0}) is b
    assert f.match({"id": 2, "status": 0}) is None   # answered already: ignored
    assert f.match({"id": 42, "status": 0}) is None
    f.drop(1)
    assert f.match({"id": 1, "status": 0}) is None and len(f) == 0
    assert isinstance(f.lost_error("gone"), errors.ConnectionLost)
    # an id-0 refusal before the server closes: every waiter gets it
    f.add(a)
    assert f.match({"id": 0, "status": 8, "error": "too many connections"}) is None
    assert f.clear() == [a] and len(f) == 0
    e1, e2 = f.lost_error("gone"), f.lost_error("gone")
    assert type(e1) is errors.ResourceExhausted and e1 is not e2
    assert e1.message == "too many connections"
    # a non-OK id-0 answer that the server did not close after (an older
    # server refusing the auth op, say) is not what a later drop reports
    f = InFlight()
    f.add(a)
    f.match({"id": 0, "status": 3, "error": "unknown op 'auth'"})
    assert f.match({"id": 1, "status": 0}) is a
    assert isinstance(f.lost_error("gone"), errors.ConnectionLost)


def test_inflight_closing_answers_end_the_connection():
    """An id-0 answer with a CLOSING status is the server's last word before
    it closes ("closing is an answer"): it sets ``closing`` for good (answers
    racing it do not undo it), and every waiter gets its error."""
    assert _core.CLOSING == {Status.RESOURCE_EXHAUSTED, Status.UNAVAILABLE,
                             Status.UNAUTHENTICATED}
    for status in _core.CLOSING:
        f = InFlight()
        a, b = object(), object()
        f.add(a), f.add(b)
        assert f.match({"id": 0, "status": int(status), "error": "idle timeout"}) is None
        assert f.closing
        assert f.match({"id": 2, "status": 0}) is b   # delivered, but the close stands
        assert f.closing and f.refusal["error"] == "idle timeout"
        assert f.clear() == [a]
        e = f.lost_error("gone")
        assert type(e) is ALL_ERRORS[int(status)] and e.message == "idle timeout"
        assert Status(status).name in f.closing_reason() and "idle timeout" in f.closing_reason()
    for answer in ({"id": 0, "status": 0}, {"id": 0, "status": 3, "error": "bad frame"},
                   {"id": 0, "status": 13, "error": "?"}):
        f = InFlight()
        f.match(answer)
        assert not f.closing
    f = InFlight()
    f.match({"id": 0, "status": 8, "error": "x" * 10_000})
    assert len(f.closing_reason()) < 300   # a server's huge message, quoted briefly


def test_a_request_the_server_did_not_receive_is_retried_unless_unauthenticated():
    """``failed(received=False)``: the error is the id-0 answer of a close, so
    any status but UNAUTHENTICATED may be retried, within the policy and the
    budget; a received answer keeps the RETRYABLE rule."""
    policy = RetryPolicy(attempts=2, base_delay=0.01, max_delay=0.01)
    for status, cls in ALL_ERRORS.items():
        call = Call({"model": "m", "inputs": [1]}, infer_result, policy=policy, timeout=10.0,
                    now=0.0)
        call.begin_attempt(0.0)
        err = error_from_answer({"id": 0, "status": status, "error": "closing"})
        if status == 16:
            with pytest.raises(cls):
                call.failed(err, 0.0, received=False)
            continue
        assert isinstance(call.failed(err, 0.0, received=False), Retry)
        call.begin_attempt(0.02)
        with pytest.raises(cls) as ei:   # attempts spent
            call.failed(error_from_answer({"id": 0, "status": status}), 0.02, received=False)
        assert ei.value.attempts == 2
    bare = Call({"op": "health"}, plain_answer, policy=None, timeout=10.0, now=0.0)
    bare.begin_attempt(0.0)
    with pytest.raises(errors.ResourceExhausted):
        bare.failed(error_from_answer({"id": 0, "status": 8}), 0.0, received=False)
    tight = Call({"model": "m", "inputs": [1], "deadline_ms": 5}, infer_result, policy=policy,
                 timeout=10.0, now=0.0)
    tight.begin_attempt(0.0)
    with pytest.raises(errors.ResourceExhausted):   # the backoff does not fit the deadline
        tight.failed(error_from_answer({"id": 0, "status": 8}), 0.0, received=False)


def test_messages_quoting_the_server_are_short():
    with pytest.raises(errors.ClientError) as ei:
        plain_answer({f"k{i}" * 1000: i for i in range(1000)})
    assert len(str(ei.value)) < 300
    with pytest.raises(errors.ClientError) as ei:
        infer_result({"id": 1, "status": 0,
                      "outputs": {"dtype": "x" * 100_000, "shape": [1], "data": b""}})
    assert len(str(ei.value)) < 400
    r = InferResult(None, "m" * 100_000, "v" * 100_000, None, None, 1, {"k" * 10**5: 1})
    assert len(repr(r)) < 600


def test_inflight_ids_wrap_and_skip_waiting_ones():
    f = InFlight()
    f.add("one")                        # id 1 stays in flight
    f._next = InFlight._WRAP - 1
    assert f.add("last") == InFlight._WRAP - 1
    assert f.add("wrapped") == 2        # 0 is never used, 1 is taken


# --- retries -------------------------------------------------------------------------------------

def test_retry_policy_schedule_and_validation():
    p = RetryPolicy(attempts=10, base_delay=0.01, max_delay=0.1, multiplier=2.0, jitter=0.0)
    assert [p.cap(k) for k in range(1, 7)] == pytest.approx([0.01, 0.02, 0.04, 0.08, 0.1, 0.1])
    assert [p.delay(k) for k in range(1, 7)] == [p.cap(k) for k in range(1, 7)]
    assert RetryPolicy(multiplier=10.0).cap(10**9) == 1.0   # no overflow, ever
    assert RetryPolicy(multiplier=1.0, base_delay=0.2).cap(50) == 0.2
    for bad in [dict(attempts=0), dict(attempts=1.5), dict(base_delay=0), dict(max_delay=0.001),
                dict(multiplier=0.5), dict(jitter=1.5), dict(jitter=-0.1),
                dict(max_delay=math.inf)]:
        with pytest.raises(ValueError):
            RetryPolicy(**bad)
    with pytest.raises(ValueError):
        p.cap(0)


def test_retry_jitter_stays_in_bounds_and_spreads():
    p = RetryPolicy(base_delay=0.1, max_delay=0.8, jitter=0.5)
    rng = random.Random(1)
    for k in range(1, 8):
        cap = p.cap(k)
        ds = [p.delay(k, rng) for _ in range(500)]
        assert all(cap * 0.5 < d <= cap for d in ds)
        assert max(ds) - min(ds) > cap * 0.4   # really spread over the band
    full = RetryPolicy(jitter=1.0)
    assert min(full.delay(1, rng) for _ in range(500)) < full.cap(1) * 0.05


def _refused(status=8) -> dict:
    return {"id": 1, "status": status, "error": "queue full", "rid": 5}


def test_only_exhausted_and_unavailable_are_retried():
    policy = RetryPolicy(attempts=3, base_delay=0.01, max_delay=0.01)
    for status, cls in ALL_ERRORS.items():
        call = Call({"model": "m", "inputs": [1]}, infer_result, policy=policy, timeout=10.0,
                    now=0.0)
        call.begin_attempt(0.0)
        if status in (8, 14):
            step = call.answer(_refused(status), 0.0)
            assert isinstance(step, Retry) and 0.005 <= step.delay <= 0.01
        else:
            with pytest.raises(cls) as ei:
                call.answer(_refused(status), 0.0)
            assert ei.value.attempts == 1


def test_attempts_bound_and_no_policy():
    call = Call({"op": "health"}, plain_answer, policy=RetryPolicy(attempts=3), timeout=60.0,
                now=0.0)
    now = 0.0
    for _ in range(2):
        call.begin_attempt(now)
        step = call.answer(_refused(), now)
        now += step.delay
    call.begin_attempt(now)
    with pytest.raises(errors.ResourceExhausted) as ei:
        call.answer(_refused(), now)
    assert ei.value.attempts == 3
    bare = Call({"op": "health"}, plain_answer, policy=None, timeout=60.0, now=0.0)
    bare.begin_attempt(0.0)
    with pytest.raises(errors.Unavailable):
        bare.answer(_refused(14), 0.0)
    ok = bare.answer({"id": 1, "status": 0, "live": True}, 0.0)
    assert ok["live"] is True


def _simulate(call: Call, latency: float, rng: random.Random) -> tuple[float, list[int]]:
    """A server that refuses every attempt after ``latency`` s: (the time the call
    gives up, the deadline_ms each attempt carried)."""
    now, sent = 0.0, []
    while True:
        try:
            call.begin_attempt(now)
        except errors.RingserveError:
            return now, sent
        sent.append(decode_frame(call.frame(1)).get("deadline_ms"))
        now += latency
        try:
            step = call.answer(_refused(), now)
        except errors.RingserveError:
            return now, sent
        now += step.delay * rng.uniform(1.0, 1.2)   # sleeps overrun a little


@pytest.mark.parametrize("seed", range(20))
def test_retries_never_pass_the_deadline(seed):
    rng = random.Random(seed)
    policy = RetryPolicy(attempts=1000, base_delay=0.001, max_delay=0.05, jitter=1.0)
    deadline_ms = rng.randint(20, 500)
    call = Call({"model": "m", "inputs": [1], "deadline_ms": deadline_ms}, infer_result,
                policy=policy, timeout=30.0, now=0.0, rng=rng)
    end, sent = _simulate(call, latency=0.0005, rng=rng)
    assert end <= deadline_ms / 1000
    assert len(sent) > 3 and sent[0] == deadline_ms
    # each retry carries what is left of the caller's deadline, never more
    assert all(1 <= b <= a for a, b in zip(sent, sent[1:], strict=False)), sent


def test_retries_bounded_by_the_client_timeout_without_a_deadline():
    rng = random.Random(3)
    policy = RetryPolicy(attempts=1000, base_delay=0.01, max_delay=0.1)
    call = Call({"op": "stats"}, plain_answer, policy=policy, timeout=0.7, now=100.0, rng=rng)
    end, sent = _simulate(call, latency=0.001, rng=rng)
    assert end <= 100.7 and set(sent) == {None}   # the server's default deadline applies
    assert call.time_left(100.5) == pytest.approx(0.2) and call.time_left(101) == 0.0


def test_a_backoff_that_would_not_fit_is_not_taken():
    policy = RetryPolicy(attempts=10, base_delay=0.2, max_delay=0.2, jitter=0.0)
    call = Call({"model": "m", "inputs": [1], "deadline_ms": 100}, infer_result, policy=policy,
                timeout=30.0, now=0.0)
    call.begin_attempt(0.0)
    with pytest.raises(errors.ResourceExhausted) as ei:
        call.answer(_refused(), 0.01)
    assert ei.value.attempts == 1
    # and when a sleep overran the rest of the deadline, the last error is final
    call = Call({"model": "m", "inputs": [1], "deadline_ms": 100}, infer_result,
                policy=RetryPolicy(base_delay=0.01, max_delay=0.01), timeout=30.0, now=0.0)
    call.begin_attempt(0.0)
    assert isinstance(call.answer(_refused(), 0.05), Retry)
    with pytest.raises(errors.ResourceExhausted):
        call.begin_attempt(0.1)


def test_a_lost_connection_whose_retry_overran_the_deadline_is_final():
    call = Call({"model": "m", "inputs": [1], "deadline_ms": 100}, infer_result,
                policy=RetryPolicy(base_delay=0.01, max_delay=0.01), timeout=30.0, now=0.0)
    call.begin_attempt(0.0)
    lost = errors.ConnectionLost("the server closed the connection")
    assert isinstance(call.lost(lost, 0.0), Retry)
    with pytest.raises(errors.ConnectionLost) as ei:   # the last error, not a TypeError
        call.begin_attempt(0.1)
    assert ei.value is lost


def test_timed_out_error():
    call = Call({"op": "health"}, plain_answer, policy=None, timeout=2.5, now=0.0)
    call.begin_attempt(0.0)
    e = call.timed_out()
    assert isinstance(e, errors.ClientTimeout) and "2.5 s" in str(e)


def test_client_options_are_checked():
    _core.check_options(1, 2.5, None, 1)
    for args, exc in [((0, 1, None, 1), ValueError), ((1, -1, None, 1), ValueError),
                      ((1, math.inf, None, 1), ValueError), ((1, 1, "x", 1), TypeError),
                      ((1, 1, None, 0), ValueError)]:
        with pytest.raises(exc):
            _core.check_options(*args)
