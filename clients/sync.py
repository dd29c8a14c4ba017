"""The blocking client: sockets, one reader thread per connection, futures.

Threads of a ``Client``:

- the caller's threads encode a request and write its frame (one writer at
  a time per connection: ``_Link._send_lock``);
- one reader thread per connection reads frames, matches each answer to its
  request by id (``_core.InFlight``) and completes the request's future;
- one timer thread runs the backoff sleeps of retries and fails the calls
  whose answer did not come within ``timeout``.

The reader never waits on a writer: the table of requests in flight has its
own short lock, so a writer blocked because the server paused reading (it
does when its answers to us pile up) cannot stop the reader from draining
those answers.

Future callbacks (``Future.add_done_callback``) run in the reader or timer
thread: keep them short, and do not call a blocking method of the same client
from one (that would wait on the thread that must deliver the answer).
"""

from __future__ import annotations

import collections
import heapq
import itertools
import logging
import math
import socket
import struct
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, InvalidStateError
from functools import partial
from typing import Any, TypeVar, TypeVarTuple, Unpack

from ipc.framing import FrameDecoder

from . import _core
from ._core import Call, InFlight, Retry, RetryPolicy
from .errors import ConnectFailed, ConnectionLost, RingserveError

__all__ = ["Client"]

log = logging.getLogger("ringserve.client")
_monotonic = time.monotonic
_RECV_BYTES = 256 * 1024
_io_thread = threading.local()   # .client is set in the threads a Client owns

T = TypeVar("T")
Ts = TypeVarTuple("Ts")
# What a request in flight waits with: called as (answer, None) or (None, exc).
_Waiter = Callable[[dict[str, Any] | None, BaseException | None], None]


def _settle(fut: Future[Any], result: object = None, exc: BaseException | None = None) -> None:
    """Complete ``fut`` unless something else (a timeout, a close) already did."""
    try:
        if exc is None:
            fut.set_result(result)
        else:
            fut.set_exception(exc)
    except InvalidStateError:
        pass


class _Link:
    """One TCP connection and the requests in flight on it."""

    def __init__(self, owner: "Client", host: str, port: int, connect_timeout: float,
                 send_timeout: float):
        try:
            sock = socket.create_connection((host, port), timeout=connect_timeout)
        except OSError as e:
            raise ConnectFailed(f"cannot connect to ringserve at {host}:{port}: {e}") from e
        sock.settimeout(None)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # A write that makes no progress for this long (the server stopped
        # reading) fails and drops the connection instead of blocking the
        # caller forever; reads stay blocking for the reader thread.
        sec = int(send_timeout)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO,
                        struct.pack("ll", sec, int((send_timeout - sec) * 1e6)))
        if owner.token is not None:
            try:
                sock.sendall(_core.auth_frame(owner.token))
            except OSError as e:
                sock.close()
                raise ConnectFailed(f"cannot write to ringserve at {host}:{port}: {e}") from e
        self.sock = sock
        self.inflight: InFlight[_Waiter] = InFlight()
        self.alive = True
        self._lock = threading.Lock()        # guards inflight and alive
        self._send_lock = threading.Lock()   # one frame written at a time
        self._closing = False
        self._reader = threading.Thread(target=self._read, args=(owner,), daemon=True,
                                        name=f"ringserve-client-reader {host}:{port}")
        self._reader.start()

    def send(self, call: Call[Any], waiter: _Waiter) -> int | None:
        """Write ``call``'s next frame under a fresh id; ``waiter(answer, exc)``
        gets the outcome. None, with nothing written, if the connection is
        already gone (the caller takes another)."""
        with self._lock:
            if not self.alive:
                return None
            rid = self.inflight.add(waiter)
        chunks = call.frame(rid)
        try:
            with self._send_lock:
                for chunk in chunks:
                    self.sock.sendall(chunk)
        except (BrokenPipeError, ConnectionResetError):
            # The server has closed the connection: its reader is about to
            # see that too, after what the server sent before (the id-0
            # answer that says why, when it closed on its own), and fails
            # the waiters, this one included, with that.
            with self._lock:
                self.alive = False
        except OSError as e:   # the send timeout: the server stopped reading
            self._lost(f"writing to the server failed: {e}")
        return rid

    def drop(self, rid: int) -> None:
        with self._lock:
            self.inflight.drop(rid)

    def _read(self, owner: Client) -> None:
        _io_thread.client = owner
        decoder = FrameDecoder(_core.MAX_ANSWER_BYTES)
        buf = bytearray(_RECV_BYTES)
        view = memoryview(buf)
        reason = "the server closed the connection"
        try:
            while True:
                n = self.sock.recv_into(buf)
                if n == 0:
                    break
                for item in decoder.feed(view[:n]):
                    if type(item) is not dict:
                        reason = f"the server sent a malformed frame ({item}); connection dropped"
                        return
                    with self._lock:
                        waiter = self.inflight.match(item)
                        closing = self.inflight.closing
                        if closing:   # the server's last word: no new request goes here
                            self.alive = False
                    if waiter is not None:
                        waiter(item, None)
                    elif closing:     # drop the connection now, not at the server's FIN
                        reason = self.inflight.closing_reason()
                        return
        except OSError as e:
            if not self._closing:
                reason = f"the connection to the server failed: {e}"
        finally:
            if self._closing:
                reason = "the client was closed"
            self._lost(reason)

    def _lost(self, reason: str) -> None:
        with self._lock:
            self.alive = False
            waiters = self.inflight.clear()
            errors = [self.inflight.lost_error(reason) for _ in waiters]
        try:
            self.sock.shutdown(socket.SHUT_RDWR)   # wakes the reader if it is not the caller
        except OSError:
            pass
        for waiter, exc in zip(waiters, errors, strict=True):
            waiter(None, exc)

    def close(self) -> None:
        self._closing = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        if self._reader is not threading.current_thread():
            self._reader.join()
        self.sock.close()


