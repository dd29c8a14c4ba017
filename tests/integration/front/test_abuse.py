"""No client can starve the others (docs/operations.md, "Limits and abuse").

Each class of abuse against a real daemon over real sockets: connections
that never finish a frame or never send one, memory held for unfinished
frames, cheap bytes that decode into expensive objects, one connection's
burst, errors that echo their input, loose types, one client taking the
queue, PROXY-protocol identities, the descriptor limit, rids a double holds.
Assertions are on answers, counts and sizes, never on durations.
"""

from __future__ import annotations

import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time

import msgpack
import numpy as np
import psutil
import pytest

from daemon.front.rids import decode
from ipc.framing import encode_frame
from tests.conftest import REPO, Daemon, demo_config
from tests.proxyhdr import v1, v2
from tests.wire import WireClient, tensor

OK, INVALID, EXHAUSTED, UNAVAILABLE, UNAUTH = 0, 3, 8, 14, 16

LIMITS = """
idle_timeout_s = 1.0
header_timeout_s = 0.5
min_frame_bytes_per_s = 100000
frame_buffer_budget_bytes = 4194304
max_connections_per_client = 12
"""


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    d = Daemon(tmp_path_factory.mktemp("abuse"), demo_config(server=LIMITS))
    try:
        d.start()
        yield d
    finally:
        if d.proc is not None:
            assert d.stop() == 0, d.log()
            d.assert_clean()


def stats(d) -> dict:
    with d.client() as c:
        return c.call({"op": "stats"})


def closing_answer(c: WireClient) -> dict:
    """The id-0 answer a server-initiated close starts with, then the close."""
    a = c.recv()
    assert a["id"] == 0 and a["status"] != OK, a
    assert c.closed_by_peer(), "the server did not close after its id-0 answer"
    return a


def x128(seed: int = 0) -> dict:
    return tensor(np.random.default_rng(seed).standard_normal(128, dtype=np.float32))


# --- connections that never finish -----------------------------------------------------------

def test_a_frame_header_that_never_completes_is_answered_and_closed(daemon):
    with daemon.client(timeout=20) as c:
        c.send_raw(b"\x00\x00")
        a = closing_answer(c)
    assert a["status"] == EXHAUSTED and "header_timeout_s" in a["error"], a
    assert stats(daemon)["limits"]["closed"]["header_timeout"] >= 1


def test_a_trickling_frame_is_answered_and_closed(daemon):
    with daemon.client(timeout=30) as c:
        c.send_raw(struct.pack(">I", 200_000) + b"\x85" + b"x" * 9)
        a = closing_answer(c)
    assert a["status"] == EXHAUSTED and "min_frame_bytes_per_s" in a["error"], a
    assert stats(daemon)["limits"]["closed"]["slow_frame"] >= 1


def test_a_big_frame_on_a_slow_but_steady_link_is_served(daemon):
    """1.5 MB in 50 kB pieces: well above the minimum rate however slow the
    machine, so it must arrive whole and be answered."""
    frame = encode_frame({"id": 5, "model": "demo", "inputs": x128(), "pad": b"p" * 1_500_000})
    with daemon.client(timeout=30) as c:
        for i in range(0, len(frame), 50_000):
            c.send_raw(frame[i:i + 50_000])
            time.sleep(0.01)
        a = c.recv()
    assert a["id"] == 5 and a["status"] == OK, a


def test_an_idle_connection_is_answered_and_closed(daemon):
    with daemon.client(timeout=20) as c:
        a = closing_answer(c)
    assert a["status"] == EXHAUSTED and "idle" in a["error"], a
    assert stats(daemon)["limits"]["closed"]["idle"] >= 1


def test_a_connection_used_now_and_then_stays_open(daemon):
    """Activity resets the idle clock: a request every half of the timeout
    keeps the connection through several timeouts."""
    with daemon.client(timeout=20) as c:
        for i in range(6):
            assert c.call({"id": i + 1, "op": "health"})["status"] == OK
            time.sleep(0.4)


