"""The client's protocol logic, sans-IO: maps in, maps and results out.

Both clients (``sync.Client`` over a socket and a reader thread,
``aio.AsyncClient`` over an asyncio protocol) are thin layers over this
module, in the way asyncpg puts futures and timeouts over a pure protocol
core. Nothing here touches a socket, a thread or an event loop; time comes in
as ``now`` (``time.monotonic()`` seconds) and randomness as an ``rng``.

- ``infer_request`` / ``op_request`` / ``feedback_request``: check the
  caller's arguments (``TypeError``/``ValueError`` for misuse) and build the
  request map of protocol.md ("Requests"), without its ``id``.
- ``InFlight``: one connection's requests awaiting answers: allocates ids,
  matches each answer to its waiter, and says what the waiters get when the
  connection goes away.
- ``Call``: one call from the caller's point of view: its attempts, the
  retry policy and the time budget, and what an answer means (a result, a
  ``Retry`` after a delay, or an exception).
- ``infer_result`` / ``error_from_answer``: answer map -> ``InferResult`` or
  one of ``clients.errors``.
"""

from __future__ import annotations

import itertools
import math
import os
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, Literal, Protocol, TypeVar, overload

import msgpack

from ipc.framing import HEADER, encode_body
from ipc.status import ProtocolError, Status, brief
from ipc.tensors import from_array, to_numpy, to_torch

from .errors import ClientError, ClientTimeout, ConnectionLost, RingserveError, error_class

if TYPE_CHECKING:
    import torch
    from numpy.typing import NDArray

__all__ = [
    "CLOSING", "DEFAULT_RETRY", "MAX_ANSWER_BYTES", "MAX_DEADLINE_MS", "RETRYABLE", "Call",
    "InFlight", "ClientOptions", "InferResult", "Packed", "Retry", "RetryPolicy", "check_options",
    "decode_outputs",
    "encode_inputs", "error_from_answer", "feedback_request", "infer_request", "infer_result",
    "op_request", "plain_answer",
]

# The server's bound on deadline_ms (daemon/front/app.py; protocol.md "Requests").
MAX_DEADLINE_MS = 3_600_000

# Largest answer frame a client accepts. Answers carry one sample's outputs,
# far below this; the bound only stops a corrupt length prefix from making
# the decoder wait for (and buffer) gigabytes that will never come.
MAX_ANSWER_BYTES = 1 << 30

# Frames up to this size are sent as one buffer (header + body joined: the
# copy costs less than a second write); larger ones as two writes, so a big
# tensor body is not copied once more just to prepend 4 bytes.
_JOIN_BELOW = 64 * 1024

# Only these statuses mean "the same request may succeed later": the queue
# was full, or no worker could take it. Everything else is final (a bad
# request stays bad; a missed deadline or a model error must not run twice).
RETRYABLE = frozenset({Status.RESOURCE_EXHAUSTED, Status.UNAVAILABLE})

# The statuses of the id-0 answer a server sends just before it closes a
# connection on its own (protocol.md "Frames"): a limit or a timeout,
# draining, a refused token. The requests in flight on it were not received;
# all but UNAUTHENTICATED ones may be retried on a new connection (a token
# the server refused stays refused).
CLOSING = frozenset({Status.RESOURCE_EXHAUSTED, Status.UNAVAILABLE, Status.UNAUTHENTICATED})

# A retry is only worth sending if it leaves the attempt this much of the
# caller's budget: less than that and it would be refused for its deadline.
_MIN_ATTEMPT_S = 0.005

_OPS = ("health", "models", "stats")
IDEMPOTENT_OPS = frozenset(("infer",) + _OPS)


# --- building requests ------------------------------------------------------------

def _opt_str(name: str, value: object) -> str | None:
    if value is None or type(value) is str:
        return value
    raise TypeError(f"{name} must be a str or None, got {type(value).__name__}")


def _model_name(model: object) -> str:
    if type(model) is not str:
        raise TypeError(f"model must be a str, got {type(model).__name__}")
    if not model:
        raise ValueError("model must not be empty")
    return model


