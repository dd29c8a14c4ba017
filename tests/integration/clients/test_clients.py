"""The client library against a real daemon: both clients, every op, every
error status, pipelining, retries, the pool, the CLI, and the protocol page
followed by hand.

One daemon serves the whole module (``daemon`` fixture): starting one costs
seconds, and these tests only talk to it. It serves

- ``demo``: the bundled MLP scorer, checked against ``daemon.workers.zoo.mlp_scorer``;
- ``magic``: x * 3 (so every answer names its request), INTERNAL on 777;
- ``slow``: a linear layer that sleeps SLOW_MS per batch, one request per
  batch, room for 3 at once: floods get RESOURCE_EXHAUSTED, short deadlines
  DEADLINE_EXCEEDED;
- ``two``: named inputs and outputs;
- ``broken``: a factory that raises, so its requests get UNAVAILABLE;

and an A/B experiment ``e1`` on ``demo``, so that ``key``, ``exp`` and
``feedback`` can be seen to arrive.
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
import struct
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import msgpack
import numpy as np
import pytest
import torch
import uvloop

from clients import (
    AsyncClient,
    AsyncClientPool,
    Client,
    ClientPool,
    InferResult,
    RetryPolicy,
    errors,
)
from daemon.serving.router import bucket
from daemon.workers.zoo import mlp_scorer
from tests.conftest import REPO, Daemon
from tests.models import slow as slow_model

SLOW_MS = 40
CONFIG = """
[server]
host = "127.0.0.1"
deadline_ms = 10000
max_connections = 24

[[models]]
name = "demo"
factory = "daemon.workers.zoo:mlp_scorer"
input = { dtype = "float32", shape = [128] }
threads = 1
max_batch = 16

[[models]]
name = "magic"
factory = "tests.models:raises_on_magic"
input = { dtype = "float32", shape = [3] }
threads = 1
max_batch = 8

[[models]]
name = "slow"
factory = "tests.models:slow"
input = { dtype = "float32", shape = [4] }
threads = 1
max_batch = 1
inflight_batches = 1
queue_limit = 2

[[models]]
name = "two"
factory = "tests.models:two_inputs"
inputs = { ids = { dtype = "int64", shape = [4] }, dense = { dtype = "float32", shape = [3] } }
threads = 1

[[models]]
name = "broken"
factory = "tests.models:broken"
input = { dtype = "float32", shape = [4] }
threads = 1

