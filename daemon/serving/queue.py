"""Per-model request queues, the dispatch policy, deadlines and completion.

Dispatch policy (one ``ModelQueue`` per served model version, shared by all of
its workers):

- a worker with nothing in flight is *idle*: it gets whatever is queued at
  once (up to ``max_batch``). A lone request never waits for a window that an
  idle device does not need. With several fronts, idle means idle for all of
  them: a worker running another front's batch is busy (its status page,
  daemon/workers/status.py), so this front's batch fills meanwhile, and the
  worker runs the batches that wait on several rings as one pass.
- otherwise a batch is handed over when ``max_batch`` requests are queued, or
  when the oldest queued request has waited ``window_ms``, to a worker that
  has a free ring slot (``inflight_batches`` per worker lets the front fill
  the next batch while the worker computes the current one).
- a finished batch frees its worker, which re-runs the policy.

The queue is bounded (``queue_limit``): beyond it a request is refused with
RESOURCE_EXHAUSTED at once. Mirrored (shadow) requests wait in a second,
lower-priority queue of their own (``daemon/serving/shadow.py``): they run only on an
idle worker when no primary request is queued, so they never delay a caller
by more than one batch. Every request is on a deadline heap; one timer,
set for the earliest deadline, answers DEADLINE_EXCEEDED for whatever is still
unanswered then, queued or in a worker, so a stuck worker can never hang a
caller. A request is answered exactly once (``Pending.done``); a late result
for an answered request is dropped.

Failures that a version's fallback may answer instead (daemon/serving/fallback.py)
go through ``ModelQueue.fail`` with their cause: the model raised on the
batch, the last worker went while requests were queued, the worker running
them died. A request moved to a fallback version is the same ``Pending``
in that version's queue (``Pending.via``); its answer, OK or not, is built
and counted by its ``Via``.
"""

from __future__ import annotations

import collections
import heapq
import itertools
import time
from collections.abc import Callable
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from ipc.status import ProtocolError, Status

from ..observe.stats import ModelStats
from ..workers.state import WorkerState
from .answers import claim, error, ok
from .fallback import MODEL_ERROR, NO_WORKER
from .request import SHADOW, Client, Pending

if TYPE_CHECKING:  # pragma: no cover
    import asyncio

    from ipc.tensors import TensorSpec

    from ..config import ModelConfig
    from ..observe.drift import DriftTracker
    from ..observe.feedback import FeedbackJoin
    from ..observe.reqlog import RequestLog
    from ..workers.port import WorkerPort
    from ..workers.spec import TensorDecl
    from .cache import ResponseCache
    from .fallback import Fallback

_monotonic_ns = time.monotonic_ns
class Refused(StrEnum):
    """Why a queue did not take a request (``submit``, ``submit_shadow``):
    the reason it is counted under in stats ``shed`` and ringserve_shed, or
    in a shadow's ``shed`` for a mirror."""
    QUEUE_FULL = "queue_full"    # queue_limit reached
    FAIR_SHARE = "fair_share"    # the client holds its share of a half-full queue
    NO_WORKER = "no_worker"      # no ready worker
    OVERLOAD = "overload"        # a mirror, while callers' requests fill half the queue
    UNAVAILABLE = "unavailable"  # a mirror, while no worker is ready (docs/operations.md)


OK = int(Status.OK)
# A client refused for a full queue counts among those sharing it this long
# (``ModelQueue.submit``): about the time a retrying client takes to return.
WAITING_S = 1.0
WAITING_NS = int(WAITING_S * 1e9)


def loop_time_at(loop: asyncio.AbstractEventLoop, monotonic_ns: int) -> float:
    """The event loop's clock reading at a ``time.monotonic_ns()`` instant.
    Converted relative to now: uvloop's clock is libuv's, which need not share
    time.monotonic()'s origin or resolution."""
    return loop.time() + (monotonic_ns - _monotonic_ns()) / 1e9