def _check_deadline(deadline_ms: object) -> None:
    if deadline_ms is None:
        return
    if type(deadline_ms) is not int:
        raise TypeError(f"deadline_ms must be an int (milliseconds) or None, "
                        f"got {type(deadline_ms).__name__}")
    if not 1 <= deadline_ms <= MAX_DEADLINE_MS:
        raise ValueError(f"deadline_ms must be from 1 to {MAX_DEADLINE_MS}, got {deadline_ms}")


def _is_wire_tensor(obj: dict[Any, Any]) -> bool:
    # The server's own test (ipc.tensors.decode_inputs): a map with "data"
    # and "dtype" is a tensor, not a map of named inputs.
    return "data" in obj and "dtype" in obj


def _tensor(value: object) -> object:
    """One input -> what goes on the wire.

    Arrays and tensors become the binary form through ``from_array``, whose
    ``data`` is a view of the caller's buffer when it is C-contiguous
    little-endian (msgpack then copies it once, into the frame). Lists go
    as plain msgpack arrays, which the server casts to the declared dtype.
    """
    if type(value) is list or type(value) is tuple:
        return value
    if type(value) is dict:
        if _is_wire_tensor(value):
            return value   # already a wire tensor map
        raise TypeError("a named input's value must be an array, tensor or list, got a map")
    return from_array(value)   # TypeError/ValueError for what has no wire form


def encode_inputs(inputs: object) -> object:
    """The request's ``inputs``: one tensor, or a map of name -> tensor."""
    if type(inputs) is dict and not _is_wire_tensor(inputs):
        if not inputs:
            raise ValueError("inputs is an empty map; send a tensor, or a map of input "
                             "name -> tensor")
        out: dict[str, object] = {}
        for name, value in inputs.items():
            if type(name) is not str:
                raise TypeError(f"input names must be str, got {type(name).__name__}")
            out[name] = _tensor(value)
        return out
    if inputs is None:
        raise TypeError("inputs is required: a numpy array, torch tensor, list, or a map of "
                        "name -> those")
    return _tensor(inputs)


def infer_request(model: str, inputs: object, key: str | None = None, exp: str | None = None,
                  version: str | int | None = None,
                  deadline_ms: int | None = None) -> dict[str, Any]:
    """The map of an ``infer`` request (no ``id`` yet).

    ``version`` may be given as an int (read as its decimal string, as the
    config does).
    """
    msg: dict[str, Any] = {"model": _model_name(model), "inputs": encode_inputs(inputs)}
    if type(version) is int:
        version = str(version)
    for name, value in (("key", key), ("exp", exp), ("version", version)):
        if _opt_str(name, value) is not None:
            msg[name] = value
    _check_deadline(deadline_ms)
    if deadline_ms is not None:
        msg["deadline_ms"] = deadline_ms
    return msg


def op_request(op: str, model: str | None = None) -> dict[str, Any]:
    """``health``, ``models`` or ``stats``, optionally for one model."""
    if op not in _OPS:
        raise ValueError(f"unknown op {brief(op)}; ops: {', '.join(_OPS)} (and infer, feedback)")
    msg: dict[str, Any] = {"op": op}
    if _opt_str("model", model) is not None:
        msg["model"] = model
    return msg


def feedback_request(ref: int | str, outcome: float,
                     model: str | None = None) -> dict[str, Any]:
    """Report ``outcome`` (a number) for ``ref`` (an answer's ``rid``, or a routing key)."""
    if type(ref) is int or type(ref) is str:
        if ref == "" or type(ref) is int and ref < 0:
            raise ValueError(f"ref must be a non-negative int (a rid) or a non-empty str "
                             f"(a routing key), got {brief(ref)}")
    else:
        raise TypeError(f"ref must be an int (an answer's rid) or a str (a routing key), "
                        f"got {type(ref).__name__}")
    if type(outcome) not in (int, float) or not math.isfinite(outcome):
        raise TypeError(f"outcome must be a finite int or float, got {brief(outcome)}")
    msg: dict[str, Any] = {"op": "feedback", "ref": ref, "outcome": outcome}
    if _opt_str("model", model) is not None:
        msg["model"] = model
    return msg


# What Packed.frame gives: one buffer, or the head and the kept entries.
Frame = tuple[bytes] | tuple[bytes, memoryview]