[[experiments]]
id = "e1"
model = "demo"
salt = "e1-salt"
arms = [{ name = "control", split = 0.5 }, { name = "treat", split = 0.5 }]
"""

# Patient retries for the floods: the slow queue drains at 1 / SLOW_MS.
PATIENT = RetryPolicy(attempts=200, base_delay=0.005, max_delay=0.05)
EAGER = RetryPolicy(attempts=1000, base_delay=0.005, max_delay=0.02)
# For the budget tests: a fixed delay before every retry (no growth, no
# jitter) and far more tries than any budget holds. How many tries a call
# made then says whether its budget stopped it, with no clock in the test:
# sleeps never end early, so a budget of B seconds holds at most
# B / STEADY_DELAY + 1 tries (a millisecond of slack per sleep for uvloop's
# whole-millisecond timers), while a client that ignored the budget would
# make all 100,000 and never return.
STEADY_DELAY = 0.02
STEADY = RetryPolicy(attempts=100_000, base_delay=STEADY_DELAY, max_delay=STEADY_DELAY,
                     jitter=0.0)


def most_tries(budget_s: float) -> int:
    return int(budget_s / (STEADY_DELAY - 0.001)) + 1


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    d = Daemon(tmp_path_factory.mktemp("clients"), CONFIG,
               env={"RINGSERVE_TEST_SLOW_MS": str(SLOW_MS)})
    try:
        d.start(wait_ready=False)
        d.wait_for(lambda h: all(m["ready"] for m in h["models"] if m["name"] != "broken") and
                   any(m["name"] == "broken" and m["state"] == "failed" for m in h["models"]),
                   what="every model ready but the broken one")
        yield d
    finally:
        d.finish()   # SIGTERM, exit code 0, and nothing of its tree left


@pytest.fixture(scope="module")
def scorer():
    return mlp_scorer()


@pytest.fixture(scope="module")
def slow_reference():
    return slow_model()


def expected(model, x: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        return model(torch.from_numpy(np.ascontiguousarray(x))[None]).numpy()[0]


def samples(n: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 128), dtype=np.float32)


LOOPS = {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}


def run(coro_fn, loop: str = "asyncio"):
    with asyncio.Runner(loop_factory=LOOPS[loop]) as runner:
        return runner.run(coro_fn())


def check_demo(r: InferResult, x, scorer) -> None:
    assert isinstance(r, InferResult)
    assert (r.model, r.version, r.lane, r.arm) == ("demo", "1", "stable", None)
    assert type(r.rid) is int and r.rid > 0 and r.attempts == 1
    assert set(r.timing) >= {"queue_us", "compute_us", "batch", "bucket"}
    out = r.outputs.numpy() if isinstance(r.outputs, torch.Tensor) else r.outputs
    assert out.shape == (2,) and out.dtype == np.float32
    np.testing.assert_allclose(out, expected(scorer, np.asarray(x, np.float32)), rtol=0, atol=1e-5)


def check_ops(health: dict, models: dict, stats: dict) -> None:
    assert health["live"] is True and health["ready"] is False   # "broken" never loads
    by_name = {m["name"]: m for m in health["models"]}
    assert set(by_name) == {"demo", "magic", "slow", "two", "broken"}
    assert by_name["demo"]["ready"] and by_name["demo"]["hash"].startswith("sha256:")
    assert "broken on purpose" in by_name["broken"]["error"]
    m = {e["name"]: e for e in models["models"]}
    assert m["demo"]["input"] == {"dtype": "float32", "shape": [128]}
    assert m["two"]["inputs"]["ids"] == {"dtype": "int64", "shape": [4]}
    assert m["slow"]["batching"]["queue_limit"] == 2
    assert {e["name"] for e in stats["models"]} == set(by_name)
    assert stats["connections"] >= 1 and "rejected" in stats


def check_routing_and_feedback(infer, feedback, aio: bool = False):
    """key and exp reach the router (the arm is the specified hash's), and
    feedback joins to the answer by rid and by key. ``aio``: the two
    callables are coroutine functions (then this returns a coroutine)."""
    async def body(call):
        x = np.zeros(128, np.float32)
        for key in ("user-1", "user-2", "user-3", "user-4"):
            r = await call(infer, "demo", x, key=key, exp="e1")
            assert r.arm == ("control" if bucket("e1-salt", key) < 5000 else "treat"), key
            fb = await call(feedback, r.rid, 1.0)
            assert fb["status"] == 0 and fb["joined"] is True
            assert (fb["model"], fb["version"], fb["arm"]) == ("demo", "1", r.arm)
            by_key = await call(feedback, key, 0)
            assert by_key["joined"] is True and by_key["arm"] == r.arm
        miss = await call(feedback, 2**62, 1)
        assert miss["joined"] is False
        with pytest.raises(errors.NotFound, match="experiment"):
            await call(infer, "demo", x, key="user-1", exp="nope")

    async def call_async(fn, *args, **kw):
        return await fn(*args, **kw)

    async def call_sync(fn, *args, **kw):
        return fn(*args, **kw)

    if aio:
        return body(call_async)
    run(lambda: body(call_sync))


# --- every op, both clients -------------------------------------------------------------

def test_sync_every_op(daemon, scorer):
    xs = samples(6)
    with Client(port=daemon.port) as c:
        check_ops(c.health(), c.models(), c.stats())
        assert [w["name"] for w in c.health("demo")["models"]] == ["demo"]
        assert [m["name"] for m in c.stats("magic")["models"]] == ["magic"]
        check_demo(c.infer("demo", xs[0]), xs[0], scorer)                      # numpy
        check_demo(c.infer("demo", torch.from_numpy(xs[1])), xs[1], scorer)    # torch
        check_demo(c.infer("demo", xs[2].tolist()), xs[2], scorer)             # list
        r = c.infer("demo", xs[3], as_torch=True, deadline_ms=5000, key="u1", version="1")
        assert isinstance(r.outputs, torch.Tensor)
        check_demo(r, xs[3], scorer)
        check_demo(c.submit("demo", xs[4]).result(), xs[4], scorer)
        two = c.infer("two", {"ids": np.arange(4, dtype=np.int64), "dense": [1.0, 2.0, 3.5]})
        assert set(two.outputs) == {"score", "twice"}
        assert two.outputs["score"].tolist() == [12.5]
        assert two.outputs["twice"].tolist() == [2.0, 4.0, 7.0]
        check_routing_and_feedback(c.infer, c.feedback)


@pytest.mark.parametrize("loop", LOOPS)
def test_async_every_op(daemon, scorer, loop):
    xs = samples(4, seed=2)

    async def main():
        async with AsyncClient(port=daemon.port) as c:
            check_ops(await c.health(), await c.models(), await c.stats())
            check_demo(await c.infer("demo", xs[0]), xs[0], scorer)
            check_demo(await c.infer("demo", torch.from_numpy(xs[1])), xs[1], scorer)
            r = await c.infer("demo", xs[2].tolist(), as_torch=True)
            assert isinstance(r.outputs, torch.Tensor)
            check_demo(r, xs[2], scorer)
            two = await c.infer("two", {"ids": [1, 2, 3, 4], "dense": np.ones(3, np.float32)})
            assert two.outputs["score"].tolist() == [13.0]
            await check_routing_and_feedback(c.infer, c.feedback, aio=True)
        assert c.closed
        # connect() opens at once; a bare constructor connects at its first call
        c2 = await AsyncClient.connect(port=daemon.port)
        c3 = AsyncClient(port=daemon.port)
        try:
            rs = await asyncio.gather(c2.infer("demo", xs[3]), c3.infer("demo", xs[3]))
            for r in rs:
                check_demo(r, xs[3], scorer)
        finally:
            await c2.close()
            await c3.close()

    run(main, loop)


def test_local_misuse_raises_at_the_call(daemon):
    with Client(port=daemon.port) as c:
        with pytest.raises(TypeError):
            c.infer("demo", "not a tensor")
        with pytest.raises(TypeError):
            c.submit("demo", [np.float32(1.0)])   # no msgpack form: raised by submit itself
        with pytest.raises(ValueError):
            c.infer("demo", [1.0], deadline_ms=0)
        with pytest.raises(ValueError):
            c.submit("demo", torch.zeros(2, dtype=torch.complex64))
    with pytest.raises(ValueError, match="closed"):
        c.infer("demo", [1.0])
    with pytest.raises(ValueError):
        Client(port=daemon.port, timeout=0)


# --- every error status -------------------------------------------------------------------

def expect(cls, fn, *args, **kw) -> errors.RingserveError:
    with pytest.raises(cls) as ei:
        fn(*args, **kw)
    e = ei.value
    assert isinstance(e, errors.RingserveError) and e.status == cls.status
    assert e.answer["status"] == int(cls.status) and e.answer["error"] == e.message
    return e


def flood(c: Client, n: int = 20) -> list:
    """n requests at once at the slow model; their outcomes (result or exception)."""
    futs = [c.submit("slow", np.full(4, i, np.float32)) for i in range(n)]
    out = []
    for f in futs:
        try:
            out.append(f.result())
        except errors.RingserveError as e:
            out.append(e)
    return out


def test_sync_every_error_status(daemon):
    with Client(port=daemon.port, retry=None) as c:
        e = expect(errors.NotFound, c.infer, "nope", [1.0])
        assert "nope" in e.message and e.rid is None
        expect(errors.NotFound, c.infer, "demo", np.zeros(128, np.float32), version="9")
        e = expect(errors.InvalidArgument, c.infer, "demo", np.zeros(127, np.float32))
        assert "127" in e.message
        expect(errors.InvalidArgument, c.infer, "two", {"ids": [1, 2, 3, 4]})
        # a frame big enough to go out as two writes arrives whole
        e = expect(errors.InvalidArgument, c.infer, "demo", np.zeros(100_000, np.float32))
        assert "100000" in e.message
        e = expect(errors.DeadlineExceeded, c.infer, "slow", np.ones(4, np.float32),
                   deadline_ms=5)
        assert e.rid is not None   # accepted, then too late
        e = expect(errors.Internal, c.infer, "magic", [777.0, 0.0, 0.0])
        assert "magic value 777" in e.message and e.rid is not None
        e = expect(errors.Unavailable, c.infer, "broken", [1.0, 2.0, 3.0, 4.0])
        assert "no ready worker" in e.message and e.attempts == 1
        outcomes = flood(c)
        refused = [o for o in outcomes if isinstance(o, errors.RingserveError)]
        assert refused and all(type(o) is errors.ResourceExhausted for o in refused)
        assert "queue_limit = 2" in refused[0].message and refused[0].attempts == 1
        assert any(isinstance(o, InferResult) for o in outcomes)
        # the connection is fine after all that
        assert c.infer("magic", [1.0, 2.0, 3.0]).outputs.tolist() == [3.0, 6.0, 9.0]


@pytest.mark.parametrize("loop", LOOPS)
def test_async_every_error_status(daemon, loop):
    async def main():
        async with AsyncClient(port=daemon.port, retry=None) as c:
            async def expect_async(cls, *args, **kw):
                with pytest.raises(cls) as ei:
                    await c.infer(*args, **kw)
                assert ei.value.status == cls.status
                return ei.value

            await expect_async(errors.NotFound, "nope", [1.0])
            await expect_async(errors.InvalidArgument, "demo", [1.0, 2.0])
            e = await expect_async(errors.InvalidArgument, "demo", np.zeros(100_000, np.float32))
            assert "100000" in e.message
            await expect_async(errors.DeadlineExceeded, "slow", [1.0] * 4, deadline_ms=5)
            await expect_async(errors.Internal, "magic", np.array([777, 0, 0], np.float32))
            await expect_async(errors.Unavailable, "broken", [1.0] * 4)
            got = await asyncio.gather(*(c.infer("slow", [float(i)] * 4) for i in range(20)),
                                       return_exceptions=True)
            refused = [g for g in got if isinstance(g, Exception)]
            assert refused and all(type(g) is errors.ResourceExhausted for g in refused)
            assert any(isinstance(g, InferResult) for g in got)

    run(main, loop)


# --- pipelining: answers out of order, each matched to its request -----------------------

def interleaved(n_magic: int = 40) -> list[tuple[str, np.ndarray]]:
    """Slow requests first, fast ones behind them: the fast ones' answers overtake."""
    reqs = [("slow", np.array([i, -i, 0.5, 1], np.float32)) for i in range(3)]
    for i in range(n_magic):
        reqs.insert(1 + i % 3 + i, ("magic", np.array([i, i + 0.5, -i], np.float32)))
    return reqs


def check_interleaved(reqs, results, order, slow_reference) -> None:
    for (model, x), r in zip(reqs, results, strict=True):
        assert r.model == model
        want = x * 3 if model == "magic" else expected(slow_reference, x)
        np.testing.assert_allclose(r.outputs, want, rtol=0, atol=1e-5)
    assert order != sorted(order), "answers came back in request order; nothing was tested"
    assert order.index(0) > order.index(1)   # the first slow one finished after a magic one


def test_sync_pipelined_answers_out_of_order(daemon, slow_reference):
    reqs = interleaved()
    order = []
    with Client(port=daemon.port, retry=PATIENT) as c:
        futs = []
        for i, (model, x) in enumerate(reqs):
            f = c.submit(model, x)
            f.add_done_callback(lambda _f, i=i: order.append(i))
            futs.append(f)
        results = [f.result() for f in futs]
    check_interleaved(reqs, results, order, slow_reference)


@pytest.mark.parametrize("loop", LOOPS)
def test_async_pipelined_answers_out_of_order(daemon, slow_reference, loop):
    reqs = interleaved()
    order = []

    async def main():
        async with AsyncClient(port=daemon.port, retry=PATIENT) as c:
            async def one(i, model, x):
                r = await c.infer(model, x)
                order.append(i)
                return r
            return await asyncio.gather(*(one(i, m, x) for i, (m, x) in enumerate(reqs)))

    check_interleaved(reqs, run(main, loop), order, slow_reference)


def test_submit_from_many_threads_on_one_connection(daemon):
    values = [v for v in range(400) if v != 777]

    with Client(port=daemon.port) as c:
        def worker(chunk):
            futs = [(v, c.submit("magic", np.array([v, 1, 2], np.float32))) for v in chunk]
            return [(v, f.result()) for v, f in futs]

        with ThreadPoolExecutor(8) as ex:
            done = [p for part in ex.map(worker, [values[i::8] for i in range(8)]) for p in part]
        assert len(c._links) == 1
    assert sorted(v for v, _ in done) == values
    for v, r in done:
        assert r.outputs.tolist() == [3.0 * v, 3.0, 6.0]


# --- retries ---------------------------------------------------------------------------------

def test_sync_retries_let_a_flood_through(daemon):
    with Client(port=daemon.port, retry=PATIENT) as c:
        outcomes = flood(c)
    assert all(isinstance(o, InferResult) for o in outcomes), outcomes
    assert max(o.attempts for o in outcomes) > 1   # the queue did refuse some


@pytest.mark.parametrize("loop", LOOPS)
def test_async_retries_let_a_flood_through(daemon, loop):
    async def main():
        async with AsyncClient(port=daemon.port, retry=PATIENT) as c:
            return await asyncio.gather(*(c.infer("slow", [float(i)] * 4) for i in range(20)))

    results = run(main, loop)
    assert len(results) == 20 and max(r.attempts for r in results) > 1


def test_sync_retries_stay_within_the_deadline_and_timeout(daemon):
    """UNAVAILABLE is retried, but only while the caller's budget lasts:
    the deadline when it gives one, else the client's timeout. The call
    ends with the server's last refusal, not a timeout of its own."""
    with Client(port=daemon.port, retry=STEADY) as c:
        e = expect(errors.Unavailable, c.infer, "broken", [1.0] * 4, deadline_ms=1000)
        assert 2 <= e.attempts <= most_tries(1.0), e.attempts
    with Client(port=daemon.port, retry=EAGER) as c:
        # Behind a full queue: refused, or let in by a retry that carried only
        # what was left of the deadline; either way over by the caller's deadline.
        with pytest.raises((errors.ResourceExhausted, errors.DeadlineExceeded)) as ei:
            flood_then(c, deadline_ms=60)
        assert ei.value.attempts > 1
    with Client(port=daemon.port, retry=STEADY, timeout=1.0) as c:   # no deadline: the timeout
        e = expect(errors.Unavailable, c.infer, "broken", [1.0] * 4)
        assert 2 <= e.attempts <= most_tries(1.0), e.attempts


def flood_then(c: Client, deadline_ms: int):
    """Fill the slow queue, then make a call that cannot get in within its deadline."""
    hold = [c.submit("slow", [1.0] * 4) for _ in range(6)]
    try:
        return c.infer("slow", [2.0] * 4, deadline_ms=deadline_ms)
    finally:
        for f in hold:
            f.exception()


@pytest.mark.parametrize("loop", LOOPS)
def test_async_retries_stay_within_the_deadline(daemon, loop):
    async def main():
        async with AsyncClient(port=daemon.port, retry=STEADY) as c:
            with pytest.raises(errors.Unavailable) as ei:
                await c.infer("broken", [1.0] * 4, deadline_ms=1000)
            return ei.value.attempts

    attempts = run(main, loop)
    assert 2 <= attempts <= most_tries(1.0), attempts


# --- pools --------------------------------------------------------------------------------------

def test_sync_pool_spreads_calls_over_its_connections(daemon, scorer):
    xs = samples(12, seed=5)
    with ClientPool(port=daemon.port, size=3) as p:
        results = [f.result() for f in [p.submit("demo", x) for x in xs]]
        for r, x in zip(results, xs, strict=True):
            check_demo(r, x, scorer)
        assert p.stats()["connections"] >= 3
        used = [link.inflight._next - 1 for link in p._links]
    assert len(used) == 3 and min(used) >= 4, used   # round robin: 13 calls over 3


@pytest.mark.parametrize("loop", LOOPS)
def test_async_pool(daemon, scorer, loop):
    xs = samples(12, seed=6)

    async def main():
        async with AsyncClientPool(port=daemon.port, size=3) as p:
            results = await asyncio.gather(*(p.infer("demo", x) for x in xs))
            return (results, (await p.stats())["connections"],
                    [link.inflight._next - 1 for link in p._links])

    results, conns, used = run(main, loop)
    for r, x in zip(results, xs, strict=True):
        check_demo(r, x, scorer)
    assert conns >= 3 and len(used) == 3 and min(used) >= 4, used


# --- the connection: refusals, loss, timeouts, reconnects -------------------------------------

def test_too_many_connections_is_resource_exhausted(daemon):
    """The daemon refuses a connection over max_connections with an id-0
    RESOURCE_EXHAUSTED and closes it: the call fails with that error, not with
    a bare ConnectionLost, so a retry policy can retry it."""
    with ClientPool(port=daemon.port, size=24) as hog:
        for _ in range(24):
            hog.health()   # every connection accepted and counted by now
        with Client(port=daemon.port, retry=None) as c:
            e = expect(errors.ResourceExhausted, c.infer, "magic", [1.0, 2.0, 3.0])
            assert "max_connections" in e.message
        with Client(port=daemon.port, retry=EAGER, timeout=1.0) as c:
            e = expect(errors.ResourceExhausted, c.health)
            assert e.attempts > 1
    with Client(port=daemon.port) as c:   # room again
        assert c.health()["live"]


def test_close_fails_calls_in_flight_and_the_client_reconnects(daemon):
    c = Client(port=daemon.port)
    futs = [c.submit("slow", [1.0] * 4) for _ in range(3)]
    c.close()
    for f in futs:
        with pytest.raises(errors.ConnectionLost):
            f.result()
    with Client(port=daemon.port) as c:
        c._links[0].sock.shutdown(socket.SHUT_RDWR)   # the connection breaks under it
        deadline = time.monotonic() + 5
        while c._links[0].alive and time.monotonic() < deadline:
            time.sleep(0.01)
        assert c.infer("magic", [1.0, 1.0, 1.0]).outputs.tolist() == [3.0, 3.0, 3.0]


class Peer:
    """A TCP peer that is not ringserve: it accepts, then either closes or says nothing."""

    def __init__(self, behaviour: str):
        self.srv = socket.create_server(("127.0.0.1", 0))
        self.port = self.srv.getsockname()[1]
        self.conns = []
        self.behaviour = behaviour
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        while True:  # "close": every connection, so that a client's retries meet it too
            try:
                conn, _ = self.srv.accept()
            except OSError:
                return
            self.conns.append(conn)
            if self.behaviour != "close":
                return
            conn.recv(65536)
            conn.close()

    def close(self):
        self.srv.close()
        for conn in self.conns:
            conn.close()


@pytest.mark.parametrize("behaviour, exc", [("close", errors.ConnectionLost),
                                            ("silent", errors.ClientTimeout)])
def test_transport_failures(behaviour, exc):
    peer = Peer(behaviour)
    try:
        with Client(port=peer.port, timeout=0.3) as c:
            with pytest.raises(exc):   # (a client that ignored its timeout would hang here)
                c.infer("demo", [1.0])
        if behaviour == "close":
            # infer is idempotent: a connection lost without an answer is
            # retried on a new one, within the policy's attempts and the budget
            assert len(peer.conns) >= 2, peer.conns

        async def main():
            peer.thread.join(1)
            peer2 = Peer(behaviour)
            try:
                async with AsyncClient(port=peer2.port, timeout=0.3) as ac:
                    with pytest.raises(exc):
                        await ac.infer("demo", [1.0])
            finally:
                peer2.close()
        run(main, "uvloop")
    finally:
        peer.close()


def test_connect_failures():
    free = socket.create_server(("127.0.0.1", 0))
    port = free.getsockname()[1]
    free.close()   # nothing listens there now
    with pytest.raises(errors.ConnectFailed, match=str(port)):
        Client(port=port)

    async def main():
        with pytest.raises(errors.ConnectFailed):
            await AsyncClient.connect(port=port)
    run(main)


# --- the command line ---------------------------------------------------------------------

def cli(daemon, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "clients", "--port", str(daemon.port), *args],
                          cwd=REPO, capture_output=True, text=True, timeout=60)