def test_connections_per_client_address_are_capped(daemon):
    conns = [daemon.client() for _ in range(12)]
    try:
        for c in conns:
            assert c.call({"op": "health"})["status"] == OK
        with daemon.client() as extra:
            a = closing_answer(extra)
        assert a["status"] == EXHAUSTED and "max_connections_per_client" in a["error"], a
        # Another address is another client.
        s = socket.socket()
        s.bind(("127.0.0.2", 0))
        s.connect(("127.0.0.1", daemon.port))
        s.sendall(encode_frame({"id": 1, "op": "health"}))
        assert msgpack.unpackb(recv_frame(s))["status"] == OK
        s.close()
    finally:
        for c in conns:
            c.close()


def recv_frame(s: socket.socket) -> bytes:
    n = struct.unpack(">I", s.recv(4, socket.MSG_WAITALL))[0]
    return s.recv(n, socket.MSG_WAITALL)


# --- memory held for unfinished frames --------------------------------------------------------

def test_unfinished_frames_share_a_memory_budget(daemon):
    """4 MiB for everyone: connections each holding 900 kB of an unfinished
    1 MB frame; the one that crosses the budget is refused and closed, and
    the gauge never passes the budget by more than that one read."""
    budget = 4 * 1024 * 1024
    conns = []
    try:
        refused = None
        for i in range(8):
            c = daemon.client(timeout=20)
            conns.append(c)
            c.send_raw(struct.pack(">I", 1_000_000) + b"\x81" + b"y" * 899_999)
            s = stats(daemon)["limits"]
            assert s["frame_buffer_bytes"] <= budget + 1_000_000, s
            c.sock.settimeout(0.3)
            try:
                a = c.recv()
            except (socket.timeout, TimeoutError):
                continue
            finally:
                c.sock.settimeout(20)
            refused = (i, a)
            break
        assert refused is not None, "no connection was refused for the budget"
        i, a = refused
        assert i == 4 and a["id"] == 0 and a["status"] == EXHAUSTED, refused
        assert "frame_buffer_budget_bytes" in a["error"]
    finally:
        for c in conns:
            c.close()
    daemon.wait_for(lambda h: stats(daemon)["limits"]["frame_buffer_bytes"] == 0,
                    what="unfinished-frame bytes back to 0")


# --- cheap bytes, expensive objects ------------------------------------------------------------

def test_a_frame_of_many_tiny_objects_is_refused_cheaply(daemon):
    front = psutil.Process(daemon.proc.pid)
    rss0 = front.memory_info().rss
    # 128 x 128 x 128 zeros: 2.1 M objects in 2.1 MB, every array within
    # the longest a valid request needs (128), the total far above it.
    inner = b"\xdc\x00\x80" + b"\x00" * 128
    mid = b"\xdc\x00\x80" + inner * 128
    body = b"\x83" + msgpack.packb("id") + msgpack.packb(9) + msgpack.packb("model") + \
        msgpack.packb("demo") + msgpack.packb("pad") + b"\xdc\x00\x80" + mid * 128
    with daemon.client(timeout=30) as c:
        for _ in range(5):
            c.send_raw(struct.pack(">I", len(body)) + body)
        answers = c.recv_n(5)
        assert all(a["id"] == 9 and a["status"] == INVALID and "elements" in a["error"]
                   for a in answers), answers[0]
        # Nesting deeper than any valid request (counted in frames longer
        # than the element budget; shorter ones stop at msgpack's 1024 levels).
        deep = {"id": 10, "model": "demo", "pad": [[[[[[[[[1]]]]]]]]], "bulk": b"b" * 5000}
        a = c.call(deep)
        assert a["id"] == 10 and a["status"] == INVALID and "nested deeper" in a["error"], a
        # A map with more keys than a request has.
        a = c.call({"id": 11, **{f"k{i}": i for i in range(500)}})
        assert a["status"] == INVALID, a
        # And the connection still serves.
        assert c.call({"id": 12, "model": "demo", "inputs": x128()})["status"] == OK
    assert front.memory_info().rss - rss0 < 64 * 1024 * 1024


