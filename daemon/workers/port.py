"""A front's port to one worker: its ring, its eventfds, the batches in it.

The worker process itself belongs to the supervisor (``daemon/supervisor/children.py``),
which tells each front, over the front's control channel, what became of it:

- ``attach(ring_fd, wake_fd, done_fd, ...)``: the worker is ready and has
  mapped a ring made for this front; from now on batches go to it.
- ``update(info)``: its state, pid, restarts, error and figures changed
  (shown by ``health`` and ``stats``; the rollout controller reads
  ``state`` and ``restarts``).
- ``down(why)``: the worker process ended; what this front had in its ring is
  answered UNAVAILABLE (or by the model's fallback) at once.

Nothing here starts, stops or waits on a process, which is also what lets the
queue and dispatch policy be tested with a port and no worker behind it.
"""

from __future__ import annotations

import collections
import logging
import os
import time

from ipc.ring import Ring
from ipc.status import Status
from ipc.tensors import non_finite_rows, not_finite_error

from ..observe.stats import BusyMeter
from ..serving.fallback import NO_WORKER
from .state import WorkerState
from .status import StatusPage

log = logging.getLogger("ringserve.port")
_ONE = (1).to_bytes(8, "little")
UNAVAILABLE = int(Status.UNAVAILABLE)


class WorkerPort:
    def __init__(self, loop, queue, index: int, device: str, uid: int, count_rejected):
        self.loop = loop
        self.queue = queue
        self.index = index
        self.device = device
        self.uid = uid  # the supervisor's id of this worker (one per version, device, reload)
        self.count_rejected = count_rejected
        self.info: dict = {"state": "starting"}
        self.busy = BusyMeter()
        self.batches = 0
        self.ring: Ring | None = None
        self.status: StatusPage | None = None
        self.inflight: collections.deque = collections.deque()
        self.free_slots = 0
        self.in_mv = self.out_mv = None
        self.in_nbytes = self.out_nbytes = ()
        self._wake = -1
        self._done = -1
        self._seq = 0

    @property
    def label(self) -> str:
        return f"{self.queue.name}@{self.queue.version}/{self.device}#{self.index}"

    @property
    def state(self) -> WorkerState:
        if self.ring is not None:
            return WorkerState.READY
        s = WorkerState(self.info.get("state", WorkerState.STARTING))
        # ready, but this front's ring is not mapped yet
        return WorkerState.WARMING if s == WorkerState.READY else s

    @property
    def restarts(self) -> int:
        return self.info.get("restarts", 0)

    @property
    def error(self) -> str | None:
        return self.info.get("error")

    @property
    def in_flight(self) -> int:
        return len(self.inflight)

    @property
    def busy_elsewhere(self) -> bool:
        """The worker runs another front's batch (this port has none in it)."""
        return self.status is not None and self.status.busy

    # -- what the supervisor says ------------------------------------------------
    def update(self, info: dict) -> None:
        was = self.state
        self.info = info
        if self.state != was:
            self.queue.worker_changed()

    def attach(self, ring_fd: int, wake_fd: int, done_fd: int, ring_id: str, info: dict,
               outputs, single_output: bool, status_fd: int = -1) -> None:
        """``status_fd``: the worker's status page (daemon/workers/status.py);
        -1 (in-process use, tests): the worker counts as idle whenever this
        port has nothing in its ring."""
        if self.ring is not None:
            self.down("the worker was attached again")
        try:
            ring = Ring.from_fd(ring_fd, ring_id)
        except BaseException:
            for fd in (wake_fd, done_fd, status_fd):
                if fd >= 0:
                    os.close(fd)
            raise
        if self.status is not None:
            self.status.close()
        self.status = StatusPage(status_fd) if status_fd >= 0 else None
        self.queue.set_outputs(outputs, single_output)
        lay = ring.layout
        self.in_mv = [[ring.input_view(s, k) for k in range(len(lay.input_nbytes))]
                      for s in range(lay.depth)]
        self.out_mv = [[ring.output_view(s, k) for k in range(len(lay.output_nbytes))]
                       for s in range(lay.depth)]
        self.in_nbytes = lay.input_nbytes
        self.out_nbytes = lay.output_nbytes
        self.ring = ring
        self._wake, self._done = wake_fd, done_fd
        self.free_slots = lay.depth
        self.info = info
        self.ready_at = time.monotonic()
        self.loop.add_reader(done_fd, self._on_done)
        self.queue.worker_changed()

    def down(self, why: str) -> int:
        """The worker is gone: answer what it held, drop the ring. Returns
        how many requests were answered for it."""
        lost = 0
        for batch, _, _ in self.inflight:
            for r in batch:
                if not r.done:
                    lost += 1
                    self.queue.fail(r, UNAVAILABLE, why, NO_WORKER)  # or its fallback answers
        self.inflight.clear()
        self.free_slots = 0
        self.close()
        self.queue.worker_changed()
        return lost

    def close(self) -> None:
        if self._done >= 0:
            try:
                self.loop.remove_reader(self._done)
            except (ValueError, OSError):
                pass
        if self.ring is not None:
            self.in_mv = self.out_mv = None
            self.ring.close()
            self.ring = None
        for fd in (self._wake, self._done):
            if fd >= 0:
                os.close(fd)
        self._wake = self._done = -1
        if self.status is not None:
            self.status.close()
            self.status = None

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
                    self.count_rejected(int(e.status))
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
            ran, ran_bucket, lead = ring.ran(slot)
            if lead:  # one front of a merged pass counts it (daemon/workers/child.py)
                self.busy.add(compute_ns)
                self.batches += 1
            try:
                q.complete_batch(batch, self.out_mv[slot], self.out_nbytes, status, compute_ns,
                                 err, t_sub, bucket, ran, ran_bucket or bucket, lead)
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
        q.dispatch()

    # -- reports -----------------------------------------------------------------
    def health(self) -> dict:
        # The metadata the config validated: the worker refuses to load unless
        # the file still has this hash (daemon/workers/runtime.py).
        meta = self.queue.cfg.metadata
        i = self.info
        d = {"name": self.queue.name, "version": self.queue.version, "lane": self.queue.lane,
             "hash": i.get("hash"), "device": self.device, "ready": self.state == WorkerState.READY,
             "state": self.state, "pid": i.get("pid"), "restarts": self.restarts,
             "data_version": self.queue.data_version,
             "metadata_hash": meta.hash if meta is not None else None}
        d["compile"] = i.get("compile")   # the mode in force: "auto" resolved
        d["pinned"] = i.get("pinned")     # null until ready
        if self.error and self.state != WorkerState.READY:
            d["error"] = self.error
        return d

    def stats(self) -> dict:
        i = self.info
        return {"device": self.device, "pid": i.get("pid"), "state": self.state,
                "busy": self.busy.fraction(), "batches": self.batches, "restarts": self.restarts,
                "in_flight_batches": self.in_flight, "compile": i.get("compile"),
                "compiled": i.get("compiled"), "pinned": i.get("pinned"), "h2d": i.get("h2d")}
