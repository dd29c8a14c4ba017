"""The front's side of each worker process: spawn, talk, hand over batches,
notice death, restart.

A ``WorkerHandle`` owns everything one worker generation needs: the process,
its control socket, the two eventfds and the ring segment. The front creates
the segment (after the worker has said what its outputs look like, which
fixes the slot size) and unlinks it on every exit path of the worker: a
clean stop, a crash, a kill -9, a failed load.

Restart policy (after gunicorn's arbiter): a worker that cannot load its
model exits with ``EXIT_LOAD_FAILED``; it is reported in ``health`` with the
error and not restarted, since it would fail the same way. Any other death
is a crash: its in-flight requests are answered UNAVAILABLE at once and it is
restarted after an exponential backoff (0.5 s doubling, capped by
``server.restart_backoff_max_s``), reset once a generation has served for a
minute.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import json
import logging
import os
import signal
import socket
import time

from ipc.ring import Ring, RingLayout
from ipc.status import Status
from ipc.tensors import non_finite_rows, not_finite_error

from .fallback import NO_WORKER
from .spec import TensorDecl, spawn_worker, spec_for
from .stats import BusyMeter
from .worker import EXIT_LOAD_FAILED

log = logging.getLogger("ringserve.supervisor")
_ONE = (1).to_bytes(8, "little")
_handle_ids = itertools.count(1)
STABLE_AFTER_S = 60.0
STOP_GRACE_S = 10.0
UNAVAILABLE = int(Status.UNAVAILABLE)


class WorkerHandle:
    def __init__(self, app, queue, index: int, device: str, threads: int):
        self.app = app
        self.loop = app.loop
        self.queue = queue
        self.index = index
        self.device = device
        self.threads = threads
        self.state = "starting"
        self.error = None
        self.hash = None
        self.compile = None
        self.pinned = None    # the worker's ring registered with CUDA (False on CPU)
        self.compiled = None  # torch.compile's counts, {"graphs", "cudagraph_skips"}
        self.h2d = None       # CUDA: input copy time per batch (runtime.H2DTimes)
        self.pid = None
        self.gen = 0
        self.uid = next(_handle_ids)  # a reload may run two handles of one version at once
        self.restarts = 0
        self.failures = 0  # consecutive crashes, for the backoff
        self.ready_at = 0.0
        self.busy = BusyMeter()
        self.batches = 0
        self.proc = None
        self.ring = None
        self.inflight: collections.deque = collections.deque()
        self.free_slots = 0
        self._ctrl = None
        self._ctrl_buf = b""
        self._pidfd = -1
        self._wake = -1
        self._done = -1
        self._start_timer = None
        self._restart_timer = None
        self._exited: asyncio.Future | None = None
        self._stopping = False
        self._seq = 0

    @property
    def label(self) -> str:
        return f"{self.queue.name}@{self.queue.version}/{self.device}#{self.index}"

    @property
    def in_flight(self) -> int:
        return len(self.inflight)

    # -- spawn ---------------------------------------------------------------
    def start(self) -> None:
        self.gen += 1
        self._restart_timer = None
        self.state = "loading"
        self.error = None
        self.pinned = self.compiled = self.h2d = None  # this generation's, once it reports
        parent, child = socket.socketpair()
        self._wake = os.eventfd(0, os.EFD_CLOEXEC)  # the worker blocks on it
        self._done = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        try:
            self.proc = spawn_worker(child.fileno(), self._wake, self._done, self.app.workdir,
                                     self.app.worker_env)
        except OSError as e:
            child.close()
            parent.close()
            self._close_fds()
            self.state = "failed"
            self.error = f"cannot start a worker process: {e}"
            log.error("worker spawn failed", extra={"worker": self.label, "error": str(e)})
            return
        child.close()
        self.pid = self.proc.pid
        self._exited = self.loop.create_future()
        parent.setblocking(False)
        self._ctrl = parent
        self.loop.add_reader(parent.fileno(), self._on_ctrl)
        self._pidfd = os.pidfd_open(self.pid)
        self.loop.add_reader(self._pidfd, self._on_exit)
        self._start_timer = self.loop.call_later(self.app.cfg.server.start_timeout_s, self._start_timed_out)
        spec = spec_for(self.queue.cfg, self.device, self.threads)
        self._send({"cmd": "load", "spec": spec.to_json()})
        log.info("worker started", extra={"worker": self.label, "pid": self.pid, "generation": self.gen})

    def _send(self, msg: dict) -> None:
        try:
            self._ctrl.sendall((json.dumps(msg) + "\n").encode())
        except (OSError, AttributeError):
            pass  # the pidfd reader reports the death

    def _on_ctrl(self) -> None:
        try:
            data = self._ctrl.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self.loop.remove_reader(self._ctrl.fileno())
            return
        self._ctrl_buf += data
        while b"\n" in self._ctrl_buf:
            line, self._ctrl_buf = self._ctrl_buf.split(b"\n", 1)
            try:
                msg = json.loads(line)
            except ValueError:
                continue
            self._on_event(msg)

    def _on_event(self, msg: dict) -> None:
        ev = msg.get("event")
        if ev == "loaded":
            self._attach(msg)
        elif ev == "ready":
            self._ready(msg)
        elif ev == "stats":
            self.h2d = msg.get("h2d")
            self.compiled = msg.get("compiled")
        elif ev == "failed":
            self.state = "failed"
            self.error = msg.get("error", "unknown load error")

    def _attach(self, msg: dict) -> None:
        outputs = [TensorDecl.from_json(t) for t in msg["outputs"]]
        self.hash = msg.get("hash")
        self.compile = msg.get("compile")
        q = self.queue
        q.set_outputs(outputs, msg.get("single_output", True))
        cfg = q.cfg
        layout = RingLayout(cfg.inflight_batches, cfg.max_batch,
                            [spec.nbytes for _, spec in cfg.inputs], [t.nbytes for t in outputs])
        name = f"ringserve-{os.getpid()}-{q.name}-{q.version}-{self.index}-h{self.uid}-g{self.gen}"
        try:
            self.ring = Ring.create(name, layout)
        except OSError as e:
            self.error = f"cannot create shared memory {name!r} ({layout.total_bytes} bytes): {e}"
            self.state = "failed"
            self._kill()
            return
        depth = layout.depth
        self.in_mv = [[self.ring.input_view(s, k) for k in range(len(layout.input_nbytes))]
                      for s in range(depth)]
        self.out_mv = [[self.ring.output_view(s, k) for k in range(len(outputs))]
                       for s in range(depth)]
        self.in_nbytes = layout.input_nbytes
        self.out_nbytes = layout.output_nbytes
        self.state = "warming"
        self._send({"cmd": "attach", "ring": name})

    def _ready(self, msg: dict) -> None:
        if self._start_timer is not None:
            self._start_timer.cancel()
            self._start_timer = None
        self.state = "ready"
        self.ready_at = time.monotonic()
        self.free_slots = self.ring.layout.depth
        self.pinned = msg.get("pinned")
        self.compiled = msg.get("compiled")
        self.loop.add_reader(self._done, self._on_done)
        log.info("worker ready", extra={"worker": self.label, "pid": self.pid,
                                        "warmup_s": msg.get("warmup_s"), "hash": self.hash,
                                        "compile": self.compile, "compiled": self.compiled,
                                        "pinned": self.pinned})
        self.queue.worker_changed()
        self.app.worker_ready(self)

    def _start_timed_out(self, timeout_s: float | None = None) -> None:
        """Not ready in time: failed, and killed (a hung load would not obey
        a stop). ``timeout_s``: a reload's, whose file is not app.cfg yet."""
        if self._start_timer is not None:
            self._start_timer.cancel()  # a no-op when it is the one firing
            self._start_timer = None
        if self.state in ("loading", "warming"):
            self.state = "failed"
            self.error = (f"did not become ready within "
                          f"{timeout_s or self.app.cfg.server.start_timeout_s} s "
                          "(server.start_timeout_s); a slow compile or load? raise it")
            log.error("worker start timed out", extra={"worker": self.label, "pid": self.pid})
            self._kill()

    # -- hot path --------------------------------------------------------------
    def submit_batch(self, batch: list, bucket: int) -> None:
        ring = self.ring
        slot = ring.next_slot()
        for k, mv in enumerate(self.in_mv[slot]):
            nb = self.in_nbytes[k]
            off = 0
            for r in batch:
                mv[off:off + nb] = r.data[k]  # the one copy: frame bytes -> shared memory
                off += nb
        if self.queue.finite_checks:
            self._refuse_non_finite(batch, slot)
        for r in batch:
            r.dispatched = 1
            r.data = None  # in shared memory now: let the frame bytes go
        now = time.monotonic_ns()
        self._seq += 1
        ring.submit(self._seq, len(batch), bucket, now)
        self.inflight.append((batch, now, bucket))
        self.free_slots -= 1
        os.write(self._wake, _ONE)

    def _refuse_non_finite(self, batch: list, slot: int) -> None:
        """The NaN/Inf check of float inputs, once per batch on the slot
        (``decode_inputs(defer_finite=True)`` skipped it per request). A bad
        row is answered INVALID_ARGUMENT at once, exactly as the per-request
        check would have (counted as rejected, not as the model's answer), and
        zeroed, so the model never sees it; its result is never read."""
        n = len(batch)
        views = self.in_mv[slot]
        for k, dtype, elems, where in self.queue.finite_checks:
            bad = non_finite_rows(views[k], dtype, n, elems)
            nb = self.in_nbytes[k]
            for row, (index, value) in bad.items():
                views[k][row * nb:(row + 1) * nb] = bytes(nb)
                r = batch[row]
                if not r.done:
                    e = not_finite_error(index, value, where)
                    self.app.count_rejected(int(e.status))
                    self.queue.refuse(r, e)

    def _on_done(self) -> None:
        try:
            os.read(self._done, 8)
        except BlockingIOError:
            pass
        ring = self.ring
        if ring is None:
            return
        completed = ring.completed()
        depth = ring.layout.depth
        q = self.queue
        while ring.consumed < completed and self.inflight:
            slot = ring.consumed % depth
            batch, t_sub, bucket = self.inflight.popleft()
            _, n, status, compute_ns, err = ring.result(slot)
            self.busy.add(compute_ns)
            self.batches += 1
            try:
                q.complete_batch(batch, self.out_mv[slot], self.out_nbytes, status, compute_ns,
                                 err, t_sub, bucket)
            except Exception:
                # A bug of ours must not leave the slot taken (the next batch
                # would read this one's results) nor its callers unanswered.
                log.exception("completing a batch failed", extra={"worker": self.label})
                for r in batch:
                    r.answer_error(int(Status.INTERNAL), "internal server error while "
                                   "answering this batch; it is logged, please report it")
            finally:
                ring.release()
                self.free_slots += 1
        if self.failures and time.monotonic() - self.ready_at > STABLE_AFTER_S:
            self.failures = 0
        q.dispatch()

    # -- death and stop ----------------------------------------------------------
    def _on_exit(self) -> None:
        self.loop.remove_reader(self._pidfd)
        os.close(self._pidfd)
        self._pidfd = -1
        rc = self.proc.wait()
        prev = self.state
        if self._start_timer is not None:
            self._start_timer.cancel()
            self._start_timer = None
        lost = 0
        why = (f"worker {self.label} (pid {self.pid}) exited with code {rc} while running this "
               "request; it was not answered by the model, retry")
        for batch, _, _ in self.inflight:
            for r in batch:
                if not r.done:
                    lost += 1
                    self.queue.fail(r, UNAVAILABLE, why, NO_WORKER)  # or its fallback answers
        self.inflight.clear()
        self.free_slots = 0
        self._teardown()
        if self._stopping or self.app.stopping:
            self.state = "stopped"
        elif prev == "failed" or rc == EXIT_LOAD_FAILED:
            self.state = "failed"
            self.error = self.error or f"worker exited with code {rc} while loading"
            log.error("worker failed to load; not restarting",
                      extra={"worker": self.label, "pid": self.pid, "error": self.error})
        else:
            self.failures += 1
            self.restarts += 1
            delay = min(self.app.cfg.server.restart_backoff_max_s, 0.5 * 2 ** (self.failures - 1))
            self.state = "restarting"
            self.error = f"worker exited with code {rc}; restarting in {delay:.1f} s"
            log.error("worker died; restarting", extra={
                "worker": self.label, "pid": self.pid, "code": rc, "was": prev,
                "lost_requests": lost, "restart_in_s": delay})
            self._restart_timer = self.loop.call_later(delay, self.start)
        if not self._exited.done():
            self._exited.set_result(rc)
        self.queue.worker_changed()

    def _teardown(self) -> None:
        if self._ctrl is not None:
            try:
                self.loop.remove_reader(self._ctrl.fileno())
            except (ValueError, OSError):
                pass
            self._ctrl.close()
            self._ctrl = None
        if self._done >= 0:
            self.loop.remove_reader(self._done)
        if self.ring is not None:
            self.in_mv = self.out_mv = None
            self.ring.close()
            self.ring.unlink()
            self.ring = None
        self._close_fds()

    def _close_fds(self) -> None:
        for fd in (self._wake, self._done):
            if fd >= 0:
                os.close(fd)
        self._wake = self._done = -1

    def _kill(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            try:
                self.proc.send_signal(signal.SIGKILL)
            except ProcessLookupError:
                pass

    async def stop(self, grace_s: float = STOP_GRACE_S) -> None:
        """Ask the worker to finish what it holds and exit; SIGKILL after the
        grace period."""
        self._stopping = True
        if self._restart_timer is not None:
            self._restart_timer.cancel()
            self._restart_timer = None
            self.state = "stopped"
        if self.proc is None or self._exited is None or self._exited.done():
            return
        self._send({"cmd": "stop"})
        try:
            await asyncio.wait_for(asyncio.shield(self._exited), grace_s)
        except asyncio.TimeoutError:
            log.warning("worker did not stop in time; killing", extra={"worker": self.label})
            self._kill()
            await self._exited

    def health(self) -> dict:
        # The metadata the front validated: the worker refuses to load unless
        # the file still has this hash (daemon/runtime.py).
        meta = self.queue.cfg.metadata
        d = {"name": self.queue.name, "version": self.queue.version, "lane": self.queue.lane,
             "hash": self.hash, "device": self.device, "ready": self.state == "ready",
             "state": self.state, "pid": self.pid, "restarts": self.restarts,
             "data_version": self.queue.data_version,
             "metadata_hash": meta.hash if meta is not None else None}
        d["compile"] = self.compile   # the mode in force: "auto" resolved
        d["pinned"] = self.pinned     # null until ready
        if self.error and self.state != "ready":
            d["error"] = self.error
        return d

    def stats(self) -> dict:
        return {"device": self.device, "pid": self.pid, "state": self.state,
                "busy": self.busy.fraction(), "batches": self.batches, "restarts": self.restarts,
                "in_flight_batches": self.in_flight, "compile": self.compile,
                "compiled": self.compiled, "pinned": self.pinned, "h2d": self.h2d}
