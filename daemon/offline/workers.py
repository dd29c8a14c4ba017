"""The batch job's workers: ``daemon.workers.child`` processes driven without an
event loop.

Each configured device gets one worker, started exactly as the daemon's
supervisor starts it (``python -m daemon.workers.child`` in a fresh interpreter, in
its own session, with a control channel and a wake eventfd) and spoken to in
the same control protocol (daemon/workers/child.py: load -> loaded, attach ->
ready, stop). Batches travel through one ``ipc.ring`` whose slots hold
``batch_rows`` rows: the driver writes a batch into a slot's input regions,
submits it and writes the worker's wake eventfd; the worker runs it and
writes the done eventfd. Nothing is pickled.

The ring is anonymous (a memfd handed to the worker with its done eventfd,
``ipc/shm.py``), so whichever of the two is killed, nothing is left in
``/dev/shm``.
"""

from __future__ import annotations

import os
import select
import signal
import time

import numpy as np

from ipc.control import Channel, ChannelClosed, pair
from ipc.ring import Ring, RingLayout
from ipc.tensors import NP_DTYPES

from ..workers.child import EXIT_LOAD_FAILED
from ..workers.spec import ModelSpec, TensorDecl, spawn_worker

_ONE = (1).to_bytes(8, "little")
STOP_GRACE_S = 10.0


class WorkerError(RuntimeError):
    """A worker failed to start, died, or its model raised (``seq``: on
    which batch)."""

    def __init__(self, message: str, seq: int | None = None):
        super().__init__(message)
        self.seq = seq


class BatchWorker:
    def __init__(self, spec: ModelSpec, index: int, env: dict, cwd: str):
        self.spec = spec
        self.index = index
        self.label = f"{spec.name}@{spec.version}/{spec.device}#{index}"
        self.env, self.cwd = env, cwd
        self.proc = None
        self.ring: Ring | None = None
        self.inputs: list[list[np.ndarray]] = []
        self.outputs_views: list[list[np.ndarray]] = []
        self.outputs: list[TensorDecl] = []
        self.weights_hash = ""
        self.compile = ""
        self.pending: list[int] = []     # seq of each submitted batch, oldest first
        self.compute_ns = 0              # the model's time on the batches collected
        self.stopping = False
        self.ctrl: Channel | None = None
        self.pidfd = self.wake = self.done = -1

    # -- start ------------------------------------------------------------------
    def start(self) -> None:
        parent, child = pair()
        self.wake = os.eventfd(0, os.EFD_CLOEXEC)
        self.done = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        try:
            self.proc = spawn_worker(child.fileno(), self.wake, self.cwd, self.env)
        finally:
            child.close()
        self.ctrl = Channel(parent)
        self.pidfd = os.pidfd_open(self.proc.pid)
        self._send(cmd="load", spec=self.spec.to_json())

    def _send(self, fds=(), **msg) -> None:
        try:
            self.ctrl.send(msg, fds)
        except (ChannelClosed, OSError):
            pass   # it died; the pidfd says so

    def _event(self, deadline: float) -> dict:
        """The worker's next control message, or WorkerError."""
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise WorkerError(f"worker {self.label} did not become ready in time "
                                  "(server.start_timeout_s); a slow load or compile? raise it")
            r, _, _ = select.select([self.ctrl, self.pidfd], [], [], left)
            if self.ctrl in r:
                try:
                    got = self.ctrl.recv()
                except ChannelClosed:
                    got = None
                if got is not None:
                    msg, fds = got
                    for fd in fds:
                        os.close(fd)
                    break
            if r:
                rc = self.proc.wait()
                raise WorkerError(f"worker {self.label} exited with code {rc} while starting"
                                  + (" (the model cannot be loaded)" if rc == EXIT_LOAD_FAILED
                                     else ""))
        if msg.get("event") == "failed":
            raise WorkerError(f"worker {self.label}: {msg.get('error')}")
        return msg

    def wait_loaded(self, deadline: float) -> None:
        msg = self._event(deadline)
        self.outputs = [TensorDecl.from_json(t) for t in msg["outputs"]]
        self.weights_hash = msg.get("hash", "")
        self.compile = msg.get("compile", "")

    def attach(self, depth: int, batch_rows: int) -> None:
        layout = RingLayout(depth, batch_rows, [t.nbytes for t in self.spec.inputs],
                            [t.nbytes for t in self.outputs])
        name = f"ringserve-{os.getpid()}-batch-{self.index}"
        try:
            self.ring, ring_fd = Ring.create_anonymous(name, layout)
        except OSError as e:
            raise WorkerError(f"cannot create shared memory {name!r} "
                              f"({layout.total_bytes} bytes): {e}") from None

        def view(mv, decl):
            return np.frombuffer(mv, NP_DTYPES[decl.dtype]).reshape(batch_rows, *decl.shape)

        r = self.ring
        self.inputs = [[view(r.input_view(s, k), d) for k, d in enumerate(self.spec.inputs)]
                       for s in range(depth)]
        self.outputs_views = [[view(r.output_view(s, k), d) for k, d in enumerate(self.outputs)]
                              for s in range(depth)]
        try:
            self._send(cmd="attach", ring=name, fds=(ring_fd, self.done))
        finally:
            os.close(ring_fd)

    def wait_ready(self, deadline: float) -> None:
        self._event(deadline)

    # -- hot path -------------------------------------------------------------------
    def free(self) -> int:
        return self.ring.free()

    def next_inputs(self) -> list[np.ndarray]:
        return self.inputs[self.ring.next_slot()]

    def submit(self, seq: int, n: int, bucket: int) -> None:
        self.ring.submit(seq, n, bucket, time.monotonic_ns())
        self.pending.append(seq)
        os.write(self.wake, _ONE)

    def collect(self):
        """Yield (seq, [output arrays, copied]) of each finished batch, in order."""
        try:
            os.read(self.done, 8)
        except BlockingIOError:
            pass
        ring = self.ring
        depth = ring.layout.depth
        while ring.consumed < ring.completed():
            slot = ring.consumed % depth
            seq, n, status, compute_ns, err = ring.result(slot)
            self.compute_ns += compute_ns
            if status:
                raise WorkerError(err or f"status {status}", seq)
            outs = [v[:n].copy() for v in self.outputs_views[slot]]
            ring.release()
            self.pending.pop(0)
            yield seq, outs

    def exited(self) -> int | None:
        return self.proc.poll() if self.proc is not None else None

    # -- stop -----------------------------------------------------------------------
    def join(self, deadline: float) -> None:
        """Wait for the process to exit (after ``stop``), SIGKILL past the
        deadline, and release everything."""
        if self.proc is not None and self.proc.poll() is None:
            if self.pidfd >= 0:
                select.select([self.pidfd], [], [], max(0.0, deadline - time.monotonic()))
            if self.proc.poll() is None:
                self.kill()
            self.proc.wait()
        self.close()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                self.proc.send_signal(signal.SIGKILL)
            except ProcessLookupError:
                pass

    def close(self) -> None:
        self.inputs = self.outputs_views = []
        if self.ring is not None:
            try:
                self.ring.close()
            except BufferError:
                pass   # a view is still referenced; the mapping goes with the process
            self.ring.unlink()
            self.ring = None
        if self.ctrl is not None:
            self.ctrl.close()
            self.ctrl = None
        for fd in (self.pidfd, self.wake, self.done):
            if fd >= 0:
                os.close(fd)
        self.pidfd = self.wake = self.done = -1


