"""A front process: startup, serving, shutdown, reloads, and its channel to
the supervisor.

A front is started by the supervisor (daemon/supervisor/) with the config
it validated, binds the port itself (SO_REUSEPORT: several fronts share it,
the kernel spreads the connections) and serves its own connections with its
own queues and batching. Its workers belong to the supervisor: each arrives
as a port (daemon/workers/port.py: a ring and eventfds made for this front) over the
control channel, which also carries reloads and the drain.

Lifecycle (after uvicorn's server): listen, serve; on drain (the
supervisor's ``stop``, or SIGTERM) stop listening, answer new requests
UNAVAILABLE ("draining"), let every accepted request finish (bounded by
``server.drain_timeout_s``), flush the answers, exit 0; the supervisor then
stops the workers.

Who does what inside a front:

- ``App`` (here): the lifecycle, the supervisor's channel, building the
  queues and ports of the configured models, routing changes and reloads.
  It owns the ``Serving`` state (daemon/front/state.py) and changes it.
- ``Connection`` (connection.py): one socket; it reports to the ``Gate``
  (gate.py: connection limits and time limits) and hands each request map
  to the ``Intake`` (intake.py: the infer path), which gives the other ops
  to ``Ops`` (ops.py).

The infer path is the hot path, one small function per step:
``Intake.handle`` (op) -> ``Intake.infer`` (validate, route) ->
``ModelQueue.submit`` (enqueue, dispatch) -> ``WorkerPort.submit_batch``
(shared memory) ... ``WorkerPort._on_done`` -> ``ModelQueue.complete_batch``
(answer: daemon/serving/answers.py).
"""

from __future__ import annotations

import asyncio
import collections
import gc
import logging
import os
import signal
import sys
import time

from ipc.control import BadMessage, Channel, ChannelClosed
from ipc.status import Status, Unavailable
from ipc.tensors import DEFERRABLE, TensorSpec, input_where

from ..observe.drift import DriftTracker
from ..observe.feedback import FeedbackJoin
from ..observe.figures import front_figures
from ..observe.reqlog import RequestLog
from ..rollout.guardrails import Tally
from ..serving.cache import ResponseCache
from ..serving.fallback import Fallback, wire_defaults
from ..serving.queue import Deadlines, ModelQueue
from ..serving.router import CANARY, STABLE, RoutingTable
from ..serving.shadow import Shadow
from ..workers.lifeline import EXIT_BOOT_FAILED
from ..workers.metadata import default_path
from ..workers.port import WorkerPort
from .access import Access
from .conncounts import ConnCounts
from .connection import Connection
from .gate import Closed, Gate
from .intake import Intake
from .ops import Ops
from .rids import RidAllocator
from .state import Serving

log = logging.getLogger("ringserve.server")
_monotonic_ns = time.monotonic_ns


def _log_metadata(m) -> None:
    """Say what a new model version was trained on, or that nothing says
    (a missing metadata file is allowed unless require_metadata is set)."""
    who = f"{m.name}@{m.version}"
    if m.metadata is not None:
        log.info("model metadata", extra={"model": who, "data_version": m.metadata.data_version,
                                          "metadata": m.metadata.path,
                                          "metadata_hash": m.metadata.hash})
        return
    weights = m.checkpoint or m.artifact
    # A weights file without one is worth a warning; a bare factory rarely has one.
    (log.warning if weights else log.info)(
        "model has no metadata file: its answers carry no data_version and its inputs are "
        "not checked against a feature schema (docs/models.md)",
        extra={"model": who, "looked_for": default_path(weights)})