# --- one connection's burst ---------------------------------------------------------------------

def test_one_connections_burst_does_not_hold_up_another(daemon):
    """2000 pipelined `stats` in one write, then one infer on another
    connection: the infer is answered before most of the burst is."""
    n = 2000
    order: list[str] = []
    lock = threading.Lock()
    flood = daemon.client(timeout=60)
    victim = daemon.client(timeout=60)
    try:
        def read_flood():
            for _ in range(n):
                flood.recv()
                with lock:
                    order.append("f")

        t = threading.Thread(target=read_flood)
        t.start()
        flood.send_raw(b"".join(encode_frame({"id": i + 1, "op": "stats"}) for i in range(n)))
        a = victim.call({"id": 1, "model": "demo", "inputs": x128()})
        with lock:
            order.append("v")
        assert a["status"] == OK, a
        t.join(60)
        assert not t.is_alive()
    finally:
        flood.close()
        victim.close()
    before = order.index("v")
    assert before < n // 4, f"{before} of {n} flooding answers came before the victim's"


# --- errors that echo their input, loose types --------------------------------------------------

def test_errors_quote_a_short_prefix_of_what_they_name(daemon):
    big = "m" * 60_000
    with daemon.client() as c:
        for msg in ({"model": big, "inputs": x128()},
                    {"model": "demo", "version": big, "inputs": x128()},
                    {"op": big},
                    {"model": "demo", "inputs": x128(), "deadline_ms": big},
                    {"model": "demo", "exp": big, "key": "u1", "inputs": x128()},
                    {"v": big},
                    {"op": "feedback", "ref": 1, "outcome": big}):
            a = c.call(dict(msg, id=3))
            assert a["status"] != OK, a
            assert len(encode_frame(a)) < 600, (list(msg), len(a["error"]))
        # Past the longest string a request may hold: refused by the decoder, briefly.
        c.send({"id": 4, "model": "x" * 70_000})
        a = c.recv()
        assert a["status"] == INVALID and len(a["error"]) < 400, a


@pytest.mark.parametrize("field,value", [("v", True), ("v", 1.0), ("id", True),
                                         ("deadline_ms", True), ("deadline_ms", 100.0)])
def test_fields_are_checked_for_their_exact_type(daemon, field, value):
    with daemon.client() as c:
        a = c.call({"id": 6, "model": "demo", "inputs": x128(), field: value})
    assert a["status"] == INVALID, a
    assert a["id"] == (0 if field == "id" else 6)


def test_a_float_in_a_shape_is_refused(daemon):
    t = x128()
    with daemon.client() as c:
        a = c.call({"id": 7, "model": "demo", "inputs": dict(t, shape=[128.0])})
    assert a["status"] == INVALID, a


# --- one connection, one client cannot take the queue -------------------------------------------

SLOW = """
[server]
host = "127.0.0.1"
deadline_ms = 20000
max_inflight_per_connection = {inflight}

[[models]]
name = "slow"
factory = "tests.models:slow"
input = {{ dtype = "float32", shape = [4] }}
devices = ["cpu"]
threads = 1
max_batch = 1
inflight_batches = 1
queue_limit = {queue_limit}
"""


def test_requests_in_flight_per_connection_are_capped(daemon_factory):
    d = daemon_factory(SLOW.format(inflight=8, queue_limit=64),
                       env={"RINGSERVE_TEST_SLOW_MS": "30"})
    x = tensor(np.ones(4, np.float32))
    with d.client() as c:
        for i in range(20):
            c.send({"id": i + 1, "model": "slow", "inputs": x})
        answers = c.recv_n(20)
    assert sorted(a["id"] for a in answers) == list(range(1, 21))
    by = {}
    for a in answers:
        by.setdefault(a["status"], []).append(a)
    assert len(by[OK]) >= 8 and len(by[EXHAUSTED]) >= 1, {k: len(v) for k, v in by.items()}
    assert all("max_inflight_per_connection" in a["error"] for a in by[EXHAUSTED])
    # Every way a request is answered gives its place back: NaN rows refused
    # when their batch leaves, then a full window of good ones.
    nan = tensor(np.array([np.nan, 1, 2, 3], np.float32))
    with d.client() as c:
        for i in range(8):
            c.send({"id": 100 + i, "model": "slow", "inputs": nan})
        assert all(a["status"] == INVALID for a in c.recv_n(8))
        for i in range(8):
            c.send({"id": 200 + i, "model": "slow", "inputs": x})
        assert sorted(a["status"] for a in c.recv_n(8)) == [OK] * 8