class WorkerPool:
    """One BatchWorker per device entry of the model, started together."""

    def __init__(self, specs: list[ModelSpec], batch_rows: int, depth: int, env: dict, cwd: str,
                 start_timeout_s: float):
        self.workers = [BatchWorker(s, i, env, cwd) for i, s in enumerate(specs)]
        self.batch_rows = batch_rows
        self.depth = depth
        self.start_timeout_s = start_timeout_s

    def start(self) -> "WorkerPool":
        deadline = time.monotonic() + self.start_timeout_s
        try:
            for w in self.workers:
                w.start()
            for w in self.workers:
                w.wait_loaded(deadline)
            first = self.workers[0]
            for w in self.workers[1:]:
                if w.outputs != first.outputs:
                    raise WorkerError(f"workers {first.label} and {w.label} disagree on the "
                                      "model's outputs")
            for w in self.workers:
                w.attach(self.depth, self.batch_rows)
            for w in self.workers:
                w.wait_ready(deadline)
        except BaseException:
            self.stop()
            raise
        return self

    @property
    def outputs(self) -> list[TensorDecl]:
        return self.workers[0].outputs

    @property
    def weights_hash(self) -> str:
        return self.workers[0].weights_hash

    def with_free_slot(self) -> BatchWorker | None:
        best = max(self.workers, key=BatchWorker.free)
        return best if best.free() > 0 else None

    def in_flight(self) -> int:
        return sum(len(w.pending) for w in self.workers)

    def wait(self, timeout: float | None = None) -> None:
        """Block until a worker finishes a batch or exits."""
        fds = [w.done for w in self.workers] + [w.pidfd for w in self.workers]
        if any(w.ring.completed() > w.ring.consumed for w in self.workers):
            return
        select.select(fds, [], [], timeout)
        for w in self.workers:
            rc = w.exited()
            if rc is not None:
                raise WorkerError(f"worker {w.label} (pid {w.proc.pid}) exited with code {rc} "
                                  "while scoring")

    def collect(self):
        for w in self.workers:
            yield from w.collect()

    def stop(self, grace_s: float = STOP_GRACE_S, wait: bool = True) -> None:
        """Ask every worker to finish what it holds and exit; with ``wait``,
        wait for them (SIGKILL after the grace period) and release the rings."""
        for w in self.workers:
            if w.proc is not None and w.proc.poll() is None and not w.stopping:
                w.stopping = True
                w._send(cmd="stop")
        if not wait:
            return
        deadline = time.monotonic() + grace_s
        for w in self.workers:
            w.join(deadline)
