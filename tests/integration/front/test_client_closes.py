"""The clients when the server closes a connection on its own ("closing is
an answer", protocol.md "Frames"): it first sends one answer with id 0
saying why (RESOURCE_EXHAUSTED for a limit or a timeout, UNAVAILABLE when
draining, UNAUTHENTICATED for a refused token), then closes. The requests in
flight on that connection were not received: an infer (or any call) is
retried on a new connection within the retry policy and the call's budget,
except after UNAUTHENTICATED; and a pooled connection closed that way while
idle is replaced at the next call, which does not fail.

Against ``Scripted``, a raw socket server in this file whose connections
follow a script (no daemon), so every close comes exactly when the test
says; each answer names the connection that gave it.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time

import numpy as np
import pytest

from clients import AsyncClient, AsyncClientPool, Client, ClientPool, RetryPolicy, errors
from daemon.front.connection import LINGER_S
from ipc.framing import FrameDecoder, encode_frame
from ipc.status import Status

FAST = RetryPolicy(attempts=4, base_delay=0.005, max_delay=0.01)


class Scripted:
    """Accepts connections; the n-th (from 1) follows ``script[n]``, else serves.

    - ``("refuse", status, error)``: read one request frame, answer nothing
      but an id-0 ``status``/``error``, then close as the daemon does
      (daemon/front/connection.py ``refuse``): shut down the sending side and read and
      drop what still comes, up to LINGER_S, so the client's later writes do
      not meet a reset before it has read the answer.
    - ``("idle", status, error, hold)``: answer the first request, then send
      the id-0 answer at once and keep the socket open (reading and ignoring
      what comes) ``hold`` seconds before closing: a close whose FIN is late.
    - default: answer every request: infer with float32 [n], other ops with
      ``{"live": True}``; every answer carries ``"conn": n``.

    Frames with id 0 (the clients' auth frame) are never answered.
    """

    def __init__(self, script: dict | None = None):
        self.script = script or {}
        self.srv = socket.create_server(("127.0.0.1", 0))
        self.port = self.srv.getsockname()[1]
        self.connections = 0
        self.refused = threading.Event()   # an id-0 answer was sent
        self._socks: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._stop = threading.Event()
        self._start(self._accept)

    def _start(self, target, *args) -> None:
        t = threading.Thread(target=target, args=args, daemon=True)
        self._threads.append(t)
        t.start()

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self.srv.accept()
            except OSError:
                return
            self.connections += 1
            self._socks.append(sock)
            self._start(self._serve, sock, self.connections)

    def _requests(self, sock: socket.socket, dec: FrameDecoder):
        while True:
            try:
                data = sock.recv(65536)
            except OSError:
                return
            if not data:
                return
            for m in dec.feed(data):
                if type(m) is dict and m.get("id"):
                    yield m

    def _refuse(self, sock, status, error) -> None:
        sock.sendall(encode_frame({"id": 0, "status": int(status), "error": error}))
        self.refused.set()

    def _serve(self, sock: socket.socket, n: int) -> None:
        step = self.script.get(n, ("serve",))
        dec = FrameDecoder()
        try:
            if step[0] == "refuse":
                next(self._requests(sock, dec), None)
                self._refuse(sock, step[1], step[2])
                sock.shutdown(socket.SHUT_WR)
                sock.settimeout(LINGER_S)
                try:
                    while sock.recv(65536):
                        pass
                except OSError:   # the linger is over (or the peer reset)
                    pass
                return
            for i, m in enumerate(self._requests(sock, dec)):
                if step[0] == "idle" and i > 0:
                    continue   # read and ignored: the server is closing
                answer = {"id": m["id"], "status": 0, "model": "m", "version": "1", "conn": n}
                if m.get("op", "infer") == "infer":
                    answer["outputs"] = {"dtype": "float32", "shape": [1],
                                         "data": np.float32(n).tobytes()}
                else:
                    answer["live"] = True
                sock.sendall(encode_frame(answer))
                if step[0] == "idle":
                    self._refuse(sock, step[1], step[2])
                    self._stop.wait(step[3])
                    return
        except OSError:
            pass
        finally:
            sock.close()

    def close(self) -> None:
        self._stop.set()
        try:
            self.srv.shutdown(socket.SHUT_RDWR)   # wakes the accept(); close() alone does not
        except OSError:
            pass
        self.srv.close()
        for s in self._socks:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for t in self._threads:
            t.join(5)


@pytest.fixture
def scripted():
    servers = []

    def make(script=None):
        servers.append(Scripted(script))
        return servers[-1]
    yield make
    for s in servers:
        s.close()


IDLE = ("refuse", Status.RESOURCE_EXHAUSTED, "idle timeout")
DRAINING = ("refuse", Status.UNAVAILABLE, "server is draining")

# (name, make a client, is async)
KINDS = {
    "sync": lambda port, **kw: Client(port=port, **kw),
    "pool": lambda port, **kw: ClientPool(port=port, size=2, **kw),
    "async": lambda port, **kw: AsyncClient(port=port, **kw),
    "async-pool": lambda port, **kw: AsyncClientPool(port=port, size=2, **kw),
}


def call(kind: str, port: int, fn, **options):
    """Run ``fn(client)`` (a coroutine function for the async kinds) on a new client."""
    make = KINDS[kind]
    if kind.startswith("async"):
        async def main():
            async with make(port, **options) as c:
                return await fn(c)
        return asyncio.run(main())
    with make(port, **options) as c:
        return fn(c)


def infer(c):
    return c.infer("m", [1.0])


def health(c):
    return c.health()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("refusal", [IDLE, DRAINING], ids=["idle-timeout", "draining"])
def test_a_call_in_flight_at_a_close_is_retried_on_a_new_connection(scripted, kind, refusal):
    """The brief's case: the first connection reads the request, answers id 0
    RESOURCE_EXHAUSTED "idle timeout" and closes; the second answers."""
    srv = scripted({1: refusal})
    r = call(kind, srv.port, infer, retry=FAST)
    assert r.answer["conn"] == 2 and r.outputs.tolist() == [2.0]
    assert r.attempts == 2
    assert srv.connections == 2   # pools open both of theirs at start; nobody a third
    h = call(kind, srv.port, health, retry=FAST)   # other ops alike (a fresh client: conn 3)
    assert h["live"]


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_every_request_in_flight_at_the_close_is_retried(scripted, kind):
    srv = scripted({1: IDLE})
    if kind == "sync":
        def fn(c):
            futs = [c.submit("m", [float(i)]) for i in range(8)]
            return [f.result() for f in futs]
    else:
        async def fn(c):
            return await asyncio.gather(*(c.infer("m", [float(i)]) for i in range(8)))
    results = call(kind, srv.port, fn, retry=FAST)
    assert [r.answer["conn"] for r in results] == [2] * 8
    # the first was in flight at the close; later ones may have been sent after it
    assert results[0].attempts == 2 and all(r.attempts in (1, 2) for r in results)
    assert srv.connections == 2


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_without_retries_the_refusal_is_the_error(scripted, kind):
    srv = scripted({1: IDLE})
    with pytest.raises(errors.ResourceExhausted) as ei:
        call(kind, srv.port, infer, retry=None)
    assert ei.value.message == "idle timeout" and ei.value.attempts == 1
    assert srv.connections == 1


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_an_unauthenticated_close_is_not_retried(scripted, kind):
    srv = scripted({1: ("refuse", Status.UNAUTHENTICATED, "bad token")})
    with pytest.raises(errors.Unauthenticated) as ei:
        call(kind, srv.port, infer, retry=FAST)
    assert ei.value.attempts == 1
    assert srv.connections == 1


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_a_close_with_another_status_is_retried_too(scripted, kind):
    """The status of a close names the connection's fate, not the request's:
    even INTERNAL there means "not received"."""
    srv = scripted({1: ("refuse", Status.INTERNAL, "connection handler failed")})
    r = call(kind, srv.port, infer, retry=FAST)
    assert r.answer["conn"] == 2 and r.attempts == 2


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_retries_after_closes_keep_to_the_policy_and_the_deadline(scripted, kind):
    srv = scripted({n: IDLE for n in range(1, 50)})   # every connection refuses
    with pytest.raises(errors.ResourceExhausted) as ei:
        call(kind, srv.port, infer, retry=FAST)
    assert ei.value.attempts == FAST.attempts and srv.connections == FAST.attempts

    srv = scripted({1: IDLE})
    slow = RetryPolicy(attempts=5, base_delay=0.5, max_delay=0.5, jitter=0)
    t0 = time.monotonic()

    def tight(c):
        return c.infer("m", [1.0], deadline_ms=100)   # a coroutine for the async client
    with pytest.raises(errors.ResourceExhausted) as ei:
        call(kind, srv.port, tight, retry=slow)
    assert ei.value.attempts == 1 and time.monotonic() - t0 < 0.4   # the backoff did not fit
    assert srv.connections == 1


@pytest.mark.parametrize("kind", KINDS)
def test_an_idle_connection_closed_with_an_answer_is_replaced_without_an_error(scripted, kind):
    """The server answers, then closes the idle connection: id-0 answer now,
    its FIN a second later. The next calls, with no retries at all, go to a
    new connection instead of the closing one, and none of them fails."""
    srv = scripted({1: ("idle", Status.RESOURCE_EXHAUSTED, "idle timeout", 1.0)})
    size = 2 if "pool" in kind else 1

    def after_refusal(results):
        assert srv.refused.wait(5)
        time.sleep(0.05)   # the id-0 answer reaches the client's reader

    if kind.startswith("async"):
        async def fn(c):
            results = [await c.infer("m", [1.0])]
            await asyncio.get_running_loop().run_in_executor(None, after_refusal, results)
            await asyncio.sleep(0.01)
            for _ in range(2 * size):
                results.append(await c.infer("m", [1.0]))
            return results
    else:
        def fn(c):
            results = [c.infer("m", [1.0])]
            after_refusal(results)
            for _ in range(2 * size):
                results.append(c.infer("m", [1.0]))
            return results
    t0 = time.monotonic()
    results = call(kind, srv.port, fn, retry=None)
    assert results[0].answer["conn"] == 1
    assert all(r.attempts == 1 and r.answer["conn"] != 1 for r in results[1:])
    assert srv.connections == size + 1
    assert time.monotonic() - t0 < 0.9   # not held up until the server's FIN
