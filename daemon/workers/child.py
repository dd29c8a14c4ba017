"""The worker process: one model version on one device, serving every front.

Started by the supervisor as ``python -m daemon.workers.child --ctrl-fd C
--wake-fd W`` (a fresh interpreter: the ``spawn`` start method, so no state
of the parent leaks in). Two file descriptors are inherited:

- ``ctrl``: the control channel (``ipc/control.py``: one pickled dict per
  SEQPACKET packet, file descriptors alongside). This is the slow path (load,
  attach, ready, stop, errors); it never carries tensors. EOF on it means the
  supervisor is gone: the worker exits at once.
- ``wake``: one eventfd every front writes after each batch it submits to
  this worker (measured against one eventfd per front under epoll: the shared
  one is one read per wake-up whatever the number of fronts, and a scan of the
  rings' counters costs less than an epoll_wait; docs/architecture.md).

Each front has a ring of its own to this worker (``ipc/ring.py``), attached
at run time: a ring arrives as a memfd with the eventfd the worker writes
after each batch it completes on that ring (``done``).

Conversation::

    sup -> {"cmd": "load", "spec": ModelSpec json} + fds [status page]  (daemon/workers/status.py;
                                                  the offline batch path sends none)
    worker -> {"event": "loaded", "outputs": [...], "single_output": b, "hash": h, ...}
              or {"event": "failed", "error": "..."} and exit EXIT_LOAD_FAILED
    sup -> {"cmd": "attach", "ring": id} + fds [ring memfd, done eventfd]
    worker -> {"event": "ready", "ring": id, "warmup_s": s, "pinned": b, "compiled": ...}
                 (the first ring: after every bucket ran on it)
              {"event": "attached", "ring": id}   (every later ring)
    sup -> {"cmd": "detach", "ring": id}          (its front is gone)
    worker -> {"event": "detached", "ring": id}
    worker -> {"event": "stats", "h2d": {...} | null, "compiled": {...} | null}
                                                  (while serving, when they change)
    sup -> {"cmd": "stop"}                        (finish what is submitted, exit 0)

The serving loop takes at most one batch from each ring in turn, starting
one ring further each pass, so a busy front cannot starve another; it never
waits on a ring (a dead front's ring is simply left alone until detached).

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
import sys
import threading
import time
import traceback

from ipc.control import BadMessage, Channel, ChannelClosed

EXIT_LOAD_FAILED = 3
REPORT_S = 0.5   # how often a serving worker sends its figures when they change
_ONE = (1).to_bytes(8, "little")


class Control:
    """The control channel; sends are serialised by a lock because the main
    loop and the control thread both report."""

    def __init__(self, fd: int):
        self.chan = Channel.from_fd(fd)
        self._lock = threading.Lock()

    def send(self, **msg) -> None:
        with self._lock:
            try:
                self.chan.send(msg)
            except (ChannelClosed, OSError):
                pass  # the supervisor is gone; the reader sees EOF and exits us

    def recv(self) -> tuple[dict, list[int]] | None:
        try:
            return self.chan.recv()
        except ChannelClosed:
            return None


def log(level: str, msg: str, **fields) -> None:
    rec = {"ts": time.time(), "level": level, "logger": "ringserve.worker", "msg": msg,
           "pid": os.getpid(), **fields}
    try:
        sys.stderr.write(json.dumps(rec, default=str) + "\n")
        sys.stderr.flush()
    except Exception:
        pass


class Lane:
    """One front's ring as this worker serves it: the ring, the worker's
    position in it, tensor views over every slot, and the eventfd to write
    after each completed batch."""

    __slots__ = ("id", "ring", "done_fd", "done", "in_views", "out_views")

    def __init__(self, id_, ring, done_fd: int, in_views, out_views):
        self.id = id_
        self.ring = ring
        self.done_fd = done_fd
        self.done = ring.completed()
        self.in_views = in_views
        self.out_views = out_views

    def close(self) -> None:
        self.in_views = self.out_views = None
        try:
            os.close(self.done_fd)
        except OSError:
            pass
        self.ring.close()


class Worker:
    def __init__(self, ctrl: Control, wake_fd: int):
        self.ctrl = ctrl
        self.wake_fd = wake_fd
        self.stopping = False
        self.runner = None
        self.lanes: list[Lane] = []
        # Attach/detach arrive on the control thread and are applied by the
        # serving loop between batches (it alone touches self.lanes).
        self._changes: list[tuple[str, object]] = []
        self._changes_lock = threading.Lock()
        self.pinned = False
        self.warmed = False
        self.buckets: list[int] = []
        self.status = None  # StatusPage: whether this worker is busy, for every front
        self.stage_in = self.stage_out = None  # staging batch of merged passes, made at the first

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

    def open_lane(self, ring_id: str, ring_fd: int, done_fd: int) -> Lane:
        """Map a ring received from the supervisor and make its views."""
        import torch

        from ipc.ring import Ring

        from .runtime import TORCH_DTYPES, LoadError, is_pinned, pin_host_memory
        ring = Ring.from_fd(ring_fd, ring_id)
        lay = ring.layout
        r = self.runner
        buf = ring.seg.buf
        if r.device.type == "cuda":
            try:
                pin_host_memory(ring.seg.address(), ring.seg.size)
            except LoadError as e:
                # Not a crash: a restart would fail the same way (ulimit -l).
                self.fail(str(e))

        def view(off, decl):
            count = lay.max_batch
            for d in decl.shape:
                count *= d
            return torch.frombuffer(buf, dtype=TORCH_DTYPES[decl.dtype], count=count,
                                    offset=off).view(lay.max_batch, *decl.shape)

        # Tensor views over every slot's regions, made once: the hot loop only slices them.
        in_views = [[view(ring.region_offset(s, "input", k), d)
                     for k, d in enumerate(r.spec.inputs)] for s in range(lay.depth)]
        out_views = [[view(ring.region_offset(s, "output", k), d)
                      for k, d in enumerate(r.outputs)] for s in range(lay.depth)]
        for views in in_views:
            for v in views:
                v.zero_()
        # Registered, as the driver sees it, for every view the hot loop
        # copies from or to (False on the CPU: nothing to pin).
        pinned = r.device.type == "cuda" and all(
            is_pinned(v) for views in in_views + out_views for v in views)
        if r.device.type == "cuda" and not pinned:
            log("warning", "ring registered but the driver does not report it pinned; "
                "copies are staged", worker=self.name)
        self.pinned = pinned if not self.lanes else (self.pinned and pinned)
        return Lane(ring_id, ring, done_fd, in_views, out_views)

    def warm_up(self, lane: Lane) -> None:
        r = self.runner
        warm = r.warm_up(lambda b: [v[:b] for v in lane.in_views[0]], lane.out_views[0])
        counts = r.compile_counts()
        self.warmed = True
        self.ctrl.send(event="ready", ring=lane.id, warmup_s=round(warm, 3), pinned=self.pinned,
                       compiled=counts)
        log("info", "worker ready", worker=self.name, warmup_s=round(warm, 3),
            compile=r.compile_mode, hash=r.weights_hash, pinned=self.pinned, compiled=counts)

    def report_loop(self) -> None:
        """Runs in a thread once serving: every REPORT_S, what changed of the
        worker's own figures (H2D copy times on CUDA, compiled graphs) goes to
        the supervisor as a ``stats`` event, off the hot loop."""
        r = self.runner
        last = None
        while True:
            time.sleep(REPORT_S)
            now = {"h2d": r.h2d.snapshot() if r.h2d is not None else None,
                   "compiled": r.compile_counts()}
            if now != last:
                self.ctrl.send(event="stats", **now)
                last = now

    def _apply_changes(self) -> None:
        with self._changes_lock:
            changes, self._changes = self._changes, []
        for kind, arg in changes:
            if kind == "attach":
                self.lanes.append(arg)
                if not self.warmed:
                    self.warm_up(arg)
                else:
                    self.ctrl.send(event="attached", ring=arg.id, pinned=self.pinned)
            else:
                for lane in [x for x in self.lanes if x.id == arg]:
                    self.lanes.remove(lane)
                    lane.close()
                self.ctrl.send(event="detached", ring=arg)

    def _change(self, kind: str, arg) -> None:
        with self._changes_lock:
            self._changes.append((kind, arg))
        os.write(self.wake_fd, _ONE)

    def _run_one(self, lane: Lane, slot: int, seq: int, n: int, bucket: int) -> None:
        """A batch of one ring, straight from the ring's memory."""
        ins = [v[:bucket] for v in lane.in_views[slot]]
        if n < bucket:
            for v in ins:
                v[n:].zero_()  # padding rows are zeros: a padded batch is deterministic
        t0 = time.perf_counter_ns()
        try:
            self.runner.run_batch(ins, lane.out_views[slot], n)
            status, err = 0, ""
        except Exception as e:
            status, err = 13, f"the model raised {type(e).__name__}: {e}"
            log("error", "batch failed", worker=self.name, error=err, batch=n)
        lane.ring.complete(slot, seq, n, status, time.perf_counter_ns() - t0, err,
                           time.monotonic_ns())
        self._done(lane)

    def _done(self, lane: Lane) -> None:
        lane.done += 1
        try:
            os.write(lane.done_fd, _ONE)  # an eventfd write never blocks
        except OSError:
            pass

    def _run_merged(self, group: list) -> None:
        """Batches of several rings as one forward pass (docs/architecture.md,
        "Batch size across fronts"): their rows are copied into a staging
        batch (pinned on CUDA), run at the bucket of the combined size, and
        each ring's rows copied back into its result slot."""
        import torch
        r = self.runner
        total = sum(n for _, _, _, n in group)
        bucket = next((b for b in self.buckets if b >= total), total)
        if self.stage_in is None:
            pin = r.device.type == "cuda"
            rows = group[0][0].ring.layout.max_batch
            self.stage_in = [torch.zeros((rows, *v.shape[1:]), dtype=v.dtype, pin_memory=pin)
                             for v in group[0][0].in_views[0]]
            self.stage_out = [torch.zeros((rows, *v.shape[1:]), dtype=v.dtype, pin_memory=pin)
                              for v in group[0][0].out_views[0]]
        off = 0
        for lane, slot, _, n in group:
            for k, v in enumerate(lane.in_views[slot]):
                self.stage_in[k][off:off + n].copy_(v[:n])
            off += n
        for v in self.stage_in:
            v[total:bucket].zero_()
        t0 = time.perf_counter_ns()
        try:
            r.run_batch([v[:bucket] for v in self.stage_in], self.stage_out, total)
            status, err = 0, ""
        except Exception as e:
            status, err = 13, f"the model raised {type(e).__name__}: {e}"
            log("error", "batch failed", worker=self.name, error=err, batch=total)
        compute_ns = time.perf_counter_ns() - t0
        now = time.monotonic_ns()
        off = 0
        for i, (lane, slot, seq, n) in enumerate(group):
            if not status:
                for k, v in enumerate(lane.out_views[slot]):
                    v[:n].copy_(self.stage_out[k][off:off + n])
            off += n
            lane.ring.complete(slot, seq, n, status, compute_ns, err, now, total, bucket, i == 0)
            self._done(lane)

    def serve(self) -> None:
        spin_s = self.runner.spec.spin_us * 1e-6
        status, busy = self.status, False
        self.buckets = sorted(self.runner.spec.buckets)
        start = 0
        while True:
            if self._changes:
                self._apply_changes()
            lanes = self.lanes
            n_lanes = len(lanes)
            # The rings with a batch waiting, in turn beginning one ring
            # further each pass: no front's ring waits behind another's backlog.
            group, total, single = [], 0, None
            for j in range(n_lanes):
                lane = lanes[(start + j) % n_lanes]
                ring = lane.ring
                if ring.submitted() == lane.done:
                    continue
                slot = lane.done % ring.layout.depth
                seq, n, bucket, _ = ring.request(slot)
                if single is None:
                    single = (lane, slot, seq, n, bucket)
                if total + n <= ring.layout.max_batch:
                    group.append((lane, slot, seq, n))
                    total += n
            start = start + 1 if n_lanes else 0
            if single is not None:
                if not busy and status is not None:
                    status.busy = busy = True  # fronts let their batches fill meanwhile
                if len(group) > 1:
                    self._run_merged(group)
                else:
                    self._run_one(*single)
                continue
            if busy:
                status.busy = busy = False
                if n_lanes > 1:
                    # Fronts that let a batch fill while this worker ran
                    # another's: it is idle now, so they hand it over
                    # (their done callback re-runs the dispatch policy).
                    for lane in lanes:
                        try:
                            os.write(lane.done_fd, _ONE)
                        except OSError:
                            pass
            if self.stopping:
                return
            # Poll a while before sleeping (models.spin_us): a wake-up
            # across cores costs ~20-27 us, but polling burns a core.
            if spin_s:
                deadline = time.perf_counter() + spin_s
                while time.perf_counter() < deadline and not self._changes and not any(
                        lane.ring.submitted() != lane.done for lane in lanes):
                    pass
                if self._changes or any(lane.ring.submitted() != lane.done for lane in lanes):
                    continue
            os.read(self.wake_fd, 8)  # blocks until a front submits (or a change, a stop)

    def control_loop(self) -> None:
        """Runs in a thread once loaded: attach, detach, stop, and the
        supervisor's death."""
        while True:
            try:
                got = self.ctrl.recv()
            except BadMessage as e:
                log("error", str(e), worker=self.name)
                continue
            except OSError:
                got = None
            if got is None:
                # The supervisor died (or closed us): nobody will read
                # results, so leave now (the rings are memfds: nothing to remove).
                log("warning", "supervisor is gone; worker exits", worker=self.name)
                os._exit(1)
            msg, fds = got
            cmd = msg.get("cmd")
            if cmd == "attach" and len(fds) == 2:
                try:
                    lane = self.open_lane(msg["ring"], fds[0], fds[1])
                except Exception as e:  # a bad ring is the supervisor's bug: say so, go on
                    log("error", "cannot attach a ring", worker=self.name, error=str(e))
                    self.ctrl.send(event="attach_failed", ring=msg["ring"], error=str(e))
                    continue
                self._change("attach", lane)
            elif cmd == "detach":
                self._change("detach", msg["ring"])
            elif cmd == "stop":
                self.stopping = True
                os.write(self.wake_fd, _ONE)
            else:
                for fd in fds:
                    os.close(fd)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m daemon.workers.child")
    p.add_argument("--ctrl-fd", type=int, required=True)
    p.add_argument("--wake-fd", type=int, required=True)
    a = p.parse_args(argv)
    # Ctrl-C in a terminal reaches the whole process group: the supervisor
    # drains first and then stops us, so a worker must not die on SIGINT by itself.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    from .lifeline import die_with_parent
    die_with_parent()
    ctrl = Control(a.ctrl_fd)
    w = Worker(ctrl, a.wake_fd)

    def on_term(signum, frame):
        w.stopping = True
        try:
            os.write(w.wake_fd, _ONE)
        except OSError:
            pass

    signal.signal(signal.SIGTERM, on_term)
    got = ctrl.recv()
    if got is None or got[0].get("cmd") != "load":
        return 1
    if got[1]:  # the status page (daemon/workers/status.py); the batch path sends none
        from .status import StatusPage
        w.status = StatusPage(got[1][0])
    w.load(got[0]["spec"])
    threading.Thread(target=w.control_loop, name="control", daemon=True).start()
    # Serving starts with the first ring (its warm-up makes the worker ready).
    while not w.lanes and not w.stopping:
        if w._changes:
            w._apply_changes()
            break
        os.read(w.wake_fd, 8)
    if w.stopping and not w.lanes:
        return 0
    threading.Thread(target=w.report_loop, name="report", daemon=True).start()
    w.serve()
    log("info", "worker stopped", worker=w.name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