def tune_gc() -> None:
    """Keep the cyclic GC off the hot path. What exists after start-up lives
    as long as the process: freeze it, so full collections never walk it
    again. Requests only make short-lived, acyclic objects that reference
    counting frees, so young collections can run far less often than every
    700 allocations (the default, tuned for programs that make cycles)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)


HEARTBEAT_S = 1.0   # and the figures a dead front leaves behind (daemon/observe/figures.py)
TALLY_S = 0.25      # how often the guardrails' counts go to the supervisor
RATE_SYNC_S = 0.05  # how often rate-limit spend goes to the other fronts (the slack it allows)
DRIFT_REPORT_S = 1.0  # how often drift flags are compared (and logged when they change)


class App:
    def __init__(self, cfg, loop, chan: Channel | None, slot: int = 0, n_fronts: int = 1,
                 port: int = 0, workers: dict | None = None, infos: dict | None = None,
                 routing: dict | None = None, rid_block: int = 0,
                 counts: ConnCounts | None = None):
        self.cfg = cfg
        self.loop = loop
        self.chan = chan
        self.slot = slot
        self.n_fronts = n_fronts
        self.port = port
        self.worker_ids = workers or {}
        self.infos = infos or {}
        self.ports: dict[int, WorkerPort] = {}
        self._prepared: dict | None = None
        self.deadlines = Deadlines(loop)
        self.serving = Serving(
            slot=slot, n_fronts=n_fronts,
            joins=FeedbackJoin(cfg.feedback.window_s, cfg.feedback.max_entries),
            rids=RidAllocator(cfg.server.node_id, slot, rid_block, self._rid_block_used),
            default_deadline_ns=cfg.server.deadline_ms * 1_000_000,
            max_inflight=cfg.server.max_inflight_per_connection)
        # The rollouts' weights and stages, as the supervisor decides them.
        self.routing = routing or {"weights": {}, "stages": {}}
        self._tally_seq = 0
        self._asks: dict[int, tuple] = {}   # token -> (connection, request id, feedback)
        self._ask_tokens = 0
        self._drift_at = 0.0
        self.gate = Gate(cfg, loop, self.serving, counts or ConnCounts(slot), self._fd_warning)
        self.ops = Ops(self.serving, self.ask)
        self.intake = Intake(self.serving, self.ops, self.ask, self.gate.count_closed)
        self._set_access(Access.from_config(cfg))
        self.server = None
        self.stopping = False
        self.started = time.monotonic()
        self.retiring: list[ModelQueue] = []  # retired by a reload, still draining
        self.reloads: collections.Counter = collections.Counter({"ok": 0, "failed": 0})
        self._signals: asyncio.Queue = asyncio.Queue()

    @property
    def queues(self) -> dict[tuple[str, str], ModelQueue]:
        return self.serving.queues

    def connection(self) -> Connection:
        """The protocol factory of the listener (and of bench.front's connections)."""
        return Connection(self.gate, self.intake, self.loop)

    @staticmethod
    def _fd_warning(warning: str, max_conns: int) -> None:
        log.warning(warning, extra={"max_connections": max_conns})

    # -- startup ---------------------------------------------------------------
    async def start(self) -> None:
        if self.cfg.request_log.enabled:
            self.serving.reqlog = RequestLog(self.cfg.request_log, self.cfg.request_log_dir)
        for m in self.cfg.models:
            self.add_model(m, self.worker_ids.get((m.name, m.version), ()))
        self.reroute(self.routing)
        self._set_shadows()
        self._set_fallbacks()
        self.loop.add_reader(self.chan.fileno(), self._on_ctrl)
        s = self.cfg.server
        self.server = await self.loop.create_server(
            self.connection, s.host, self.port, reuse_address=True, reuse_port=True,
            backlog=1024)
        self.gate.start()
        self._beat()
        self._tick()
        if self.n_fronts > 1:
            self._rate_tick()
        self.tell({"event": "listening"})
        log.info("front listening", extra={"host": s.host, "port": self.port, "front": self.slot,
                                           "pid": os.getpid()})

    def add_model(self, m, uids) -> ModelQueue:
        """Serve model version ``m`` (its workers' uids: their ports attach
        as the supervisor hands them over)."""
        q = self.serving.queues[(m.name, m.version)] = self.make_queue(m, uids)
        return q

    # -- the supervisor's channel ------------------------------------------------
    def tell(self, msg: dict) -> None:
        if self.chan is None:  # an App driven in-process (bench.front, tests): nobody to tell
            return
        try:
            self.chan.send(msg)
        except (ChannelClosed, OSError):
            pass  # the supervisor is gone: our parent-death signal follows

    def _rid_block_used(self, next_block: int) -> None:
        self.tell({"event": "rid_block", "next": next_block})

    def _beat(self) -> None:
        if not self.stopping:
            self.tell({"event": "beat", "figures": self.figures()})
            self.loop.call_later(HEARTBEAT_S, self._beat)

    def _tick(self) -> None:
        """The guardrails' counts to the supervisor, and this front's shadow
        and drift reports to the decision log (which the supervisor keeps)."""
        if self.stopping:
            return
        self.loop.call_later(TALLY_S, self._tick)
        self.send_tallies()
        try:
            self.report_shadows()
            if time.monotonic() >= self._drift_at:
                self._drift_at = time.monotonic() + DRIFT_REPORT_S
                self.report_drift()
        except Exception:  # a bug here must not stop the ticks
            log.exception("shadow or drift report failed")

    def _rate_tick(self) -> None:
        if self.stopping:
            return
        self.loop.call_later(RATE_SYNC_S, self._rate_tick)
        a = self.serving.access
        if a is not None and a.spent:
            self.tell({"event": "spent", "spent": a.take_spent()})

    def send_tallies(self) -> None:
        out = {m: t.take() for m, t in self.serving.tallies.items() if not t.empty()}
        if out:
            self._tally_seq += 1
            self.tell({"event": "tally", "seq": self._tally_seq, "tallies": out})

    def decision(self, record: dict) -> None:
        self.tell({"event": "decision", "record": record})

    def ask(self, conn: Connection, req_id: int, msg: dict, feedback=None) -> None:
        """An op the supervisor answers (machine-wide stats, a feedback
        another front joins): its answer comes back as ``answer``."""
        self._ask_tokens += 1
        token = self._ask_tokens
        self._asks[token] = (conn, req_id, feedback)
        conn.inflight += 1
        self.tell(dict(msg, token=token))

    def _answered(self, token: int, answer: dict, unjoined: bool = False) -> None:
        got = self._asks.pop(token, None)
        if got is None:
            return
        conn, req_id, feedback = got
        if unjoined and feedback is not None:  # no front joined it
            self.ops.unjoined(feedback[1])
        conn.inflight -= 1
        conn.send(dict(answer, id=req_id))

    def _on_ctrl(self) -> None:
        while True:
            try:
                got = self.chan.recv()
            except BadMessage as e:
                log.error(str(e), extra={"front": self.slot})
                continue
            except (ChannelClosed, OSError):
                # The supervisor died: nothing may serve on without it.
                log.error("supervisor is gone; front exits")
                os._exit(1)
            if got is None:
                return
            msg, fds = got
            try:
                self._control(msg, fds)
            except Exception:
                log.exception("handling a control message failed", extra={"cmd": msg.get("cmd")})

    def _control(self, msg: dict, fds: list[int]) -> None:
        cmd = msg.get("cmd")
        if cmd == "port":
            p = self.ports.get(msg["uid"])
            if p is None or len(fds) != 4:
                for fd in fds:
                    os.close(fd)
                return
            p.attach(fds[0], fds[1], fds[2], msg["ring"], msg["info"], msg["outputs"],
                     msg["single_output"], fds[3])
            if self.ready():
                log.info("ready: every worker is attached", extra={"front": self.slot})
            return
        for fd in fds:
            os.close(fd)
        if cmd == "worker":
            self.infos[msg["uid"]] = msg["info"]
            p = self.ports.get(msg["uid"])
            if p is not None:
                p.update(msg["info"])
        elif cmd == "port_down":
            self.infos[msg["uid"]] = msg["info"]
            p = self.ports.get(msg["uid"])
            if p is not None:
                lost = p.down(msg["why"])
                p.update(msg["info"])
                if lost:
                    log.error("worker died with requests of this front in flight", extra={
                        "worker": p.label, "lost_requests": lost, "front": self.slot})
        elif cmd == "routing":
            self.send_tallies()  # what was counted under the old stage goes first
            self.reroute(msg["routing"])
        elif cmd == "figures":
            self.tell({"event": "figures", "token": msg["token"], "figures": self.figures()})
        elif cmd == "answer":
            self._answered(msg["token"], msg["answer"], msg.get("unjoined", False))
        elif cmd == "join":
            self.tell({"event": "joined", "token": msg["token"],
                       "answer": self.ops.join(msg["ref"], msg["outcome"], relayed=True)})
        elif cmd == "spent":
            if self.serving.access is not None:
                self.serving.access.debit(msg["spent"])
        elif cmd == "metrics_port":
            self.serving.metrics_port = msg["port"]
        elif cmd == "prepare":
            self.prepare(msg["cfg"], msg["workers"])
        elif cmd == "switch":
            self.loop.create_task(self.switch(msg["routing"]))
        elif cmd == "abort":
            self.abort(msg["errors"])
        elif cmd == "reload_failed":
            self.reloads["failed"] += 1
        elif cmd == "stop":
            self.on_signal(signal.SIGTERM)

    def make_queue(self, m, uids) -> ModelQueue:
        q = ModelQueue(m, self.loop, self.deadlines)
        _log_metadata(m)
        q.specs = tuple((n, TensorSpec(s.dtype, tuple(s.shape))) for n, s in m.inputs)
        q.joins = self.serving.joins
        q.reqlog = self.serving.reqlog
        if m.cache:
            q.cache = ResponseCache(m.cache_ttl_s, m.cache_max_bytes)
        if m.drift:
            q.drift = DriftTracker(m, self.cfg.side_file(None, f".drift-{m.name}-{m.version}.json"))
        else:  # drift samples requests before they are batched: they must be checked first
            q.finite_checks = tuple(
                (k, s.dtype, s.numel, "inputs" if m.single_input else input_where(n))
                for k, (n, s) in enumerate(m.inputs) if s.dtype in DEFERRABLE)
        if m.fallback is not None:
            q.fallback = Fallback(m.fallback, q, self.serving.count_rejected)
        q.defaults = wire_defaults(m)
        q.special = q.defaults is not None or q.fallback is not None
        for i, (dev, uid) in enumerate(zip(m.devices, uids, strict=False)):
            p = WorkerPort(self.loop, q, i, dev, uid, self.serving.count_rejected)
            if uid in self.infos:
                p.info = self.infos[uid]
            self.ports[uid] = p
            q.workers.append(p)
        return q

    def _set_fallbacks(self) -> None:
        """Point each version fallback at its version's queue (start, reload:
        the one serving now; requests already moved finish where they are)."""
        for q in self.queues.values():
            fb = q.fallback
            if fb is not None and fb.cfg.version is not None:
                fb.target = t = self.queues.get((q.name, fb.cfg.version))
                if t is not None:
                    t.special = True

    def _set_shadows(self) -> None:
        """One Shadow per [[shadows]] entry, pointed at its candidate's queue;
        a Shadow whose entry did not change keeps its figures over a reload."""
        shadows = {}
        for q in self.queues.values():
            q.shadow_limit = 0
        for sc in self.cfg.shadows:
            sh = self.serving.shadows.get(sc.model)
            if sh is None or sh.cfg != sc:
                sh = Shadow(sc, self.serving.default_deadline_ns)
            sh.deadline_ns = self.serving.default_deadline_ns
            sh.queue = self.queues.get((sc.model, sc.candidate))
            sh.queue.shadow_limit = sc.queue_limit
            shadows[sc.model] = sh
        self.serving.shadows = shadows

    def report_shadows(self) -> None:
        now = time.monotonic()
        for sh in self.serving.shadows.values():
            if now - sh.last_report >= sh.cfg.report_interval_s:
                sh.last_report = now
                self.decision({"event": "shadow", **sh.snapshot()})

    def report_drift(self) -> None:
        """Feed what the drift trackers hold; a change in the flagged
        features is a decision-log record."""
        for q in self.queues.values():
            t = q.drift
            if t is None:
                continue
            t.feed()
            flagged = t.monitor.flagged()
            names = [f for f, _ in flagged]
            if names != [f for f, _ in t.last_flagged]:
                self.decision({"event": "drift", "model": q.name, "version": q.version,
                                         "flagged": [{"feature": f, "ks": round(d, 4)}
                                                     for f, d in flagged],
                                         "threshold": t.monitor.threshold,
                                         "window_rows": t.monitor.window_rows,
                                         "reference": t.source})
            t.last_flagged = flagged

    def reroute(self, routing: dict) -> None:
        """The supervisor's rollout weights (start, advance, rollback,
        reload): a new routing table in one assignment; requests already
        routed keep their queue. Each guarded rollout gets a Tally for its
        current stage (kept when the stage did not change), which its two
        versions' queues report their answers to."""
        self.routing = routing
        stages = routing["stages"]
        old = self.serving.tallies
        self.serving.tallies = tallies = {
            m: t if (t := old.get(m)) is not None and t.stage_id == sid else Tally(sid)
            for m, sid in stages.items()}
        self.serving.router = RoutingTable.from_config(self.cfg, routing["weights"],
                                                       {m: t.routed for m, t in tallies.items()})
        self._set_lanes()
        for q in self.all_queues():
            q.observer = None
        for r in self.cfg.rollouts:
            t = self.serving.tallies.get(r.model)
            if t is None:
                continue
            for v in (r.stable, r.candidate):
                q = self.queues.get((r.model, v))
                if q is not None:
                    q.observer = t.observe

    def _set_lanes(self) -> None:
        """A version's lane, for health/models/stats: canary while it is a
        rollout's candidate, stable otherwise."""
        candidates = {(r.model, r.candidate) for r in self.serving.router.rollouts.values()}
        for key, q in self.queues.items():
            q.lane = CANARY if key in candidates else STABLE
        # route()'s fast path: models without a rollout, to their default version's queue
        self.serving.plain = {name: self.queues[(name, v)]
                       for name, v in self.serving.router.default_version.items()
                       if name not in self.serving.router.rollouts and (name, v) in self.queues}

    def ready(self) -> bool:
        return self.serving.ready()

    def figures(self) -> dict:
        return front_figures(self.serving, self.gate, self.all_queues(), self.reloads)

    # -- signals and shutdown ------------------------------------------------------------
    def on_signal(self, signum: int) -> None:
        self._signals.put_nowait(signum)

    async def run(self) -> int:
        # The supervisor owns SIGHUP (reload) and Ctrl-C (it drains us); a
        # SIGTERM sent to a front directly drains it, as the supervisor's stop does.
        self.loop.add_signal_handler(signal.SIGTERM, self.on_signal, signal.SIGTERM)
        for sig in (signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)
        tune_gc()
        while True:
            sig = await self._signals.get()
            if sig == signal.SIGTERM:
                log.info("front draining", extra={"front": self.slot})
                await self.shutdown()
                return 0

    # -- reload (driven by the supervisor: prepare -> switch | abort) -------------
    def prepare(self, new, workers: dict) -> None:
        """The supervisor validated ``new`` and starts its new workers: build
        their queues (their ports attach as the workers warm up); nothing
        changes for the requests being served."""
        # Tokens and limits apply as soon as the file validates: a revoked
        # token must not stay valid while new models warm up, nor because
        # one of them then fails to start and the rest of the reload is rejected.
        self._set_access(Access.from_config(new))
        if self._prepared is not None:
            self._drop_prepared()
        wanted = {(m.name, m.version): m for m in new.models}
        keep = {k: q for k, q in self.queues.items() if k in wanted and q.cfg == wanted[k]}
        started = {k: self.make_queue(m, workers.get(k, ())) for k, m in wanted.items()
                   if k not in keep}
        self._prepared = {"cfg": new, "keep": keep, "started": started, "t0": time.monotonic()}

    def _drop_prepared(self) -> None:
        for q in self._prepared["started"].values():
            for p in q.workers:
                p.close()
                self.ports.pop(p.uid, None)
        self._prepared = None

    def abort(self, errors: list[str]) -> None:
        if self._prepared is not None:
            self._drop_prepared()
        self.reloads["failed"] += 1

    async def switch(self, routing: dict) -> None:
        """Every new worker is warm and attached: switch the routing at once,
        then drain the versions that left and tell the supervisor."""
        prep, self._prepared = self._prepared, None
        if prep is None:
            self.tell({"event": "retired"})
            return
        new, keep, started = prep["cfg"], prep["keep"], prep["started"]
        # The switch: one assignment each, no await in between. Requests
        # already routed keep their queue (and finish there).
        retired = [q for k, q in self.queues.items() if k not in keep]
        self.cfg = new
        self.serving.queues = {**keep, **started}
        self.serving.default_deadline_ns = new.server.deadline_ms * 1_000_000
        self._set_limits(new)
        self.send_tallies()
        self.reroute(routing)
        self._set_shadows()
        self._set_fallbacks()
        self.reloads["ok"] += 1
        record = {"started": [f"{n}@{v}" for n, v in started],
                  "retired": [f"{q.name}@{q.version}" for q in retired],
                  "kept": [f"{n}@{v}" for n, v in keep],
                  "s": round(time.monotonic() - prep["t0"], 3)}
        log.info("front switched", extra={"event": "reload", "ok": True, "front": self.slot,
                                          **record})
        await self._retire(retired, new.server.drain_timeout_s)
        self.tell({"event": "retired"})

    def _set_limits(self, cfg) -> None:
        """A reload's limits: the connections' follow the models and the
        descriptors; counts and buffers carry over."""
        self.gate.configure(cfg)
        self.serving.max_inflight = cfg.server.max_inflight_per_connection
        self.serving.joins.window_s = cfg.feedback.window_s
        self.serving.joins.max_entries = cfg.feedback.max_entries

    def _set_access(self, access: Access | None) -> None:
        """A reload's auth and limits: rate buckets and refusal counts carry
        over; when the tokens changed (or auth was turned on), connections
        not authenticated by a token still listed must authenticate again."""
        old = self.serving.access
        if access is not None and old is not None:
            access.buckets, access.refused = old.buckets, old.refused
        if access is not None and access.rate and self.n_fronts > 1:
            access.spent = (old.spent if old is not None else None) or {}
        self.serving.access = access
        if access is not None and access.auth:
            if old is None or not old.auth or old.tokens != access.tokens:
                n = access.revoke_stale(self.gate.conns)
                log.info("tokens changed: connections without a listed token must authenticate "
                         "again", extra={"event": "reload", "connections": n})
        else:
            for c in self.gate.conns:
                c.set_client(None, None)
                c.reauth = False

    async def _retire(self, queues, grace_s: float) -> None:
        self.retiring.extend(queues)  # shutdown stops them too if it comes first
        t_end = time.monotonic() + grace_s
        while any(not q.idle() for q in queues) and time.monotonic() < t_end:
            await asyncio.sleep(0.01)
        for q in queues:
            q.fail_all_queued(int(Status.UNAVAILABLE), "this model version was retired by a "
                              "config reload before the request ran; retry")
            for p in q.workers:
                p.down("this model version was retired by a config reload while the request "
                       "ran; retry")
                self.ports.pop(p.uid, None)
        for q in queues:
            self.retiring.remove(q)

    def all_queues(self) -> list[ModelQueue]:
        """Serving and still-draining queues: everything with live workers."""
        return list(self.queues.values()) + self.retiring

    async def shutdown(self) -> None:
        self.serving.draining = True  # /readyz answers 503 from now: load balancers move away
        for q in self.all_queues():  # and nothing falls back any more
            if q.fallback is not None:
                q.fallback.live = False
        self.gate.stop()
        if self.server is not None:
            self.server.close()
        queues = self.all_queues()
        grace = self.cfg.server.drain_timeout_s
        t_end = time.monotonic() + grace
        while any(not q.idle() for q in queues) and time.monotonic() < t_end:
            await asyncio.sleep(0.005)
        left = sum(q.queued + sum(len(b) for w in q.workers for b, _, _ in w.inflight)
                   for q in queues)
        if left:
            log.error("drain timed out; answering what is left UNAVAILABLE",
                      extra={"requests": left, "drain_timeout_s": grace})
        self.stopping = True
        for q in queues:
            q.fail_all_queued(int(Status.UNAVAILABLE), "server shut down before this request ran")
            for w in q.workers:
                for batch, _, _ in w.inflight:
                    for r in batch:
                        r.answer_error(int(Status.UNAVAILABLE),
                                       "server shut down before this request finished")
        # Let answers reach the peers before the sockets close.
        t_flush = time.monotonic() + 2.0
        while time.monotonic() < t_flush and any(
                not c.closed and c.transport.get_write_buffer_size() for c in self.gate.conns):
            await asyncio.sleep(0.005)
        for c in list(self.gate.conns):  # closing is an answer: id 0, "draining"
            c.refuse(Unavailable("server shut down (drained); reconnect to another instance "
                                 "or retry later"), Closed.DRAINING)
        await asyncio.sleep(0.05)  # let the closing answers and FINs leave
        for p in list(self.ports.values()):
            p.close()
        if self.serving.reqlog is not None:
            self.serving.reqlog.close()
        # What was counted since the last report, before the supervisor stops us.
        self.send_tallies()
        self.tell({"event": "beat", "figures": self.figures()})
        log.info("front stopped", extra={"answered": sum(sum(q.stats.by_status.values())
                                                   for q in queues)})


def run_front(chan: Channel) -> int:
    """A front process's life: the supervisor's ``start`` message, then
    serve until drained."""
    import uvloop

    got = chan.recv()
    if got is None or got[0].get("cmd") != "start":
        return 1
    msg, fds = got
    counts = ConnCounts.from_fd(msg["slot"], fds[0]) if fds else None
    from ..observe import logs
    logs.setup(msg["cfg"].logging.level)

    async def main() -> int:
        app = App(msg["cfg"], asyncio.get_running_loop(), chan, msg["slot"], msg["fronts"],
                  msg["port"], msg["workers"], msg["infos"], msg["routing"], msg["rid_block"],
                  counts)
        try:
            await app.start()
        except OSError as e:
            log.error("front cannot serve", extra={"error": str(e), "front": msg["slot"]})
            return EXIT_BOOT_FAILED
        try:
            return await app.run()
        finally:
            app.stopping = True

    if sys.version_info >= (3, 12):  # pragma: no cover
        return asyncio.run(main(), loop_factory=uvloop.new_event_loop)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main())