class Packed:
    """A request map packed once; each attempt's frame puts its own ``id``
    (and what is left of the deadline) in front of the same bytes.

    The map is packed by ``ipc.framing.encode_body``. Requests have fewer than
    16 keys, so the body is a msgpack fixmap: one header byte (0x80 | count),
    then the entries, which are kept as they are. An attempt's body is a new
    header byte, the ``id`` entry (first, where the server's salvage of a bad
    frame looks for it), ``deadline_ms`` if any, and the kept entries. So the
    tensors are packed once per call, not once per attempt, and a value that
    msgpack cannot pack raises ``TypeError`` when the call is made.
    """

    __slots__ = ("count", "entries")

    def __init__(self, msg: dict[str, Any]):
        if "id" in msg or "deadline_ms" in msg:
            raise ValueError("id and deadline_ms are added per attempt")
        body = encode_body(msg)
        if body[0] & 0xF0 != 0x80:   # pragma: no cover - requests have a handful of keys
            raise ValueError(f"a request map must have fewer than 16 keys, got {len(msg)}")
        self.count = body[0] & 0x0F
        self.entries = memoryview(body)[1:]

    def frame(self, rid: int, deadline_ms: int | None = None) -> Frame:
        """The whole frame (protocol.md "Frames"), as one or two buffers to write in order."""
        if deadline_ms is None:
            head = bytes((0x80 | (self.count + 1),)) + _ID_KEY + _packb(rid)
        else:
            head = (bytes((0x80 | (self.count + 2),)) + _ID_KEY + _packb(rid) + _DEADLINE_KEY +
                    _packb(deadline_ms))
        n = len(head) + len(self.entries)
        if n < _JOIN_BELOW:
            return (b"".join((HEADER.pack(n), head, self.entries)),)
        return (HEADER.pack(n) + head, self.entries)


TOKEN_ENV = "RINGSERVE_TOKEN"


def read_token(path: str | None) -> str | None:
    """A command line's token: from the file ``path`` (never a command-line
    value, which other users of the machine can read in the process list),
    else from $RINGSERVE_TOKEN, else None. ValueError says what is wrong."""
    if path is None:
        return os.environ.get(TOKEN_ENV) or None
    try:
        with open(path, encoding="utf-8") as f:
            token = f.read().strip()
    except OSError as e:
        raise ValueError(f"cannot read the token file {path}: {e.strerror or e}") from None
    if not token:
        raise ValueError(f"the token file {path} is empty")
    return token


def auth_frame(token: str) -> bytes:
    """The frame a client writes first on each new connection when it has a token.

    It is not awaited: the server handles a connection's frames in order, so
    every request written after it is already authenticated. Its answer has
    id 0, which ``InFlight`` ignores when it is OK and keeps as the
    connection's refusal when it is not (the server then closes the
    connection, and every waiter fails with ``Unauthenticated``)."""
    body = encode_body({"id": 0, "op": "auth", "token": token})
    return HEADER.pack(len(body)) + body


_packb = msgpack.packb
_ID_KEY = _packb("id")
_DEADLINE_KEY = _packb("deadline_ms")


# --- matching answers to requests ----------------------------------------------------

W = TypeVar("W")   # what a transport waits with: a callback, a future


