"""The supervisor: the process ``ringserve serve`` starts. It never touches a request.

It reads and validates the config, takes the port, and starts two kinds of
children, each a fresh interpreter that dies with it (daemon/workers/lifeline.py):

- **fronts** (``python -m daemon.front``, ``[server] fronts`` of them): each
  binds the port itself with SO_REUSEPORT (a socket inherited from a parent
  would make the kernel's balancing useless), answers its own connections
  and batches its own requests (daemon/front/app.py);
- **workers** (``python -m daemon.workers.child``): one per model version per
  device, serving the rings of every front.

The supervisor makes every ring (one per front and worker: a memfd,
``ipc/ring.py``) and every eventfd, and hands them to both ends over their
control channels (``ipc/control.py``), so a ring has no name and nothing is
left in ``/dev/shm`` whoever dies.

After gunicorn's arbiter: signal handlers only enqueue; one loop dispatches
(SIGHUP reload, SIGTERM/SIGINT drain); a child that dies is restarted after
an exponential backoff (0.5 s doubling, capped by
``server.restart_backoff_max_s``, reset once it has served for a minute),
except one that fails to boot (a worker that cannot load its model exits
EXIT_LOAD_FAILED, a front that cannot bind exits EXIT_BOOT_FAILED): it would
fail the same way, so it is reported and left alone. Stops escalate: a
message, a grace period, SIGKILL.

Reload (SIGHUP): validate the file (an invalid one changes nothing); tell
every front what is coming (``prepare``: the new config and the new workers'
ids); start the new workers, attach them to every front, wait until they are
warm; then ``switch`` every front; the fronts drain what they had for the
versions that left, and the supervisor stops those workers once every front
has. Drain (SIGTERM): every front stops accepting, answers what it accepted
and exits; then the workers stop.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import os
import signal
import sys
import time

from ipc import shm
from ipc.shm import Segment

from ..config import ConfigError, load_config, with_overrides
from ..front.conncounts import PAGE_BYTES as CONN_PAGE_BYTES
from ..front.conncounts import ConnCounts
from ..front.rids import decode as decode_rid
from ..observe.figures import Figures, MachineView, stats_answer
from ..rollout.controller import Rollouts, weight_of
from ..workers.spec import share_cores, worker_env
from ..workers.state import WorkerState
from .children import FrontProcess, WorkerProcess
from .cores import front_count
from .metrics import MetricsServer
from .portlock import PortLock

log = logging.getLogger("ringserve.supervisor")
STOP_GRACE_S = 10.0
HEARTBEAT_S = 1.0        # a front's heartbeat period
GATHER_TIMEOUT_S = 2.0   # a front that does not send its figures in time is shown as last seen
_tokens = itertools.count(1)


class Supervisor:
    def __init__(self, cfg, loop, port_file: str | None = None, overrides: dict | None = None):
        self.cfg = cfg
        self.loop = loop
        self.port_file = port_file
        self.overrides = overrides or {}
        self.workdir = os.getcwd()
        self.worker_env = worker_env(cfg.source, self.workdir)
        self.stopping = False
        self.port: int | None = None
        self.lock: PortLock | None = None
        self.workers: dict[tuple[str, str], list[WorkerProcess]] = {}
        self.retiring: list[WorkerProcess] = []
        self.fronts: list[FrontProcess] = []
        self.n_fronts = 1
        self._signals: asyncio.Queue = asyncio.Queue()
        self._listening = asyncio.Event()
        self._beat_task: asyncio.Task | None = None
        self.preparing: dict | None = None   # a reload's prepare message, for fronts that start
        self.started = time.monotonic()
        self.rollouts = Rollouts(self)
        self.figures = Figures()
        self.metrics = MetricsServer(self)
        self._gathers: dict[int, tuple[asyncio.Future, set[int]]] = {}
        # Every front's open connections (daemon/front/conncounts.py).
        self.conn_seg, self.conn_fd = Segment.anonymous("ringserve-connections", CONN_PAGE_BYTES)
        self.conn_counts = ConnCounts(-1, self.conn_seg.buf)
        self._joins: dict[int, asyncio.Future] = {}
        self._gathering: asyncio.Task | None = None
        self._gather_next: asyncio.Future | None = None

    # -- what the rollout controller uses (Rollouts' host) ------------------------
    def workers_of(self, model: str, version: str):
        return self.workers.get((model, version))

    def routing(self) -> dict:
        return {"weights": {m: weight_of(st) for m, st in self.rollouts.states.items()},
                "stages": self.rollouts.stage_ids()}

    def reroute(self) -> None:
        """A weight changed (advance, rollback): every front switches now."""
        self.broadcast({"cmd": "routing", "routing": self.routing()})

    # -- the machine's figures ---------------------------------------------------
    @property
    def draining(self) -> bool:
        return self.stopping

    def ready(self) -> bool:
        """Every front listens and beats, every serving worker is warm and
        attached to every front, and the daemon is not draining."""
        if self.stopping or not self.fronts:
            return False
        limit = self.cfg.server.front_heartbeat_timeout_s
        now = time.monotonic()
        fronts = self.fronts
        if not all(f.listening and now - f.last_beat <= limit for f in fronts):
            return False
        for ws in self.workers.values():
            for w in ws:
                if (w.state != WorkerState.READY
                        or len(set(map(id, w.attached.values()))) < len(fronts)):
                    return False
        return True

    def degraded(self) -> bool:
        """Some version with a fallback has no ready worker: its requests are
        answered by the fallback alone (daemon/serving/fallback.py)."""
        def ready(name: str, version: str) -> bool:
            return any(w.state == WorkerState.READY for w in self.workers.get((name, version), ()))

        return not self.stopping and any(
            m.fallback is not None and not ready(m.name, m.version) and
            (m.fallback.version is None or ready(m.name, m.fallback.version))
            for m in self.cfg.models)

    def front_list(self) -> list[dict]:
        return [{"slot": f.slot, "pid": f.pid, "alive": f.alive, "listening": f.listening,
                 "restarts": f.backoff.restarts,
                 "connections": self.figures.live.get(f.slot, {}).get("connections", 0)}
                for f in self.fronts]

    async def gather(self) -> None:
        """Fresh figures from every listening front, taken after this call
        began. Calls that come while a gather is out share the next one, so a
        flood of stats requests or scrapes costs the fronts one gather at a
        time, back to back, never one per request."""
        if self._gather_next is None:
            self._gather_next = self.loop.create_future()
            if self._gathering is None or self._gathering.done():
                self._gathering = self.loop.create_task(self._gather_loop())
        await asyncio.shield(self._gather_next)

    async def _gather_loop(self) -> None:
        while self._gather_next is not None:
            waiting, self._gather_next = self._gather_next, None
            try:
                await self._gather_once()
            finally:
                if not waiting.done():
                    waiting.set_result(None)

    async def _gather_once(self) -> None:
        """Fresh figures from every listening front (GATHER_TIMEOUT_S at most)."""
        fronts = [f for f in self.live_fronts() if f.listening]
        if not fronts:
            return
        token = next(_tokens)
        fut = self.loop.create_future()
        self._gathers[token] = (fut, {f.slot for f in fronts})
        for f in fronts:
            f.send({"cmd": "figures", "token": token})
        try:
            await asyncio.wait_for(fut, GATHER_TIMEOUT_S)
        except asyncio.TimeoutError:
            pass
        finally:
            self._gathers.pop(token, None)

    def got_figures(self, token: int, slot: int) -> None:
        g = self._gathers.get(token)
        if g is not None:
            g[1].discard(slot)
            if not g[1] and not g[0].done():
                g[0].set_result(None)

    def front_gone(self, front: "FrontProcess") -> None:
        for token in list(self._gathers):
            self.got_figures(token, front.slot)

    async def view(self) -> MachineView | None:
        await self.gather()
        merged = self.figures.merged()
        if merged is None:
            return None
        workers = {w.uid: (w.key, w.device, w.index, w.info()) for w in self.all_workers()}
        return MachineView(merged, workers, self.rollouts, self.cfg, self.ready(),
                           self.stopping, self.started)

    async def answer_stats(self, front: "FrontProcess", msg: dict) -> None:
        view = await self.view()
        if view is None:
            answer = {"status": 14, "error": "no front has figures yet; retry"}
        else:
            answer = stats_answer(view, 0, msg.get("model"), self.front_list(), front.slot)
        front.send({"cmd": "answer", "token": msg["token"], "answer": answer})

    async def relay_feedback(self, origin: "FrontProcess", msg: dict) -> None:
        """An outcome the front that received it could not join: the front
        that gave the answer joins it (the rid names it; a routing key is
        tried on each other front in turn until one joins)."""
        ref = msg["ref"]
        others = [f for f in self.live_fronts() if f is not origin and f.listening]
        if type(ref) is int:
            slot = decode_rid(ref).front
            others = [f for f in others if f.slot == slot]
        answer = None
        for f in others:
            token = next(_tokens)
            fut = self.loop.create_future()
            self._joins[token] = fut
            f.send({"cmd": "join", "token": token, "ref": ref, "outcome": msg["outcome"]})
            try:
                answer = await asyncio.wait_for(asyncio.shield(fut), GATHER_TIMEOUT_S)
            except asyncio.TimeoutError:
                answer = None
            finally:
                self._joins.pop(token, None)
            if answer is not None and answer.get("joined"):
                break
        if answer is None or not answer.get("joined"):
            answer = {"status": 0, "joined": False}
        origin.send({"cmd": "answer", "token": msg["token"], "answer": answer,
                     "unjoined": not answer["joined"]})

    def got_join(self, token: int, answer: dict) -> None:
        fut = self._joins.get(token)
        if fut is not None and not fut.done():
            fut.set_result(answer)

    # -- the children ----------------------------------------------------------
    def all_workers(self) -> list[WorkerProcess]:
        return [w for ws in self.workers.values() for w in ws] + self.retiring

    def live_fronts(self) -> list[FrontProcess]:
        return [f for f in self.fronts if f.alive]

    def worker_ids(self) -> dict:
        return {key: [w.uid for w in ws] for key, ws in self.workers.items()}

    def broadcast(self, msg: dict) -> None:
        for f in self.live_fronts():
            f.send(msg)

    def _make_workers(self, cfg) -> dict[tuple[str, str], list[WorkerProcess]]:
        threads = share_cores(sum(1 for m in cfg.models for d in m.devices if d == "cpu"),
                              self.n_fronts)
        out = {}
        for m in cfg.models:
            ws = []
            for i, dev in enumerate(m.devices):
                w = WorkerProcess(self, m, i, dev, m.threads or threads if dev == "cpu" else 1)
                w.start_timeout_s = cfg.server.start_timeout_s
                ws.append(w)
            out[(m.name, m.version)] = ws
        return out

    def worker_ready(self, w: WorkerProcess) -> None:
        if all(x.state == WorkerState.READY for x in self.all_workers()):
            log.info("ready: every worker has warmed up")

    def front_listening(self, f: FrontProcess) -> None:
        if all(x.listening or x.failed for x in self.fronts):
            self._listening.set()

    def front_failed(self, f: FrontProcess) -> None:
        if all(x.failed for x in self.fronts):
            log.error("no front could start; stopping")
            self._signals.put_nowait(signal.SIGTERM)
        self.front_listening(f)

    # -- start -----------------------------------------------------------------
    async def start(self) -> None:
        s = self.cfg.server
        try:
            self.n_fronts, note = front_count(self.cfg)
        except ValueError as e:
            raise OSError(str(e)) from None
        if note:
            log.info(note)
        removed = shm.sweep_stale()  # named segments of a killed process of an older ringserve
        if removed:
            log.warning("removed shared memory left by a process that died",
                        extra={"segments": removed})
        self.lock = PortLock(s.host, s.port)
        self.port = self.lock.port
        self.rollouts.apply(self.cfg, "start")
        self.rollouts.start()
        self.workers = self._make_workers(self.cfg)
        self.fronts = [FrontProcess(self, i) for i in range(self.n_fronts)]
        for f in self.fronts:
            f.start()
        for w in self.all_workers():
            w.start()
        await self._listening.wait()
        if all(f.failed for f in self.fronts):
            return
        self._beat_task = self.loop.create_task(self._watch_beats())
        if self.cfg.metrics.enabled:
            await self.metrics.start(self.cfg.metrics.host, self.cfg.metrics.port)
            self.broadcast({"cmd": "metrics_port", "port": self.metrics.port})
        if self.port_file:
            tmp = self.port_file + ".tmp"
            with open(tmp, "w") as fh:
                fh.write(f"{self.port}\n")
            os.replace(tmp, self.port_file)
        log.info("listening", extra={"host": s.host, "port": self.port, "pid": os.getpid(),
                                     "fronts": self.n_fronts, "config": self.cfg.source,
                                     "models": [f"{m.name}@{m.version}" for m in self.cfg.models]})

    async def _watch_beats(self) -> None:
        while True:
            await asyncio.sleep(HEARTBEAT_S)
            limit = self.cfg.server.front_heartbeat_timeout_s
            now = time.monotonic()
            for f in self.live_fronts():
                if not f.stopping and now - f.last_beat > limit:
                    log.error("front sent no heartbeat; killing it", extra={
                        "front": f.label, "pid": f.pid, "silent_s": round(now - f.last_beat, 1)})
                    f.kill()

    # -- signals -----------------------------------------------------------------
    def on_signal(self, signum: int) -> None:
        self._signals.put_nowait(signum)

    async def run(self) -> int:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            self.loop.add_signal_handler(sig, self.on_signal, sig)
        try:
            await self.start()
        except OSError as e:
            log.error("cannot start", extra={"error": str(e)})
            await self.shutdown()
            return 1
        if all(f.failed for f in self.fronts):
            await self.shutdown()
            return 1
        reloading: asyncio.Task | None = None
        again = False
        while True:
            sig = await self._signals.get()
            if sig in (signal.SIGTERM, signal.SIGINT):
                log.info("shutting down", extra={"signal": signal.Signals(sig).name})
                if reloading is not None and not reloading.done():
                    reloading.cancel()
                    await asyncio.gather(reloading, return_exceptions=True)
                await self.shutdown()
                return 0
            if sig == signal.SIGHUP:
                if reloading is not None and not reloading.done():
                    again = True  # SIGHUPs during a reload coalesce into one more
                    continue
                reloading = self.loop.create_task(self._reload_loop())
            elif sig == "reloaded" and again:
                again = False
                reloading = self.loop.create_task(self._reload_loop())

    async def _reload_loop(self) -> None:
        try:
            await self.reload()
        except Exception:
            log.exception("reload failed")
        finally:
            self._signals.put_nowait("reloaded")

    # -- reload ------------------------------------------------------------------
    async def reload(self) -> bool:
        old = self.cfg
        try:
            new = with_overrides(load_config(old.source), self.overrides)
        except ConfigError as e:
            log.error("reload rejected: invalid config; still serving the previous one",
                      extra={"event": "reload", "ok": False, "error": str(e), "key": e.key})
            self.rollouts.log.write({"event": "reload", "ok": False, "error": str(e),
                                     "key": e.key})
            self.broadcast({"cmd": "reload_failed"})
            return False
        fixed = ("host", "port", "node_id", "fronts")
        if any(getattr(new.server, k) != getattr(old.server, k) for k in fixed):
            log.warning("server.host, port, node_id and fronts changes need a restart; still "
                        "listening on the old address, with the old node_id and fronts",
                        extra={"event": "reload"})
            new = dataclasses.replace(new, server=dataclasses.replace(
                new.server, **{k: getattr(old.server, k) for k in fixed}))
        for section in ("metrics", "request_log"):
            if getattr(new, section) != getattr(old, section):
                log.warning(f"[{section}] changes need a restart; it stays as it is",
                            extra={"event": "reload"})
                new = dataclasses.replace(new, **{section: getattr(old, section)})
        wanted = {(m.name, m.version): m for m in new.models}
        old_models = {(m.name, m.version): m for m in old.models}
        keep = {k: ws for k, ws in self.workers.items()
                if k in wanted and old_models.get(k) == wanted[k]}
        started = {k: ws for k, ws in self._make_workers(new).items() if k not in keep}
        workers = {**keep, **started}
        t0 = time.monotonic()
        self.preparing = {"cmd": "prepare", "cfg": new,
                          "workers": {k: [w.uid for w in ws] for k, ws in workers.items()}}
        self.broadcast(self.preparing)
        new_workers = [w for ws in started.values() for w in ws]
        self.retiring.extend(new_workers)  # fronts that start now attach them too
        for w in new_workers:
            w.start()
        try:
            failed = await self._wait_warm(new_workers, new.server.start_timeout_s)
        except asyncio.CancelledError:
            self.preparing = None
            self.broadcast({"cmd": "abort", "errors": ["the daemon is shutting down"]})
            await self._stop_workers(new_workers)
            raise
        self.preparing = None
        for w in new_workers:
            self.retiring.remove(w)
        if failed:
            log.error("reload rejected: a new model version did not start; still serving the "
                      "previous config", extra={"event": "reload", "ok": False, "errors": failed})
            self.rollouts.log.write({"event": "reload", "ok": False, "errors": failed})
            self.broadcast({"cmd": "abort", "errors": failed})
            await self._stop_workers(new_workers)
            return False
        retired = [w for k, ws in self.workers.items() if k not in keep for w in ws]
        self.cfg = new
        self.workers = workers
        self.retiring.extend(retired)
        self.rollouts.apply(new, "reload")
        fronts = self.live_fronts()
        for f in fronts:
            f.retired = self.loop.create_future()
        self.broadcast({"cmd": "switch", "routing": self.routing()})
        record = {"started": [f"{n}@{v}" for n, v in started],
                  "retired": sorted({f"{w.key[0]}@{w.key[1]}" for w in retired}),
                  "kept": [f"{n}@{v}" for n, v in keep], "s": round(time.monotonic() - t0, 3)}
        log.info("reloaded", extra={"event": "reload", "ok": True, **record})
        self.rollouts.log.write({"event": "reload", "ok": True, **record})
        # Every front drains what it had for the retired versions, then they stop.
        for f in fronts:
            await asyncio.wait([asyncio.shield(f.retired), asyncio.shield(f.exited)],
                               timeout=new.server.drain_timeout_s + 5.0,
                               return_when=asyncio.FIRST_COMPLETED)
        await self._stop_workers(retired)
        for w in retired:
            self.retiring.remove(w)
        return True

    async def _wait_warm(self, workers, timeout_s: float) -> list[str]:
        t_end = time.monotonic() + timeout_s

        def attached(w):
            return all(any(f is x for x in w.attached.values()) for f in self.live_fronts()
                       if f.listening)

        while any(w.state not in (WorkerState.READY, WorkerState.FAILED) or
                  (w.state == WorkerState.READY and not attached(w))
                  for w in workers) and time.monotonic() < t_end:
            await asyncio.sleep(0.02)
        for w in (w for w in workers if w.state in (WorkerState.LOADING, WorkerState.WARMING)):
            w.start_timed_out(timeout_s)
        return [f"{w.label}: {w.error or w.state}" for w in workers if w.state != WorkerState.READY]

    async def _stop_workers(self, workers) -> None:
        await asyncio.gather(*(w.stop(STOP_GRACE_S) for w in workers))

    # -- drain -------------------------------------------------------------------
    async def shutdown(self) -> None:
        self.stopping = True  # /readyz answers 503 from now: load balancers move away
        if self._beat_task is not None:
            self._beat_task.cancel()
        await self.rollouts.stop()
        grace = self.cfg.server.drain_timeout_s + 5.0
        await asyncio.gather(*(f.stop(grace) for f in self.fronts))
        await self._stop_workers(self.all_workers())
        self.metrics.close()
        if self.lock is not None:
            self.lock.close()
        if self.port_file:
            try:
                os.unlink(self.port_file)
            except FileNotFoundError:
                pass
        log.info("stopped")


def serve(cfg, port_file: str | None = None, overrides: dict | None = None) -> int:
    import uvloop

    async def main() -> int:
        sup = Supervisor(cfg, asyncio.get_running_loop(), port_file, overrides)
        try:
            return await sup.run()
        except BaseException:
            # Whatever went wrong, take the children with us.
            sup.stopping = True
            for c in sup.fronts + sup.all_workers():
                c.kill()
            raise

    if sys.version_info >= (3, 12):  # pragma: no cover
        return asyncio.run(main(), loop_factory=uvloop.new_event_loop)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main())
