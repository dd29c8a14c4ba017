"""SIGTERM's graceful drain (docs/operations.md, "Start, check, stop") on a
real daemon with a slow model, so the drain lasts long enough to look at:
new requests on open connections get UNAVAILABLE, the listener is closed,
/readyz says 503 and ``health.draining`` is true, every accepted request is
answered, and ``drain_timeout_s`` bounds it by answering the rest
UNAVAILABLE. Every step waits on state it can observe, never on a sleep."""

from __future__ import annotations

import signal
import socket

from ipc.framing import FrameDecoder
from tests.faults import (
    OK,
    UNAVAILABLE,
    X4,
    call_until,
    http_get,
    poll,
    records,
    server,
    slow_model,
)

INFER = {"model": "slow", "inputs": X4}


def _new_connection_is_turned_away(port: int) -> bool:
    """True once a new connect is refused. A connect that the kernel accepted
    just before the listener closed must get the id-0 UNAVAILABLE answer and
    be closed: the protocol's rule for a server closing on its own."""
    try:
        s = socket.create_connection(("127.0.0.1", port), timeout=10)
    except ConnectionRefusedError:
        return True
    with s:
        dec, got = FrameDecoder(1 << 20), []
        while True:
            data = s.recv(65536)
            if not data:
                break
            got.extend(dec.feed(data))
        assert len(got) == 1 and got[0]["id"] == 0 and got[0]["status"] == UNAVAILABLE, got
        assert "draining" in got[0]["error"]
    return False


def test_drain_refuses_new_work_closes_the_listener_and_answers_what_it_accepted(daemon_factory):
    d = daemon_factory(server() + slow_model(max_batch=1), env={"RINGSERVE_TEST_SLOW_MS": "250"})
    metrics_port = d.health()["metrics_port"]
    assert http_get(metrics_port, "/readyz")[0] == 200
    n = 6
    seen: dict[int, dict] = {}
    with d.client() as c:
        for i in range(1, n + 1):
            c.send(dict(INFER, id=i))
        # Frames of one connection are handled in order: once this answer is
        # back, the daemon has accepted every request above.
        s = call_until(c, {"op": "stats"}, 1000, seen)
        assert s["models"][0]["queue_depth"] + len(seen) + s["models"][0]["in_flight_batches"] >= 1
        d.proc.send_signal(signal.SIGTERM)
        ids = iter(range(1001, 2000))
        h = poll(lambda: (lambda h: h if h["draining"] else None)(
                 call_until(c, {"op": "health"}, next(ids), seen)), "draining", log=d.log)
        assert h["ready"] is False and h["live"] is True
        assert http_get(metrics_port, "/readyz") == (503, b"draining\n")
        # a request that arrives during the drain, on a connection already open
        late = call_until(c, dict(INFER), 500, seen)
        assert late["status"] == UNAVAILABLE and "draining" in late["error"], late
        # the listener is closed: a new connection is refused
        poll(lambda: _new_connection_is_turned_away(d.port), "listener closed", log=d.log)
        # every request accepted before the drain is answered, once, by the model
        while len([i for i in seen if 1 <= i <= n]) < n:
            a = c.recv()
            assert a["id"] not in seen, a
            seen[a["id"]] = a
        closing = c.recv()  # closing is an answer: id 0, the server drained
        assert closing["id"] == 0 and closing["status"] == UNAVAILABLE, closing
        assert c.closed_by_peer()
    accepted = {i: seen[i] for i in range(1, n + 1)}
    assert all(a["status"] == OK for a in accepted.values()), accepted
    assert d.proc.wait(60) == 0
    assert d.stop() == 0
    assert not records(d, "drain timed out; answering what is left UNAVAILABLE")
    d.assert_clean()


def test_drain_timeout_answers_what_is_left_unavailable(daemon_factory):
    d = daemon_factory(server("drain_timeout_s = 0.3") + slow_model(max_batch=1),
                       env={"RINGSERVE_TEST_SLOW_MS": "300"})
    n = 12  # 3.6 s of work against a 0.3 s drain
    seen: dict[int, dict] = {}
    with d.client() as c:
        for i in range(1, n + 1):
            c.send(dict(INFER, id=i))
        call_until(c, {"op": "stats"}, 1000, seen)  # all accepted
        d.proc.send_signal(signal.SIGTERM)
        while True:
            try:
                a = c.recv()
            except ConnectionError:
                break
            assert a["id"] not in seen, f"answered twice: {a}"
            seen[a["id"]] = a
    closing = seen.pop(0)  # the last frame before the close (id 0), saying why
    assert closing["status"] == UNAVAILABLE, closing
    assert sorted(seen) == list(range(1, n + 1))  # every one answered exactly once
    by_status: dict[int, list] = {}
    for a in seen.values():
        by_status.setdefault(a["status"], []).append(a)
    assert set(by_status) <= {OK, UNAVAILABLE}, by_status
    left = by_status.get(UNAVAILABLE, [])
    assert left and all("shut down before this request" in a["error"] for a in left), left
    assert d.proc.wait(60) == 0
    assert d.stop() == 0
    (rec,) = records(d, "drain timed out; answering what is left UNAVAILABLE")
    assert rec["requests"] == len(left) and rec["drain_timeout_s"] == 0.3
    d.assert_clean()