class InFlight(Generic[W]):
    """The requests of one connection that await their answers.

    Ids are allocated here, from 1 up: 0 is what the server puts on answers
    it cannot tie to a request (an unreadable frame, a refused auth token),
    and on the one answer it sends before it closes a connection on its own
    initiative ("closing is an answer", protocol.md "Frames"): a limit or a
    timeout (RESOURCE_EXHAUSTED), draining (UNAVAILABLE), a bad token or the
    auth time limit (UNAUTHENTICATED). A non-OK id-0 answer is kept as
    ``refusal``; one with a CLOSING status also sets ``closing``: the server
    has said its last word, so the transport drops the connection at once
    (new calls open another instead of racing the server's close), and every
    waiter fails with that error, its request not received by the server
    (``Call.failed(..., received=False)`` decides whether to retry it).

    Not thread-safe: the blocking client holds a lock around it.
    """

    __slots__ = ("_waiting", "_next", "refusal", "closing")

    _WRAP = 2**64   # ids are msgpack uints

    def __init__(self) -> None:
        self._waiting: dict[int, W] = {}
        self._next = 1
        self.refusal: dict[str, Any] | None = None
        self.closing = False

    def __len__(self) -> int:
        return len(self._waiting)

    def add(self, waiter: W) -> int:
        """A fresh id, with ``waiter`` remembered for its answer."""
        rid = self._next
        while rid in self._waiting:   # only after a wrap-around
            rid = rid + 1 if rid + 1 < self._WRAP else 1
        self._next = rid + 1 if rid + 1 < self._WRAP else 1
        self._waiting[rid] = waiter
        return rid

    def match(self, answer: dict[str, Any]) -> W | None:
        """The waiter of ``answer`` (removed), or None: unknown or abandoned id,
        or an id-0 answer, which is kept as the connection's ``refusal``."""
        rid = answer.get("id")
        if rid == 0 or rid is None:
            status = answer.get("status")
            if status:
                self.refusal = answer
                if type(status) is int and status in CLOSING:
                    self.closing = True
            return None
        # Any other non-OK id-0 answer is no close (an old server that does
        # not know the auth op, say): an answer after it means the connection
        # goes on, so a later drop is a plain ConnectionLost.
        if not self.closing:
            self.refusal = None
        return self._waiting.pop(rid, None)

    def drop(self, rid: int) -> None:
        """Forget a request whose caller stopped waiting; its late answer is ignored."""
        self._waiting.pop(rid, None)

    def clear(self) -> list[W]:
        """Every waiter (removed), when the connection is gone."""
        waiters = list(self._waiting.values())
        self._waiting.clear()
        return waiters

    def lost_error(self, reason: str) -> Exception:
        """What a waiter gets when the connection is gone: a new exception each
        time; the refusal's ``RingserveError`` when the server sent one (its
        request was not received), else ``ConnectionLost`` (it may have run)."""
        if self.refusal is not None:
            return error_from_answer(self.refusal)
        return ConnectionLost(reason)

    def closing_reason(self) -> str:
        """Why a connection with ``closing`` set was dropped, for logs and errors."""
        r = self.refusal or {}
        return (f"the server closed the connection ({_status_name(r.get('status'))}: "
                f"{brief(r.get('error'), 200)})")


# --- reading answers -------------------------------------------------------------------

@dataclass(slots=True, repr=False, eq=False)
class InferResult:
    """One ``infer`` answer.

    ``outputs`` is one array (numpy, or torch with ``as_torch=True``) when
    the model returns one tensor, else a dict name -> array. numpy outputs
    are read-only views of the received bytes (no copy); ``.copy()`` one to
    write to it. torch outputs own their memory.
    """

    outputs: object
    model: str | None
    version: str | None
    lane: str | None
    arm: str | None
    rid: int | str | None
    timing: dict[str, Any]
    answer: dict[str, Any] = field(default_factory=dict)   # the raw answer map
    attempts: int = 1                             # tries it took (retries + 1)
    # Given by the fallback of the version the router chose (protocol.md,
    # "Fallback answers"): why (no_worker, queue_full, deadline_near,
    # model_error); None for the model's own answers. ``version`` then names
    # the fallback version, or "fallback:constant".
    fallback: str | None = None
    defaulted: tuple[str, ...] = ()               # inputs left out that got their default

    def __repr__(self) -> str:
        extra = f", fallback={brief(self.fallback)}" if self.fallback is not None else ""
        return (f"InferResult(model={brief(self.model)}, version={brief(self.version)}, "
                f"lane={brief(self.lane)}, arm={brief(self.arm)}, rid={brief(self.rid)}{extra}, "
                f"outputs={_describe(self.outputs)}, timing={brief(self.timing, 200)})")


def _describe(outputs: object) -> str:
    if isinstance(outputs, dict):
        return "{" + ", ".join(f"{k!r}: {_describe(v)}" for k, v in outputs.items()) + "}"
    dtype = str(getattr(outputs, "dtype", "?")).removeprefix("torch.")
    return f"{dtype}{list(getattr(outputs, 'shape', []))}"


