"""One accepted infer request, from arrival to its one answer, and the lane
of mirrored requests. Its own module so that the queue and the shadow
sampler, which both make requests, need not import each other."""

from __future__ import annotations

from collections.abc import Hashable
from typing import TYPE_CHECKING, Any, Protocol

from .answers import claim, error

if TYPE_CHECKING:  # pragma: no cover
    from .fallback import Fallback, Via
    from .queue import ModelQueue
    from .shadow import Shadow

# A request's input bytes, one part per declared input, in order.
Inputs = list[bytes]
# Who holds a place in a queue's fair share: a connection's ("client", name)
# or ("ip", host), or a Fallback for what it moved to its version.
Client = Hashable


class Sink(Protocol):
    """Where a request's answer goes: a client's connection, or the Shadow
    that mirrored it; ``inflight`` is the connection's cap count."""

    inflight: int

    def send(self, answer: dict[str, Any]) -> None: ...

SHADOW = "shadow"  # the lane of mirrored requests; they are never answered to anyone


class Pending:
    """One accepted infer request, from arrival to its one answer."""

    __slots__ = ("id", "conn", "data", "arrival", "deadline", "done", "queue", "rid", "dispatched",
                 "lane", "arm", "key", "shadow", "sdata", "log", "ckey", "client", "fb", "via",
                 "defaulted")

    def __init__(self, req_id: Any, conn: Sink, data: Inputs | None, arrival: int,
                 deadline: int, queue: ModelQueue, rid: int, lane: str, arm: str | None,
                 key: str | None):
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
        self.shadow: Shadow | None = None  # the Shadow to mirror this request to once answered
        # its input bytes, kept for the mirror or the fallback (``data`` is dropped)
        self.sdata: Inputs | None = None
        # (features hash, exp) when the request log samples this request
        self.log: tuple[str, Any] | None = None
        # response-cache key, when the model caches and this was a miss
        self.ckey: bytes | None = None
        self.client: Client | None = None  # who holds it in ModelQueue.held, once queued
        # daemon/serving/fallback.py: the Fallback that may answer it (routed, not
        # pinned, to a version that has one); once moved to a fallback
        # version, the Via that answers it from there (and fb is None).
        self.fb: Fallback | None = None
        self.via: Via | None = None
        # names of the inputs it omitted and got the default of
        self.defaulted: list[str] | None = None

    def answer_error(self, status: int, message: str) -> None:
        if not claim(self):
            return
        if self.via is not None:  # its fallback version failed: the primary's error
            self.via.failed(self, status, message)
            return
        self.queue.finished(self, status, error(self, status, message))
