"""Rollout state: which stage each canary is at, guardrail checks, rollback.

The config says where the operator wants a rollout (``stage``); this module
keeps where it *is*, which may differ: auto-advanced past the configured
stage, or rolled back to weight 0. That state is persisted (``state_file``,
written atomically) so that a restart or a reload neither resumes a
rolled-back canary nor restarts a rollout from its first stage.

How the config and the saved state combine (``resolve``), per rollout:

- a new candidate, stable version or salt, or a changed ``retry``: a fresh
  rollout at the configured stage (the explicit retry of a rolled-back one);
- rolled back: stays rolled back (weight 0), whatever else the file says;
- ``stage`` edited since the state was saved: the operator moved it, so the
  configured stage wins;
- otherwise the saved weight is kept, mapped onto the (possibly edited)
  stage list: the last stage whose weight is at most the saved weight, so an
  edited list never sends a rollout back to its first stage (Argo's bug).

Every decision (reload, check, stage change, promotion, rollback) is a JSON
line in the decision log (``decision_log``) and a record of the daemon's own
log, with the figures behind it (``daemon/rollout/guardrails.py``).
"""

from __future__ import annotations

import collections
import itertools
import json
import logging
import os
import time

from ..workers.state import WorkerState
from .guardrails import CANARY, STABLE, Guardrail

log = logging.getLogger("ringserve.rollouts")
STATE_FORMAT = 1
DECISION_LOG_MAX_BYTES = 16 * 1024 * 1024  # then rotated to .1 (one old file kept)
ACTIVE, ROLLED_BACK, PROMOTED = "active", "rolled_back", "promoted"
_stage_ids = itertools.count(1)


