"""The supervisor's children: a worker process (one model version on one
device) and a front process, with what they share (a process, its control
channel and pidfd, restarts after a backoff). The supervisor that owns them
is daemon/supervisor/arbiter.py."""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import signal
import subprocess
import sys
import time
from typing import TYPE_CHECKING

from ipc.control import BadMessage, Channel, ChannelClosed, pair
from ipc.ring import Ring, RingLayout
from ipc.shm import Segment

from ..workers.child import EXIT_LOAD_FAILED
from ..workers.lifeline import EXIT_BOOT_FAILED, PARENT_ENV
from ..workers.spec import TensorDecl, spawn_worker, spec_for
from ..workers.state import WorkerState
from ..workers.status import STATUS_PAGE_BYTES

if TYPE_CHECKING:  # pragma: no cover
    from .arbiter import Supervisor


log = logging.getLogger("ringserve.supervisor")
STABLE_AFTER_S = 60.0
_uids = itertools.count(1)


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
            except BadMessage as e:
                log.error(str(e), extra={"child": self.label})
                continue
            except (ChannelClosed, OSError):
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
        self.state = WorkerState.STARTING
        self.error: str | None = None
        self.info_extra: dict = {}
        self.outputs: list[TensorDecl] | None = None
        self.single_output = True
        self.wake = -1
        self.status_fd = -1
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
                "error": self.error if self.state != WorkerState.READY else None, **self.info_extra}

    def _changed(self) -> None:
        self.sup.broadcast({"cmd": "worker", "uid": self.uid, "info": self.info()})

    # -- spawn -------------------------------------------------------------------
    def start(self) -> None:
        self.gen += 1
        self.state, self.error = WorkerState.LOADING, None
        self.info_extra = {}
        self.outputs = None  # this generation's, once it has loaded
        parent, child = pair()
        self.wake = os.eventfd(0, os.EFD_CLOEXEC)
        # The worker's status page (daemon/workers/status.py): it says there
        # when it runs a batch, and every front reads it to know whether the
        # worker is idle machine-wide, not only for its own ring.
        page, self.status_fd = Segment.anonymous(f"ringserve-status-w{self.uid}g{self.gen}",
                                                 STATUS_PAGE_BYTES)
        page.close()
        try:
            proc = spawn_worker(child.fileno(), self.wake, self.sup.workdir, self.sup.worker_env)
        except OSError as e:
            parent.close()
            os.close(self.wake)
            os.close(self.status_fd)
            self.wake = self.status_fd = -1
            self.state, self.error = WorkerState.FAILED, f"cannot start a worker process: {e}"
            log.error("worker spawn failed", extra={"worker": self.label, "error": str(e)})
            self._changed()
            return
        finally:
            child.close()
        self._watch(proc, Channel(parent))
        self._start_timer = self.loop.call_later(self.start_timeout_s, self.start_timed_out)
        self.send({"cmd": "load", "spec": spec_for(self.cfg, self.device, self.threads).to_json()},
                  (self.status_fd,))
        log.info("worker started", extra={"worker": self.label, "pid": self.pid,
                                          "generation": self.gen})
        self._changed()

    def start_timed_out(self, timeout_s: float | None = None) -> None:
        """Not ready in time: failed, and killed (a hung load would not obey a stop)."""
        if self._start_timer is not None:
            self._start_timer.cancel()
            self._start_timer = None
        if self.state in (WorkerState.LOADING, WorkerState.WARMING):
            self.state = WorkerState.FAILED
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
            self.state = WorkerState.WARMING
            self._changed()
            for front in self.sup.live_fronts():
                self.add_front(front)
        elif ev in ("ready", "attached"):
            if ev == "ready":
                if self._start_timer is not None:
                    self._start_timer.cancel()
                    self._start_timer = None
                self.state = WorkerState.READY
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
            self.state, self.error = WorkerState.FAILED, msg.get("error", "unknown load error")
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
        ring_id = (f"ringserve-{c.name}-{c.version}-{self.index}"
                   f"-w{self.uid}g{self.gen}-{front.label}")
        try:
            ring, ring_fd = Ring.create_anonymous(ring_id, layout)
        except OSError as e:
            self.state = WorkerState.FAILED
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
                           (ring_fd, self.wake, done, self.status_fd))
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
        for fd in (self.wake, self.status_fd):
            if fd >= 0:
                os.close(fd)
        self.wake = self.status_fd = -1
        why = (f"worker {self.label} (pid {self.pid}) exited with code {rc} while running this "
               "request; it was not answered by the model, retry")
        if self.stopping or self.sup.stopping:
            self.state = WorkerState.STOPPED
        elif prev == WorkerState.FAILED or rc == EXIT_LOAD_FAILED:
            self.state = WorkerState.FAILED
            self.error = self.error or f"worker exited with code {rc} while loading"
            log.error("worker failed to load; not restarting",
                      extra={"worker": self.label, "pid": self.pid, "error": self.error})
        else:
            delay = self.backoff.next_delay(self.sup.cfg.server.restart_backoff_max_s)
            self.state = WorkerState.RESTARTING
            self.error = f"worker exited with code {rc}; restarting in {delay:.1f} s"
            log.error("worker died; restarting", extra={
                "worker": self.label, "pid": self.pid, "code": rc, "was": prev,
                "restart_in_s": delay})
            self.schedule_restart(delay)
        self.sup.broadcast({"cmd": "port_down", "uid": self.uid, "why": why,
                            "info": self.info()})

    def stopped_waiting(self) -> None:
        self.state = WorkerState.STOPPED
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
        sup.conn_counts.forget(self.slot)
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
        self.sup.conn_counts.forget(self.slot)  # its connections are gone with it
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
