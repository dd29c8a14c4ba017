"""The ops of a front that are not infer: health, models, feedback (and the
join of an outcome to the answer it is about). ``stats`` is the machine's
and is answered by the supervisor (daemon/front/app.py ``ask``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ipc.status import InvalidArgument, brief

from .rids import decode as decode_rid

if TYPE_CHECKING:
    from .connection import Connection
    from .state import Serving

MAX_OUTCOME = 1e15  # |outcome| of feedback: KPI sums of squares stay finite
# (connection, request id, message for the supervisor, (ref, outcome) of a feedback)
Ask = Callable[["Connection", int, dict[str, Any], "tuple[Any, float] | None"], None]


def rid_front(rid: int) -> int:
    return decode_rid(rid).front


class Ops:
    def __init__(self, serving: Serving, ask: Ask) -> None:
        self.serving = serving
        self.ask = ask

    def health(self, req_id: int, msg: dict[str, Any]) -> dict[str, Any]:
        name = msg.get("model")
        s = self.serving
        workers = [w.health() for q in s.queues.values() for w in q.workers
                   if name is None or q.name == name]
        fallbacks = [{"name": q.name, "version": q.version, "fallback": q.fallback.by,
                      "ready": q.has_ready, "degraded": q.fallback.degraded()}
                     for q in s.queues.values()
                     if q.fallback is not None and (name is None or q.name == name)]
        return {"id": req_id, "status": 0, "live": True, "ready": s.ready(),
                "degraded": s.degraded(), "draining": s.draining, "models": workers,
                "fallbacks": fallbacks, "metrics_port": s.metrics_port, "front": s.slot}

    def models(self, req_id: int) -> dict[str, Any]:
        out = []
        for q in self.serving.queues.values():
            m = q.cfg
            entry: dict[str, Any] = {
                "name": m.name, "version": m.version, "lane": q.lane,
                "devices": list(m.devices), "dtype": m.dtype,
                "batching": {"max_batch": m.max_batch, "window_ms": m.window_ms,
                             "buckets": list(m.buckets), "queue_limit": m.queue_limit,
                             "inflight_batches": m.inflight_batches}}
            ins: dict[str, dict[str, Any]] = {n: {"dtype": s.dtype, "shape": list(s.shape)}
                                              for n, s in m.inputs}
            for n, t in (q.defaults or {}).items():
                ins[n]["default"] = t
            if q.fallback is not None:
                entry["fallback"] = {"version": q.fallback.by, "on": sorted(q.fallback.on)}
            if m.single_input:
                entry["input"] = next(iter(ins.values()))
            else:
                entry["inputs"] = ins
            outs = {t.name: {"dtype": t.dtype, "shape": list(t.shape)} for t in q.outputs}
            if outs and q.single_output:
                entry["output"] = next(iter(outs.values()))
            elif outs:
                entry["outputs"] = outs
            entry["data_version"] = q.data_version
            entry["metadata"] = m.metadata.describe() if m.metadata is not None else None
            out.append(entry)
        return {"id": req_id, "status": 0, "models": out}

    def feedback(self, conn: Connection, req_id: int, msg: dict[str, Any]) -> None:
        ref, outcome = msg.get("ref"), msg.get("outcome")
        if not (type(ref) is int and ref >= 0 or type(ref) is str and ref):
            raise InvalidArgument("feedback needs 'ref': the 'rid' of an earlier answer "
                                  "(unsigned int) or the routing key it was sent with (string)")
        if (not isinstance(outcome, (int, float)) or type(outcome) is bool
                or not abs(outcome) <= MAX_OUTCOME):
            raise InvalidArgument(f"feedback needs 'outcome', a finite number of magnitude at "
                                  f"most {MAX_OUTCOME:g} (label, click 0/1, reward), got "
                                  f"{brief(outcome)}")
        outcome = float(outcome)
        s = self.serving
        if s.n_fronts > 1 and not (type(ref) is int and rid_front(ref) == s.slot):
            answer = self.join(ref, outcome, relayed=True)
            if not answer["joined"]:
                # Another front may have given that answer (a client's pool
                # of connections spans fronts): the supervisor asks it.
                self.ask(conn, req_id, {"event": "feedback", "ref": ref, "outcome": outcome},
                         (ref, outcome))
                return
        else:
            answer = self.join(ref, outcome)
        conn.send(dict(answer, id=req_id))

    def join(self, ref: int | str, outcome: float, relayed: bool = False) -> dict[str, Any]:
        """Join an outcome here: its KPI, the guardrail's tally, the request
        log. ``relayed``: a miss is not counted (the front that received
        the feedback counts it once no front joined it)."""
        s = self.serving
        group = s.joins.record(ref, outcome, count_miss=not relayed)
        if s.reqlog is not None and (group is not None or not relayed):
            s.reqlog.feedback(s.joins.last_rid, outcome, group)
        answer: dict[str, Any] = {"status": 0, "joined": group is not None}
        if group is not None:
            t = s.tallies.get(group[0])
            if t is not None:
                t.outcome(group[2], outcome)
            answer.update(model=group[0], version=group[1], lane=group[2], arm=group[3])
        return answer

    def unjoined(self, outcome: float) -> None:
        """No front joined a feedback this front received: counted and logged here."""
        s = self.serving
        s.joins.unjoined += 1
        if s.reqlog is not None:
            s.reqlog.feedback(None, outcome, None)