@overload
def decode_outputs(obj: object,
                   as_torch: Literal[False] = False) -> NDArray[Any] | dict[str, NDArray[Any]]: ...
@overload
def decode_outputs(obj: object,
                   as_torch: Literal[True]) -> torch.Tensor | dict[str, torch.Tensor]: ...
@overload
def decode_outputs(obj: object, as_torch: bool = False) -> object: ...
def decode_outputs(obj: object, as_torch: bool = False) -> object:
    """An answer's ``outputs`` -> one array, or a dict name -> array."""
    convert = to_torch if as_torch else to_numpy
    try:
        if type(obj) is dict and not _is_wire_tensor(obj):
            return {name: convert(t) for name, t in obj.items()}
        return convert(obj)
    except ProtocolError as e:   # ipc.tensors' complaint about a malformed map
        raise ClientError(f"the server's answer holds a malformed tensor: {e}") from None


def error_from_answer(answer: dict[str, Any]) -> RingserveError:
    """The exception for an answer whose status is not OK."""
    status: Any = answer.get("status")   # as the server sent it: an int, unless it is broken
    message = answer.get("error")
    if type(message) is not str:
        message = "(the server gave no message)"
    return error_class(status)(status, message, answer)


def _status_name(status: Any) -> str:   # Any: whatever the server sent; Status() refuses junk
    try:
        return Status(status).name
    except (ValueError, TypeError):
        return f"status {brief(status)}"


def _check_status(answer: dict[str, Any]) -> None:
    status = answer.get("status")
    if type(status) is not int:
        raise ClientError(f"the server's answer has no integer 'status'; its keys: "
                          f"{brief(list(answer))}")
    if status != 0:
        raise error_from_answer(answer)


def infer_result(answer: dict[str, Any], attempts: int = 1,
                 as_torch: bool = False) -> InferResult:
    """An OK ``infer`` answer -> ``InferResult``; any other raises its ``RingserveError``."""
    _check_status(answer)
    defaulted = answer.get("defaulted")
    return InferResult(decode_outputs(answer.get("outputs"), as_torch), answer.get("model"),
                       answer.get("version"), answer.get("lane"), answer.get("arm"),
                       answer.get("rid"), answer.get("timing") or {}, answer, attempts,
                       fallback if type(fallback := answer.get("fallback")) is str else None,
                       tuple(defaulted) if type(defaulted) is list else ())


def plain_answer(answer: dict[str, Any], attempts: int = 1) -> dict[str, Any]:
    """An OK answer of the other ops, as the map it is; else raises."""
    _check_status(answer)
    return answer


# --- retries and the time budget ----------------------------------------------------------

