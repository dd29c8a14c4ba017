"""Fallback answers: when a model version cannot answer, its configured
fallback answers instead, marked (docs/operations.md, "Degraded mode").

A version's ``[models.fallback]`` is either another version of the same
model (``version``: typically a smaller or older one, with the same inputs
and outputs) or a constant answer in the declared output schema
(``outputs``), for the causes named in ``on``:

=============  =====================================================  ==========
cause          when                                                   instead of
=============  =====================================================  ==========
no_worker      the version has no ready worker (when the request       UNAVAILABLE
               arrives, or when its last worker goes and it is
               queued), or the worker running it died
queue_full     the version's queue is full (``queue_limit``)            RESOURCE_EXHAUSTED
deadline_near  the request's budget (``deadline_ms``) is below the     (queued, then
               version's p95 from arrival to answer over the last       most likely
               10-20 s of OK answers (its queue + compute time)         DEADLINE_EXCEEDED)
model_error    the model raised on the request's batch                  INTERNAL
=============  =====================================================  ==========

Never for a request that pins ``version``, nor one refused before it reaches
a queue (rate limit, frame size, bad input, draining: ``App.infer`` raises
first), nor for a client over its fair share of the queue (that is a
per-client limit, like the rate limit), nor once the daemon drains
(``live``). A NaN the version would have found in its batch (deferred
check) is INVALID_ARGUMENT here too.

The answer is the fallback's outputs with ``fallback`` (the cause) and
``version`` (the fallback version, or ``"fallback:constant"``); its
``lane`` and ``arm`` are the router's. It is built by
``daemon/serving/answers.py``, as every answer is.

Bookkeeping. Each rule is kept in one place:

- One request, one answer. ``Fallback.take`` either answers the request at
  once (a constant), or moves the same ``Pending`` into the fallback
  version's queue (so its deadline and its one ``done`` still hold there),
  or returns False having changed nothing, and the caller gives the error
  it would have given anyway.
- ``conn.inflight``: +1 when ``App.infer`` accepts the request, -1 at its
  one answer by ``ModelQueue.release`` of the queue that holds it then. A
  move changes neither.
- Fair shares (``ModelQueue.held``): a moved request gives its client's
  place in the primary's queue back (``ModelQueue.unhold``) and takes one
  in the fallback version's queue with the ``Fallback`` itself as its
  client. So a version fallback has its own bound: at most ``queue_limit``
  of its requests are queued or running there, it is one client among the
  others of that queue (fair shares apply to it), and an overloaded
  primary cannot push the fallback version into overload too: past the
  bound the request gets its ordinary error.
- Counted apart. A fallback answer is not an answer of the primary
  (``ModelStats.by_route``), nor of the fallback version: it is counted by
  ``Fallback.answered`` (stats ``fallback``, ``ringserve_fallback_answers_
  total{reason}``), logged with ``fallback`` and ``routed`` in the request
  log, and shown to the primary's guardrail as a failure (``FALLBACK``:
  a canary that falls back on every request is failing). It is never
  cached, never mirrored to a shadow, never joined to feedback (so KPIs
  are the model's own), and the fallback version's own answers and latency
  figures do not include it (its batch figures do: it ran them).
- A fallback version that fails too (its model raises, its worker dies,
  the deadline passes there) gives the request its ordinary error: the
  primary's status and message, the fallback's failure added to the
  message (DEADLINE_EXCEEDED when the deadline passed), counted as the
  primary's answer.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ipc.status import Status
from ipc.tensors import non_finite_rows, not_finite_error

from ..rollout.guardrails import FALLBACK
from .answers import claim, error, ok

if TYPE_CHECKING:  # pragma: no cover
    from ..config import FallbackConfig, ModelConfig
    from .queue import ModelQueue
    from .request import Inputs, Pending

NO_WORKER, QUEUE_FULL, DEADLINE_NEAR, MODEL_ERROR = (
    "no_worker", "queue_full", "deadline_near", "model_error")
CONSTANT = "fallback:constant"  # the ``version`` of a constant fallback's answers
P95_EVERY_NS = 100_000_000      # the deadline_near threshold is re-read this often
_CONSTANT_TIMING = {"queue_us": 0, "compute_us": 0, "batch": 0}  # shared: never written to
_DEADLINE = int(Status.DEADLINE_EXCEEDED)
_monotonic_ns = time.monotonic_ns


def wire_outputs(model_cfg: ModelConfig, consts: tuple[tuple[str, bytes], ...]) -> dict[str, Any]:
    """A constant fallback's outputs in the answer's form: one tensor map
    for a model that declares ``output``, else name -> tensor map."""
    specs = dict(model_cfg.outputs)
    maps = {n: {"dtype": specs[n].dtype, "shape": list(specs[n].shape), "data": data}
            for n, data in consts}
    return next(iter(maps.values())) if model_cfg.single_output else maps


def wire_defaults(model_cfg: ModelConfig) -> dict[str, Any] | None:
    """name -> tensor map of each input that declares a default (what
    ``fill_inputs`` puts in place of an omitted one); None without any."""
    out = {n: {"dtype": s.dtype, "shape": list(s.shape), "data": s.default}
           for n, s in model_cfg.inputs if s.default is not None}
    return out or None


def fill_inputs(obj: Any, q: ModelQueue, decode: Callable[..., Inputs]
                ) -> tuple[Inputs, list[str]] | None:
    """A request's ``inputs`` with the omitted ones that have a default put
    in: ``(data, names defaulted)``, or None when that does not make it
    whole (an input without a default is missing, or the inputs are wrong
    in another way) and the caller raises the codec's own error. ``decode``
    is ``ipc.tensors.decode_inputs``; only called after it refused ``obj``."""
    defaults = q.defaults
    if defaults is None:
        return None
    if obj is None:
        obj = {}
    elif type(obj) is not dict or ("data" in obj and "dtype" in obj):
        return None  # a bare tensor: nothing was omitted
    elif q.cfg.single_input and obj:
        return None  # the one input, sent wrong: its own error
    missing = [n for n, _ in q.specs if n not in obj]
    if not missing or any(n not in defaults for n in missing):
        return None
    filled = dict(obj)
    for n in missing:
        filled[n] = defaults[n]
    return decode(filled, q.specs, q.cfg.single_input, bool(q.finite_checks)), missing


class Fallback:
    """The fallback of one model version (its ``ModelQueue.fallback``)."""

    def __init__(self, cfg: FallbackConfig, primary: ModelQueue,
                 count_rejected: Callable[[int], None]):
        self.cfg = cfg
        self.primary = primary
        self.on = frozenset(cfg.on)
        self.by = cfg.version or CONSTANT
        self.constant = wire_outputs(primary.cfg, cfg.outputs) if cfg.outputs is not None else None
        # the fallback version's ModelQueue (App._set_fallbacks)
        self.target: ModelQueue | None = None
        self.limit = cfg.queue_limit
        self.live = True     # False once the daemon drains
        self.count_rejected = count_rejected
        self._near = DEADLINE_NEAR in self.on
        self._p95_ns = 0
        self._p95_at = 0
        self.answered: collections.Counter = collections.Counter()  # (lane, arm, reason, by)
        self.failed: collections.Counter = collections.Counter()    # reason: taken, then failed
        # reason: not taken (full, not ready)
        self.refused: collections.Counter = collections.Counter()

    # -- when ------------------------------------------------------------------
    def deadline_near(self, budget_ns: int, now: int) -> bool:
        """Is a request's budget below the primary's recent p95?"""
        if not self._near:
            return False
        if now >= self._p95_at:
            self._p95_at = now + P95_EVERY_NS
            p95 = self.primary.stats.latency.percentiles((95,))["p95"]
            self._p95_ns = p95 * 1000 if p95 else 0
        return budget_ns < self._p95_ns

    def near_message(self, budget_ns: int) -> str:
        p = self.primary
        return (f"the request's deadline ({budget_ns / 1e6:g} ms) is below the recent p95 of "
                f"model {p.name!r} version {p.version!r} ({self._p95_ns / 1e6:g} ms); raise "
                "deadline_ms or reduce load")

    def take(self, req: Pending, reason: str, status: int, message: str) -> bool:
        """Answer ``req`` from the fallback for ``reason``, instead of the
        error (``status``, ``message``) the primary would give; False, with
        nothing changed, when the fallback does not cover the reason or
        cannot take the request now."""
        if reason not in self.on or not self.live:
            return False
        p = self.primary
        if self.constant is not None:
            if not self._refused_nan(req) and claim(req):
                self.finish(req, ok(req, self.constant, p.name, CONSTANT, None,
                                     _CONSTANT_TIMING, reason), reason, p)
            return True
        t = self.target
        if t is None or t.held.get(self, 0) >= self.limit:
            self.refused[reason] += 1
            return False
        if self._refused_nan(req):
            return True
        queue, client, dispatched, data = req.queue, req.client, req.dispatched, req.data
        req.queue, req.fb, req.via, req.dispatched = t, None, Via(self, reason, status, message), 0
        if data is None:  # its batch was in the primary's worker: sdata kept the bytes
            req.data = req.sdata
        if t.submit(req, self) is not None:  # refused: back as it was
            req.queue, req.fb, req.via, req.dispatched, req.data = (queue, self, None, dispatched,
                                                                    data)
            self.refused[reason] += 1
            return False
        if client is not None:
            p.unhold(client)
        req.shadow = req.ckey = None  # a fallback answer is never mirrored nor cached
        return True

    def _refused_nan(self, req: Pending) -> bool:
        """A NaN/Inf the primary's per-batch check would have refused and
        nobody will check now (a constant answers at once; a fallback version
        whose inputs are checked per request, drift on, does not check its
        batches): refused here, INVALID_ARGUMENT, as it would have been."""
        checks = self.primary.finite_checks
        if not checks or req.dispatched or (self.target is not None and
                                            self.target.finite_checks):
            return False
        data = req.data
        assert data is not None  # not dispatched: it still holds its bytes
        for k, dtype, elems, where in checks:
            bad = non_finite_rows(data[k], dtype, 1, elems)
            if bad:
                index, value = bad[0]
                e = not_finite_error(index, value, where)
                self.count_rejected(int(e.status))
                self.primary.refuse(req, e)
                return True
        return False

    # -- the answer -------------------------------------------------------------------
    def finish(self, req: Pending, answer: dict[str, Any], reason: str, queue: ModelQueue) -> None:
        """Send a fallback answer (``req`` claimed) and count it apart;
        ``queue`` holds the request (``release``)."""
        queue.release(req)
        req.data = req.sdata = None  # (see ModelQueue.complete_batch)
        latency_us = (_monotonic_ns() - req.arrival) // 1000
        by = answer["version"]
        self.answered[(req.lane, req.arm, reason, by)] += 1
        p = self.primary
        if p.observer is not None:
            p.observer(req.lane, FALLBACK, latency_us)
        if req.log is not None and p.reqlog is not None:
            p.reqlog.answer(req, 0, answer, latency_us, p.name, by, p.reqlog.cfg.score_output,
                            (reason, p.version))
        req.conn.send(answer)

    # -- reading ------------------------------------------------------------------------
    def degraded(self) -> bool:
        """The primary cannot answer and this fallback can: requests routed to
        it are answered by the fallback alone."""
        if self.primary.has_ready:
            return False
        return self.constant is not None or (self.target is not None and self.target.has_ready)

    def snapshot(self) -> dict:
        by_reason: collections.Counter = collections.Counter()
        for (_, _, reason, _), n in self.answered.items():
            by_reason[reason] += n
        t = self.target
        return {"version": self.by, "on": sorted(self.on), "degraded": self.degraded(),
                "answered": dict(by_reason), "failed": dict(self.failed),
                "refused": dict(self.refused),
                "held": t.held.get(self, 0) if t is not None else 0,
                "queue_limit": self.limit if self.constant is None else None}


class Via:
    """What a request moved to a fallback version carries (``Pending.via``):
    how to answer it from there, or fail it as the primary would have."""

    __slots__ = ("fallback", "reason", "status", "message")

    def __init__(self, fallback: Fallback, reason: str, status: int, message: str):
        self.fallback = fallback
        self.reason = reason
        self.status = status
        self.message = message

    def answered(self, req: Pending, outputs: dict[str, Any], timing: dict[str, int]) -> None:
        """The fallback version's OK result (``ModelQueue.complete_batch``;
        ``req`` claimed)."""
        fb, t = self.fallback, req.queue
        fb.finish(req, ok(req, outputs, fb.primary.name, t.version, t.data_version, timing,
                          self.reason), self.reason, t)

    def failed(self, req: Pending, status: int, message: str) -> None:
        """The fallback version could not answer either
        (``Pending.answer_error``; ``req`` claimed): the ordinary
        error, answered and counted as the primary's."""
        fb = self.fallback
        t, p = req.queue, fb.primary
        fb.failed[self.reason] += 1
        if req.client is not None:
            t.unhold(req.client)
        req.client, req.queue, req.via = None, p, None
        note = f"its fallback, version {t.version!r}, could not answer either: {message}"
        if status != _DEADLINE:
            status, text = self.status, f"{self.message}; {note}"
        else:
            text = f"{message} (in fallback version {t.version!r}, after: {self.message})"
        p.finished(req, status, error(req, status, text))
