"""A front process: startup, serving, shutdown, and the request ops.

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

The infer path is the hot path, one small function per step:
``handle`` (op) -> ``infer`` (validate, route) -> ``ModelQueue.submit``
(enqueue, dispatch) -> ``WorkerPort.submit_batch`` (shared memory) ...
``WorkerPort._on_done`` -> ``ModelQueue.complete_batch`` (answer).
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
from ipc.proxy import parse_trusted
from ipc.status import (
    InvalidArgument,
    NotFound,
    ProtocolError,
    ResourceExhausted,
    Status,
    Unauthenticated,
    Unavailable,
    brief,
)
from ipc.tensors import DEFERRABLE, TensorSpec, decode_inputs, input_where

from ..config import MAX_FRONTS
from ..observe.drift import DriftTracker
from ..observe.feedback import FeedbackJoin
from ..observe.figures import front_figures
from ..observe.reqlog import RequestLog, features_hash
from ..rollout.guardrails import Tally
from ..serving.cache import ResponseCache
from ..serving.fallback import DEADLINE_NEAR, Fallback, fill_inputs, wire_defaults
from ..serving.queue import Deadlines, ModelQueue
from ..serving.request import Pending
from ..serving.router import CANARY, STABLE, RoutingTable, UnknownExperiment
from ..serving.shadow import Shadow
from ..workers.lifeline import EXIT_BOOT_FAILED
from ..workers.metadata import default_path
from ..workers.port import WorkerPort
from ..workers.state import WorkerState
from .access import Access
from .connection import Connection
from .limits import CONN_PAGE_BYTES, frame_limits, raise_nofile
from .rids import RidAllocator
from .rids import decode as _decode_rid

log = logging.getLogger("ringserve.server")
PROTOCOL_VERSIONS = (1,)
OPS = ("infer", "health", "stats", "models", "feedback", "auth")
MAX_DEADLINE_MS = 3_600_000
MAX_ID = 2**53 - 1  # protocol.md: every integer the server sends is below 2**53
MAX_OUTCOME = 1e15  # |outcome| of feedback: KPI sums of squares stay finite
_SHED = {"busy": "queue_full", "share": "fair_share", "unavailable": "no_worker"}
_NO_INPUTS = ("request has no 'inputs'; send one sample as a tensor map {dtype, shape, data} or "
              "a list of numbers")
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
    def __init__(self, cfg, loop, chan: Channel, slot: int = 0, n_fronts: int = 1,
                 port: int = 0, workers: dict | None = None, infos: dict | None = None,
                 routing: dict | None = None, rid_block: int = 0, conn_page=None):
        self.cfg = cfg
        self.loop = loop
        self.chan = chan
        self.slot = slot
        self.n_fronts = n_fronts
        self.port = port
        # Every front's open connections, one u64 each (written by its own
        # front only), in a page the supervisor shares: max_connections
        # counts all fronts together.
        self.conn_page = conn_page
        self.worker_ids = workers or {}
        self.infos = infos or {}
        self.ports: dict[int, WorkerPort] = {}
        self._prepared: dict | None = None
        self.deadlines = Deadlines(loop)
        self.queues: dict[tuple[str, str], ModelQueue] = {}
        self._plain: dict[str, ModelQueue] = {}  # see _set_lanes
        # The rollouts' weights and stages, as the supervisor decides them.
        self.routing = routing or {"weights": {}, "stages": {}}
        self.tallies: dict[str, Tally] = {}
        self.router: RoutingTable | None = None
        self._tally_seq = 0
        self._asks: dict[int, tuple] = {}   # token -> (connection, request id, op)
        self._ask_tokens = 0
        self._drift_at = 0.0
        self.metrics_port = None
        self.shadows: dict[str, Shadow] = {}
        self.reqlog = None
        self.joins = FeedbackJoin(cfg.feedback.window_s, cfg.feedback.max_entries)
        self.access = None  # None: no auth, no rate limit
        self.conns: set[Connection] = set()
        self._set_access(Access.from_config(cfg))
        self.server = None
        self.draining = False
        self.stopping = False
        self.started = time.monotonic()
        self.rejected: collections.Counter = collections.Counter()
        self.retiring: list[ModelQueue] = []  # retired by a reload, still draining
        self.reloads: collections.Counter = collections.Counter({"ok": 0, "failed": 0})
        self.default_deadline_ns = cfg.server.deadline_ms * 1_000_000
        self.rids = RidAllocator(cfg.server.node_id, slot, rid_block, self._rid_block_used)
        # The connection limits (daemon/front/connection.py, docs/operations.md "Limits and abuse").
        self.frame_limits = frame_limits(cfg.models)
        self.frame_bytes = 0  # held for unfinished frames, all connections together
        self.per_host: collections.Counter = collections.Counter()
        self.closed_by: collections.Counter = collections.Counter()  # reason -> connections
        self.max_conns = cfg.server.max_connections  # lowered by the descriptor limit
        self.max_inflight = cfg.server.max_inflight_per_connection
        self._trusted = parse_trusted(cfg.server.trusted_proxies)
        self._sweeper: asyncio.TimerHandle | None = None
        self._signals: asyncio.Queue = asyncio.Queue()
        self._ready_event = asyncio.Event()

    # -- startup ---------------------------------------------------------------
    async def start(self) -> None:
        if self.cfg.request_log.enabled:
            self.reqlog = RequestLog(self.cfg.request_log, self.cfg.request_log_dir)
        self.max_conns, warning = raise_nofile(self.cfg)
        if warning:
            log.warning(warning, extra={"max_connections": self.max_conns})
        for m in self.cfg.models:
            key = (m.name, m.version)
            self.queues[key] = self._make_queue(m, self.worker_ids.get(key, ()))
        self.reroute(self.routing)
        self._set_shadows()
        self._set_fallbacks()
        self.loop.add_reader(self.chan.fileno(), self._on_ctrl)
        s = self.cfg.server
        self.server = await self.loop.create_server(
            lambda: Connection(self), s.host, self.port, reuse_address=True, reuse_port=True,
            backlog=1024)
        self._sweep_soon()
        self._beat()
        self._tick()
        if self.n_fronts > 1:
            self._rate_tick()
        self.tell({"event": "listening"})
        log.info("front listening", extra={"host": s.host, "port": self.port, "front": self.slot,
                                           "pid": os.getpid()})

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
            self.tell({"event": "beat", "figures": front_figures(self)})
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
        a = self.access
        if a is not None and a.spent:
            self.tell({"event": "spent", "spent": a.take_spent()})

    def send_tallies(self) -> None:
        out = {m: t.take() for m, t in self.tallies.items() if not t.empty()}
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
        if unjoined and feedback is not None:  # no front joined it: counted and logged here
            self.joins.unjoined += 1
            if self.reqlog is not None:
                self.reqlog.feedback(None, feedback[1], None)
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
            self.tell({"event": "figures", "token": msg["token"], "figures": front_figures(self)})
        elif cmd == "answer":
            self._answered(msg["token"], msg["answer"], msg.get("unjoined", False))
        elif cmd == "join":
            self.tell({"event": "joined", "token": msg["token"],
                       "answer": self.join(msg["ref"], msg["outcome"], relayed=True)})
        elif cmd == "spent":
            if self.access is not None:
                self.access.debit(msg["spent"])
        elif cmd == "metrics_port":
            self.metrics_port = msg["port"]
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

    def _make_queue(self, m, uids) -> ModelQueue:
        q = ModelQueue(m, self.loop, self.deadlines)
        _log_metadata(m)
        q.specs = tuple((n, TensorSpec(s.dtype, tuple(s.shape))) for n, s in m.inputs)
        q.joins = self.joins
        q.reqlog = self.reqlog
        if m.cache:
            q.cache = ResponseCache(m.cache_ttl_s, m.cache_max_bytes)
        if m.drift:
            q.drift = DriftTracker(m, self.cfg.side_file(None, f".drift-{m.name}-{m.version}.json"))
        else:  # drift samples requests before they are batched: they must be checked first
            q.finite_checks = tuple(
                (k, s.dtype, s.numel, "inputs" if m.single_input else input_where(n))
                for k, (n, s) in enumerate(m.inputs) if s.dtype in DEFERRABLE)
        if m.fallback is not None:
            q.fallback = Fallback(m.fallback, q, self.count_rejected)
        q.defaults = wire_defaults(m)
        q.special = q.defaults is not None or q.fallback is not None
        for i, (dev, uid) in enumerate(zip(m.devices, uids, strict=False)):
            p = WorkerPort(self.loop, q, i, dev, uid, self.count_rejected)
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
            sh = self.shadows.get(sc.model)
            if sh is None or sh.cfg != sc:
                sh = Shadow(sc, self.default_deadline_ns)
            sh.deadline_ns = self.default_deadline_ns
            sh.queue = self.queues.get((sc.model, sc.candidate))
            sh.queue.shadow_limit = sc.queue_limit
            shadows[sc.model] = sh
        self.shadows = shadows

    def report_shadows(self) -> None:
        now = time.monotonic()
        for sh in self.shadows.values():
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
        self.tallies = {m: t if (t := self.tallies.get(m)) is not None and t.stage_id == sid
                        else Tally(sid) for m, sid in stages.items()}
        self.router = RoutingTable.from_config(self.cfg, routing["weights"],
                                               {m: t.routed for m, t in self.tallies.items()})
        self._set_lanes()
        for q in self.all_queues():
            q.observer = None
        for r in self.cfg.rollouts:
            t = self.tallies.get(r.model)
            if t is None:
                continue
            for v in (r.stable, r.candidate):
                q = self.queues.get((r.model, v))
                if q is not None:
                    q.observer = t.observe

    def _set_lanes(self) -> None:
        """A version's lane, for health/models/stats: canary while it is a
        rollout's candidate, stable otherwise."""
        candidates = {(r.model, r.candidate) for r in self.router.rollouts.values()}
        for key, q in self.queues.items():
            q.lane = CANARY if key in candidates else STABLE
        # route()'s fast path: models without a rollout, to their default version's queue
        self._plain = {name: self.queues[(name, v)]
                       for name, v in self.router.default_version.items()
                       if name not in self.router.rollouts and (name, v) in self.queues}

    def worker_ready(self, w) -> None:
        if self.ready():
            log.info("ready: every worker has warmed up")

    def ready(self) -> bool:
        return not self.draining and all(
            w.state == WorkerState.READY for q in self.queues.values() for w in q.workers)

    # -- connections -------------------------------------------------------------
    def expects_proxy_header(self, host: str) -> bool:
        return self.cfg.server.proxy_protocol and self._trusted(host)

    def machine_conns(self) -> int:
        """Open connections of every front (this one's exact, the others' as
        they last wrote them: two fronts admitting at the same instant may
        go over max_connections by one each, never further)."""
        page = self.conn_page
        if page is None:
            return len(self.conns)
        page[self.slot] = len(self.conns)
        return sum(page)

    def connection_pending(self, conn: Connection) -> None:
        """Accepted from a trusted proxy: waiting for its PROXY header, which
        names the client that the per-client limits are for."""
        self.conns.add(conn)
        if self.machine_conns() > self.max_conns:
            self._too_many(conn)

    def connection_opened(self, conn: Connection, proxy_failed: bool = False) -> None:
        self.conns.add(conn)
        if proxy_failed:
            self.machine_conns()
            return
        s = self.cfg.server
        if self.machine_conns() > self.max_conns:
            self._too_many(conn)
            return
        if self.per_host[conn.host] >= s.max_connections_per_client:
            conn.refuse(ResourceExhausted(
                f"too many connections from {brief(conn.host)} (server.max_connections_per_"
                f"client = {s.max_connections_per_client}); reuse a connection (requests "
                "pipeline) or close some"), "per_client")
            return
        self.per_host[conn.host] += 1
        conn.counted = True
        if self.draining:
            conn.refuse(Unavailable("server is draining (shutting down); connect to another "
                                    "instance"), "draining")

    def _too_many(self, conn: Connection) -> None:
        conn.refuse(ResourceExhausted(
            f"too many connections (server.max_connections = {self.max_conns}); reuse a "
            "connection (requests pipeline) or retry later"), "max_connections")

    def connection_closed(self, conn: Connection) -> None:
        self.conns.discard(conn)
        if self.conn_page is not None:
            self.conn_page[self.slot] = len(self.conns)
        self.frame_bytes -= conn.decoder.buffered
        conn.decoder.drop()
        if conn.counted:
            conn.counted = False
            n = self.per_host[conn.host] - 1
            if n > 0:
                self.per_host[conn.host] = n
            else:
                del self.per_host[conn.host]

    def frame_bytes_changed(self, conn: Connection, delta: int) -> bool:
        """Account ``conn``'s change in buffered bytes; True when that put the
        unfinished-frame budget over and ``conn`` was refused for it."""
        self.frame_bytes += delta
        if delta > 0 and self.frame_bytes > self.cfg.server.frame_buffer_budget_bytes \
                and conn.decoder.partial:
            self.frame_bytes -= conn.decoder.drop()
            conn.refuse(ResourceExhausted(
                "the server's memory for unfinished frames is used up (server.frame_buffer_"
                f"budget_bytes = {self.cfg.server.frame_buffer_budget_bytes}); retry later, "
                "or send smaller requests"), "frame_budget")
            return True
        return False

    def count_closed(self, reason: str) -> None:
        self.closed_by[reason] += 1

    def _sweep_soon(self) -> None:
        s = self.cfg.server
        shortest = min(s.idle_timeout_s, s.header_timeout_s, self.cfg.auth.timeout_s)
        every = min(1.0, max(0.02, shortest / 4))
        self._sweeper = self.loop.call_later(every, self.sweep)

    def sweep(self) -> None:
        """The connections' time limits (daemon/front/connection.py): a few times per
        limit, over every connection; O(connections) a second at most."""
        now = time.monotonic()
        s = self.cfg.server
        header_s, rate = s.header_timeout_s, s.min_frame_bytes_per_s
        idle_s = s.idle_timeout_s
        auth_s = self.cfg.auth.timeout_s if self.access is not None and self.access.auth else 0
        for c in list(self.conns):
            if c.closed:
                continue
            if c.proxy is not None:
                if now - c.opened > header_s:
                    c.refuse(ResourceExhausted(
                        f"no PROXY protocol header within {header_s:g} s (server.header_"
                        "timeout_s); this port expects one from trusted proxies"), "proxy_header")
                continue
            partial = c.decoder.partial
            if partial:
                took = now - c.frame_started
                if partial < 4 and took > header_s:
                    c.refuse(ResourceExhausted(
                        f"frame header not completed within {header_s:g} s of its first byte "
                        "(server.header_timeout_s); send whole frames"), "header_timeout")
                    continue
                if took > header_s and partial < rate * (took - header_s):
                    c.refuse(ResourceExhausted(
                        f"frame arriving too slowly: {partial} bytes in {took:.1f} s, below "
                        f"server.min_frame_bytes_per_s = {rate} after {header_s:g} s of grace; "
                        "check the link, or send smaller frames"), "slow_frame")
                    continue
            elif c.inflight or c.decoder.backlog:
                c.last_active = now  # waiting for answers is not idle
            elif now - c.last_active > idle_s:
                c.refuse(ResourceExhausted(
                    f"idle timeout: nothing received and nothing in flight for {idle_s:g} s "
                    "(server.idle_timeout_s); reconnect when there is work"), "idle")
                continue
            if auth_s and c.client is None and now - c.opened > auth_s:
                c.refuse(Unauthenticated(
                    f"no valid token within {auth_s:g} s of connecting (auth.timeout_s); open "
                    "each connection with op 'auth' and your token"), "auth_timeout")
        if not self.stopping:
            self._sweep_soon()

    def count_rejected(self, status: int) -> None:
        self.rejected[status] += 1

    # -- ops ---------------------------------------------------------------------
    def handle(self, conn: Connection, msg: dict) -> None:
        req_id = msg.get("id", 0)
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
            if self.access is not None:
                self.access.check(conn, msg, op)
            if op == "infer":
                self.infer(conn, req_id, msg)
            elif op == "health":
                conn.send(self.health(req_id, msg))
            elif op == "stats":
                model = msg.get("model")
                self.ask(conn, req_id, {"event": "stats", "model": model if type(model) is str
                                        else None})
            elif op == "models":
                conn.send(self.models(req_id, msg))
            elif op == "feedback":
                self.feedback(conn, req_id, msg)
            elif op == "auth":
                conn.send({"id": req_id, "status": 0, "client": conn.client,
                           "auth": self.access is not None and self.access.auth})
            else:
                raise InvalidArgument(f"unknown op {brief(op)}; ops are: {', '.join(OPS)}")
        except ProtocolError as e:
            self.count_rejected(int(e.status))
            e.req_id = req_id
            conn.send(e.answer())
            if conn.close_after_answer:
                # The request's own answer says why; the closing answer (id 0)
                # tells a client with others in flight that they were not received.
                if req_id:
                    conn.refuse(type(e)(e.message), "auth")
                else:
                    self.count_closed("auth")
                    conn.close()
        except Exception as e:  # a bug of ours: answer it, log it, keep serving everyone
            log.exception("internal error while handling a request", extra={"op": msg.get("op")})
            self.count_rejected(int(Status.INTERNAL))
            conn.send({"id": req_id, "status": int(Status.INTERNAL),
                       "error": f"internal server error ({type(e).__name__}); it is logged, "
                                "please report it"})

    def route(self, msg: dict) -> tuple[ModelQueue, str, str | None, str | None]:
        """(queue, lane, arm, key) for an infer request (daemon/serving/router.py)."""
        name, version = msg.get("model"), msg.get("version")
        key, exp = msg.get("key"), msg.get("exp")
        if version is None and exp is None and type(name) is str:
            q = self._plain.get(name)  # no rollout: the key cannot change the answer
            if q is not None and (key is None or type(key) is str):
                return q, STABLE, None, key
        if type(name) is not str:
            if name is None:
                raise InvalidArgument(f"request has no 'model'; models served here: "
                                      f"{', '.join(sorted(self.router.default_version))}")
            raise InvalidArgument(f"'model' must be a string, got {type(name).__name__}")
        if name not in self.router.default_version:
            raise NotFound(f"model {brief(name)} is not served here; models: "
                           f"{', '.join(sorted(self.router.default_version))}")
        for field, value in (("version", version), ("key", key), ("exp", exp)):
            if value is not None and type(value) is not str:
                raise InvalidArgument(f"{field!r} must be a string, got {type(value).__name__}")
        try:
            version, lane, arm = self.router.route(name, key, exp, version)
        except UnknownExperiment:
            exps = sorted(e.id for e in self.router.experiments.values() if e.model == name)
            raise NotFound(f"experiment {brief(exp)} is not configured for model {name!r}; "
                           f"experiments: {', '.join(exps) or 'none'}") from None
        q = self.queues.get((name, version))
        if q is None:
            versions = sorted(v for (n, v) in self.queues if n == name)
            raise NotFound(f"model {name!r} has no version {brief(version)}; versions: "
                           f"{', '.join(versions)}")
        return q, lane, arm, key

    def infer(self, conn: Connection, req_id: int, msg: dict) -> None:
        if self.draining:
            raise Unavailable("server is draining (shutting down); retry on another instance")
        q, lane, arm, key = self.route(msg)
        sh = self.shadows.get(q.name) if self.shadows else None
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
            dl_ns = self.default_deadline_ns
        elif type(dl) is int and 0 < dl <= MAX_DEADLINE_MS:
            dl_ns = dl * 1_000_000
        else:
            raise InvalidArgument(f"'deadline_ms' must be an integer from 1 to {MAX_DEADLINE_MS}, "
                                  f"got {brief(dl)}")
        if conn.inflight >= self.max_inflight:
            raise ResourceExhausted(
                f"this connection has {conn.inflight} requests in flight (server.max_inflight_"
                f"per_connection = {self.max_inflight}); wait for answers before sending more, "
                "or use another connection")
        now = _monotonic_ns()
        req = Pending(req_id, conn, data, now, now + dl_ns, q, self.rids.next(), lane, arm, key)
        conn.inflight += 1  # until q.finished answers it, whichever way
        if defaulted is not None:
            req.defaulted = defaulted
            counts = q.stats.defaulted   # per input: stats' "defaulted", ringserve_defaulted_inputs
            for name in defaulted:
                counts[name] += 1
        if self.reqlog is not None and self.reqlog.sampled():
            req.log = (features_hash(data), msg.get("exp"))
        if q.cache is not None and self._cached(q, req):
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
            if refused == "busy":
                status = int(Status.RESOURCE_EXHAUSTED)
                err = (f"model {q.name!r} version {q.version!r} is busy: its queue is full "
                       f"(queue_limit = {q.limit}); retry with backoff")
            elif refused == "share":
                status = int(Status.RESOURCE_EXHAUSTED)
                err = (f"model {q.name!r} version {q.version!r} is busy: its queue is more than "
                       f"half full and this client already holds its share of it ("
                       f"{q.held.get(conn.ident, 0)} of queue_limit = {q.limit}, shared by "
                       f"{len(q.held)} clients); retry with backoff")
            else:
                status = int(Status.UNAVAILABLE)
                states = ", ".join(sorted({w.state for w in q.workers}))
                err = (f"model {q.name!r} version {q.version!r} has no ready worker "
                       f"(workers: {states}); retry shortly")
            reason = _SHED[refused]
            q.stats.shed[reason] += 1
            if req.fb is not None and req.fb.take(req, reason, status, err):
                return
            req.done = True
            q.finished(req, status, {"id": req_id, "status": status, "error": err, "rid": req.rid},
                       observe=refused != "unavailable")

    def _cached(self, q: ModelQueue, req: Pending) -> bool:
        """Answer ``req`` from the response cache if it can be (a hit)."""
        k = q.cache.key(req.data)
        outputs = q.cache.get(k)
        if outputs is None:
            q.stats.cache["miss"] += 1
            req.ckey = k
            return False
        q.stats.cache["hit"] += 1
        req.done = True
        answer = {
            "id": req.id, "status": 0, "outputs": outputs, "model": q.name, "version": q.version,
            "data_version": q.data_version, "lane": req.lane, "arm": req.arm, "rid": req.rid,
            "timing": {"queue_us": 0, "compute_us": 0, "batch": 0, "cache": True}}
        if req.defaulted is not None:
            answer["defaulted"] = req.defaulted
        q.finished(req, 0, answer, observe=False)
        self.joins.answered(req.rid, q.name, q.version, req.lane, req.arm, req.key)
        return True

    def feedback(self, conn: Connection, req_id: int, msg: dict) -> None:
        ref, outcome = msg.get("ref"), msg.get("outcome")
        if type(ref) is int and ref >= 0 or type(ref) is str and ref:
            pass
        else:
            raise InvalidArgument("feedback needs 'ref': the 'rid' of an earlier answer "
                                  "(unsigned int) or the routing key it was sent with (string)")
        if type(outcome) not in (int, float) or not abs(outcome) <= MAX_OUTCOME:
            raise InvalidArgument(f"feedback needs 'outcome', a finite number of magnitude at "
                                  f"most {MAX_OUTCOME:g} (label, click 0/1, reward), got "
                                  f"{brief(outcome)}")
        outcome = float(outcome)
        if self.n_fronts > 1 and not (type(ref) is int and rid_front(ref) == self.slot):
            answer = self.join(ref, outcome, relayed=True)
            if not answer["joined"]:
                # Another front may have given that answer (a client's pool
                # of connections spans fronts): the supervisor asks it.
                self.ask(conn, req_id, {"event": "feedback", "ref": ref, "outcome": outcome},
                         (ref, outcome))
                return
        else:
            answer = self.join(ref, outcome)
        conn.send(dict(answer, id=req_id))

    def join(self, ref, outcome: float, relayed: bool = False) -> dict:
        """Join an outcome here: its KPI, the guardrail's tally, the request
        log. ``relayed``: a miss is not counted (the front that received
        the feedback counts it once no front joined it)."""
        group = self.joins.record(ref, outcome, count_miss=not relayed)
        if self.reqlog is not None and (group is not None or not relayed):
            self.reqlog.feedback(self.joins.last_rid, outcome, group)
        answer = {"status": 0, "joined": group is not None}
        if group is not None:
            t = self.tallies.get(group[0])
            if t is not None:
                t.outcome(group[2], outcome)
            answer.update(model=group[0], version=group[1], lane=group[2], arm=group[3])
        return answer

    def health(self, req_id: int, msg: dict) -> dict:
        name = msg.get("model")
        workers = [w.health() for q in self.queues.values() for w in q.workers
                   if name is None or q.name == name]
        fallbacks = [{"name": q.name, "version": q.version, "fallback": q.fallback.by,
                      "ready": q.has_ready, "degraded": q.fallback.degraded()}
                     for q in self.queues.values()
                     if q.fallback is not None and (name is None or q.name == name)]
        return {"id": req_id, "status": 0, "live": True, "ready": self.ready(),
                "degraded": self.degraded(), "draining": self.draining, "models": workers,
                "fallbacks": fallbacks, "metrics_port": self.metrics_port, "front": self.slot}

    def degraded(self) -> bool:
        """Some version is answered by its fallback alone (daemon/serving/fallback.py):
        not ready, but not down either."""
        return any(q.fallback is not None and q.fallback.degraded() for q in self.queues.values())

    def models(self, req_id: int, msg: dict) -> dict:
        out = []
        for q in self.queues.values():
            m = q.cfg
            entry = {"name": m.name, "version": m.version, "lane": q.lane,
                     "devices": list(m.devices), "dtype": m.dtype,
                     "batching": {"max_batch": m.max_batch, "window_ms": m.window_ms,
                                  "buckets": list(m.buckets), "queue_limit": m.queue_limit,
                                  "inflight_batches": m.inflight_batches}}
            ins = {n: {"dtype": s.dtype, "shape": list(s.shape)} for n, s in m.inputs}
            for n, t in (q.defaults or {}).items():
                ins[n]["default"] = t
            if q.fallback is not None:
                entry["fallback"] = {"version": q.fallback.by, "on": sorted(q.fallback.on)}
            if m.single_input:
                entry["input"] = next(iter(ins.values()))
            else:
                entry["inputs"] = ins
            outs = {t.name: {"dtype": t.dtype, "shape": list(t.shape)} for t in q.outputs}
            if outs and q.single_output:
                entry["output"] = next(iter(outs.values()))
            elif outs:
                entry["outputs"] = outs
            entry["data_version"] = q.data_version
            entry["metadata"] = m.metadata.describe() if m.metadata is not None else None
            out.append(entry)
        return {"id": req_id, "status": 0, "models": out}

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
        started = {k: self._make_queue(m, workers.get(k, ())) for k, m in wanted.items()
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
        self.queues = {**keep, **started}
        self.default_deadline_ns = new.server.deadline_ms * 1_000_000
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
        """A reload's connection limits: the frame bounds follow the models,
        for open connections too; counts and buffers carry over."""
        self.frame_limits = frame_limits(cfg.models)
        for c in self.conns:
            c.decoder.limits = self.frame_limits
        self._trusted = parse_trusted(cfg.server.trusted_proxies)
        self.max_inflight = cfg.server.max_inflight_per_connection
        self.max_conns, warning = raise_nofile(cfg)
        if warning:
            log.warning(warning, extra={"max_connections": self.max_conns})
        self.joins.window_s = cfg.feedback.window_s
        self.joins.max_entries = cfg.feedback.max_entries

    def _set_access(self, access: Access | None) -> None:
        """A reload's auth and limits: rate buckets and refusal counts carry
        over; when the tokens changed (or auth was turned on), connections
        not authenticated by a token still listed must authenticate again."""
        old = self.access
        if access is not None and old is not None:
            access.buckets, access.refused = old.buckets, old.refused
        if access is not None and access.rate and self.n_fronts > 1:
            access.spent = (old.spent if old is not None else None) or {}
        self.access = access
        if access is not None and access.auth:
            if old is None or not old.auth or old.tokens != access.tokens:
                n = access.revoke_stale(self.conns)
                log.info("tokens changed: connections without a listed token must authenticate "
                         "again", extra={"event": "reload", "connections": n})
        else:
            for c in self.conns:
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
        self.draining = True  # /readyz answers 503 from now: load balancers move away
        for q in self.all_queues():  # and nothing falls back any more
            if q.fallback is not None:
                q.fallback.live = False
        if self._sweeper is not None:
            self._sweeper.cancel()
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
                not c.closed and c.transport.get_write_buffer_size() for c in self.conns):
            await asyncio.sleep(0.005)
        for c in list(self.conns):  # closing is an answer: id 0, "draining"
            c.refuse(Unavailable("server shut down (drained); reconnect to another instance "
                                 "or retry later"), "draining")
        await asyncio.sleep(0.05)  # let the closing answers and FINs leave
        for p in list(self.ports.values()):
            p.close()
        if self.reqlog is not None:
            self.reqlog.close()
        # What was counted since the last report, before the supervisor stops us.
        self.send_tallies()
        self.tell({"event": "beat", "figures": front_figures(self)})
        log.info("front stopped", extra={"answered": sum(sum(q.stats.by_status.values())
                                                   for q in queues)})


def rid_front(rid: int) -> int:
    return _decode_rid(rid).front


def run_front(chan: Channel) -> int:
    """A front process's life: the supervisor's ``start`` message, then
    serve until drained."""
    import uvloop

    got = chan.recv()
    if got is None or got[0].get("cmd") != "start":
        return 1
    msg, fds = got
    conn_page = None
    if fds:
        import mmap
        conn_page = memoryview(mmap.mmap(fds[0], CONN_PAGE_BYTES)).cast("Q")[:MAX_FRONTS]
        os.close(fds[0])
    from ..observe import logs
    logs.setup(msg["cfg"].logging.level)

    async def main() -> int:
        app = App(msg["cfg"], asyncio.get_running_loop(), chan, msg["slot"], msg["fronts"],
                  msg["port"], msg["workers"], msg["infos"], msg["routing"], msg["rid_block"],
                  conn_page)
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