def test_cli_health_and_infer(daemon, tmp_path):
    h = cli(daemon, "health")
    assert h.returncode == 0, h.stderr
    assert re.search(r"^live\s+yes$", h.stdout, re.M) and re.search(r"^ready\s+no$", h.stdout, re.M)
    assert re.search(r"^demo\s+1\s+stable\s+cpu\s+ready\s+yes", h.stdout, re.M)
    assert "broken on purpose" in h.stdout

    r = cli(daemon, "infer", "--model", "magic", "--json", "[1, 2, 3]")
    assert r.returncode == 0, r.stderr
    assert re.search(r"^model\s+magic$", r.stdout, re.M)
    assert re.search(r"^output\s+float32\[3\]\s+\[3\., 6\., 9\.\]$", r.stdout, re.M), r.stdout

    np.save(tmp_path / "ids.npy", np.arange(4, dtype=np.int64))
    np.save(tmp_path / "dense.npy", np.array([1.0, 2.0, 3.5], np.float32))
    r = cli(daemon, "infer", "--model", "two", "--npy", f"ids={tmp_path / 'ids.npy'}",
            "--npy", f"dense={tmp_path / 'dense.npy'}", "--json-out")
    assert r.returncode == 0, r.stderr
    a = json.loads(r.stdout)
    assert a["status"] == 0 and a["outputs"]["score"] == {"dtype": "float32", "shape": [1],
                                                           "values": [12.5]}

    x = samples(1, seed=9)[0]
    np.save(tmp_path / "x.npy", x)
    r = cli(daemon, "infer", "--model", "demo", "--npy", str(tmp_path / "x.npy"), "--json-out")
    got = np.array(json.loads(r.stdout)["outputs"]["values"], np.float32)
    np.testing.assert_allclose(got, expected(mlp_scorer(), x), rtol=0, atol=1e-5)

    for args in (["models"], ["stats", "--model", "demo"], ["--json-out", "health"]):
        r = cli(daemon, *args)
        assert r.returncode == 0 and r.stdout.strip(), (args, r.stderr)
    assert "QUEUE_LIMIT" in cli(daemon, "models").stdout


