"""The queue and dispatch policy (daemon/serving/queue.py) against a fake clock and
a real worker port (daemon/workers/port.py) with no process behind it: the port is
attached to a real ring, and the test plays the worker's part on its own
mapping of that ring. What is held here: an idle worker never waits, a busy
one gets a batch when it is full or when the window has passed, a request
near its deadline does not wait for a fuller batch, deadlines answer at the
deadline, the bounded queue and the fair shares refuse at once, and a
finished batch answers every request with its own rows."""

from __future__ import annotations

import os

import numpy as np
import pytest

import daemon.serving.queue as batcher
from daemon.config import load_config
from daemon.serving.queue import Deadlines, ModelQueue, Refused
from daemon.serving.request import Pending
from daemon.workers.port import WorkerPort
from daemon.workers.spec import TensorDecl
from daemon.workers.status import STATUS_PAGE_BYTES, StatusPage
from ipc.ring import Ring, RingLayout
from ipc.shm import Segment

MS = 1_000_000

CONFIG = """
[[models]]
name = "m"
version = "1"
factory = "tests.models:two_x"
input = {{ dtype = "float32", shape = [2] }}
threads = 1
max_batch = 4
window_ms = 2.0
queue_limit = {limit}
inflight_batches = 2
"""


class Clock:
    def __init__(self):
        self.ns = 10_000 * MS

    def __call__(self) -> int:
        return self.ns


class Handle:
    def __init__(self, loop, when, cb, args):
        self.loop, self.when, self.cb, self.args = loop, when, cb, args
        self.cancelled = False

    def cancel(self):
        self.cancelled = True


class FakeLoop:
    """call_at / call_later on the fake clock; readers are recorded, never polled."""

    def __init__(self, clock: Clock):
        self.clock = clock
        self.timers: list[Handle] = []
        self.readers: dict[int, object] = {}

    def time(self) -> float:
        return self.clock.ns / 1e9

    def call_at(self, when, cb, *args):
        h = Handle(self, when, cb, args)
        self.timers.append(h)
        return h

    def call_later(self, delay, cb, *args):
        return self.call_at(self.time() + delay, cb, *args)

    def add_reader(self, fd, cb):
        self.readers[fd] = cb

    def remove_reader(self, fd):
        self.readers.pop(fd, None)

    def advance(self, ns: int) -> None:
        end = self.clock.ns + ns
        while True:
            horizon = end / 1e9 + 1e-12
            due = sorted((h for h in self.timers if not h.cancelled and h.when <= horizon),
                         key=lambda h: h.when)
            if not due:
                break
            h = due[0]
            self.timers.remove(h)
            self.clock.ns = max(self.clock.ns, int(round(h.when * 1e9)))
            h.cb(*h.args)
        self.clock.ns = end


class Conn:
    def __init__(self):
        self.inflight = 0
        self.sent: list[dict] = []

    def send(self, answer: dict) -> None:
        self.sent.append(answer)


class Worker:
    """The worker's half of the ring: finishes what was submitted (2 * x)."""

    def __init__(self, loop, q: ModelQueue):
        lay = RingLayout(2, 4, [8], [8])
        self.ring, fd = Ring.create_anonymous("ringserve-test-queue", lay)
        self.wake, done = os.eventfd(0, os.EFD_NONBLOCK), os.eventfd(0, os.EFD_NONBLOCK)
        self.port = WorkerPort(loop, q, 0, "cpu", 1, lambda status: None)
        q.workers.append(self.port)
        page, page_fd = Segment.anonymous("ringserve-test-status", STATUS_PAGE_BYTES)
        page.close()
        self.status = StatusPage(os.dup(page_fd))  # the worker's side of its status page
        self.port.attach(fd, self.wake, done, "ringserve-test-queue", {"state": "ready"},
                         [TensorDecl("output", "float32", (2,))], True, page_fd)
        self.done = 0

    def submitted(self) -> list[tuple[int, int]]:
        """(rows, bucket) of each batch handed over and not finished."""
        out = []
        for b in range(self.done, self.ring.submitted()):
            _, n, bucket, _ = self.ring.request(b % 2)
            out.append((n, bucket))
        return out

    def finish_one(self, compute_ns: int = 500_000) -> None:
        slot = self.done % 2
        seq, n, bucket, _ = self.ring.request(slot)
        x = np.frombuffer(self.ring.input_view(slot, 0), np.float32)[:2 * n]
        np.frombuffer(self.ring.output_view(slot, 0), np.float32)[:2 * n] = 2 * x
        self.ring.complete(slot, seq, n, 0, compute_ns, "", 1)
        self.done += 1
        self.port._on_done()

    def close(self):
        self.port.close()
        self.ring.close()
        self.status.close()


@pytest.fixture
def setup(tmp_path, monkeypatch):
    def make(limit: int = 16):
        clock = Clock()
        monkeypatch.setattr(batcher, "_monotonic_ns", clock)
        (tmp_path / "c.toml").write_text(CONFIG.format(limit=limit))
        m = load_config(str(tmp_path / "c.toml")).models[0]
        loop = FakeLoop(clock)
        q = ModelQueue(m, loop, Deadlines(loop))
        w = Worker(loop, q)
        made.append(w)
        return clock, loop, q, w
    made: list[Worker] = []
    yield make
    for w in made:
        w.close()


def request(q, conn, clock, i: int, x=(1.0, 2.0), deadline_ms: float = 1000.0, client=None):
    r = Pending(i, conn, [np.array(x, np.float32).tobytes()], clock.ns,
                clock.ns + int(deadline_ms * MS), q, 1000 + i, "stable", None, None)
    conn.inflight += 1
    return r, q.submit(r, client)