class _Timers:
    """One thread that runs the retries' callbacks when their backoff is over
    (a heap) and fails calls when their ``timeout`` passes (a FIFO: every call
    of a client has the same timeout, so they fall due in the order they
    started; finished ones are dropped from its front as we go)."""

    def __init__(self, owner: "Client"):
        self._cond = threading.Condition()
        self._heap: list[tuple[float, int, Callable[..., object], tuple[Any, ...]]] = []
        self._fifo: collections.deque[
            tuple[float, Future[Any], Callable[..., object], tuple[Any, ...]]] = collections.deque()
        self._seq = itertools.count()
        self._wake_at = math.inf   # when the thread will look next, unless notified
        self._stopped = False
        self._thread = threading.Thread(target=self._run, args=(owner,), daemon=True,
                                        name="ringserve-client-timers")
        self._thread.start()

    def call_at(self, when: float, fn: Callable[[Unpack[Ts]], object], *args: Unpack[Ts]) -> None:
        with self._cond:
            heapq.heappush(self._heap, (when, next(self._seq), fn, args))
            if when < self._wake_at:
                self._cond.notify()

    def expire_at(self, when: float, fut: Future[Any], fn: Callable[[Unpack[Ts]], object],
                  *args: Unpack[Ts]) -> None:
        """Run ``fn(*args)`` at ``when`` unless ``fut`` is done by then."""
        with self._cond:
            fifo = self._fifo
            while fifo and fifo[0][1].done():
                fifo.popleft()
            fifo.append((when, fut, fn, args))
            # Waking the thread costs a context switch; a call made while an
            # earlier one is pending falls due after it and needs none.
            if when < self._wake_at:
                self._cond.notify()

    def _run(self, owner: Client) -> None:
        _io_thread.client = owner
        while True:
            due: list[tuple[Callable[..., object], tuple[Any, ...]]] = []
            with self._cond:
                while not due:
                    if self._stopped:
                        return
                    now = _monotonic()
                    heap, fifo = self._heap, self._fifo
                    while heap and heap[0][0] <= now:
                        _, _, fn, args = heapq.heappop(heap)
                        due.append((fn, args))
                    while fifo and (fifo[0][1].done() or fifo[0][0] <= now):
                        _, fut, fn, args = fifo.popleft()
                        if not fut.done():
                            due.append((fn, args))
                    if not due:
                        self._wake_at = min([t[0][0] for t in (heap, fifo) if t],
                                            default=math.inf)
                        self._cond.wait(None if self._wake_at == math.inf
                                        else self._wake_at - now)
                        self._wake_at = -math.inf   # awake: every change is seen
            for fn, args in due:
                try:
                    fn(*args)
                except Exception:   # a bug of ours; keep the other calls' timers running
                    log.exception("ringserve client timer callback failed")

    def stop(self) -> list[Future[Any]]:
        """Stop the thread; return the futures of every call not known to be done."""
        with self._cond:
            self._stopped = True
            self._cond.notify()
            futures = [f for _, f, _, _ in self._fifo if not f.done()]
            self._fifo.clear()
            self._heap.clear()
        if self._thread is not threading.current_thread():
            self._thread.join()
        return futures


