"""Shadow traffic (dark launch): mirror a sample of requests to a candidate
version and compare its answers with the ones the callers got.

- Sampling is by ``bucket(salt, key) < sample_rate * 10000`` (the routing
  hash), so the same users are mirrored every time; requests without a key
  are sampled at random.
- A request is mirrored only after its primary answer has been handed to the
  connection, with the primary's first output copied out of shared memory
  (one small copy per *sampled* request). The caller never waits for the
  shadow and never sees its answer.
- Mirrored requests go to the candidate's own low-priority queue
  (``ModelQueue.submit_shadow``): bounded by ``queue_limit``, dispatched only
  to an idle worker and only when no primary request is queued, and refused
  at once while the candidate's primary queue is over half full. That is
  what "shed first" means here: under load the shadow gives way before any
  caller's request waits for it. Every shed request is counted by reason.
- Comparison, on the first output: *agreement* is the same argmax for an
  output of several values, the same side of 0.5 for a single score (a
  binary classifier's decision); the score difference is the mean and the
  max of ``|shadow - primary|`` over the output's elements.
"""

from __future__ import annotations

import collections
import random
import time
from typing import TYPE_CHECKING

import numpy as np

from ipc.tensors import DTYPES, to_numpy

from ..observe.stats import LatencyWindow
from .request import SHADOW, Pending
from .router import BUCKETS, bucket

if TYPE_CHECKING:  # pragma: no cover
    from ..config import ShadowConfig
    from .queue import ModelQueue

_monotonic_ns = time.monotonic_ns


def _array(data: bytes | memoryview, dtype: str) -> np.ndarray:
    n = len(data) // DTYPES[dtype].itemsize
    return to_numpy({"dtype": dtype, "shape": [n], "data": data}).astype(np.float64)


class Shadow:
    # A mirror's Sink count (serving/request.py): mirrors are answered to the
    # Shadow, never released against a connection's cap, so it stays 0.
    inflight = 0

    def __init__(self, cfg: ShadowConfig, deadline_ns: int):
        self.cfg = cfg
        self.model = cfg.model
        self.candidate = cfg.candidate
        self.threshold = int(round(cfg.sample_rate * BUCKETS))
        self.deadline_ns = deadline_ns
        # the candidate's ModelQueue, set by the app (start, reload)
        self.queue: ModelQueue | None = None
        self._rand = random.Random()
        self._seq = 0
        self.waiting: dict[int, tuple] = {}  # mirror id -> (t_sent_ns, primary bytes, dtype)
        self.mirrored = 0
        self.shed: collections.Counter = collections.Counter()
        self.by_status: collections.Counter = collections.Counter()
        self.compared = 0
        self.agreed = 0
        self.incomparable = 0
        self.diff_sum = 0.0
        self.diff_max = 0.0
        self.latency = LatencyWindow()  # OK shadow answers, mirror to answer
        self.last_report = time.monotonic()

    def sampled(self, key: str | None) -> bool:
        b = bucket(self.cfg.salt, key) if key is not None else self._rand.randrange(BUCKETS)
        return b < self.threshold

    def mirror(self, req: Pending, primary_out: bytes | memoryview, dtype: str) -> None:
        """Send a copy of an answered request to the candidate."""
        q = self.queue
        if q is None:
            self.shed["no_candidate"] += 1
            return
        self._seq += 1
        sid = self._seq
        now = _monotonic_ns()
        self.waiting[sid] = (now, bytes(primary_out), dtype)
        p = Pending(sid, self, req.sdata, now, now + self.deadline_ns, q, 0, SHADOW, None, None)
        refused = q.submit_shadow(p)
        if refused is not None:
            del self.waiting[sid]
            self.shed[refused] += 1
            return
        self.mirrored += 1

    # The candidate's queue answers a mirrored request here, as if this were
    # its connection. ``answer["outputs"]`` is a view of shared memory, valid
    # only during this call: it is compared now, never kept.
    def send(self, answer: dict) -> None:
        sent = self.waiting.pop(answer["id"], None)
        if sent is None:
            return
        t0, primary, dtype = sent
        status = answer["status"]
        self.by_status[status] += 1
        if status:
            return
        self.latency.add((_monotonic_ns() - t0) // 1000)
        out = answer["outputs"]
        if "data" not in out:  # several named outputs: compare the first
            out = next(iter(out.values()))
        if out["dtype"] != dtype or len(out["data"]) != len(primary):
            self.incomparable += 1
            return
        a, b = _array(primary, dtype), _array(out["data"], dtype)
        if a.size > 1:
            agree = int(a.argmax()) == int(b.argmax())
        else:
            agree = (a[0] > 0.5) == (b[0] > 0.5)
        d = np.abs(a - b)
        self.compared += 1
        self.agreed += bool(agree)
        self.diff_sum += float(d.mean())
        self.diff_max = max(self.diff_max, float(d.max()))

    def snapshot(self) -> dict:
        return {"model": self.model, "candidate": self.candidate,
                "sample_rate": self.cfg.sample_rate, "mirrored": self.mirrored,
                "shed": dict(self.shed), "pending": len(self.waiting),
                "answers": {str(k): v for k, v in sorted(self.by_status.items())},
                "compared": self.compared, "incomparable": self.incomparable,
                "agreement": round(self.agreed / self.compared, 6) if self.compared else None,
                "score_diff_mean": (round(self.diff_sum / self.compared, 9) if self.compared
                                    else None),
                "score_diff_max": round(self.diff_max, 9) if self.compared else None,
                "latency_us": self.latency.percentiles()}
