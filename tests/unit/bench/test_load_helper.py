"""tests/load.py's SteadyLoad against a fake server that misanswers on
purpose: it must name each id answered twice, answered but never sent, and
sent but never answered; against a server that answers well, nothing."""

from __future__ import annotations

import socket
import threading

import pytest

from ipc.framing import FrameDecoder, encode_frame
from tests.load import SteadyLoad


class FakeServer:
    """Answers each request {"id": i, "status": 0}, except that ``twice``
    (the n-th requests, 1-based) are answered twice and ``renamed`` ones under
    another id."""

    def __init__(self, twice=(), renamed=None):
        self.twice = set(twice)
        self.renamed = dict(renamed or {})
        self.srv = socket.create_server(("127.0.0.1", 0))
        self.srv.settimeout(10)
        self.port = self.srv.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        try:
            conn, _ = self.srv.accept()
        except OSError:
            return
        n = 0
        dec = FrameDecoder()
        with conn:
            conn.settimeout(10)
            while True:
                try:
                    data = conn.recv(65536)
                except OSError:
                    return
                if not data:
                    return
                for msg in dec.feed(data):
                    n += 1
                    rid = self.renamed.get(n, msg["id"])
                    out = encode_frame({"id": rid, "status": 0})
                    conn.sendall(out * (2 if n in self.twice else 1))

    def close(self) -> None:
        self.srv.close()
        self.thread.join(10)


def test_a_good_server_passes():
    server = FakeServer()
    try:
        with SteadyLoad(server.port, lambda i: {"op": "health"}, conns=1, timeout=2.0) as load:
            load.wait_answers(20, timeout=30)
    finally:
        server.close()
    assert load.id_problems() == {"unknown": [], "duplicate": [], "missing": []}
    assert load.sent == len(load.answers) >= 20


def test_duplicates_unknown_and_missing_ids_are_named():
    # The 3rd request is answered twice; the 6th under an id nobody sent,
    # so its own id is never answered.
    server = FakeServer(twice={3}, renamed={6: 424242})
    try:
        load = SteadyLoad(server.port, lambda i: {"op": "health"}, conns=1, timeout=2.0)
        with pytest.raises(AssertionError) as ei:
            with load:
                load.wait_answers(20, timeout=30)
    finally:
        server.close()
    problems = load.id_problems()
    assert problems == {"unknown": [424242], "duplicate": [3], "missing": [6]}, problems
    message = str(ei.value)
    assert "unknown ids [424242]" in message and "duplicate ids [3]" in message
    assert "missing ids [6]" in message