class Client(_core.ClientOptions[_Link]):
    """A blocking ringserve client; thread-safe, pipelined.

    Many threads may share one client, and ``submit`` puts many requests in
    flight on one connection; answers are matched by id in a reader thread.
    With ``connections=n`` the client keeps n connections and sends each call
    on the next one in turn (``ClientPool`` is the same with ``size``). A
    connection that breaks is replaced at the next call.

    ``timeout`` bounds each call as a whole, retries included (seconds);
    ``retry`` is a ``RetryPolicy``, or None for no retries.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 7070, *,
                 connect_timeout: float = 5.0, timeout: float = 30.0,
                 retry: RetryPolicy | None = _core.DEFAULT_RETRY, connections: int = 1,
                 token: str | None = None):
        super().__init__(host, port, connect_timeout, timeout, retry, connections, token)
        self._dial_lock = threading.Lock()
        self._timers = _Timers(self)
        try:
            for i in range(connections):
                self._links[i] = _Link(self, host, port, connect_timeout, timeout)
        except BaseException:
            self.close()
            raise

    # -- the API ---------------------------------------------------------------------
    def infer(self, model: str, inputs: object, *, key: str | None = None,
              exp: str | None = None, version: str | None = None,
              deadline_ms: int | None = None,
              as_torch: bool = False) -> _core.InferResult:
        """Run ``model`` on one sample; return its ``InferResult`` or raise."""
        return self._wait(self.submit(model, inputs, key=key, exp=exp, version=version,
                                      deadline_ms=deadline_ms, as_torch=as_torch))

    def submit(self, model: str, inputs: object, *, key: str | None = None,
               exp: str | None = None, version: str | None = None,
               deadline_ms: int | None = None,
               as_torch: bool = False) -> Future[_core.InferResult]:
        """Like ``infer`` without waiting: a ``Future`` of the ``InferResult``.

        Arguments are checked (and the inputs encoded) before it returns, so
        misuse raises here; everything else arrives through the future.
        """
        msg = _core.infer_request(model, inputs, key, exp, version, deadline_ms)
        return self._start(msg, partial(_core.infer_result, as_torch=as_torch))

    def feedback(self, ref: int | str, outcome: float, *,
                 model: str | None = None) -> dict[str, Any]:
        """Report ``outcome`` for ``ref`` (an earlier answer's ``rid``, or a routing key)."""
        return self._wait(self._start(_core.feedback_request(ref, outcome, model),
                                      _core.plain_answer))

    def health(self, model: str | None = None) -> dict[str, Any]:
        """The ``health`` answer: liveness, readiness, one entry per worker."""
        return self._op("health", model)

    def models(self) -> dict[str, Any]:
        """The ``models`` answer: each served model's schema and batching."""
        return self._op("models")

    def stats(self, model: str | None = None) -> dict[str, Any]:
        """The ``stats`` answer: counts, latency percentiles, queues, workers."""
        return self._op("stats", model)

    def close(self) -> None:
        """Close the connections; calls still waiting fail with ``ConnectionLost``."""
        with self._dial_lock:
            if self._closed:
                return
            self._closed = True
            links, self._links = self._links, []
        for link in links:
            if link is not None:
                link.close()
        for fut in self._timers.stop():
            _settle(fut, exc=ConnectionLost("the client was closed"))

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"{len(self._links)} connection(s)"
        return f"<{type(self).__name__} {self.host}:{self.port} {state}>"

    # -- one call -----------------------------------------------------------------------
    def _op(self, op: str, model: str | None = None) -> dict[str, Any]:
        return self._wait(self._start(_core.op_request(op, model), _core.plain_answer))

    def _wait(self, fut: Future[T]) -> T:
        if getattr(_io_thread, "client", None) is self:
            raise RuntimeError("a blocking call of a Client from a future callback of the same "
                               "client would wait on itself; use submit() there")
        return fut.result()

    def _start(self, msg: dict[str, Any], decode: Callable[[dict[str, Any], int], T]) -> Future[T]:
        if self._closed:
            raise ValueError("the client is closed")
        now = _monotonic()
        call = Call(msg, decode, policy=self.retry, timeout=self.timeout, now=now)
        fut: Future[T] = Future()
        fut.set_running_or_notify_cancel()   # a request on the wire cannot be called back
        self._timers.expire_at(call.timeout_at, fut, self._expire, call, fut)
        self._attempt(call, fut)
        return fut

    def _attempt(self, call: Call[Any], fut: Future[Any]) -> None:
        if fut.done():
            return
        try:
            call.begin_attempt(_monotonic())
        except (RingserveError, ConnectionLost) as e:   # out of budget: the last error is final
            _settle(fut, exc=e)
            return
        try:
            for _ in range(2):   # a connection that died since _link() took it: once more
                link = self._link()
                call.sent = (link, None)
                rid = link.send(call, partial(self._answered, call, fut))
                if rid is not None:
                    call.sent = (link, rid)
                    return
            # Nothing written: the new connection was closed at once too.
            raise link.inflight.lost_error("the connection to the server is closed")
        except RingserveError as e:   # closed with an id-0 answer: not received, maybe retry
            self._answered(call, fut, None, e)
        except BaseException as e:    # cannot connect, connection lost, closed
            _settle(fut, exc=e)

    def _answered(self, call: Call[Any], fut: Future[Any], answer: dict[str, Any] | None,
                  exc: BaseException | None) -> None:
        now = _monotonic()
        step: object
        try:
            if exc is None:
                assert answer is not None   # a waiter gets (answer, None) or (None, exc)
                step = call.answer(answer, now)
            elif isinstance(exc, RingserveError):   # the id-0 answer of a server's close:
                step = call.failed(exc, now, received=False)   # the request was not received
            elif isinstance(exc, ConnectionLost):
                step = call.lost(exc, now)
            else:
                raise exc
        except BaseException as e:
            _settle(fut, exc=e)
            return
        if isinstance(step, Retry):
            self._timers.call_at(now + step.delay, self._attempt, call, fut)
        else:
            _settle(fut, step)

    def _expire(self, call: Call[Any], fut: Future[Any]) -> None:
        if call.sent is not None and call.sent[1] is not None:
            call.sent[0].drop(call.sent[1])
        _settle(fut, exc=call.timed_out())

    def _link(self) -> _Link:
        links = self._links
        if not links:
            raise ConnectionLost("the client was closed")
        i = next(self._turn) % len(links)
        link = links[i]
        if link is not None and link.alive:
            return link
        with self._dial_lock:   # reconnect the broken slot, once
            if self._closed:
                raise ConnectionLost("the client was closed")
            link = self._links[i]
            if link is None or not link.alive:
                if link is not None:
                    link.close()
                link = self._links[i] = _Link(self, self.host, self.port, self.connect_timeout,
                                              self.timeout)
            return link

