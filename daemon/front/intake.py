"""The request path of a front: one decoded request map in, its answer (or
its place in a queue) out.

One small function per step, in the order a request takes them:
``handle`` (id, version, access, op) -> ``route`` (lane, arm, queue) ->
``infer`` (inputs, deadline, cache, shadow, fallback) ->
``ModelQueue.submit`` (daemon/serving/queue.py). What is not an infer goes to
daemon/front/ops.py. A ProtocolError raised on the way is the request's
answer; anything else is a bug of ours, answered INTERNAL and logged, and
the connection goes on.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ipc.status import (
    InvalidArgument,
    NotFound,
    ProtocolError,
    ResourceExhausted,
    Status,
    Unavailable,
    brief,
)
from ipc.tensors import decode_inputs

from ..observe.reqlog import features_hash
from ..serving.answers import claim, error, ok
from ..serving.fallback import DEADLINE_NEAR, fill_inputs
from ..serving.queue import ModelQueue, Refused
from ..serving.request import Pending
from ..serving.router import STABLE, UnknownExperiment
from .gate import Closed

if TYPE_CHECKING:
    from .connection import Connection
    from .ops import Ops
    from .state import Serving

log = logging.getLogger("ringserve.server")
PROTOCOL_VERSIONS = (1,)
OPS = ("infer", "health", "stats", "models", "feedback", "auth")
MAX_DEADLINE_MS = 3_600_000
MAX_ID = 2**53 - 1  # protocol.md: every integer the server sends is below 2**53
_NO_INPUTS = ("request has no 'inputs'; send one sample as a tensor map {dtype, shape, data} or "
              "a list of numbers")
_monotonic_ns = time.monotonic_ns


class Intake:
    def __init__(self, serving: Serving, ops: Ops,
                 ask: Callable[[Connection, int, dict[str, Any]], None],
                 count_closed: Callable[[Closed], None]) -> None:
        self.serving = serving
        self.ops = ops
        self.ask = ask  # an op the supervisor answers (machine-wide stats)
        self.count_closed = count_closed

    def handle(self, conn: Connection, msg: dict[str, Any]) -> None:
        req_id = msg.get("id", 0)
        s = self.serving
        try:
            if type(req_id) is not int or req_id < 0 or req_id > MAX_ID:
                req_id = 0
                raise InvalidArgument("'id' must be an unsigned integer below 2**53 (every "
                                      "integer the server sends back is)")
            v = msg.get("v", 1)
            if type(v) is not int or v not in PROTOCOL_VERSIONS:
                raise InvalidArgument(f"protocol version {brief(v)} is not supported; this "
                                      f"server speaks {list(PROTOCOL_VERSIONS)} (send v=1 or "
                                      "omit it)")
            op = msg.get("op", "infer")
            if s.access is not None:
                s.access.check(conn, msg, op)
            if op == "infer":
                self.infer(conn, req_id, msg)
            elif op == "health":
                conn.send(self.ops.health(req_id, msg))
            elif op == "stats":
                model = msg.get("model")
                self.ask(conn, req_id, {"event": "stats", "model": model if type(model) is str
                                        else None})
            elif op == "models":
                conn.send(self.ops.models(req_id))
            elif op == "feedback":
                self.ops.feedback(conn, req_id, msg)
            elif op == "auth":
                conn.send({"id": req_id, "status": 0, "client": conn.client,
                           "auth": s.access is not None and s.access.auth})
            else:
                raise InvalidArgument(f"unknown op {brief(op)}; ops are: {', '.join(OPS)}")
        except ProtocolError as e:
            s.count_rejected(int(e.status))
            e.req_id = req_id
            conn.send(e.answer())
            if conn.close_after_answer:
                # The request's own answer says why; the closing answer (id 0)
                # tells a client with others in flight that they were not received.
                if req_id:
                    conn.refuse(type(e)(e.message), Closed.AUTH)
                else:
                    self.count_closed(Closed.AUTH)
                    conn.close()
        except Exception as e:  # a bug of ours: answer it, log it, keep serving everyone
            log.exception("internal error while handling a request", extra={"op": msg.get("op")})
            s.count_rejected(int(Status.INTERNAL))
            conn.send({"id": req_id, "status": int(Status.INTERNAL),
                       "error": f"internal server error ({type(e).__name__}); it is logged, "
                                "please report it"})

    def route(self, msg: dict[str, Any]) -> tuple[ModelQueue, str, str | None, str | None]:
        """(queue, lane, arm, key) for an infer request (daemon/serving/router.py)."""
        name, version = msg.get("model"), msg.get("version")
        key, exp = msg.get("key"), msg.get("exp")
        s = self.serving
        if version is None and exp is None and type(name) is str:
            q = s.plain.get(name)  # no rollout: the key cannot change the answer
            if q is not None and (key is None or type(key) is str):
                return q, STABLE, None, key
        router = s.router
        assert router is not None  # set before the front listens
        if type(name) is not str:
            if name is None:
                raise InvalidArgument(f"request has no 'model'; models served here: "
                                      f"{', '.join(sorted(router.default_version))}")
            raise InvalidArgument(f"'model' must be a string, got {type(name).__name__}")
        if name not in router.default_version:
            raise NotFound(f"model {brief(name)} is not served here; models: "
                           f"{', '.join(sorted(router.default_version))}")
        for field, value in (("version", version), ("key", key), ("exp", exp)):
            if value is not None and type(value) is not str:
                raise InvalidArgument(f"{field!r} must be a string, got {type(value).__name__}")
        try:
            version, lane, arm = router.route(name, key, exp, version)
        except UnknownExperiment:
            exps = sorted(e.id for e in router.experiments.values() if e.model == name)
            raise NotFound(f"experiment {brief(exp)} is not configured for model {name!r}; "
                           f"experiments: {', '.join(exps) or 'none'}") from None
        q = s.queues.get((name, version))
        if q is None:
            versions = sorted(v for (n, v) in s.queues if n == name)
            raise NotFound(f"model {name!r} has no version {brief(version)}; versions: "
                           f"{', '.join(versions)}")
        return q, lane, arm, key

    def infer(self, conn: Connection, req_id: int, msg: dict[str, Any]) -> None:
        s = self.serving
        if s.draining:
            raise Unavailable("server is draining (shutting down); retry on another instance")
        q, lane, arm, key = self.route(msg)
        sh = s.shadows.get(q.name) if s.shadows else None
        inputs = msg.get("inputs")
        defaulted = None
        if inputs is None and q.defaults is None:
            raise InvalidArgument(_NO_INPUTS)
        try:
            data = decode_inputs(inputs, q.specs, q.cfg.single_input, bool(q.finite_checks))
        except InvalidArgument:
            # Not whole: whole with the declared defaults of what it omitted?
            filled = fill_inputs(inputs, q, decode_inputs) if q.defaults is not None else None
            if filled is None:
                if inputs is None:
                    raise InvalidArgument(_NO_INPUTS) from None
                raise
            data, defaulted = filled
        if q.drift is not None and defaulted is None:
            # A declared default is not a served feature: it would pull the
            # window towards the default (drift watches one input, so a
            # defaulted request has nothing of its own to show).
            q.drift.sample(data)
        dl = msg.get("deadline_ms")
        if dl is None:
            dl_ns = s.default_deadline_ns
        elif type(dl) is int and 0 < dl <= MAX_DEADLINE_MS:
            dl_ns = dl * 1_000_000
        else:
            raise InvalidArgument(f"'deadline_ms' must be an integer from 1 to {MAX_DEADLINE_MS}, "
                                  f"got {brief(dl)}")
        if conn.inflight >= s.max_inflight:
            raise ResourceExhausted(
                f"this connection has {conn.inflight} requests in flight (server.max_inflight_"
                f"per_connection = {s.max_inflight}); wait for answers before sending more, "
                "or use another connection")
        now = _monotonic_ns()
        req = Pending(req_id, conn, data, now, now + dl_ns, q, s.rids.next(), lane, arm, key)
        conn.inflight += 1  # until q.finished answers it, whichever way
        if defaulted is not None:
            req.defaulted = defaulted
            counts = q.stats.defaulted   # per input: stats' "defaulted", ringserve_defaulted_inputs
            for name in defaulted:
                counts[name] += 1
        if s.reqlog is not None and s.reqlog.sampled():
            req.log = (features_hash(data), msg.get("exp"))
        if q.cache is not None and self.cached(q, req):
            return
        if sh is not None and q.version != sh.candidate and sh.sampled(key):
            req.shadow, req.sdata = sh, data
        fb = q.fallback
        if fb is not None and msg.get("version") is None:  # a pinned version never falls back
            req.fb, req.sdata = fb, data  # (kept: a version fallback may run it after the primary)
            if fb.deadline_near(dl_ns, now) and fb.take(
                    req, DEADLINE_NEAR, int(Status.DEADLINE_EXCEEDED), fb.near_message(dl_ns)):
                return
        refused = q.submit(req, conn.ident)
        if refused is not None:
            self.refused(q, req, refused, conn)

    def refused(self, q: ModelQueue, req: Pending, why: Refused, conn: Connection) -> None:
        """The queue did not take ``req``: its fallback answers, or the error."""
        if why is Refused.NO_WORKER:
            status = int(Status.UNAVAILABLE)
            states = ", ".join(sorted({w.state for w in q.workers}))
            err = (f"model {q.name!r} version {q.version!r} has no ready worker "
                   f"(workers: {states}); retry shortly")
        elif why is Refused.FAIR_SHARE:
            status = int(Status.RESOURCE_EXHAUSTED)
            client = conn.ident
            err = (f"model {q.name!r} version {q.version!r} is busy: its queue is more than "
                   f"half full and this client already holds its share of it ("
                   f"{q.held.get(client, 0)} of queue_limit = {q.limit}, shared by "
                   f"{len(q.held)} clients); retry with backoff")
        else:
            status = int(Status.RESOURCE_EXHAUSTED)
            err = (f"model {q.name!r} version {q.version!r} is busy: its queue is full "
                   f"(queue_limit = {q.limit}); retry with backoff")
        q.stats.shed[why] += 1
        # A refusal is named like the fallback cause it is (queue_full, no_worker;
        # a client over its fair share is not one: no fallback covers it).
        if req.fb is not None and req.fb.take(req, why, status, err):
            return
        if claim(req):
            # No worker says nothing of the model: kept from its guardrail.
            q.finished(req, status, error(req, status, err), observe=why is not Refused.NO_WORKER)

    def cached(self, q: ModelQueue, req: Pending) -> bool:
        """Answer ``req`` from the response cache if it can be (a hit)."""
        cache, data = q.cache, req.data
        assert cache is not None and data is not None  # a caching model's new request
        k = cache.key(data)
        outputs = cache.get(k)
        if outputs is None:
            q.stats.cache["miss"] += 1
            req.ckey = k
            return False
        q.stats.cache["hit"] += 1
        if claim(req):
            q.finished(req, 0, ok(req, outputs, q.name, q.version, q.data_version,
                                  {"queue_us": 0, "compute_us": 0, "batch": 0, "cache": True}),
                       observe=False)
            self.serving.joins.answered(req.rid, q.name, q.version, req.lane, req.arm, req.key)
        return True