def test_a_flooding_client_leaves_room_for_another(daemon_factory):
    """One client keeps 64 requests pipelined against a 16-deep queue; a
    second client (another address) retrying on RESOURCE_EXHAUSTED gets in."""
    d = daemon_factory(SLOW.format(inflight=1024, queue_limit=16),
                       env={"RINGSERVE_TEST_SLOW_MS": "20"})
    x = tensor(np.ones(4, np.float32))
    stop = threading.Event()
    flood = d.client(timeout=60)
    counts = {"sent": 0, "answered": 0}

    def flooder():
        for _ in range(64):
            counts["sent"] += 1
            flood.send({"model": "slow", "inputs": x})
        while not stop.is_set():
            flood.recv()
            counts["answered"] += 1
            counts["sent"] += 1
            flood.send({"model": "slow", "inputs": x})

    t = threading.Thread(target=flooder)
    t.start()
    try:
        d.wait_for(lambda h: stats(d)["models"][0]["queue_depth"] >= 8, what="a full queue")
        s = socket.socket()
        s.bind(("127.0.0.2", 0))
        s.settimeout(30)
        s.connect(("127.0.0.1", d.port))
        got = None
        for attempt in range(200):
            s.sendall(encode_frame({"id": attempt + 1, "model": "slow", "inputs": x}))
            a = msgpack.unpackb(recv_frame(s))
            if a["status"] == OK:
                got = attempt
                break
            assert a["status"] == EXHAUSTED, a
            time.sleep(0.02)
        s.close()
        assert got is not None, "the second client never got in"
        shed = stats(d)["models"][0]["shed"]
        assert shed.get("fair_share", 0) >= 1, shed
    finally:
        stop.set()
        t.join(30)
        flood.close()


# --- client identity behind a proxy -------------------------------------------------------------

PROXIED = demo_config(server="""
proxy_protocol = true
trusted_proxies = ["127.0.0.3"]
max_connections_per_client = 2
""") + """
[rate_limit]
requests_per_s = 0.001
burst = 2
"""


def from_address(host: str, port: int) -> socket.socket:
    s = socket.socket()
    s.bind((host, 0))
    s.settimeout(20)
    s.connect(("127.0.0.1", port))
    return s


def proxied(port: int, header: bytes) -> socket.socket:
    """A connection from the trusted proxy (127.0.0.3), PROXY header first."""
    s = from_address("127.0.0.3", port)
    s.sendall(header)
    return s


def ask(s: socket.socket, msg: dict) -> dict:
    s.sendall(encode_frame(msg))
    return msgpack.unpackb(recv_frame(s))