def test_cli_errors(daemon):
    r = cli(daemon, "infer", "--model", "nope", "--json", "[1]")
    assert r.returncode == 1 and "NOT_FOUND" in r.stderr and "nope" in r.stderr
    r = cli(daemon, "infer", "--model", "nope", "--json", "[1]", "--json-out")
    assert r.returncode == 1 and json.loads(r.stdout)["status"] == 5
    r = cli(daemon, "infer", "--model", "magic", "--json", "[1, 2")
    assert r.returncode == 2 and "not valid JSON" in r.stderr
    free = socket.create_server(("127.0.0.1", 0))
    port = free.getsockname()[1]
    free.close()
    r = subprocess.run([sys.executable, "-m", "clients", "--port", str(port), "health"],
                       cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode == 3 and "cannot connect" in r.stderr


# --- the protocol page, followed with nothing but the standard tools -----------------------

def recv_exactly(s: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        assert chunk, "connection closed"
        buf += chunk
    return bytes(buf)


def test_protocol_md_by_hand(daemon, scorer):
    """docs/protocol.md is enough to talk to the daemon: frames, tensors,
    pipelined ids, named inputs and outputs, an error answer."""
    def frame(msg: dict) -> bytes:
        body = msgpack.packb(msg)
        return struct.pack(">I", len(body)) + body

    def read(s) -> dict:
        (n,) = struct.unpack(">I", recv_exactly(s, 4))
        return msgpack.unpackb(recv_exactly(s, n))

    xs = samples(2, seed=11)
    with socket.create_connection(("127.0.0.1", daemon.port), timeout=30) as s:
        s.sendall(b"".join([
            frame({"id": 10, "model": "demo",
                   "inputs": {"dtype": "float32", "shape": [128], "data": xs[0].tobytes()}}),
            frame({"id": 11, "op": "infer", "v": 1, "model": "demo", "inputs": xs[1].tolist()}),
            frame({"id": 12, "model": "two", "inputs": {
                "ids": {"dtype": "int64", "shape": [4],
                        "data": np.arange(4).astype("<i8").tobytes()},
                "dense": [1.0, 2.0, 3.5]}}),
            frame({"id": 13, "model": "nope", "inputs": [1.0]}),
        ]))
        answers = {a["id"]: a for a in (read(s) for _ in range(4))}
    for i in (10, 11):
        a = answers[i]
        assert a["status"] == 0 and a["model"] == "demo" and a["lane"] == "stable"
        t = a["outputs"]
        assert t["dtype"] == "float32" and t["shape"] == [2] and len(t["data"]) == 8
        got = np.frombuffer(t["data"], np.dtype(t["dtype"]).newbyteorder("<")).reshape(t["shape"])
        np.testing.assert_allclose(got, expected(scorer, xs[i - 10]), rtol=0, atol=1e-5)
        assert set(a["timing"]) >= {"queue_us", "compute_us", "batch"}
    two = answers[12]["outputs"]
    assert np.frombuffer(two["score"]["data"], "<f4").tolist() == [12.5]
    assert answers[13]["status"] == 5 and "nope" in answers[13]["error"]


def test_protocol_md_example_runs(daemon, scorer):
    """The page's own "complete exchange" runs as written (port aside)."""
    page = (Path(REPO) / "docs" / "protocol.md").read_text()
    m = re.search(r"## A complete exchange\s+```python\n(.*?)```", page, re.S)
    assert m, "docs/protocol.md lost its example"
    code = m.group(1).replace("7070", str(daemon.port))
    scope: dict = {}
    exec(compile(code, "docs/protocol.md", "exec"), scope)
    scope["s"].close()
    np.testing.assert_allclose(scope["scores"], expected(scorer, np.zeros(128, np.float32)),
                               rtol=0, atol=1e-5)