def test_an_idle_worker_never_waits_for_the_window(setup):
    clock, loop, q, w = setup()
    conn = Conn()
    _, refused = request(q, conn, clock, 1)
    assert refused is None and w.submitted() == [(1, 1)]
    assert q.stats.dispatch == {"idle": 1}


def test_a_worker_busy_with_another_fronts_batch_is_not_idle(setup):
    clock, loop, q, w = setup()
    conn = Conn()
    w.status.busy = True       # the worker runs a batch of another front's ring
    request(q, conn, clock, 1)
    request(q, conn, clock, 2)
    assert w.submitted() == [] and q.queued == 2   # they fill the batch meanwhile
    loop.advance(2 * MS)
    assert w.submitted() == [(2, 2)] and q.stats.dispatch == {"window": 1}
    w.status.busy = False      # idle again, for everyone: the next request goes at once
    w.finish_one()
    request(q, conn, clock, 3)
    assert w.submitted() == [(1, 1)] and q.stats.dispatch["idle"] == 1


def test_a_busy_worker_gets_a_batch_when_the_window_has_passed(setup):
    clock, loop, q, w = setup()
    conn = Conn()
    request(q, conn, clock, 1)                         # the worker is busy with it
    for i in (2, 3):
        request(q, conn, clock, i)
    assert w.submitted() == [(1, 1)] and q.queued == 2
    loop.advance(1 * MS)
    assert w.submitted() == [(1, 1)]                   # half the window: still waiting
    loop.advance(1 * MS)
    assert w.submitted() == [(1, 1), (2, 2)] and q.stats.dispatch["window"] == 1


def test_a_full_batch_goes_at_once(setup):
    clock, loop, q, w = setup()
    conn = Conn()
    request(q, conn, clock, 1)
    for i in range(2, 6):                              # max_batch = 4
        request(q, conn, clock, i)
    assert w.submitted() == [(1, 1), (4, 4)] and q.stats.dispatch["full"] == 1


def test_a_request_near_its_deadline_does_not_wait_for_a_fuller_batch(setup):
    clock, loop, q, w = setup()
    conn = Conn()
    request(q, conn, clock, 1)
    request(q, conn, clock, 2, deadline_ms=1.5)       # less than a window of budget left
    assert w.submitted() == [(1, 1), (1, 1)] and q.stats.dispatch["deadline"] == 1


def test_the_deadline_answers_at_the_deadline_while_the_worker_holds_the_slots(setup):
    clock, loop, q, w = setup()
    conn = Conn()
    for i in range(1, 6):                              # 1 in the first slot, 2-5 in the second
        request(q, conn, clock, i)
    request(q, conn, clock, 6, deadline_ms=5.0)        # waits: no free slot
    assert w.submitted() == [(1, 1), (4, 4)] and q.queued == 1
    loop.advance(4 * MS)
    assert conn.sent == []
    loop.advance(1 * MS)
    (a,) = conn.sent
    assert (a["id"], a["status"]) == (6, 4) and "deadline" in a["error"]
    assert conn.inflight == 5 and q.queued == 0


def test_a_full_queue_and_a_client_over_its_share_are_refused_at_once(setup):
    clock, loop, q, w = setup(limit=8)
    conn = Conn()
    for i in range(1, 14):  # 1 and 2-5 fill the two slots; 6-13 fill the queue (the limit)
        assert request(q, conn, clock, i, client="a")[1] is None
    assert q.queued == 8
    assert request(q, conn, clock, 14, client="b")[1] is Refused.QUEUE_FULL
    w.finish_one()                                     # answers 1; 6-9 take its slot
    assert q.queued == 4
    # b was refused a moment ago: it counts, and a (holding 12) is over its half
    assert request(q, conn, clock, 15, client="a")[1] is Refused.FAIR_SHARE
    assert request(q, conn, clock, 16, client="b")[1] is None


def test_no_ready_worker_refuses_and_a_lost_port_answers_what_it_held(setup):
    clock, loop, q, w = setup()
    conn = Conn()
    request(q, conn, clock, 1)
    request(q, conn, clock, 2)
    lost = w.port.down("worker gone; retry")
    assert lost == 1
    assert [(a["id"], a["status"]) for a in conn.sent] == [(1, 14), (2, 14)]
    assert request(q, conn, clock, 3)[1] is Refused.NO_WORKER


def test_a_finished_batch_answers_each_request_with_its_own_rows(setup):
    clock, loop, q, w = setup()
    conn = Conn()
    request(q, conn, clock, 1, x=(0.5, 1.5))
    for i, x in ((2, (1.0, -1.0)), (3, (3.0, 4.0)), (4, (0.25, 0.0))):
        request(q, conn, clock, i, x=x)
    loop.advance(2 * MS)
    clock.ns += 3 * MS
    w.finish_one()
    w.finish_one()
    got = {a["id"]: a for a in conn.sent}
    assert set(got) == {1, 2, 3, 4} and conn.inflight == 0
    for i, x in ((1, (0.5, 1.5)), (2, (1.0, -1.0)), (3, (3.0, 4.0)), (4, (0.25, 0.0))):
        a = got[i]
        assert a["status"] == 0 and a["rid"] == 1000 + i
        out = np.frombuffer(bytes(a["outputs"]["data"]), np.float32)
        np.testing.assert_array_equal(out, 2 * np.array(x, np.float32))
    assert got[2]["timing"]["batch"] == 3 and got[2]["timing"]["bucket"] == 3
    assert q.stats.batches == 2 and dict(q.stats.batch_sizes) == {1: 1, 3: 1}
