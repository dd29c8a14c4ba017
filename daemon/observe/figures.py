"""The machine's figures: every front's counters, summed by the supervisor.

A front keeps its counters as it always did (``daemon/observe/stats.py``: plain
ints, Counters and histograms, no locks); ``front_figures(app)`` copies them
into one picklable dict. The supervisor asks every front for it when a
``stats`` request or a scrape of /metrics comes (so both are exact up to that
moment), and each front also sends it once a second unasked, so that a front
that dies leaves its last figures behind.

``Figures`` merges them: the live fronts' latest figures plus, for every
front that died, its last figures folded into ``retired`` (counters and
histograms only: a dead front holds no connections and its recent
latencies are not recent). So a total never goes down when a front is
restarted (Prometheus would read that as a counter reset); what a front
killed with SIGKILL had counted since its last report (at most a second) is
lost, and docs/operations.md says so.

``MachineView`` shows the merged figures with the attributes the metrics
collector reads (``daemon/supervisor/metrics.py``), and ``stats_answer`` builds the
``stats`` op's answer from them: one collector and one answer format,
whatever the number of fronts. Prometheus's multiprocess mode is not used:
it writes a file per process per metric and cannot hold the guardrails'
histograms exactly.
"""

from __future__ import annotations

import collections
import copy
import os
import time
from typing import TYPE_CHECKING, Any

from ..workers.state import WorkerState
from .stats import BusyMeter, LatencyWindow, ModelStats

if TYPE_CHECKING:
    from collections.abc import Iterable

    from ..config import Config
    from ..front.gate import Gate
    from ..front.state import Serving
    from ..rollout.controller import Rollouts
    from ..serving.queue import ModelQueue
    from ..serving.shadow import Shadow

# Snapshot keys that are settings or states, not counts: the first front's
# value stands (they are equal on every front), except where any front's does.
_SAME = frozenset({"ttl_s", "max_bytes", "queue_limit", "sample_rate", "rate_per_client",
                   "version", "on", "dir", "auth", "model", "candidate", "name", "lane",
                   "mean", "stderr", "agreement", "score_diff_mean", "score_diff_max",
                   "latency_us"})
_ANY = frozenset({"degraded"})