def test_the_proxy_protocol_names_the_client_for_limits(daemon_factory):
    d = daemon_factory(PROXIED)
    port = d.port
    a1 = proxied(port, v2("10.0.0.1", 4000, "127.0.0.1", port))
    a2 = proxied(port, v1("10.0.0.1", 4001, "127.0.0.1", port))
    b1 = proxied(port, v2("10.0.0.2", 4000, "127.0.0.1", port))
    try:
        for s in (a1, a2, b1):
            assert ask(s, {"id": 1, "op": "health"})["status"] == OK
        # A third connection of 10.0.0.1 is one too many; 10.0.0.2 has room.
        a3 = proxied(port, v2("10.0.0.1", 4002, "127.0.0.1", port))
        a = msgpack.unpackb(recv_frame(a3))
        assert a["id"] == 0 and a["status"] == EXHAUSTED and "10.0.0.1" in a["error"], a
        a3.close()
        # Rate buckets follow the proxied address: 10.0.0.1's two connections
        # share a burst of 2, 10.0.0.2 has its own.
        assert ask(a1, {"id": 2, "op": "models"})["status"] == OK
        assert ask(a2, {"id": 3, "op": "models"})["status"] == OK
        a = ask(a1, {"id": 4, "op": "models"})
        assert a["status"] == EXHAUSTED and "10.0.0.1" in a["error"], a
        assert ask(b1, {"id": 5, "op": "models"})["status"] == OK
        # From the trusted proxy without a header: refused, with a reason.
        raw = from_address("127.0.0.3", port)
        raw.sendall(encode_frame({"id": 6, "op": "health"}))
        a = msgpack.unpackb(recv_frame(raw))
        assert a["id"] == 0 and a["status"] == INVALID and "PROXY" in a["error"], a
        raw.close()
        # A client that is not a trusted proxy is served as itself.
        with d.client() as direct:
            assert direct.call({"id": 7, "op": "health"})["status"] == OK
    finally:
        for s in (a1, a2, b1):
            s.close()


# --- auth within a time limit -------------------------------------------------------------------

def test_a_connection_that_never_authenticates_is_closed(daemon_factory, tmp_path):
    tokens = tmp_path / "tokens"
    tokens.write_text("alice:" + "a" * 24 + "\n")
    os.chmod(tokens, 0o600)
    d = daemon_factory(demo_config() + f'\n[auth]\ntokens_file = "{tokens}"\ntimeout_s = 0.5\n'
                       'exempt_ops = ["health"]\n')
    with d.client(timeout=20) as c:
        a = closing_answer(c)
    assert a["status"] == UNAUTH and "auth.timeout_s" in a["error"], a
    with d.client(timeout=20) as c:
        assert c.call({"op": "auth", "token": "a" * 24})["status"] == OK
        time.sleep(1.0)  # past the auth limit: authenticated, so it stays
        assert c.call({"op": "stats"})["status"] == OK


# --- rids: below 2**53, unique across restarts ---------------------------------------------------

def test_rids_fit_a_double_and_never_repeat_across_restarts(daemon_factory):
    cfg = demo_config(server="node_id = 3\n") + "\n[feedback]\nmax_entries = 5\n"
    seen = []
    for _ in range(2):
        d = daemon_factory(cfg, sub="rids")
        with d.client() as c:
            answers = [c.call({"model": "demo", "inputs": x128(i)}) for i in range(8)]
            rids = [a["rid"] for a in answers]
            assert all(0 < r < 2**53 and float(r) == r for r in rids)
            assert all(decode(r).node == 3 for r in rids)
            assert len({decode(r).block for r in rids}) == 1
            # [feedback] max_entries = 5: the oldest answers are forgotten.
            first = c.call({"op": "feedback", "ref": rids[0], "outcome": 1.0})
            last = c.call({"op": "feedback", "ref": rids[-1], "outcome": 1.0})
            assert first["status"] == OK and first["joined"] is False
            assert last["status"] == OK and last["joined"] is True
        assert d.stop() == 0
        seen.append(rids)
    assert not set(seen[0]) & set(seen[1])
    assert decode(seen[1][0]).block > decode(seen[0][0]).block


# --- the open-files limit ------------------------------------------------------------------------