def atomic_write_json(path: str, obj) -> None:
    """Write, fsync, rename: after a crash the file is the old one or the new
    one, never a torn mix."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_state(path: str) -> dict:
    """The saved rollouts (model -> state); {} when there is no usable file
    (a broken file is logged and set aside, not fatal: the config's stages
    are the safe fallback only if nothing was rolled back, so say so loudly)."""
    try:
        with open(path) as f:
            data = json.load(f)
        if (not isinstance(data, dict) or data.get("format") != STATE_FORMAT
                or not isinstance(data.get("rollouts"), dict)
                or not all(isinstance(v, dict) for v in data["rollouts"].values())):
            raise ValueError("not a ringserve rollout state (format 1)")
        return data["rollouts"]
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        aside = f"{path}.corrupt"
        try:
            os.replace(path, aside)
        except OSError:
            aside = None
        log.error("rollout state file unreadable; set aside, and every rollout starts from its "
                  "configured stage: check it for rolled-back canaries and set `retry` or the "
                  "stage by hand", extra={"path": path, "set_aside": aside, "error": str(e)})
        return {}


def load_rid_blocks(path: str) -> dict[int, int]:
    """Per front slot, the first request-id block no earlier start used
    (daemon/front/rids.py); {} when the file has none. Front 0's is
    ``rids.next_block`` (as before there were several fronts), the others'
    ``rids.fronts``."""
    try:
        with open(path) as f:
            rids = json.load(f).get("rids", {})
        out = {0: rids.get("next_block", 0)}
        out.update({int(k): v for k, v in rids.get("fronts", {}).items()})
        return {k: v for k, v in out.items() if type(v) is int and v >= 0}
    except (OSError, ValueError, AttributeError, TypeError):
        return {}


def _identity(r) -> dict:
    return {"stable": r.stable, "candidate": r.candidate, "salt": r.salt, "retry": r.retry}


def resolve(r, saved: dict | None, now: float) -> dict:
    """The state of rollout ``r`` (a RolloutConfig) given what was saved."""
    fresh = {**_identity(r), "status": ACTIVE, "stage": r.stage, "config_stage": r.stage,
             "stages": list(r.stages), "since": now, "reason": "configured"}
    if not saved:
        return fresh
    if saved.get("status") == ROLLED_BACK:
        if (saved.get("candidate"), saved.get("retry")) != (r.candidate, r.retry):
            return fresh  # a new candidate, or the operator's explicit retry
        # stable or salt edited: still rolled back, under the new identity
        return dict(saved, **_identity(r), stages=list(r.stages))
    if any(saved.get(k) != v for k, v in _identity(r).items()):
        return fresh
    state = dict(saved, stages=list(r.stages))
    old_stages = saved.get("stages") or []
    cs = saved.get("config_stage")
    old_config_weight = (old_stages[cs] if isinstance(cs, int) and 0 <= cs < len(old_stages)
                         else None)
    if old_config_weight != r.stages[r.stage]:
        return dict(state, stage=r.stage, config_stage=r.stage, since=now,
                    reason="stage set in the config")
    old_stage = saved.get("stage", 0)
    weight = old_stages[old_stage] if 0 <= old_stage < len(old_stages) else r.stages[r.stage]
    stage = max([i for i, w in enumerate(r.stages) if w <= weight + 1e-12] or [0])
    if stage != old_stage or list(old_stages) != list(r.stages):
        state.update(stage=stage, config_stage=r.stage, since=now,
                     reason="stage list edited; weight kept")
    return state


def weight_of(state: dict) -> float:
    return 0.0 if state["status"] == ROLLED_BACK else float(state["stages"][state["stage"]])


class DecisionLog:
    """Append-only JSON Lines; one ``write`` is one whole line (a single
    ``write`` call of a line-buffered file), rotated by size."""

    def __init__(self, path: str):
        self.path = path
        self.f = None

    def write(self, record: dict) -> None:
        record = {"ts": round(time.time(), 6), **record}
        log.info(record.get("event", "decision"), extra={"decision": record})
        try:
            if self.f is None:
                self.f = open(self.path, "a", buffering=1)
            if self.f.tell() > DECISION_LOG_MAX_BYTES:
                self.f.close()
                os.replace(self.path, self.path + ".1")
                self.f = open(self.path, "a", buffering=1)
            self.f.write(json.dumps(record, default=str) + "\n")
        except OSError as e:
            log.error("cannot write the decision log", extra={"path": self.path, "error": str(e)})

    def close(self) -> None:
        if self.f is not None:
            self.f.close()
            self.f = None


class Rollouts:
    """The machine's rollout controller (it runs in the supervisor): owns the
    state, the guardrails of each active stage and the check timer. The
    fronts count what they answer (``guardrails.Tally``) and send it here
    (``absorb``); when a weight changes, ``host.reroute()`` tells every
    front at once.

    ``host`` gives what the controller uses: ``cfg``, ``loop``,
    ``workers_of(model, version)`` (None when the version is not served;
    else objects with ``state`` and ``restarts``) and ``reroute()``."""

    def __init__(self, host):
        self.app = host
        self.states: dict[str, dict] = {}
        self.guards: dict[str, Guardrail] = {}
        self.next_check: dict[str, float] = {}
        self.path = None
        self.rid_blocks: dict[int, int] = {}  # front slot -> next free block (daemon/front/rids.py)
        self.verdicts: collections.Counter = collections.Counter()  # (model, verdict)
        self.log: DecisionLog | None = None
        self._task = None
        self._drift_at = 0.0

    # -- config ----------------------------------------------------------------
    def apply(self, cfg, event: str) -> dict[str, float]:
        """Combine ``cfg`` with the saved state (at start) or the live state
        (at reload); persist; return the canary weight of each rollout."""
        now = time.time()
        if self.log is None or self.log.path != cfg.decision_log_path:
            if self.log is not None:
                self.log.close()
            self.log = DecisionLog(cfg.decision_log_path)
        if event == "start":
            self.rid_blocks = load_rid_blocks(cfg.state_path)
        saved = load_state(cfg.state_path) if event == "start" else self.states
        self.path = cfg.state_path
        states = {r.model: resolve(r, saved.get(r.model), now) for r in cfg.rollouts}
        for model, st in states.items():
            before = saved.get(model)
            if before != st:
                self.log.write({"event": "stage", "cause": event, "model": model,
                                "weight": weight_of(st),
                                **{k: v for k, v in st.items() if k != "salt"}})
        for model, st in saved.items():
            # A rolled-back rollout taken out of the file is still remembered:
            # putting the same candidate back must not resume it.
            if model not in states and st.get("status") == ROLLED_BACK:
                states[model] = st
        self.states = states
        if cfg.rollouts or os.path.exists(self.path):
            self.persist()
        mono = time.monotonic()
        guards = {}
        for r in cfg.rollouts:
            st, g = states[r.model], self.guards.get(r.model)
            w = weight_of(st)
            gcfg = cfg.guardrail(r.model)
            if g is not None and g.weight == w and g.cfg == gcfg and g.identity == _identity(r):
                guards[r.model] = g  # same stage of the same rollout: keep its evidence
            elif w > 0:
                guards[r.model] = self._new_guard(r, gcfg, w, mono)
        self.guards = guards
        self.next_check = {m: self.next_check.get(m, mono + g.cfg.interval_s)
                           for m, g in guards.items()}
        return {m: weight_of(st) for m, st in states.items()}

    def _new_guard(self, r, gcfg, weight: float, mono: float) -> Guardrail:
        g = Guardrail(gcfg, weight, mono)
        g.stage_id = next(_stage_ids)
        g.identity = _identity(r)
        g.restart_base = self._candidate_restarts(r.model, r.candidate)
        return g

    def take_rid_block(self, slot: int) -> int:
        """The first block for a front that starts in ``slot``. The file is
        written two blocks ahead before the front is told: the front moves to
        its next block without waiting for the supervisor, which is then told
        (``rid_block_used``) and stays one block ahead. A failure to write
        is logged, not fatal (rids may repeat those of before a restart)."""
        b = self.rid_blocks.get(slot, 0)
        self.rid_blocks[slot] = b + 2
        self.persist()
        return b

    def rid_block_used(self, slot: int, next_block: int) -> None:
        if next_block + 1 > self.rid_blocks.get(slot, 0):
            self.rid_blocks[slot] = next_block + 1
            self.persist()

    def persist(self) -> None:
        state = {"format": STATE_FORMAT, "rollouts": self.states}
        if self.rid_blocks:
            state["rids"] = {"next_block": self.rid_blocks.get(0, 0),
                             "fronts": {str(k): v for k, v in sorted(self.rid_blocks.items())
                                        if k}}
        try:
            atomic_write_json(self.path, state)
        except OSError as e:
            log.error("cannot save the rollout state; a restart may not remember a rollback",
                      extra={"path": self.path, "error": str(e)})

    def stage_ids(self) -> dict[str, int]:
        """The stage each guarded rollout is in now: the fronts tag what they
        count with it, so evidence of a stage that ended is not added to the next."""
        return {m: g.stage_id for m, g in self.guards.items()}

    def absorb(self, model: str, stage_id: int, lanes: dict, routed) -> bool:
        """One front's counts since its last report; dropped (False) when
        they belong to a stage that has ended."""
        g = self.guards.get(model)
        if g is None or g.stage_id != stage_id:
            return False
        g.absorb(lanes, routed)
        return True

    # -- checks ----------------------------------------------------------------
    def start(self) -> None:
        self._task = self.app.loop.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except BaseException:
                pass
        if self.log is not None:
            self.log.close()

    async def _run(self) -> None:
        import asyncio
        while True:
            await asyncio.sleep(0.1)
            now = time.monotonic()
            for model in [m for m, t in self.next_check.items() if t <= now]:
                g = self.guards.get(model)
                if g is None:
                    continue
                self.next_check[model] = now + g.cfg.interval_s
                if not self._warm(model):
                    continue  # warming up is not evidence against the candidate
                try:
                    self.check(model, now)
                except Exception:  # a bug here must not stop the other checks
                    log.exception("guardrail check failed", extra={"model": model})

    def _rollout(self, model: str):
        return next(r for r in self.app.cfg.rollouts if r.model == model)

    def _warm(self, model: str) -> bool:
        """Both versions have a ready worker, or the candidate failed to load
        or crashed max_restarts times (which the hard floor must see)."""
        r = self._rollout(model)
        for v in (r.stable, r.candidate):
            workers = self.app.workers_of(model, v)
            if workers is None:
                return False
            if v == r.candidate and any(w.state == WorkerState.FAILED for w in workers):
                return True
            # A candidate that crashes while loading is never ready: waiting
            # for it to warm up would keep its canary lane unanswered forever.
            g = self.guards.get(model)
            if (v == r.candidate and g is not None and
                    sum(w.restarts for w in workers) - g.restart_base >= g.cfg.max_restarts):
                return True
            if not any(w.state == WorkerState.READY for w in workers):
                return False
        return True

    def _candidate_restarts(self, model: str, candidate: str) -> int:
        workers = self.app.workers_of(model, candidate)
        return sum(w.restarts for w in workers) if workers is not None else 0

    def check(self, model: str, now: float) -> str:
        r = self._rollout(model)
        st, g = self.states[model], self.guards[model]
        workers = self.app.workers_of(model, r.candidate)
        failed = workers is not None and any(w.state == WorkerState.FAILED for w in workers)
        g.restarts = self._candidate_restarts(model, r.candidate) - g.restart_base
        v = g.check(now, candidate_failed=failed)
        self.verdicts[(model, v.action)] += 1
        record = {"event": "check", "model": model, "stable": r.stable, "candidate": r.candidate,
                  "stage": st["stage"], "weight": g.weight, **v.record()}
        if v.action == "rollback":
            self.log.write(record)
            self.rollback(model, v)
            return "rollback"
        self.log.write(record)
        if v.action == "pass" and st["status"] == ACTIVE:
            dwell = time.time() - st["since"]
            canary_n = g.stage[CANARY].n
            if dwell >= r.min_dwell_s and canary_n >= r.min_samples:
                if st["stage"] + 1 < len(st["stages"]) and r.auto_advance:
                    self.verdicts[(model, "advance")] += 1
                    self._move(model, st["stage"] + 1, "advance",
                               f"stage healthy for {dwell:.0f} s over {canary_n} canary answers")
                    return "advance"
                if st["stage"] + 1 == len(st["stages"]):
                    self.verdicts[(model, "promote")] += 1
                    st.update(status=PROMOTED, reason="final stage healthy")
                    self.persist()
                    self.log.write({"event": "promote", "model": model, "candidate": r.candidate,
                                    "weight": g.weight, "dwell_s": round(dwell, 3),
                                    "canary_answers": canary_n})
                    return "promote"
        return v.action

    def _move(self, model: str, stage: int, event: str, reason: str) -> None:
        r = self._rollout(model)
        st = self.states[model]
        st.update(stage=stage, since=time.time(), reason=reason)
        self.persist()
        w = weight_of(st)
        self.guards[model] = self._new_guard(r, self.app.cfg.guardrail(model), w, time.monotonic())
        self.next_check[model] = time.monotonic() + self.guards[model].cfg.interval_s
        self.log.write({"event": event, "model": model, "candidate": r.candidate,
                        "stage": stage, "weight": w, "reason": reason})
        self.app.reroute()

    def rollback(self, model: str, verdict) -> None:
        r = self._rollout(model)
        st = self.states[model]
        st.update(status=ROLLED_BACK, since=time.time(), reason="; ".join(verdict.reasons))
        self.persist()  # before anything else: a crash now must not resume the canary
        self.guards.pop(model, None)
        self.next_check.pop(model, None)
        self.log.write({"event": "rollback", "model": model, "stable": r.stable,
                        "candidate": r.candidate, "weight": 0.0, **verdict.record()})
        log.error("canary rolled back", extra={"model": model, "candidate": r.candidate,
                                               "reasons": verdict.reasons})
        self.app.reroute()

    def snapshot(self, model: str | None = None) -> list[dict]:
        out = []
        for m, st in self.states.items():
            if model is not None and m != model:
                continue
            g = self.guards.get(m)
            out.append({"model": m, "stable": st["stable"], "candidate": st["candidate"],
                        "weight": weight_of(st), "stage": st["stage"], "stages": st["stages"],
                        "status": st["status"], "reason": st["reason"],
                        "guard": None if g is None else {
                            "failing_checks": g.failing,
                            STABLE: g.totals(STABLE).summary(),
                            CANARY: g.totals(CANARY).summary()}})
        return out