def merge_snapshot(a: Any, b: Any) -> Any:
    """Sum two JSON-shaped snapshots of the same thing (numbers add, maps
    merge key by key, everything else is the first one's)."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = dict(a)
        for k, v in b.items():
            if k not in out:
                out[k] = v
            elif k in _ANY:
                out[k] = bool(out[k]) or bool(v)
            elif k not in _SAME:
                out[k] = merge_snapshot(out[k], v)
        return out
    if type(a) in (int, float) and type(b) in (int, float):
        return a + b
    return a if a is not None else b


# -- in a front ---------------------------------------------------------------------------

def _shadow(sh: Shadow) -> dict[str, Any]:
    return {"model": sh.model, "candidate": sh.candidate, "by_status": sh.by_status,
            "shed": sh.shed, "mirrored": sh.mirrored, "compared": sh.compared,
            "agreed": sh.agreed, "incomparable": sh.incomparable, "diff_sum": sh.diff_sum,
            "diff_max": sh.diff_max, "pending": len(sh.waiting), "sample_rate":
            sh.cfg.sample_rate, "latency": sh.latency}


def front_figures(serving: Serving, gate: Gate, queues_served: Iterable[ModelQueue],
                  reloads: dict[str, int]) -> dict[str, Any]:
    """Everything the machine's stats and metrics read of a front: its
    request state (daemon/front/state.py), its connections' gate, every queue
    with live workers (serving and retiring) and its reload counts."""
    queues = []
    for q in queues_served:
        queues.append({
            "key": (q.name, q.version), "lane": q.lane, "queued": q.queued,
            "in_flight": q.in_flight, "held": sum(q.held.values()), "stats": q.stats,
            "cache": q.cache.snapshot() if q.cache is not None else None,
            "drift": (q.drift.feed(), q.drift.snapshot(), list(q.drift.named_distances()))[1:]
            if q.drift is not None else None,
            "fallback": (q.fallback.snapshot(), q.fallback.answered)
            if q.fallback is not None else None,
            "serving": (q.name, q.version) in serving.queues,
            "workers": [{"uid": w.uid, "busy": w.busy, "batches": w.batches,
                         "in_flight_batches": w.in_flight} for w in q.workers]})
    joins = serving.joins
    return {"slot": serving.slot, "pid": os.getpid(), "connections": len(gate.conns),
            "draining": serving.draining, "ready": serving.ready(), "degraded": serving.degraded(),
            "max_connections": gate.max_conns, "frame_bytes": gate.frame_bytes,
            "closed_by": gate.closed_by, "rejected": serving.rejected, "reloads": reloads,
            "access": serving.access.snapshot() if serving.access is not None else None,
            "access_refused": serving.access.refused if serving.access is not None else None,
            "kpis": joins.kpis, "joined": joins.joined, "unjoined": joins.unjoined,
            "shadows": [_shadow(sh) for sh in serving.shadows.values()],
            "reqlog": serving.reqlog.snapshot() if serving.reqlog is not None else None,
            "queues": queues}


# -- in the supervisor --------------------------------------------------------------------

_COUNTERS = ("closed_by", "rejected", "reloads")


def _queue_copy(q: dict[str, Any], live: bool) -> dict[str, Any]:
    nq = copy.deepcopy(q)
    if not live:
        lat = nq["stats"].latency
        lat.cur, lat.prev = [0] * len(lat.cur), [0] * len(lat.prev)
        nq["queued"] = nq["in_flight"] = nq["held"] = 0
        for w in nq["workers"]:
            w["in_flight_batches"] = 0
    return nq


def _fold(into: dict[str, Any] | None, f: dict[str, Any], live: bool) -> dict[str, Any]:
    """``into`` + ``f`` (a copy of ``f`` when ``into`` is None); ``live``
    False adds only what a dead front leaves: counters and histograms."""
    if into is None:
        out = {k: copy.deepcopy(v) for k, v in f.items() if k != "queues"}
        out["queues"] = [_queue_copy(q, live) for q in f["queues"]]
        if not live:
            out["connections"] = out["frame_bytes"] = 0
            out["ready"], out["draining"], out["degraded"] = True, False, False
            for sh in out["shadows"]:
                sh["pending"] = 0
        return out
    for k in _COUNTERS:
        into[k] = collections.Counter(into[k]) + collections.Counter(f[k])
    if f["access_refused"] is not None:
        into["access_refused"] = collections.Counter(into["access_refused"] or {}) + \
            collections.Counter(f["access_refused"])
    into["access"] = merge_snapshot(into["access"], f["access"])
    into["reqlog"] = merge_snapshot(into["reqlog"], f["reqlog"])
    for g, k in f["kpis"].items():
        mine = into["kpis"].get(g)
        if mine is None:
            into["kpis"][g] = copy.copy(k)
        else:
            mine.n += k.n
            mine.sum += k.sum
            mine.sumsq += k.sumsq
    into["joined"] += f["joined"]
    into["unjoined"] += f["unjoined"]
    if live:
        into["connections"] += f["connections"]
        into["frame_bytes"] += f["frame_bytes"]
        into["ready"] = into["ready"] and f["ready"]
        into["degraded"] = into["degraded"] or f["degraded"]
        into["draining"] = into["draining"] or f["draining"]
        into["max_connections"] = max(into["max_connections"], f["max_connections"])
    shadows = {(s["model"], s["candidate"]): s for s in into["shadows"]}
    for s in f["shadows"]:
        mine = shadows.get((s["model"], s["candidate"]))
        if mine is None:
            into["shadows"].append(copy.deepcopy(s))
            continue
        for k in ("mirrored", "compared", "agreed", "incomparable", "diff_sum", "pending"):
            mine[k] += s[k]
        mine["diff_max"] = max(mine["diff_max"], s["diff_max"])
        mine["by_status"] = (collections.Counter(mine["by_status"])
                             + collections.Counter(s["by_status"]))
        mine["shed"] = collections.Counter(mine["shed"]) + collections.Counter(s["shed"])
        if live:
            mine["latency"].merge(s["latency"])
    queues = {q["key"]: q for q in into["queues"]}
    for q in f["queues"]:
        mine = queues.get(q["key"])
        if mine is None:
            into["queues"].append(_queue_copy(q, live))
            continue
        mine["stats"].merge(q["stats"], windows=live)
        mine["serving"] = mine["serving"] or q["serving"]
        if live:
            for k in ("queued", "in_flight", "held"):
                mine[k] += q[k]
        mine["cache"] = merge_snapshot(mine["cache"], q["cache"])
        if mine["drift"] is None:
            mine["drift"] = q["drift"]
        if q["fallback"] is not None:
            snap, answered = q["fallback"]
            if mine["fallback"] is None:
                mine["fallback"] = copy.deepcopy(q["fallback"])
            else:
                mine["fallback"] = (merge_snapshot(mine["fallback"][0], snap),
                                    collections.Counter(mine["fallback"][1]) + answered)
        workers = {w["uid"]: w for w in mine["workers"]}
        for w in q["workers"]:
            mw = workers.get(w["uid"])
            if mw is None:
                mine["workers"].append(copy.deepcopy(w))
            else:
                mw["busy"].merge(w["busy"])
                mw["batches"] += w["batches"]
                if live:
                    mw["in_flight_batches"] += w["in_flight_batches"]
    return into


class Figures:
    """The latest figures of each live front and what dead fronts left."""

    def __init__(self) -> None:
        self.live: dict[int, dict[str, Any]] = {}  # front slot -> its latest figures
        self.retired: dict[str, Any] | None = None  # every dead front's last figures, summed

    def update(self, slot: int, figures: dict[str, Any]) -> None:
        self.live[slot] = figures

    def front_died(self, slot: int) -> None:
        f = self.live.pop(slot, None)
        if f is not None:
            self.retired = _fold(self.retired, f, live=False)

    def merged(self) -> dict[str, Any] | None:
        out = None
        for f in self.live.values():
            out = _fold(out, f, live=True)
        if self.retired is not None:
            out = _fold(out, self.retired, live=False)
        return out


class _WorkerView:
    __slots__ = ("device", "index", "busy", "restarts", "state", "batches", "info",
                 "in_flight_batches")
    device: str
    index: int
    busy: BusyMeter
    restarts: int
    state: str
    batches: int
    info: dict[str, Any]
    in_flight_batches: int

    def stats(self) -> dict[str, Any]:
        i = self.info
        return {"device": self.device, "pid": i.get("pid"), "state": self.state,
                "busy": self.busy.fraction(), "batches": self.batches, "restarts": self.restarts,
                "in_flight_batches": self.in_flight_batches, "compile": i.get("compile"),
                "compiled": i.get("compiled"), "pinned": i.get("pinned"), "h2d": i.get("h2d")}


class _FallbackView:
    __slots__ = ("answered", "snap")
    answered: collections.Counter[tuple[str, str | None, str, str]]  # (lane, arm, reason, by)
    snap: dict[str, Any]


class _DriftView:
    __slots__ = ("snap", "distances")
    snap: dict[str, Any]
    distances: list[tuple[str, float]]

    def named_distances(self) -> list[tuple[str, float]]:
        return self.distances


class _QueueView:
    __slots__ = ("name", "version", "lane", "stats", "queued", "in_flight", "held", "cache",
                 "drift", "fallback", "workers")
    name: str
    version: str
    lane: str
    stats: ModelStats
    queued: int
    in_flight: int
    held: int
    cache: dict[str, Any] | None
    drift: _DriftView | None
    fallback: _FallbackView | None
    workers: list[_WorkerView]


class _ShadowView:
    # Set from the dict _shadow makes, by __dict__.update (which a type checker cannot follow).
    model: str
    candidate: str
    by_status: collections.Counter[int]
    shed: collections.Counter[str]
    mirrored: int
    compared: int
    agreed: int
    incomparable: int
    diff_sum: float
    diff_max: float
    pending: int
    sample_rate: float
    latency: LatencyWindow

    def __init__(self, s: dict[str, Any]) -> None:
        self.__dict__.update(s)

    def snapshot(self) -> dict[str, Any]:
        c = self.compared
        return {"model": self.model, "candidate": self.candidate,
                "sample_rate": self.sample_rate, "mirrored": self.mirrored,
                "shed": dict(self.shed), "pending": self.pending,
                "answers": {str(k): v for k, v in sorted(self.by_status.items())},
                "compared": c, "incomparable": self.incomparable,
                "agreement": round(self.agreed / c, 6) if c else None,
                "score_diff_mean": round(self.diff_sum / c, 9) if c else None,
                "score_diff_max": round(self.diff_max, 9) if c else None,
                "latency_us": self.latency.percentiles()}


class _Refused:
    __slots__ = ("refused",)
    refused: dict[str, int]


class _Reqlog:
    __slots__ = ("written", "dropped")
    written: int
    dropped: int


class MachineView:
    """The merged figures, shaped as the collector and ``stats_answer`` read
    them. ``workers`` is the supervisor's: uid -> (config key, device,
    index, info dict)."""

    def __init__(self, merged: dict[str, Any],
                 workers: dict[int, tuple[tuple[str, str], str, int, dict[str, Any]]],
                 rollouts: Rollouts | None, cfg: Config, ready: bool,
                 draining: bool, started: float) -> None:
        self.cfg = cfg
        self.rollouts = rollouts
        self.draining = draining or merged["draining"]
        self._ready = ready and merged["ready"] and not self.draining
        self._degraded = merged["degraded"]
        self.started = started
        m = merged
        self.rejected, self.reloads, self.closed_by = m["rejected"], m["reloads"], m["closed_by"]
        self.conns = range(m["connections"])
        self.frame_bytes = m["frame_bytes"]
        self.max_conns = m["max_connections"]
        self.merged = m
        self.access: _Refused | None
        self.reqlog: _Reqlog | None
        if m["access_refused"] is not None:
            self.access = _Refused()
            self.access.refused = m["access_refused"]
        else:
            self.access = None
        if m["reqlog"] is not None:
            self.reqlog = _Reqlog()
            self.reqlog.written, self.reqlog.dropped = (m["reqlog"]["written"],
                                                        m["reqlog"]["dropped"])
        else:
            self.reqlog = None
        self.shadows = {(s["model"], s["candidate"]): _ShadowView(s) for s in m["shadows"]}
        serving: list[_QueueView] = []
        draining_q: list[_QueueView] = []
        for q in m["queues"]:
            v = _QueueView()
            v.name, v.version = q["key"]
            v.lane, v.stats, v.queued, v.in_flight, v.held = (
                q["lane"], q["stats"], q["queued"], q["in_flight"], q["held"])
            v.cache = q["cache"]
            v.drift = None
            if q["drift"] is not None:
                v.drift = _DriftView()
                v.drift.snap, v.drift.distances = q["drift"]
            v.fallback = None
            if q["fallback"] is not None:
                v.fallback = _FallbackView()
                v.fallback.snap, v.fallback.answered = q["fallback"]
            v.workers = []
            for w in q["workers"]:
                wv = _WorkerView()
                key, wv.device, wv.index, info = workers.get(
                    w["uid"], (q["key"], "?", 0, {"state": WorkerState.STOPPED}))
                wv.info = info
                wv.state, wv.restarts = info.get("state", "?"), info.get("restarts", 0)
                wv.busy, wv.batches = w["busy"], w["batches"]
                wv.in_flight_batches = w["in_flight_batches"]
                v.workers.append(wv)
            (serving if q["serving"] else draining_q).append(v)
        self.queues = serving
        self.retiring = draining_q

    def all_queues(self) -> list[_QueueView]:
        return self.queues + self.retiring

    def ready(self) -> bool:
        return self._ready

    def degraded(self) -> bool:
        return self._degraded


def stats_answer(view: MachineView, req_id: int, name: str | None, fronts: list[dict[str, Any]],
                 answered_by: int) -> dict[str, Any]:
    """The ``stats`` op's answer (docs/protocol.md), for the whole machine."""
    out = []
    for q in view.queues:
        if name is not None and q.name != name:
            continue
        d: dict[str, Any]
        d = {"name": q.name, "version": q.version, "lane": q.lane,
             "queue_depth": q.queued, "in_flight_batches": q.in_flight}
        d.update(q.stats.snapshot())
        if q.cache is not None:
            d["cache"] = dict(d["cache"], **q.cache)
        if q.drift is not None:
            d["drift"] = q.drift.snap
        d["held"] = q.held
        if q.fallback is not None:
            d["fallback"] = q.fallback.snap
        d["workers"] = [w.stats() for w in q.workers]
        out.append(d)
    m = view.merged
    kpis = [dict(model=g[0], version=g[1], lane=g[2], arm=g[3], **k.snapshot())
            for g, k in sorted(m["kpis"].items(), key=lambda e: str(e[0]))
            if name is None or g[0] == name]
    return {"id": req_id, "status": 0, "uptime_s": round(time.monotonic() - view.started, 3),
            "front": answered_by, "fronts": fronts,
            "connections": len(view.conns), "draining": view.draining,
            "limits": {"max_connections": view.max_conns, "frame_buffer_bytes": view.frame_bytes,
                       "closed": dict(view.closed_by)},
            "rejected": {str(k): v for k, v in sorted(view.rejected.items())},
            "models": out, "kpis": kpis, "reloads": dict(view.reloads),
            "feedback": {"joined": m["joined"], "unjoined": m["unjoined"]},
            "access": m["access"],
            "rollouts": view.rollouts.snapshot(name) if view.rollouts is not None else [],
            "shadows": [sh.snapshot() for sh in view.shadows.values()
                        if name is None or sh.model == name],
            "request_log": m["reqlog"]}


__all__ = ["BusyMeter", "Figures", "MachineView", "ModelStats", "front_figures",
           "merge_snapshot", "stats_answer"]
