"""Steady background load for integration tests: a few threads, each with its
own connection, sending keyed requests one at a time and keeping every
answer, so a test can count that nothing was lost while it did something to
the daemon (a reload, a rollback)."""

from __future__ import annotations

import threading
import time

from tests.wire import WireClient


class SteadyLoad:
    def __init__(self, port: int, request, conns: int = 2, pause_s: float = 0.0):
        """``request(i)`` -> the i-th request map of a thread (no id)."""
        self.port = port
        self.request = request
        self.pause_s = pause_s
        self.stop_flag = threading.Event()
        self.sent = 0
        self.answers: list[tuple[float, float, dict]] = []  # (t_sent, latency_s, answer)
        self.errors: list[BaseException] = []
        self._lock = threading.Lock()
        self.threads = [threading.Thread(target=self._run, args=(k,), daemon=True)
                        for k in range(conns)]

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self.stop()

    def _run(self, k: int) -> None:
        try:
            with WireClient("127.0.0.1", self.port, timeout=30) as c:
                i = 0
                while not self.stop_flag.is_set():
                    msg = self.request(k * 1_000_000 + i)
                    i += 1
                    t0 = time.monotonic()
                    with self._lock:
                        self.sent += 1
                    ans = c.call(msg)
                    with self._lock:
                        self.answers.append((t0, time.monotonic() - t0, ans))
                    if self.pause_s:
                        time.sleep(self.pause_s)
        except BaseException as e:  # surfaced by stop()
            self.errors.append(e)

    def stop(self) -> None:
        self.stop_flag.set()
        for t in self.threads:
            t.join(60)
        assert not self.errors, self.errors

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