def _owned(outputs: dict[str, Any]) -> dict[str, Any]:
    """A copy of an answer's outputs that owns its bytes (the answer's own
    ``data`` are views of a result slot that is about to be reused)."""
    if "data" in outputs:
        return dict(outputs, data=bytes(outputs["data"]))
    return {k: dict(t, data=bytes(t["data"])) for k, t in outputs.items()}


class Deadlines:
    """One heap and one timer for every pending request of the process.

    Answered requests are not removed from the heap when they are answered
    (that would cost O(n)); instead the heap is compacted whenever it has
    grown to twice the entries that were live at the last compaction. That
    keeps the work O(1) amortised per request and, as important, stops a
    second's worth of answered requests (tens of thousands) from outliving
    their answer: long-lived garbage is what makes Python's full collections
    slow (measured: 8-25 ms pauses every 0.7 s at 43k requests/s before).
    """

    COMPACT_MIN = 4096

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.heap: list[tuple[int, int, Pending]] = []
        self.seq = itertools.count()
        self.timer: asyncio.TimerHandle | None = None
        self.timer_at = 0
        self._compact_at = self.COMPACT_MIN

    def add(self, req: Pending) -> None:
        heap = self.heap
        if len(heap) >= self._compact_at:
            heap = self.heap = [e for e in heap if not e[2].done]
            heapq.heapify(heap)
            self._compact_at = max(self.COMPACT_MIN, 2 * len(heap))
        heapq.heappush(heap, (req.deadline, next(self.seq), req))
        if self.timer is None or req.deadline < self.timer_at:
            self._arm(req.deadline)

    def _arm(self, at_ns: int) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.timer_at = at_ns
        self.timer = self.loop.call_at(loop_time_at(self.loop, at_ns), self._fire)

    def _fire(self) -> None:
        self.timer = None
        now = _monotonic_ns()
        heap = self.heap
        while heap and (heap[0][0] <= now or heap[0][2].done):
            _, _, req = heapq.heappop(heap)
            if not req.done:
                req.queue.expire(req)
        if heap:
            self._arm(heap[0][0])