def test_a_low_descriptor_limit_is_raised_or_reported_and_refusals_are_answered(tmp_path):
    """Started under a hard RLIMIT_NOFILE of 200 with max_connections 1024:
    the daemon warns (naming the limit and the fix) and serves fewer
    connections, answering the ones past them RESOURCE_EXHAUSTED instead of
    leaving the kernel to drop them."""
    if subprocess.run(["prlimit", "--version"], capture_output=True, timeout=10).returncode:
        pytest.skip("prlimit (util-linux) is not installed")
    d = Daemon(tmp_path / "d", demo_config())
    d._log = log = open(d.log_path, "wb")
    d.proc = subprocess.Popen(
        ["prlimit", "--nofile=200:200", sys.executable, "-m", "daemon", "--config",
         str(d.config_path), "--port", "0", "--port-file", str(d.port_file)],
        cwd=REPO, env=d.env, stdout=log, stderr=subprocess.STDOUT)
    try:
        d.root = psutil.Process(d.proc.pid)
        t_end = time.monotonic() + 120
        while not d.port_file.exists():
            assert d.proc.poll() is None and time.monotonic() < t_end, d.log()
            time.sleep(0.05)
        d.port = int(d.port_file.read_text())
        d.wait_ready()
        assert "RLIMIT_NOFILE" in d.log() and "ulimit -n" in d.log()
        room = stats(d)["limits"]["max_connections"]
        assert 1 <= room < 200
        conns, refused = [], 0
        for _ in range(room + 5):
            c = d.client(timeout=20)
            conns.append(c)
            a = c.call({"op": "health"})
            if a["id"] == 0:
                assert a["status"] == EXHAUSTED and "max_connections" in a["error"], a
                refused += 1
        assert refused >= 5, refused
        for c in conns:
            c.close()
    finally:
        rc = d.stop()
    assert rc == 0, d.log()
    d.assert_clean()


# --- found by a hostile probe --------------------------------------------------------------------

def test_refused_connections_do_not_hold_places_for_others(daemon_factory):
    """One address that keeps opening connections past its own cap must not
    fill max_connections with the ones it was refused."""
    d = daemon_factory(demo_config(server="max_connections = 8\nmax_connections_per_client = 3\n"))
    mine = [from_address("127.0.0.2", d.port) for _ in range(12)]
    try:
        refused = 0
        for s in mine[3:]:
            a = msgpack.unpackb(recv_frame(s))
            assert a["id"] == 0 and a["status"] == EXHAUSTED, a
            refused += "max_connections_per_client" in a["error"]
        assert refused == 9
        with d.client() as c:   # another client still gets in
            assert c.call({"op": "health"})["status"] == OK
    finally:
        for s in mine:
            s.close()


def test_a_half_closed_connection_gets_its_answers(daemon):
    s = from_address("127.0.0.1", daemon.port)
    # health answered at once, between infers answered later, in one read
    s.sendall(b"".join(encode_frame({"id": i + 1, "model": "demo", "inputs": x128(i)})
                       for i in range(5)) + b"".join(
        encode_frame({"id": i, "op": "health"}) for i in range(6, 60)))
    s.shutdown(socket.SHUT_WR)
    got = []
    while True:
        head = s.recv(4, socket.MSG_WAITALL)
        if not head:
            break
        got.append(msgpack.unpackb(s.recv(struct.unpack(">I", head)[0], socket.MSG_WAITALL)))
    s.close()
    assert sorted(a["id"] for a in got) == list(range(1, 60))
    assert all(a["status"] == OK for a in got)


def test_ids_the_server_could_not_send_back_exactly_are_refused(daemon):
    with daemon.client() as c:
        for bad in (2**53, 2**64 - 1):
            a = c.call({"id": bad, "op": "health"})
            assert a["id"] == 0 and a["status"] == INVALID and "2**53" in a["error"], a
        assert c.call({"id": 2**53 - 1, "op": "health"})["id"] == 2**53 - 1


def test_an_outcome_too_large_to_sum_is_refused(daemon):
    with daemon.client() as c:
        rid = c.call({"model": "demo", "inputs": x128()})["rid"]
        a = c.call({"op": "feedback", "ref": rid, "outcome": 1e308})
        assert a["status"] == INVALID, a
        assert c.call({"op": "feedback", "ref": rid, "outcome": 1e15})["status"] == OK


def test_sigterm_closes_every_connection_with_an_answer(daemon_factory):
    d = daemon_factory(demo_config())
    c = d.client(timeout=30)
    assert c.call({"op": "health"})["status"] == OK
    os.kill(d.proc.pid, signal.SIGTERM)
    a = c.recv()
    assert a["id"] == 0 and a["status"] == UNAVAILABLE, a
    assert c.closed_by_peer()
    c.close()
    assert d.stop() == 0
