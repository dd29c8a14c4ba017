"""Steady background load for integration tests: a few threads, each with its
own connection, sending keyed requests one at a time and keeping every
answer, so a test can count that nothing was lost while it did something to
the daemon (a reload, a rollback).

Every request carries an id of its own (unique across threads), and
``stop()`` checks that the answers match the requests exactly once: no
answer with an id that was never sent, none twice, none missing. One
request is in flight per connection, so an answer whose id is not the one
just sent is itself a fault (a duplicate, a stray, or another's); after the
threads stop, each connection is read once more, briefly, for answers that
arrived late or twice."""

from __future__ import annotations

import collections
import socket
import threading
import time

from tests.wire import WireClient

_ID_STRIDE = 1_000_000_000   # thread k sends ids k * _ID_STRIDE + 1, + 2, ...
_TAIL_S = 0.2                # how long stop() reads each connection for stray answers


class SteadyLoad:
    def __init__(self, port: int, request, conns: int = 2, pause_s: float = 0.0,
                 timeout: float = 30.0):
        """``request(i)`` -> the i-th request map of a thread (no id);
        ``timeout``: how long one answer may take."""
        self.port = port
        self.timeout = timeout
        self.request = request
        self.pause_s = pause_s
        self.stop_flag = threading.Event()
        self.sent = 0
        self.answers: list[tuple[float, float, dict]] = []  # (t_sent, latency_s, answer)
        self.errors: list[BaseException] = []
        self.sent_ids: set[int] = set()
        self.answered_ids: collections.Counter = collections.Counter()
        self._lock = threading.Lock()
        self._stopped = False
        self.threads = [threading.Thread(target=self._run, args=(k,), daemon=True)
                        for k in range(conns)]

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc is None:
            self.stop()
            return
        try:   # the test already failed: stop, and add what the load saw to its report
            self.stop()
        except AssertionError as e:
            exc.add_note(f"steady load: {e}")

    def _record(self, t0: float, ans: dict) -> None:
        with self._lock:
            self.answers.append((t0, time.monotonic() - t0, ans))
            self.answered_ids[ans.get("id")] += 1

    def _run(self, k: int) -> None:
        try:
            with WireClient("127.0.0.1", self.port, timeout=self.timeout) as c:
                i = 0
                while not self.stop_flag.is_set():
                    i += 1
                    rid = k * _ID_STRIDE + i
                    msg = dict(self.request(k * 1_000_000 + i - 1), id=rid)
                    t0 = time.monotonic()
                    with self._lock:
                        self.sent += 1
                        self.sent_ids.add(rid)
                    c.send(msg)
                    self._record(t0, c.recv())
                    if self.pause_s:
                        time.sleep(self.pause_s)
                # Nothing is in flight now: anything still coming is a stray.
                c.sock.settimeout(_TAIL_S)
                try:
                    while True:
                        self._record(time.monotonic(), c.recv())
                except (socket.timeout, TimeoutError):
                    pass
        except BaseException as e:  # surfaced by stop()
            self.errors.append(e)

    def id_problems(self) -> dict[str, list[int]]:
        """{"unknown": ids answered but never sent, "duplicate": ids answered
        more than once, "missing": ids sent and never answered}; empty lists
        when every answer matched a request exactly once."""
        with self._lock:
            answered = dict(self.answered_ids)
            sent = set(self.sent_ids)
        return {"unknown": sorted((i for i in answered if i not in sent), key=repr),
                "duplicate": sorted(i for i, n in answered.items() if n > 1 and i in sent),
                "missing": sorted(sent - set(answered))}

    def stop(self) -> None:
        self.stop_flag.set()
        for t in self.threads:
            t.join(60)
        assert not [t for t in self.threads if t.is_alive()], "load threads did not stop in 60 s"
        assert not self.errors, self.errors
        problems = {k: v for k, v in self.id_problems().items() if v}
        assert not problems, "answers do not match the requests exactly once: " + "; ".join(
            f"{k} ids {v[:10]}{' ...' if len(v) > 10 else ''} ({len(v)})"
            for k, v in problems.items())

    def statuses(self, since: float = 0.0) -> dict[int, int]:
        out: dict[int, int] = {}
        for t, _, a in list(self.answers):
            if t >= since:
                out[a["status"]] = out.get(a["status"], 0) + 1
        return out

    def wait_answers(self, n: int, timeout: float = 60.0) -> None:
        t_end = time.monotonic() + timeout
        while len(self.answers) < n:
            assert time.monotonic() < t_end, f"only {len(self.answers)} answers in {timeout} s"
            assert not self.errors, self.errors
            time.sleep(0.01)
