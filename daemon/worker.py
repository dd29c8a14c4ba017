"""The worker process: one model version on one device.

Started by the front as ``python -m daemon.worker --ctrl-fd C --wake-fd W
--done-fd D`` (a fresh interpreter: the ``spawn`` start method, so no state
of the front leaks in). Three file descriptors are inherited:

- ``ctrl``: a Unix stream socket carrying JSON lines both ways. This is the
  slow path (load, attach, ready, stop, errors); it never carries tensors.
  EOF on it means the front is gone: the worker exits at once.
- ``wake``: an eventfd the front writes after each batch it submits.
- ``done``: an eventfd the worker writes after each batch it completes.

Conversation::

    front -> {"cmd": "load", "spec": ModelSpec}
    worker -> {"event": "loaded", "outputs": [...], "single_output": b, "hash": h, ...}
              or {"event": "failed", "error": "..."} and exit EXIT_LOAD_FAILED
    front -> {"cmd": "attach", "ring": "<segment name>"}   (sized from "outputs")
    worker -> {"event": "ready", "warmup_s": s, "pinned": b, "compiled": {...} | null}
                                                           (after every bucket ran)
    worker -> {"event": "stats", "h2d": {...} | null, "compiled": {...} | null}
                                                           (while serving, when they change)
    front -> {"cmd": "stop"}                                 (finish what is submitted, exit 0)

``pinned``: the ring is registered with CUDA (cudaHostRegister), checked
with the driver; False on the CPU. ``compiled``: torch.compile's graph count
(``Runner.compile_counts``). ``h2d``: copy time of each batch's inputs from
the ring slot to the device (``runtime.H2DTimes``); null on the CPU.

Exit codes: 0 stopped on request, EXIT_LOAD_FAILED (3) the model cannot be
loaded (the supervisor does not restart it: it would fail the same way),
anything else is a crash and the supervisor restarts the worker.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import sys
import threading
import time
import traceback

EXIT_LOAD_FAILED = 3
REPORT_S = 0.5   # how often a serving worker sends its figures when they change
_ONE = (1).to_bytes(8, "little")


class Control:
    """JSON lines over the control socket; sends are serialised by a lock
    because the main loop and the control thread both report."""

    def __init__(self, fd: int):
        self.sock = socket.socket(fileno=fd)
        self.rfile = self.sock.makefile("rb")
        self._lock = threading.Lock()

    def send(self, **msg) -> None:
        data = (json.dumps(msg) + "\n").encode()
        with self._lock:
            try:
                self.sock.sendall(data)
            except OSError:
                pass  # the front is gone; the reader sees EOF and exits us

    def recv(self) -> dict | None:
        line = self.rfile.readline()
        if not line:
            return None
        return json.loads(line)


def log(level: str, msg: str, **fields) -> None:
    rec = {"ts": time.time(), "level": level, "logger": "ringserve.worker", "msg": msg,
           "pid": os.getpid(), **fields}
    try:
        sys.stderr.write(json.dumps(rec, default=str) + "\n")
        sys.stderr.flush()
    except Exception:
        pass


class Worker:
    def __init__(self, ctrl: Control, wake_fd: int, done_fd: int):
        self.ctrl = ctrl
        self.wake_fd = wake_fd
        self.done_fd = done_fd
        self.stopping = False
        self.ring = None
        self.runner = None
        self._pinned = 0
        self.pinned = False

    def load(self, spec_json: dict) -> None:
        from .runtime import LoadError, ModelSpec, Runner
        spec = ModelSpec.from_json(spec_json)
        self.name = f"{spec.name}@{spec.version}/{spec.device}"
        t0 = time.perf_counter()
        try:
            self.runner = Runner(spec)
            self.runner.load()
        except LoadError as e:
            self.fail(str(e))
        except Exception as e:
            self.fail(f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=5)}")
        r = self.runner
        self.ctrl.send(event="loaded", outputs=[t.to_json() for t in r.outputs],
                       single_output=r.single_output, hash=r.weights_hash,
                       compile=r.compile_mode, device=spec.device,
                       load_s=round(time.perf_counter() - t0, 3))

    def fail(self, error: str) -> None:
        log("error", "model failed to load", worker=getattr(self, "name", "?"), error=error)
        self.ctrl.send(event="failed", error=error)
        os._exit(EXIT_LOAD_FAILED)

    def attach(self, ring_name: str) -> None:
        import torch
        from ipc.ring import Ring
        from .runtime import TORCH_DTYPES, LoadError, is_pinned, pin_host_memory
        ring = Ring.attach(ring_name)
        self.ring = ring
        lay = ring.layout
        r = self.runner
        buf = ring.seg.buf
        if r.device.type == "cuda":
            try:
                pin_host_memory(ring.seg.address(), ring.seg.size)
            except LoadError as e:
                # Not a crash: a restart would fail the same way (ulimit -l).
                self.fail(str(e))
            self._pinned = ring.seg.address()

        def view(off, decl):
            count = lay.max_batch
            for d in decl.shape:
                count *= d
            return torch.frombuffer(buf, dtype=TORCH_DTYPES[decl.dtype], count=count,
                                    offset=off).view(lay.max_batch, *decl.shape)

        # Tensor views over every slot's regions, made once: the hot loop only slices them.
        self.in_views = [[view(ring.region_offset(s, "input", k), d)
                          for k, d in enumerate(r.spec.inputs)] for s in range(lay.depth)]
        self.out_views = [[view(ring.region_offset(s, "output", k), d)
                           for k, d in enumerate(r.outputs)] for s in range(lay.depth)]
        for views in self.in_views:
            for v in views:
                v.zero_()
        # Registered, as the driver sees it, for every view the hot loop
        # copies from or to (False on the CPU: nothing to pin).
        self.pinned = r.device.type == "cuda" and all(
            is_pinned(v) for views in self.in_views + self.out_views for v in views)
        if r.device.type == "cuda" and not self.pinned:
            log("warning", "ring registered but the driver does not report it pinned; "
                "copies are staged", worker=self.name)
        warm = r.warm_up(lambda b: [v[:b] for v in self.in_views[0]], self.out_views[0])
        counts = r.compile_counts()
        self.ctrl.send(event="ready", warmup_s=round(warm, 3), pinned=self.pinned,
                       compiled=counts)
        log("info", "worker ready", worker=self.name, warmup_s=round(warm, 3),
            compile=r.compile_mode, hash=r.weights_hash, pinned=self.pinned, compiled=counts)

    def report_loop(self) -> None:
        """Runs in a thread once serving: every REPORT_S, what changed of the
        worker's own figures (H2D copy times on CUDA, compiled graphs) goes to
        the front as a ``stats`` event, off the hot loop."""
        r = self.runner
        last = None
        while True:
            time.sleep(REPORT_S)
            now = {"h2d": r.h2d.snapshot() if r.h2d is not None else None,
                   "compiled": r.compile_counts()}
            if now != last:
                self.ctrl.send(event="stats", **now)
                last = now

    def serve(self) -> None:
        ring = self.ring
        depth = ring.layout.depth
        run = self.runner.run_batch
        in_views, out_views = self.in_views, self.out_views
        done = ring.completed()
        spin_s = self.runner.spec.spin_us * 1e-6
        perf_ns = time.perf_counter_ns
        mono_ns = time.monotonic_ns
        while True:
            if ring.submitted() == done:
                if self.stopping:
                    return
                # Poll a while before sleeping (models.spin_us): a wake-up
                # across cores costs ~20-27 us, but polling burns a core.
                deadline = time.perf_counter() + spin_s
                while ring.submitted() == done and time.perf_counter() < deadline:
                    pass
                if ring.submitted() == done:
                    os.read(self.wake_fd, 8)  # blocks until the front submits
                    continue
            slot = done % depth
            seq, n, bucket, _ = ring.request(slot)
            ins = [v[:bucket] for v in in_views[slot]]
            if n < bucket:
                for v in ins:
                    v[n:].zero_()  # padding rows are zeros: a padded batch is deterministic
            t0 = perf_ns()
            try:
                run(ins, out_views[slot], n)
                status, err = 0, ""
            except Exception as e:
                status, err = 13, f"the model raised {type(e).__name__}: {e}"
                log("error", "batch failed", worker=self.name, error=err, batch=n)
            t1 = perf_ns()
            ring.complete(slot, seq, n, status, t1 - t0, err, mono_ns())
            done += 1
            os.write(self.done_fd, _ONE)

    def control_loop(self) -> None:
        """Runs in a thread once serving: stop requests and front death."""
        while True:
            try:
                msg = self.ctrl.recv()
            except (OSError, ValueError):
                msg = None
            if msg is None:
                # The front died (or closed us): nobody will read results and
                # nobody else may unlink the ring, so leave now.
                log("warning", "front is gone; worker exits", worker=self.name)
                if self.ring is not None:
                    self.ring.unlink()
                os._exit(1)
            if msg.get("cmd") == "stop":
                self.stopping = True
                os.write(self.wake_fd, _ONE)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m daemon.worker")
    p.add_argument("--ctrl-fd", type=int, required=True)
    p.add_argument("--wake-fd", type=int, required=True)
    p.add_argument("--done-fd", type=int, required=True)
    a = p.parse_args(argv)
    # Ctrl-C in a terminal reaches the whole process group: the front drains
    # first and then stops us, so a worker must not die on SIGINT by itself.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    ctrl = Control(a.ctrl_fd)
    w = Worker(ctrl, a.wake_fd, a.done_fd)

    def on_term(signum, frame):
        w.stopping = True
        try:
            os.write(w.wake_fd, _ONE)
        except OSError:
            pass

    signal.signal(signal.SIGTERM, on_term)
    msg = ctrl.recv()
    if msg is None or msg.get("cmd") != "load":
        return 1
    w.load(msg["spec"])
    msg = ctrl.recv()
    if msg is None:
        return 1
    if msg.get("cmd") == "stop":
        return 0
    w.attach(msg["ring"])
    threading.Thread(target=w.control_loop, name="control", daemon=True).start()
    threading.Thread(target=w.report_loop, name="report", daemon=True).start()
    w.serve()
    log("info", "worker stopped", worker=w.name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
