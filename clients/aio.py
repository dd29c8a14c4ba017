"""The asyncio client: an ``asyncio.Protocol`` per connection, futures by id.

``_Link.data_received`` only feeds the sans-IO ``FrameDecoder`` and completes
the future of each answer's id; it never awaits. Every call is a coroutine
that sends its frame and awaits its future, so pipelining comes from
concurrency: many tasks awaiting calls on one client keep many requests in
flight on one connection. Writes honour the transport's flow control: when
its buffer is over the high-water mark (the server stopped reading), callers
wait in ``send`` until it drains.

Works on any asyncio event loop, uvloop's included.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Callable
from functools import partial
from typing import Any, TypeVar, cast

from ipc.framing import FrameDecoder

from . import _core
from ._core import Call, InFlight, Retry, RetryPolicy
from .errors import ConnectFailed, ConnectionLost, RingserveError

__all__ = ["AsyncClient"]

_monotonic = time.monotonic
T = TypeVar("T")


class _Link(asyncio.Protocol):
    """One TCP connection and the requests in flight on it."""

    def __init__(self) -> None:
        self.decoder = FrameDecoder(_core.MAX_ANSWER_BYTES)
        self.inflight: InFlight[asyncio.Future[dict[str, Any]]] = InFlight()
        self.transport: asyncio.Transport | None = None
        self.alive = False
        self._writable = asyncio.Event()
        self._writable.set()
        self._loop = asyncio.get_running_loop()
        self._closing = False

    # -- asyncio.Protocol ------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # create_connection makes a stream transport: an asyncio.Transport
        self.transport = cast(asyncio.Transport, transport)
        self.alive = True
        sock = transport.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except (OSError, AttributeError):   # pragma: no cover - not TCP
                pass

    def data_received(self, data: bytes) -> None:
        inflight = self.inflight
        for item in self.decoder.feed(data):
            if type(item) is not dict:
                self._fail(f"the server sent a malformed frame ({item}); connection dropped")
                assert self.transport is not None   # data comes after connection_made
                self.transport.abort()
                return
            fut = inflight.match(item)
            if fut is not None:
                if not fut.done():
                    fut.set_result(item)
            elif inflight.closing:   # the server's last word: drop the connection now
                self._fail(inflight.closing_reason())
                assert self.transport is not None
                self.transport.abort()
                return

    def eof_received(self) -> bool:
        return False   # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        if self._closing:
            reason = "the client was closed"
        elif exc is None:
            reason = "the server closed the connection"
        else:
            reason = f"the connection to the server failed: {exc}"
        self._fail(reason)

    def pause_writing(self) -> None:
        self._writable.clear()

    def resume_writing(self) -> None:
        self._writable.set()

    # -- used by AsyncClient -------------------------------------------------------------
    def _fail(self, reason: str) -> None:
        self.alive = False
        for fut in self.inflight.clear():
            if not fut.done():
                fut.set_exception(self.inflight.lost_error(reason))
        self._writable.set()   # wake writers so that they see the connection is gone

    async def send(self, call: Call[Any]) -> tuple[int, asyncio.Future[dict[str, Any]]] | None:
        """Write ``call``'s next frame under a fresh id; return the id and the
        answer's future. None, with nothing written, if the connection is
        gone (the caller takes another)."""
        if not self._writable.is_set():
            await self._writable.wait()
        if not self.alive:
            return None
        assert self.transport is not None   # alive: connection_made has run
        fut: asyncio.Future[dict[str, Any]] = self._loop.create_future()
        rid = self.inflight.add(fut)
        chunks = call.frame(rid)
        if len(chunks) == 1:
            self.transport.write(chunks[0])
        else:
            self.transport.writelines(chunks)
        return rid, fut

    def close(self) -> None:
        self._closing = True
        if self.transport is not None:
            self.transport.close()
        self._fail("the client was closed")


class AsyncClient(_core.ClientOptions[_Link]):
    """An asyncio ringserve client; pipelined by concurrency.

    Open it with ``client = await AsyncClient.connect(host, port, ...)`` or
    ``async with AsyncClient(host, port, ...) as client``; a client made with
    the bare constructor connects at its first call. Options are those of
    ``clients.Client``.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 7070, *,
                 connect_timeout: float = 5.0, timeout: float = 30.0,
                 retry: RetryPolicy | None = _core.DEFAULT_RETRY, connections: int = 1,
                 token: str | None = None):
        super().__init__(host, port, connect_timeout, timeout, retry, connections, token)
        self._dial_lock: asyncio.Lock | None = None

    @classmethod
    async def connect(cls, host: str = "127.0.0.1", port: int = 7070,
                      **options: Any) -> "AsyncClient":
        """A client with its connections open (``ConnectFailed`` if they cannot be)."""
        self = cls(host, port, **options)
        await self._open()
        return self

    async def _open(self) -> None:
        try:
            for i in range(len(self._links)):
                link = self._links[i]
                if link is None or not link.alive:
                    self._links[i] = await self._dial()
        except BaseException:
            await self.close()
            raise

    async def __aenter__(self) -> "AsyncClient":
        await self._open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- the API ---------------------------------------------------------------------
    async def infer(self, model: str, inputs: object, *, key: str | None = None,
                    exp: str | None = None, version: str | None = None,
                    deadline_ms: int | None = None,
                    as_torch: bool = False) -> _core.InferResult:
        """Run ``model`` on one sample; return its ``InferResult`` or raise."""
        msg = _core.infer_request(model, inputs, key, exp, version, deadline_ms)
        return await self._call(msg, partial(_core.infer_result, as_torch=as_torch))

    async def feedback(self, ref: int | str, outcome: float, *,
                       model: str | None = None) -> dict[str, Any]:
        """Report ``outcome`` for ``ref`` (an earlier answer's ``rid``, or a routing key)."""
        return await self._call(_core.feedback_request(ref, outcome, model), _core.plain_answer)

    async def health(self, model: str | None = None) -> dict[str, Any]:
        return await self._call(_core.op_request("health", model), _core.plain_answer)

    async def models(self) -> dict[str, Any]:
        return await self._call(_core.op_request("models"), _core.plain_answer)

    async def stats(self, model: str | None = None) -> dict[str, Any]:
        return await self._call(_core.op_request("stats", model), _core.plain_answer)

    async def close(self) -> None:
        """Close the connections; calls still waiting fail with ``ConnectionLost``."""
        if self._closed:
            return
        self._closed = True
        links, self._links = self._links, []
        for link in links:
            if link is not None:
                link.close()
        await asyncio.sleep(0)   # let the transports run their close callbacks

    @property
    def closed(self) -> bool:
        return self._closed

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"{len(self._links)} connection(s)"
        return f"<{type(self).__name__} {self.host}:{self.port} {state}>"

    # -- one call -----------------------------------------------------------------------
    async def _call(self, msg: dict[str, Any], decode: Callable[[dict[str, Any], int], T]) -> T:
        if self._closed:
            raise ValueError("the client is closed")
        call = Call(msg, decode, policy=self.retry, timeout=self.timeout, now=_monotonic())
        while True:
            call.begin_attempt(_monotonic())
            link = await self._link()
            rid = None
            step: T | Retry
            try:
                # The timeout covers the write too: it waits while the server
                # does not read.
                async with asyncio.timeout(call.time_left(_monotonic())):
                    sent = await link.send(call)
                    if sent is None:   # it died since _link() took it: once more
                        link = await self._link()
                        sent = await link.send(call)
                        if sent is None:   # nothing written: closed at once too
                            raise link.inflight.lost_error("the connection to the server "
                                                           "is closed")
                    rid, fut = sent
                    answer = await fut
            except TimeoutError:   # only asyncio.timeout's: futures never hold one
                raise call.timed_out() from None
            except RingserveError as e:   # the id-0 answer of a server's close: the
                step = call.failed(e, _monotonic(), received=False)   # request was not received
            except ConnectionLost as e:
                step = call.lost(e, _monotonic())
            else:
                step = call.answer(answer, _monotonic())
            finally:
                if rid is not None:
                    link.inflight.drop(rid)
            if isinstance(step, Retry):
                await asyncio.sleep(step.delay)
                continue
            return step

    async def _dial(self) -> _Link:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.connect_timeout):
                _, link = await loop.create_connection(_Link, self.host, self.port)
        except (OSError, TimeoutError) as e:
            what = "timed out" if isinstance(e, TimeoutError) else str(e)
            raise ConnectFailed(f"cannot connect to ringserve at {self.host}:{self.port}: "
                                f"{what}") from e
        if self.token is not None:
            assert link.transport is not None   # connected
            link.transport.write(_core.auth_frame(self.token))
        return link

    async def _link(self) -> _Link:
        links = self._links
        if not links:
            raise ConnectionLost("the client was closed")
        i = next(self._turn) % len(links)
        link = links[i]
        if link is not None and link.alive:
            return link
        if self._dial_lock is None:
            self._dial_lock = asyncio.Lock()
        async with self._dial_lock:   # one dial per broken slot, however many callers
            if self._closed:
                raise ConnectionLost("the client was closed")
            link = self._links[i]
            if link is None or not link.alive:
                if link is not None:
                    link.close()
                link = self._links[i] = await self._dial()
            return link