class ModelQueue:
    """The queue and workers of one model version."""

    def __init__(self, model_cfg: ModelConfig, loop: asyncio.AbstractEventLoop,
                 deadlines: Deadlines, lane: str = "stable"):
        self.cfg = model_cfg
        self.name = model_cfg.name
        self.version = model_cfg.version
        # The training data version from the model's metadata (None without
        # a metadata file): a constant of the queue, put in every OK answer.
        meta = model_cfg.metadata
        self.data_version = meta.data_version if meta is not None else None
        self.lane = lane
        self.loop = loop
        self.deadlines = deadlines
        self.max_batch = model_cfg.max_batch
        self.window_ns = int(model_cfg.window_ms * 1e6)
        self.limit = model_cfg.queue_limit
        self.buckets = tuple(model_cfg.buckets)
        # bucket for each batch size n (index n): the smallest bucket >= n
        self.bucket_for = [0] * (self.max_batch + 1)
        b = 0
        for n in range(1, self.max_batch + 1):
            while self.buckets[b] < n:
                b += 1
            self.bucket_for[n] = self.buckets[b]
        self.q: collections.deque[Pending] = collections.deque()
        self.queued = 0  # live (unanswered) requests in q
        # client -> its unanswered requests here, queued or running
        self.held: dict[Client, int] = {}
        # client -> when it was last refused for a full queue (ns)
        self.waiting: dict[Client, int] = {}
        self._pruned = 0
        self.workers: list[WorkerPort] = []
        self.has_ready = False  # any worker ready: kept by worker_changed, read per request
        self.stats = ModelStats(self.buckets)
        self.window_timer: asyncio.TimerHandle | None = None
        self.outputs: list[TensorDecl] = []  # TensorDecl list, learned from the first worker
        self.single_output = True
        # called when nothing is queued or in flight (drain)
        self.on_idle: Callable[[], None] | None = None
        # FeedbackJoin: OK answers are remembered for feedback
        self.joins: FeedbackJoin | None = None
        # guardrail of a rollout: observer(lane, status, latency_us)
        self.observer: Callable[[str, int, int], None] | None = None
        self.shadow_q: collections.deque[Pending] = collections.deque()
        self.shadow_queued = 0
        self.shadow_limit = 0  # set when a [[shadows]] entry names this version
        self.cache: ResponseCache | None = None  # ResponseCache when the model has cache = true
        self.drift: DriftTracker | None = None  # DriftTracker when the model has drift = true
        self.reqlog: RequestLog | None = None  # RequestLog, when [request_log] is enabled
        # (input index, dtype, elements per sample, where) of the float inputs
        # whose NaN/Inf check runs once per batch (WorkerPort.submit_batch)
        self.finite_checks: tuple[tuple[int, str, int, str], ...] = ()
        # Fallback (daemon/serving/fallback.py), when the entry has [models.fallback]
        self.fallback: Fallback | None = None
        # (name, spec) of each declared input, in order: what decode_inputs checks against
        self.specs: tuple[tuple[str, TensorSpec], ...] = ()
        # input name -> wire tensor map of the inputs with a default
        self.defaults: dict[str, Any] | None = None
        # Answers here may need more than the plain OK answer: requests with
        # defaulted inputs, with a fallback (their input bytes are kept until
        # the answer), or moved here by another version's fallback. Set by
        # the app, never cleared (moved requests may still be queued).
        self.special = False

    # -- intake ------------------------------------------------------------
    def ready_workers(self) -> list[WorkerPort]:
        return [w for w in self.workers if w.state == WorkerState.READY]

    def submit(self, req: Pending, client: Client | None = None) -> Refused | None:
        """Queue a request; returns why instead when it cannot be taken:
        QUEUE_FULL, FAIR_SHARE (see below) or NO_WORKER.

        Fair shares: once the queue is half full, a client (``client``: its
        token's name or address) may hold at most ``queue_limit / n`` of the
        model's unanswered requests (queued or running), n being the clients
        that hold some or were refused in the last ``WAITING_S`` (itself
        included), unless it is alone. So one pipelining client fills the
        queue only while nobody else wants it: a client refused because the
        queue was full counts from then on, the flooder's share shrinks to
        half, and the newcomer's retry finds room as the flooder's requests
        are answered."""
        held = self.held
        if self.queued >= self.limit:
            if client is not None and client not in held:
                self._waiting(client, req.arrival)
            return Refused.QUEUE_FULL
        if not self.has_ready:
            return Refused.NO_WORKER
        if client is not None:
            mine = held.get(client, 0)
            if self.queued * 2 >= self.limit:
                n = self._clients(client, mine, req.arrival)
                if n > 1 and mine * n >= self.limit:
                    return Refused.FAIR_SHARE
            held[client] = mine + 1
            req.client = client
            if self.waiting:
                self.waiting.pop(client, None)
        self.q.append(req)
        self.queued += 1
        self.deadlines.add(req)
        if (self.window_timer is not None and self.queued < self.max_batch
                and req.deadline - req.arrival > self.window_ns):
            # A batch is filling while no worker is idle: the armed window
            # timer says so (dispatch cancels it whenever it hands a batch
            # over, and a worker only becomes idle through a dispatch). This
            # request cannot make it go sooner; the timer or a finishing
            # worker will.
            return None
        self.dispatch()
        return None

    def _waiting(self, client: Client, now: int) -> None:
        self.waiting[client] = now

    def _clients(self, client: Client, mine: int, now: int) -> int:
        """How many clients share the queue now (``submit``'s n)."""
        waiting = self.waiting
        if waiting and now - self._pruned > WAITING_NS // 4:
            self._pruned = now
            horizon = now - WAITING_NS
            for c in [c for c, t in waiting.items() if t < horizon]:
                del waiting[c]
        return len(self.held) + len(waiting) + (0 if mine or client in waiting else 1)

    def submit_shadow(self, req: Pending) -> Refused | None:
        """Queue a mirrored request, or say why it is shed."""
        if self.shadow_queued >= self.shadow_limit:
            return Refused.QUEUE_FULL
        if self.queued * 2 >= self.limit:
            return Refused.OVERLOAD  # callers' requests are piling up: they come first
        if not self.has_ready:
            return Refused.UNAVAILABLE
        self.shadow_q.append(req)
        self.shadow_queued += 1
        self.deadlines.add(req)
        self.dispatch()
        return None

    # -- policy --------------------------------------------------------------
    def _oldest(self) -> Pending | None:
        q = self.q
        while q and q[0].done:
            q.popleft()
        return q[0] if q else None

    def _pick_worker(self, oldest: Pending) -> tuple[WorkerPort | None, str]:
        """(worker, why) for the next batch, or (None, "") to wait."""
        best = None
        for w in self.workers:
            if w.state != WorkerState.READY:
                continue
            inflight = w.in_flight
            if inflight == 0 and not w.busy_elsewhere:
                return w, "idle"  # idle, for every front: never make it wait
            if w.free_slots and (best is None or inflight < best.in_flight):
                best = w
        if best is None:
            return None, ""
        if self.queued >= self.max_batch:
            return best, "full"
        now = _monotonic_ns()
        if now - oldest.arrival >= self.window_ns:
            return best, "window"
        # A request with less than a window of its budget left does not wait
        # for a fuller batch: it would spend its deadline queueing.
        if oldest.deadline - now <= self.window_ns:
            return best, "deadline"
        if self.window_timer is None:
            at = min(oldest.arrival + self.window_ns, oldest.deadline - self.window_ns)
            self.window_timer = self.loop.call_at(loop_time_at(self.loop, at), self._window_passed)
        return None, ""

    def _window_passed(self) -> None:
        self.window_timer = None
        self.dispatch()

    def dispatch(self) -> None:
        while self.queued:
            oldest = self._oldest()
            if oldest is None:
                break
            w, why = self._pick_worker(oldest)
            if w is None:
                return
            batch = self._take(self.q)
            self.queued -= len(batch)
            if self.window_timer is not None:  # it waited for the oldest, now gone
                self.window_timer.cancel()
                self.window_timer = None
            if batch:
                n = len(batch)
                self.stats.dispatch[why] += 1
                w.submit_batch(batch, self.bucket_for[n])
        if self.window_timer is not None:  # nothing left to wait for (see submit)
            self.window_timer.cancel()
            self.window_timer = None
        if self.shadow_queued and not self.queued:
            self._dispatch_shadow()
        self._maybe_idle()

    def _take(self, q: collections.deque) -> list[Pending]:
        """Up to max_batch live requests from the front of ``q`` (requests
        already answered, by their deadline, are skipped)."""
        batch: list[Pending] = []
        mb = self.max_batch
        while q and len(batch) < mb:
            r = q.popleft()
            if not r.done:
                batch.append(r)
        return batch

    def _dispatch_shadow(self) -> None:
        for w in self.workers:
            if not self.shadow_queued:
                return
            if w.state != WorkerState.READY or w.in_flight:
                continue
            batch = self._take(self.shadow_q)
            self.shadow_queued -= len(batch)
            if batch:
                self.stats.dispatch["shadow"] += 1
                w.submit_batch(batch, self.bucket_for[len(batch)])

    # -- completion ------------------------------------------------------------
    def set_outputs(self, outputs: list[TensorDecl], single: bool) -> None:
        self.outputs = outputs
        self.single_output = single
        # (name, dtype, shape) of each output, built once: answers only add data
        self._out_meta = [(t.name, t.dtype, list(t.shape)) for t in outputs]

    def complete_batch(self, batch: list[Pending], out_mvs: list[memoryview],
                       out_nbytes: tuple[int, ...] | list[int], status: int, compute_ns: int,
                       err: str | None, t_sub: int, bucket: int, ran: int = 0,
                       ran_bucket: int = 0, lead: bool = True) -> None:
        """Answer every request of a finished batch from the result slot.

        Output bytes go from shared memory straight into the answer frame:
        each ``data`` is a memoryview slice that msgpack packs as bin, before
        the slot is released. ``ran``/``ran_bucket``: the forward pass it ran
        in, when the worker merged it with other fronts' batches (its
        ``timing`` says so); ``lead`` False: another front counts that pass."""
        n = ran or len(batch)
        bucket = ran_bucket or bucket
        stats = self.stats
        if lead:
            stats.batch(n, bucket, compute_ns // 1000)
        if status:
            message = f"model {self.name!r} version {self.version!r} failed on this batch: {err}"
            for r in batch:
                self.fail(r, int(Status.INTERNAL), message, MODEL_ERROR)
            return
        compute_us = compute_ns // 1000
        meta = self._out_meta
        single = self.single_output
        name, version, data_version = self.name, self.version, self.data_version
        finished = self.finished
        joins = self.joins
        joined = joins.answered if joins is not None else None
        now = joins.clock() if joins is not None else 0.0
        shadow_lane = SHADOW
        queue_time = stats.queue_time.add
        cache = self.cache
        special = self.special
        for i, r in enumerate(batch):
            if not claim(r):
                continue
            queue_us = (t_sub - r.arrival) // 1000
            queue_time(queue_us)
            if single:
                nb = out_nbytes[0]
                _, dt, shape = meta[0]
                outputs: dict[str, Any] = {"dtype": dt, "shape": shape,
                                           "data": out_mvs[0][i * nb:(i + 1) * nb]}
            else:
                outputs = {}
                for k, (oname, dt, shape) in enumerate(meta):
                    nb = out_nbytes[k]
                    outputs[oname] = {"dtype": dt, "shape": shape,
                                      "data": out_mvs[k][i * nb:(i + 1) * nb]}
            timing = {"queue_us": queue_us, "compute_us": compute_us, "batch": n, "bucket": bucket}
            if special and r.via is not None:  # moved here by another version's fallback
                r.via.answered(r, outputs, timing)
                continue
            finished(r, OK, ok(r, outputs, name, version, data_version, timing))
            if r.lane is shadow_lane:
                continue
            if r.ckey is not None and cache is not None:
                cache.put(r.ckey, _owned(outputs))
            if joined is not None:
                joined(r.rid, name, version, r.lane, r.arm, r.key, now)
            if r.shadow is not None:  # after the answer is on its way
                nb = out_nbytes[0]
                r.shadow.mirror(r, out_mvs[0][i * nb:(i + 1) * nb], meta[0][1])
            if special:
                # Kept for a fallback that might have run it: let the bytes go
                # now, not when the deadline heap drops the request (up to its
                # whole deadline later: measured, 0.6 us per request).
                r.sdata = None

    def finished(self, req: Pending, status: int, answer: dict, observe: bool = True,
                 count: bool = True) -> None:
        """Send one answer (``claim``ed by the caller), log it and count it.
        ``observe`` False keeps it from the rollout's guardrail (cache hits,
        refusals while no worker was ready: they say nothing of the model);
        ``count`` False from the version's counts too (bad input)."""
        conn = req.conn
        if req.lane is SHADOW:  # to its Shadow, not to a caller; counted there
            conn.send(answer)
            return
        conn.inflight -= 1  # release(), inlined: once per answer
        if req.client is not None:
            self.unhold(req.client)
        latency_us = (_monotonic_ns() - req.arrival) // 1000
        if count:
            self.stats.answered(status, latency_us, req.lane, req.arm)
        if observe and self.observer is not None:
            self.observer(req.lane, status, latency_us)
        if req.log is not None and self.reqlog is not None:
            self.reqlog.answer(req, status, answer, latency_us, self.name, self.version,
                               self.reqlog.cfg.score_output)
        conn.send(answer)

    def release(self, req: Pending) -> None:
        """The request no longer counts against its connection's in-flight
        cap or its client's share of this queue."""
        req.conn.inflight -= 1
        if req.client is not None:
            self.unhold(req.client)

    def unhold(self, client: Client) -> None:
        """``release``'s share part alone: a request moved to a fallback
        version gives its client's place here back (daemon/serving/fallback.py)."""
        held = self.held
        n = held[client] - 1
        if n:
            held[client] = n
        else:
            del held[client]

    def fail(self, req: Pending, status: int, message: str, reason: str) -> None:
        """Answer an accepted request with an error, or from its fallback
        when it has one that covers ``reason`` (daemon/serving/fallback.py)."""
        if req.done:
            return
        fb = req.fb
        if fb is not None and fb.take(req, reason, status, message):
            return
        req.answer_error(status, message)

    def refuse(self, req: Pending, err: ProtocolError) -> None:
        """Answer an accepted request with a ProtocolError found after it was
        queued (a NaN in its row): logged like every answer, counted as
        rejected input by the caller, and neither the model's answer in its
        counts nor its guardrail's (bad input says nothing of the model)."""
        if claim(req):
            status = int(err.status)
            self.finished(req, status, error(req, status, err.message), observe=False,
                          count=False)

    def expire(self, req: Pending) -> None:
        """Deadline passed: answer now, wherever the request is."""
        if req.lane is not SHADOW:
            self.stats.shed["deadline"] += 1
        if not req.dispatched:
            if req.lane is SHADOW:
                self.shadow_queued -= 1
                if len(self.shadow_q) > 2 * self.shadow_limit:
                    self.shadow_q = collections.deque(r for r in self.shadow_q if not r.done)
            else:
                self.queued -= 1
                if len(self.q) > 2 * self.limit:
                    self.q = collections.deque(r for r in self.q if not r.done)
        req.answer_error(int(Status.DEADLINE_EXCEEDED),
                         f"deadline exceeded after {(_monotonic_ns() - req.arrival) // 1000} us "
                         f"{'in the worker' if req.dispatched else 'in the queue'} of model "
                         f"{self.name!r} version {self.version!r}; "
                         "raise deadline_ms or reduce load")
        self._maybe_idle()

    def fail_all_queued(self, status: int, message: str, reason: str | None = None) -> None:
        """Answer everything queued with an error; with ``reason``, from their
        fallbacks where they have one that covers it (``fail``)."""
        if self.window_timer is not None:  # nothing is queued for it any more
            self.window_timer.cancel()
            self.window_timer = None
        q, self.q = self.q, collections.deque()
        sq, self.shadow_q = self.shadow_q, collections.deque()
        self.queued = self.shadow_queued = 0
        for r in q:
            if reason is not None:
                self.fail(r, status, message, reason)
            else:
                r.answer_error(status, message)
        for r in sq:
            r.answer_error(status, message)
        self._maybe_idle()

    def worker_changed(self) -> None:
        """A worker became ready or went away (the only ways into and out of
        "ready": WorkerPort calls this on both)."""
        self.has_ready = any(w.state == WorkerState.READY for w in self.workers)
        if not self.has_ready and (self.queued or self.shadow_queued):
            states = ", ".join(sorted({w.state for w in self.workers})) or "none"
            self.fail_all_queued(int(Status.UNAVAILABLE),
                                 f"model {self.name!r} version {self.version!r} has no ready "
                                 f"worker (workers: {states}); retry shortly", NO_WORKER)
        self.dispatch()

    @property
    def in_flight(self) -> int:
        return sum(w.in_flight for w in self.workers)

    def idle(self) -> bool:
        return self.queued == 0 and self.shadow_queued == 0 and self.in_flight == 0

    def _maybe_idle(self) -> None:
        if self.on_idle is not None and self.idle():
            self.on_idle()
