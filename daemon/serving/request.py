"""One accepted infer request, from arrival to its one answer, and the lane
of mirrored requests. Its own module so that the queue and the shadow
sampler, which both make requests, need not import each other."""

from __future__ import annotations

from .answers import claim, error

SHADOW = "shadow"  # the lane of mirrored requests; they are never answered to anyone


class Pending:
    """One accepted infer request, from arrival to its one answer."""

    __slots__ = ("id", "conn", "data", "arrival", "deadline", "done", "queue", "rid", "dispatched",
                 "lane", "arm", "key", "shadow", "sdata", "log", "ckey", "client", "fb", "via",
                 "defaulted")

    def __init__(self, req_id, conn, data, arrival, deadline, queue, rid, lane, arm, key):
        self.id = req_id
        self.lane = lane
        self.arm = arm
        self.key = key
        self.conn = conn
        self.data = data  # raw bytes per input, validated
        self.arrival = arrival  # monotonic ns
        self.deadline = deadline  # monotonic ns
        self.done = False
        self.queue = queue
        self.rid = rid
        self.dispatched = 0
        self.shadow = None  # the Shadow to mirror this request to once answered
        # its input bytes, kept for the mirror or the fallback (``data`` is dropped)
        self.sdata = None
        self.log = None     # (input bytes, exp) when the request log samples this request
        self.ckey = None    # response-cache key, when the model caches and this was a miss
        self.client = None  # who holds it in ModelQueue.held, once queued
        # daemon/serving/fallback.py: the Fallback that may answer it (routed, not
        # pinned, to a version that has one); once moved to a fallback
        # version, the Via that answers it from there (and fb is None).
        self.fb = None
        self.via = None
        self.defaulted = None  # names of the inputs it omitted and got the default of

    def answer_error(self, status: int, message: str) -> None:
        if not claim(self):
            return
        if self.via is not None:  # its fallback version failed: the primary's error
            self.via.failed(self, status, message)
            return
        self.queue.finished(self, status, error(self, status, message))