@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Retries of RESOURCE_EXHAUSTED and UNAVAILABLE answers, with jittered
    exponential backoff.

    Before retry k (k = 1, 2, ...) the client sleeps
    ``cap_k * (1 - jitter * u)``, u uniform in [0, 1), where
    ``cap_k = min(max_delay, base_delay * multiplier ** (k - 1))``: so
    delays stay in ``(cap_k * (1 - jitter), cap_k]``. ``attempts`` counts
    every try, the first included (1 = never retry).

    Defaults: 5 tries, 25 ms doubling to at most 1 s. A full queue drains in
    about (queue_limit / throughput), typically tens of ms, so the first
    retries come soon. ``jitter=0.5`` ("equal jitter") keeps every delay at
    least half its cap, so callers that were refused together spread out
    without some of them retrying at once into the same full queue.

    No retry is ever sent past the caller's ``deadline_ms`` or the client's
    ``timeout``: a retry that would leave less than 5 ms of the budget is not
    made, and the last error is raised instead.
    """

    attempts: int = 5
    base_delay: float = 0.025
    max_delay: float = 1.0
    multiplier: float = 2.0
    jitter: float = 0.5

    def __post_init__(self) -> None:
        if type(self.attempts) is not int or self.attempts < 1:
            raise ValueError(f"attempts must be an int >= 1, got {brief(self.attempts)}")
        if not (self.base_delay > 0 and math.isfinite(self.base_delay)):
            raise ValueError(f"base_delay must be > 0 seconds, got {brief(self.base_delay)}")
        if not (self.max_delay >= self.base_delay and math.isfinite(self.max_delay)):
            raise ValueError(f"max_delay must be >= base_delay ({self.base_delay}), "
                             f"got {brief(self.max_delay)}")
        if not (self.multiplier >= 1 and math.isfinite(self.multiplier)):
            raise ValueError(f"multiplier must be >= 1, got {brief(self.multiplier)}")
        if not 0 <= self.jitter <= 1:
            raise ValueError(f"jitter must be from 0 to 1, got {brief(self.jitter)}")

    def cap(self, retry: int) -> float:
        """The longest delay before retry number ``retry`` (1-based)."""
        if retry < 1:
            raise ValueError(f"retry numbers start at 1, got {retry}")
        # min() before the power would overflow: the exponent is bounded by
        # where the cap is reached anyway.
        steps = retry - 1
        if self.multiplier > 1:
            steps = min(steps, math.ceil(math.log(self.max_delay / self.base_delay,
                                                  self.multiplier)) + 1)
        return min(self.max_delay, self.base_delay * self.multiplier ** steps)

    def delay(self, retry: int, rng: random.Random | None = None) -> float:
        """The jittered delay before retry number ``retry`` (1-based)."""
        u = (rng or random).random()
        return self.cap(retry) * (1.0 - self.jitter * u)


DEFAULT_RETRY = RetryPolicy()


def check_options(connect_timeout: float, timeout: float, retry: RetryPolicy | None,
                  connections: int, token: str | None = None) -> None:
    """The constructor arguments both clients share."""
    if token is not None and (type(token) is not str or not token):
        raise TypeError("token must be a non-empty str (the server's [auth] token) or None")
    for name, value in (("connect_timeout", connect_timeout), ("timeout", timeout)):
        if type(value) not in (int, float) or not value > 0 or not math.isfinite(value):
            raise ValueError(f"{name} must be a number of seconds > 0, got {brief(value)}")
    if retry is not None and not isinstance(retry, RetryPolicy):
        raise TypeError(f"retry must be a RetryPolicy or None, got {type(retry).__name__}")
    if type(connections) is not int or connections < 1:
        raise ValueError(f"connections must be an int >= 1, got {brief(connections)}")


L = TypeVar("L")   # a client's connection


class ClientOptions(Generic[L]):
    """What ``Client`` and ``AsyncClient`` share from their constructors:
    the checked options, and the slots of their connections (each opened by
    the subclass, in its own way)."""

    def __init__(self, host: str, port: int, connect_timeout: float, timeout: float,
                 retry: "RetryPolicy | None", connections: int, token: str | None):
        check_options(connect_timeout, timeout, retry, connections, token)
        self.host, self.port = host, port
        self.connect_timeout = connect_timeout
        self.timeout = timeout
        self.retry = retry
        self.token = token
        self._closed = False
        self._links: list[L | None] = [None] * connections
        self._turn = itertools.count()


@dataclass(frozen=True, slots=True)
class Retry:
    """``Call``'s answer when the request should be sent again after ``delay`` seconds."""

    delay: float


T = TypeVar("T")   # what a call's decode makes of an OK answer


class _Attempt(Protocol):
    """The connection an attempt was sent on (``Call.sent``)."""

    def drop(self, rid: int) -> None: ...


