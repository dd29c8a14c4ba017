"""What a front's request path reads: one small object, shared.

The App owns it and changes it at start, on a routing change and on a
reload, a field at a time and each in one assignment (no await between a
reload's assignments: daemon/front/app.py ``switch``). The intake (the infer
path), the other ops and the figures read it; none of them is handed the App
(uvicorn's ServerState: the protocols share a small state, not the server).
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..workers.state import WorkerState

if TYPE_CHECKING:
    from ..observe.feedback import FeedbackJoin
    from ..observe.reqlog import RequestLog
    from ..rollout.guardrails import Tally
    from ..serving.queue import ModelQueue
    from ..serving.router import RoutingTable
    from ..serving.shadow import Shadow
    from .access import Access
    from .rids import RidAllocator


@dataclass(eq=False)
class Serving:
    slot: int                      # this front's place among the machine's fronts
    n_fronts: int
    joins: FeedbackJoin
    rids: RidAllocator
    default_deadline_ns: int
    max_inflight: int              # server.max_inflight_per_connection
    queues: dict[tuple[str, str], ModelQueue] = field(default_factory=dict)
    # route()'s fast path: models without a rollout -> their default version's queue
    plain: dict[str, ModelQueue] = field(default_factory=dict)
    router: RoutingTable | None = None
    shadows: dict[str, Shadow] = field(default_factory=dict)
    # the rollouts' guardrail counts of the current stage, per model (sent to the supervisor)
    tallies: dict[str, Tally] = field(default_factory=dict)
    reqlog: RequestLog | None = None
    access: Access | None = None   # None: no auth, no rate limit
    draining: bool = False
    metrics_port: int | None = None
    # requests refused before they reached a queue, by status
    rejected: collections.Counter[int] = field(default_factory=collections.Counter)

    def count_rejected(self, status: int) -> None:
        self.rejected[status] += 1

    def ready(self) -> bool:
        """Every worker of every served version is attached and warm, and
        the front is not draining."""
        return not self.draining and all(
            w.state == WorkerState.READY for q in self.queues.values() for w in q.workers)

    def degraded(self) -> bool:
        """Some version is answered by its fallback alone (daemon/serving/fallback.py):
        not ready, but not down either."""
        return any(q.fallback is not None and q.fallback.degraded()
                   for q in self.queues.values())
