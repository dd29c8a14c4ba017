"""The front's own CPU per request, without sockets, kernel or model.

``python -m bench.front`` runs the daemon's real request path (``App``:
frame decode, validation, routing, queueing, dispatch, the copy into a real
shared-memory ring, completion, stats, the feedback join, answer encoding)
against 64 in-process connections whose transport only keeps the answers,
and a stand-in worker that completes each submitted batch at once (no
process, no model). What is left is the Python the front spends per request,
read with ``time.process_time``: the figure to watch when changing the hot
path, steadier than a socket benchmark on a shared machine because nothing
else is in it.

Run it long (``--requests 1500000``) to see state that only grows with
traffic: the feedback join's million-answer bound was found this way (past
it, every answer cost 5x more until the fix).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time

from ipc.framing import FrameDecoder, encode_frame
from ipc.ring import Ring, RingLayout

from .servers import DEFAULT_CONFIG

_OK = b"\xa6status\x00"  # "status": 0 as msgpack writes it


class _Transport:
    """Counts the answers written to it: OK ones by a byte search (decoding
    every answer would cost as much as what is measured); others are kept
    and decoded after the clock stops."""

    def __init__(self):
        self.ok = 0
        self.other: list[bytes] = []

    def write(self, data) -> None:
        if _OK in data:
            self.ok += 1
        else:
            self.other.append(bytes(data))

    def statuses(self) -> dict[int, int]:
        out = {0: self.ok} if self.ok else {}
        dec = FrameDecoder(1 << 20)
        for data in self.other:
            for msg in dec.feed(data):
                out[msg["status"]] = out.get(msg["status"], 0) + 1
        return out

    def get_extra_info(self, name):
        return ("127.0.0.1", 0) if name == "peername" else None

    def get_write_buffer_size(self) -> int:
        return 0

    def close(self) -> None:
        pass


def _fake_worker(app, q):
    """Attach ``q``'s first worker port to a real ring (``WorkerPort.attach``,
    as the supervisor's ``port`` message does), with nothing on the other
    side: ``complete`` plays the worker's part on its own mapping."""
    from daemon.workers.spec import TensorDecl
    w = q.workers[0]
    outputs = [TensorDecl(n, s.dtype, s.shape) for n, s in q.cfg.outputs] or \
        [TensorDecl("output", "float32", (2,))]
    depth = q.cfg.inflight_batches
    lay = RingLayout(depth, q.max_batch, [s.nbytes for _, s in q.cfg.inputs],
                     [t.nbytes for t in outputs])
    worker_side, ring_fd = Ring.create_anonymous("ringserve-benchfront", lay)
    wake, done_fd = os.eventfd(0, os.EFD_NONBLOCK), os.eventfd(0, os.EFD_NONBLOCK)
    w.attach(ring_fd, wake, done_fd, "ringserve-benchfront", {"state": "ready"}, outputs, True)

    def complete():
        ring = worker_side
        done = ring.completed()
        while ring.submitted() > done:
            slot = done % depth
            seq, n, _, _ = ring.request(slot)
            ring.complete(slot, seq, n, 0, 100_000, "", time.monotonic_ns())
            done += 1
        w._on_done()

    def close():
        w.close()
        worker_side.close()
    return complete, close


async def measure(config: str, requests: int, arrivals: int, warmup: int = 20_000) -> dict:
    """Front CPU per request: ``arrivals`` requests (one per connection)
    arrive, then the batch in the worker finishes, over and over."""
    import numpy as np

    from daemon.config import load_config
    from daemon.front.app import App, tune_gc
    cfg = load_config(config)
    app = App(cfg, asyncio.get_running_loop(), chan=None)
    m = cfg.models[0]
    q = app.add_model(m, (1,))
    app.reroute(app.routing)
    complete, close = _fake_worker(app, q)
    try:
        conns = []
        for _ in range(arrivals):
            c = app.connection()
            c.connection_made(_Transport())
            conns.append(c)
        rng = np.random.default_rng(0)
        inputs = {n: {"dtype": s.dtype, "shape": list(s.shape),
                      "data": rng.standard_normal(s.numel).astype(s.dtype).tobytes()}
                  for n, s in m.inputs}
        if m.single_input:
            inputs = next(iter(inputs.values()))
        frames = [encode_frame({"id": 1 + i, "model": m.name, "inputs": inputs})
                  for i in range(arrivals)]

        def run(rounds: int) -> None:
            # Steady state: a round's requests queue while the previous
            # batch is out; finishing it hands them over as the next batch.
            for _ in range(rounds):
                for c, f in zip(conns, frames, strict=True):
                    c.data_received(f)
                complete()

        warm_rounds, rounds = -(-warmup // arrivals), -(-requests // arrivals)
        tune_gc()   # as the daemon does once it has started
        run(warm_rounds)
        batches0 = q.stats.batches
        t0 = time.process_time()
        run(rounds)
        cpu = time.process_time() - t0
        batches = q.stats.batches - batches0
        complete()   # the last batch
        statuses: dict[int, int] = {}
        for c in conns:
            for s, k in c.transport.statuses().items():
                statuses[s] = statuses.get(s, 0) + k
        measured = rounds * arrivals
        return {"requests": measured, "sent": (warm_rounds + rounds) * arrivals,
                "statuses": statuses, "cpu_s": cpu, "us_per_request": cpu / measured * 1e6,
                "mean_batch": round(measured / max(1, batches), 2)}
    finally:
        close()
        if app.deadlines.timer is not None:
            app.deadlines.timer.cancel()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.front", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(DEFAULT_CONFIG),
                   help="daemon config; its first model is served (default: configs/default.toml)")
    p.add_argument("--requests", type=int, default=300_000, help="measured requests")
    p.add_argument("--arrivals", type=int, default=21,
                   help="requests that arrive between two completed batches (the batch size "
                   "the 64-connection benchmark sees)")
    a = p.parse_args(argv)
    import uvloop
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        r = runner.run(measure(a.config, a.requests, a.arrivals))
    ok = r["statuses"].get(0, 0)
    print(f"front CPU per request: {r['us_per_request']:.2f} us over {r['requests']:,} requests "
          f"(mean batch {r['mean_batch']}); answers OK {ok:,} of {r['sent']:,} sent")
    return 0 if ok == r["sent"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