class Call(Generic[T]):
    """One call (an infer or another op) across its attempts.

    The clients drive it::

        call = Call(msg, decode, policy=..., timeout=..., now=now)   # packs msg
        while True:
            call.begin_attempt(now)          # raises the last error when out of budget
            rid = <a fresh id on a connection>
            write call.frame(rid); wait for the answer, at most call.time_left(now)
            step = call.answer(answer, now)  # or call.failed(exc, now): an error without answer
            if isinstance(step, Retry): sleep step.delay; continue
            return step                      # the decoded result; errors are raised

    The budget: the call gives up ``timeout`` seconds after it started, and a
    retry is only sent if it fits in ``deadline_ms`` (when the caller gave
    one) and in ``timeout``. A retry carries the *remaining* part of the
    caller's deadline, so the server's deadline stays the caller's.
    """

    __slots__ = ("packed", "decode", "policy", "rng", "timeout", "timeout_at", "deadline_at",
                 "budget_at", "deadline_ms", "attempts", "last_error", "sent", "idempotent")

    def __init__(self, msg: dict[str, Any], decode: Callable[[dict[str, Any], int], T], *,
                 policy: RetryPolicy | None, timeout: float, now: float,
                 rng: random.Random | None = None):
        msg = dict(msg)
        dl = msg.pop("deadline_ms", None)
        # May run twice without harm: a connection lost without an answer
        # (a front killed, say) is retried for these, never for feedback.
        self.idempotent = msg.get("op", "infer") in IDEMPOTENT_OPS
        self.packed = Packed(msg)
        self.decode = decode        # (answer, attempts) -> result; raises for a bad status
        self.policy = policy
        self.rng = rng
        self.timeout = timeout
        self.timeout_at = now + timeout
        self.deadline_at: float | None = None
        self.budget_at = self.timeout_at
        if dl is not None:
            self.deadline_at = now + dl / 1000
            self.budget_at = min(self.timeout_at, self.deadline_at)
        self.deadline_ms = dl       # what the attempt in flight carries
        self.attempts = 0
        self.last_error: RingserveError | ConnectionLost | None = None
        # the transport's handle on the attempt in flight: (connection, id or None)
        self.sent: tuple[_Attempt, int | None] | None = None

    def begin_attempt(self, now: float) -> None:
        """Count the next attempt; a retry's ``deadline_ms`` is what is left of the caller's."""
        if self.attempts and self.deadline_at is not None:
            left_ms = math.floor((self.deadline_at - now) * 1000)
            if left_ms < 1:   # the backoff sleep overran what was left
                # A retry follows failed() or lost(), which set last_error.
                assert self.last_error is not None
                raise self.last_error
            self.deadline_ms = left_ms
        self.attempts += 1

    def frame(self, rid: int) -> Frame:
        """The attempt's frame, with id ``rid``."""
        return self.packed.frame(rid, self.deadline_ms)

    def lost(self, error: ConnectionLost, now: float) -> Retry:
        """The connection went away with the attempt unanswered (no id-0
        answer): ``Retry`` on a new connection if the op is idempotent and
        the policy and budget allow, else raises ``error``. A front that died
        leaves its connections so; the others on the port take the retry."""
        if not self.idempotent:
            raise error
        self.last_error = error
        p = self.policy
        if p is not None and self.attempts < p.attempts:
            delay = p.delay(self.attempts, self.rng)
            if now + delay + _MIN_ATTEMPT_S <= self.budget_at:
                return Retry(delay)
        raise error

    def time_left(self, now: float) -> float:
        """How long the attempt in flight may still wait for its answer."""
        return max(0.0, self.timeout_at - now)

    def answer(self, answer: dict[str, Any], now: float) -> T | Retry:
        """The attempt's answer -> the result, or ``Retry``; raises the final error."""
        try:
            return self.decode(answer, self.attempts)
        except RingserveError as e:
            return self.failed(e, now)

    def failed(self, error: RingserveError, now: float, received: bool = True) -> Retry:
        """The attempt failed with ``error``: ``Retry`` if the policy and the
        budget allow, else raises it (with ``error.attempts`` set).

        ``received=False``: ``error`` is the id-0 answer the server sent
        before it closed the connection the attempt was on (``InFlight``),
        so the request was not received, and any status but UNAUTHENTICATED
        may be retried; otherwise only RETRYABLE ones are.
        """
        error.attempts = self.attempts
        self.last_error = error
        p = self.policy
        if received:
            retryable = error.status in RETRYABLE
        else:
            retryable = error.status != Status.UNAUTHENTICATED
        if p is not None and retryable and self.attempts < p.attempts:
            delay = p.delay(self.attempts, self.rng)
            if now + delay + _MIN_ATTEMPT_S <= self.budget_at:
                return Retry(delay)
        raise error

    def timed_out(self) -> ClientTimeout:
        """The error for a call whose answer did not come within ``timeout``."""
        return ClientTimeout(f"no answer within the client's timeout of {self.timeout:g} s "
                             f"(attempt {self.attempts}); the server may be overloaded or "
                             "unreachable")
