"""The supervisor: the process ``ringserve serve`` starts. It never touches a request.

It reads and validates the config, takes the port, and starts two kinds of
children, each a fresh interpreter that dies with it (daemon/lifeline.py):

- **fronts** (``python -m daemon.front``, ``[server] fronts`` of them): each
  binds the port itself with SO_REUSEPORT (a socket inherited from a parent
  would make the kernel's balancing useless), answers its own connections
  and batches its own requests (daemon/server.py);
- **workers** (``python -m daemon.worker``): one per model version per
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
import fcntl
import itertools
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

from ipc import shm
from ipc.control import Channel, ChannelClosed, pair
from ipc.ring import Ring, RingLayout
from ipc.shm import Segment

from .config import ConfigError, load_config, with_overrides
from .cores import front_count
from .figures import Figures, MachineView, stats_answer
from .lifeline import EXIT_BOOT_FAILED, PARENT_ENV
from .limits import CONN_PAGE_BYTES
from .metrics import MetricsServer
from .rids import decode as decode_rid
from .rollouts import Rollouts, weight_of
from .spec import TensorDecl, share_cores, spawn_worker, spec_for, worker_env
from .worker import EXIT_LOAD_FAILED

log = logging.getLogger("ringserve.supervisor")
STABLE_AFTER_S = 60.0
STOP_GRACE_S = 10.0
HEARTBEAT_S = 1.0        # a front's heartbeat period
GATHER_TIMEOUT_S = 2.0   # a front that does not send its figures in time is shown as last seen
_uids = itertools.count(1)
_tokens = itertools.count(1)


class Backoff:
    """Restart delays: 0.5 s doubling up to ``cap``, reset once a child has
    served ``STABLE_AFTER_S``."""

    def __init__(self):
        self.failures = 0
        self.restarts = 0
        self.ready_at = 0.0

    def next_delay(self, cap: float) -> float:
        if self.failures and time.monotonic() - self.ready_at > STABLE_AFTER_S and self.ready_at:
            self.failures = 0
        self.failures += 1
        self.restarts += 1
        return min(cap, 0.5 * 2 ** (self.failures - 1))


class Child:
    """What fronts and workers share: a process, its control channel, its
    pidfd, and the messages that arrive."""

    def __init__(self, sup: "Supervisor"):
        self.sup = sup
        self.loop = sup.loop
        self.proc: subprocess.Popen | None = None
        self.pid: int | None = None
        self.chan: Channel | None = None
        self._pidfd = -1
        self.exited: asyncio.Future | None = None
        self.stopping = False
        self.backoff = Backoff()
        self._restart_timer: asyncio.TimerHandle | None = None

    def _watch(self, proc, chan: Channel) -> None:
        self.proc, self.pid, self.chan = proc, proc.pid, chan
        self.exited = self.loop.create_future()
        chan.sock.setblocking(False)
        self.loop.add_reader(chan.fileno(), self._on_ctrl)
        self._pidfd = os.pidfd_open(self.pid)
        self.loop.add_reader(self._pidfd, self._reap)

    def send(self, msg: dict, fds=()) -> bool:
        if self.chan is None:
            return False
        try:
            self.chan.sock.setblocking(True)  # a few MiB of buffer; never waits in practice
            self.chan.send(msg, fds)
            return True
        except (ChannelClosed, OSError):
            return False  # the pidfd reports the death
        finally:
            if self.chan is not None:
                self.chan.sock.setblocking(False)

    def _on_ctrl(self) -> None:
        while self.chan is not None:
            try:
                got = self.chan.recv()
            except (ChannelClosed, OSError, EOFError, ValueError):
                self.loop.remove_reader(self.chan.fileno())
                return
            if got is None:
                return
            msg, fds = got
            try:
                self.on_message(msg, fds)
            except Exception:
                log.exception("handling a control message failed", extra={"child": self.label})
                for fd in fds:
                    try:
                        os.close(fd)
                    except OSError:
                        pass

    def _reap(self) -> None:
        self.loop.remove_reader(self._pidfd)
        os.close(self._pidfd)
        self._pidfd = -1
        rc = self.proc.wait()
        if self.chan is not None:
            try:
                self.loop.remove_reader(self.chan.fileno())
            except (ValueError, OSError):
                pass
            self.chan.close()
            self.chan = None
        self.on_exit(rc)
        if not self.exited.done():
            self.exited.set_result(rc)

    def kill(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            try:
                self.proc.send_signal(signal.SIGKILL)
            except ProcessLookupError:
                pass

    async def stop(self, grace_s: float) -> None:
        """Ask the child to finish and exit; SIGKILL after the grace period."""
        self.stopping = True
        if self._restart_timer is not None:
            self._restart_timer.cancel()
            self._restart_timer = None
            self.stopped_waiting()
        if self.proc is None or self.exited is None or self.exited.done():
            return
        self.send({"cmd": "stop"})
        try:
            await asyncio.wait_for(asyncio.shield(self.exited), grace_s)
        except asyncio.TimeoutError:
            log.warning("child did not stop in time; killing", extra={"child": self.label})
            self.kill()
            await self.exited

    def stopped_waiting(self) -> None:
        """A stop came while a restart was pending."""

    def schedule_restart(self, delay: float) -> None:
        self._restart_timer = self.loop.call_later(delay, self._restart)

    def _restart(self) -> None:
        self._restart_timer = None
        if not self.stopping and not self.sup.stopping:
            self.start()


class WorkerProcess(Child):
    """One model version on one device: the process, its wake eventfd, the
    ring it has for each front."""

    def __init__(self, sup: "Supervisor", model_cfg, index: int, device: str, threads: int):
        super().__init__(sup)
        self.cfg = model_cfg
        self.key = (model_cfg.name, model_cfg.version)
        self.index = index
        self.device = device
        self.threads = threads
        self.uid = next(_uids)
        self.gen = 0
        self.state = "starting"
        self.error: str | None = None
        self.info_extra: dict = {}
        self.outputs: list[TensorDecl] | None = None
        self.single_output = True
        self.wake = -1
        self.rings: dict[str, tuple] = {}   # ring id -> (front, ring fd, done fd) until attached
        self.attached: dict[str, "FrontProcess"] = {}  # ring id -> its front
        self._start_timer: asyncio.TimerHandle | None = None
        self.start_timeout_s = sup.cfg.server.start_timeout_s

    @property
    def label(self) -> str:
        return f"{self.key[0]}@{self.key[1]}/{self.device}#{self.index}"

    @property
    def restarts(self) -> int:
        return self.backoff.restarts

    def info(self) -> dict:
        return {"state": self.state, "pid": self.pid, "restarts": self.backoff.restarts,
                "error": self.error if self.state != "ready" else None, **self.info_extra}

    def _changed(self) -> None:
        self.sup.broadcast({"cmd": "worker", "uid": self.uid, "info": self.info()})

    # -- spawn -------------------------------------------------------------------
    def start(self) -> None:
        self.gen += 1
        self.state, self.error = "loading", None
        self.info_extra = {}
        parent, child = pair()
        self.wake = os.eventfd(0, os.EFD_CLOEXEC)
        try:
            proc = spawn_worker(child.fileno(), self.wake, self.sup.workdir, self.sup.worker_env)
        except OSError as e:
            parent.close()
            os.close(self.wake)
            self.wake = -1
            self.state, self.error = "failed", f"cannot start a worker process: {e}"
            log.error("worker spawn failed", extra={"worker": self.label, "error": str(e)})
            self._changed()
            return
        finally:
            child.close()
        self._watch(proc, Channel(parent))
        self._start_timer = self.loop.call_later(self.start_timeout_s, self.start_timed_out)
        self.send({"cmd": "load", "spec": spec_for(self.cfg, self.device, self.threads).to_json()})
        log.info("worker started", extra={"worker": self.label, "pid": self.pid,
                                          "generation": self.gen})
        self._changed()

    def start_timed_out(self, timeout_s: float | None = None) -> None:
        """Not ready in time: failed, and killed (a hung load would not obey a stop)."""
        if self._start_timer is not None:
            self._start_timer.cancel()
            self._start_timer = None
        if self.state in ("loading", "warming"):
            self.state = "failed"
            self.error = (f"did not become ready within {timeout_s or self.start_timeout_s} s "
                          "(server.start_timeout_s); a slow compile or load? raise it")
            log.error("worker start timed out", extra={"worker": self.label, "pid": self.pid})
            self.kill()
            self._changed()

    def on_message(self, msg: dict, fds: list[int]) -> None:
        for fd in fds:
            os.close(fd)
        ev = msg.get("event")
        if ev == "loaded":
            self.outputs = [TensorDecl.from_json(t) for t in msg["outputs"]]
            self.single_output = msg.get("single_output", True)
            self.info_extra.update(hash=msg.get("hash"), compile=msg.get("compile"))
            self.state = "warming"
            self._changed()
            for front in self.sup.live_fronts():
                self.add_front(front)
        elif ev in ("ready", "attached"):
            if ev == "ready":
                if self._start_timer is not None:
                    self._start_timer.cancel()
                    self._start_timer = None
                self.state = "ready"
                self.backoff.ready_at = time.monotonic()
                self.info_extra.update(pinned=msg.get("pinned"), compiled=msg.get("compiled"))
                log.info("worker ready", extra={"worker": self.label, "pid": self.pid,
                                                "warmup_s": msg.get("warmup_s"),
                                                **self.info_extra})
            self._hand_over(msg["ring"])
            if ev == "ready":
                self._changed()
                self.sup.worker_ready(self)
        elif ev == "attach_failed":
            log.error("worker could not attach a ring", extra={"worker": self.label, **msg})
        elif ev == "detached":
            self.attached.pop(msg.get("ring"), None)
        elif ev == "stats":
            self.info_extra.update(h2d=msg.get("h2d"), compiled=msg.get("compiled"))
            self._changed()
        elif ev == "failed":
            self.state, self.error = "failed", msg.get("error", "unknown load error")
            self._changed()

    # -- rings -------------------------------------------------------------------
    def add_front(self, front: "FrontProcess") -> None:
        """Make a ring for ``front`` and give it to the worker; the front
        gets it (``_hand_over``) once the worker has mapped it."""
        if self.outputs is None or self.chan is None:
            return
        c = self.cfg
        layout = RingLayout(c.inflight_batches, c.max_batch, [s.nbytes for _, s in c.inputs],
                            [t.nbytes for t in self.outputs])
        ring_id = f"ringserve-{c.name}-{c.version}-{self.index}-w{self.uid}g{self.gen}-{front.label}"
        try:
            ring, ring_fd = Ring.create_anonymous(ring_id, layout)
        except OSError as e:
            self.state = "failed"
            self.error = f"cannot create shared memory ({layout.total_bytes} bytes): {e}"
            self.kill()
            self._changed()
            return
        ring.close()  # the memfd keeps it; the supervisor never touches ring memory
        done = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self.rings[ring_id] = (front, ring_fd, done)
        if not self.send({"cmd": "attach", "ring": ring_id}, (ring_fd, done)):
            self._drop_ring(ring_id)

    def _hand_over(self, ring_id: str) -> None:
        front, ring_fd, done = self.rings.pop(ring_id, (None, -1, -1))
        if front is None:
            return
        try:
            if front.alive:
                self.attached[ring_id] = front
                front.send({"cmd": "port", "uid": self.uid, "ring": ring_id, "info": self.info(),
                            "outputs": self.outputs, "single_output": self.single_output},
                           (ring_fd, self.wake, done))
            else:
                self.send({"cmd": "detach", "ring": ring_id})
        finally:
            os.close(ring_fd)
            os.close(done)

    def _drop_ring(self, ring_id: str) -> None:
        _, ring_fd, done = self.rings.pop(ring_id)
        os.close(ring_fd)
        os.close(done)

    def front_gone(self, front: "FrontProcess") -> None:
        for ring_id, f in list(self.attached.items()):
            if f is front:
                del self.attached[ring_id]
                self.send({"cmd": "detach", "ring": ring_id})

    # -- death -------------------------------------------------------------------
    def on_exit(self, rc: int) -> None:
        prev = self.state
        if self._start_timer is not None:
            self._start_timer.cancel()
            self._start_timer = None
        for ring_id in list(self.rings):
            self._drop_ring(ring_id)
        self.attached.clear()
        if self.wake >= 0:
            os.close(self.wake)
            self.wake = -1
        why = (f"worker {self.label} (pid {self.pid}) exited with code {rc} while running this "
               "request; it was not answered by the model, retry")
        if self.stopping or self.sup.stopping:
            self.state = "stopped"
        elif prev == "failed" or rc == EXIT_LOAD_FAILED:
            self.state = "failed"
            self.error = self.error or f"worker exited with code {rc} while loading"
            log.error("worker failed to load; not restarting",
                      extra={"worker": self.label, "pid": self.pid, "error": self.error})
        else:
            delay = self.backoff.next_delay(self.sup.cfg.server.restart_backoff_max_s)
            self.state = "restarting"
            self.error = f"worker exited with code {rc}; restarting in {delay:.1f} s"
            log.error("worker died; restarting", extra={
                "worker": self.label, "pid": self.pid, "code": rc, "was": prev,
                "restart_in_s": delay})
            self.schedule_restart(delay)
        self.sup.broadcast({"cmd": "port_down", "uid": self.uid, "why": why,
                            "info": self.info()})

    def stopped_waiting(self) -> None:
        self.state = "stopped"
        self._changed()


class FrontProcess(Child):
    """One front: its process and its heartbeat."""

    def __init__(self, sup: "Supervisor", slot: int):
        super().__init__(sup)
        self.slot = slot
        self.gen = 0
        self.alive = False       # started and not yet reaped
        self.listening = False
        self.failed: str | None = None
        self.last_beat = 0.0
        self.drained: asyncio.Future | None = None
        self.retired: asyncio.Future | None = None

    @property
    def label(self) -> str:
        return f"f{self.slot}g{self.gen}"

    def start(self) -> None:
        self.gen += 1
        sup = self.sup
        parent, child = pair()
        env = {**sup.worker_env, PARENT_ENV: str(os.getpid())}
        try:
            proc = subprocess.Popen(
                [sys.executable, "-m", "daemon.front", "--ctrl-fd", str(child.fileno())],
                pass_fds=(child.fileno(),), stdin=subprocess.DEVNULL, cwd=sup.workdir, env=env,
                start_new_session=True)
        except OSError as e:
            parent.close()
            self.failed = f"cannot start a front process: {e}"
            log.error("front spawn failed", extra={"front": self.label, "error": str(e)})
            return
        finally:
            child.close()
        self._watch(proc, Channel(parent))
        self.alive, self.listening = True, False
        self.last_beat = time.monotonic()
        self.tally_seq = 0
        sup.conn_counts[self.slot] = 0
        self.send({"cmd": "start", "cfg": sup.cfg, "slot": self.slot, "fronts": sup.n_fronts,
                   "port": sup.port, "workers": sup.worker_ids(),
                   "infos": {w.uid: w.info() for w in sup.all_workers()},
                   "routing": sup.routing(), "rid_block": sup.rollouts.take_rid_block(self.slot)},
                  (sup.conn_fd,))
        if sup.preparing is not None:
            self.send(sup.preparing)
        for w in sup.all_workers():
            if w.outputs is not None:
                w.add_front(self)
        log.info("front started", extra={"front": self.label, "pid": self.pid})

    def on_message(self, msg: dict, fds: list[int]) -> None:
        for fd in fds:
            os.close(fd)
        ev = msg.get("event")
        self.last_beat = time.monotonic()
        sup = self.sup
        if ev == "beat":
            sup.figures.update(self.slot, msg["figures"])
        elif ev == "tally":
            if msg["seq"] > self.tally_seq:  # a front's reports are counted once, in order
                self.tally_seq = msg["seq"]
                for model, (stage_id, lanes, routed) in msg["tallies"].items():
                    sup.rollouts.absorb(model, stage_id, lanes, routed)
        elif ev == "figures":
            sup.figures.update(self.slot, msg["figures"])
            sup.got_figures(msg["token"], self.slot)
        elif ev == "stats":
            self.loop.create_task(sup.answer_stats(self, msg))
        elif ev == "feedback":
            self.loop.create_task(sup.relay_feedback(self, msg))
        elif ev == "joined":
            sup.got_join(msg["token"], msg["answer"])
        elif ev == "decision":
            sup.rollouts.log.write(dict(msg["record"], front=self.slot))
        elif ev == "spent":
            for f in sup.live_fronts():
                if f is not self:
                    f.send({"cmd": "spent", "spent": msg["spent"]})
        elif ev == "rid_block":
            sup.rollouts.rid_block_used(self.slot, msg["next"])
        elif ev == "listening":
            self.listening = True
            self.backoff.ready_at = time.monotonic()
            sup.front_listening(self)
        elif ev == "retired" and self.retired is not None and not self.retired.done():
            self.retired.set_result(msg)

    def on_exit(self, rc: int) -> None:
        self.alive = self.listening = False
        self.sup.conn_counts[self.slot] = 0  # its connections are gone with it
        self.sup.figures.front_died(self.slot)
        self.sup.front_gone(self)
        for w in self.sup.all_workers():
            w.front_gone(self)
        if self.stopping or self.sup.stopping:
            return
        if rc == EXIT_BOOT_FAILED:
            self.failed = f"front {self.label} could not start serving (exit {rc}); see its log"
            log.error("front failed to boot; not restarting", extra={"front": self.label})
            self.sup.front_failed(self)
            return
        delay = self.backoff.next_delay(self.sup.cfg.server.restart_backoff_max_s)
        log.error("front died; restarting", extra={"front": self.label, "pid": self.pid,
                                                   "code": rc, "restart_in_s": delay})
        self.schedule_restart(delay)


class PortLock:
    """One daemon per address: an flock'd file per host and port, plus a
    bound (not listening) SO_REUSEPORT socket that holds the port, so that
    ``port = 0`` is picked once for every front, and a process that is not
    ours is seen at once. Without the lock a second daemon would silently
    share the port's traffic (SO_REUSEPORT lets it bind)."""

    def __init__(self, host: str, port: int):
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.lock_fd = -1
        try:
            self.sock.bind((host, port))
            self.port = self.sock.getsockname()[1]
            path = os.path.join(tempfile.gettempdir(), f"ringserve-{host}-{self.port}.lock")
            self.path = path
            self.lock_fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(self.lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                other = os.pread(self.lock_fd, 32, 0).decode(errors="replace").strip()
                raise OSError(f"another ringserve daemon (pid {other or '?'}) serves "
                              f"{host}:{self.port} (lock {path}); stop it or choose another "
                              "port") from None
            os.ftruncate(self.lock_fd, 0)
            os.pwrite(self.lock_fd, f"{os.getpid()}\n".encode(), 0)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        self.sock.close()
        if self.lock_fd >= 0:
            os.close(self.lock_fd)
            self.lock_fd = -1


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
        # Every front's open connections (daemon/server.py machine_conns).
        self.conn_seg, self.conn_fd = Segment.anonymous("ringserve-connections", CONN_PAGE_BYTES)
        self.conn_counts = self.conn_seg.buf.cast("Q")
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
                if w.state != "ready" or len(set(map(id, w.attached.values()))) < len(fronts):
                    return False
        return True

    def degraded(self) -> bool:
        """Some version with a fallback has no ready worker: its requests are
        answered by the fallback alone (daemon/fallback.py)."""
        def ready(name: str, version: str) -> bool:
            return any(w.state == "ready" for w in self.workers.get((name, version), ()))

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
        for token, (fut, waiting) in list(self._gathers.items()):
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
        if all(x.state == "ready" for x in self.all_workers()):
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

        while any(w.state not in ("ready", "failed") or (w.state == "ready" and not attached(w))
                  for w in workers) and time.monotonic() < t_end:
            await asyncio.sleep(0.02)
        for w in (w for w in workers if w.state in ("loading", "warming")):
            w.start_timed_out(timeout_s)
        return [f"{w.label}: {w.error or w.state}" for w in workers if w.state != "ready"]

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
