"""Which model version answers a request: canary lanes, A/B arms, pinning.

The assignment is a pure function of (salt, key), specified in
``docs/protocol.md`` ("Routing hash"), so that another daemon, an offline job
or a client in another language computes the same lane and arm::

    bucket(salt, key) = int.from_bytes(
        sha256((salt + "\\x1f" + key).encode()).digest()[:8], "big") % 10000

Order of decisions for one request of model M:

1. ``version`` pinned by the caller: that version, no experiment, lane by
   version (the rollout's candidate is the canary lane).
2. ``exp`` names an experiment on M and the key falls inside its coverage:
   the arm by cumulative split of ``bucket(exp.salt, key)``; an arm that names
   a version routes there, an arm that is only a label keeps step 3's version.
3. M has a rollout: the canary lane (its candidate) when
   ``bucket(rollout.salt, key) < weight * 10000``; raising the weight keeps
   every earlier canary member in the canary (stickiness). Otherwise, and
   without a rollout, the stable version.

A request without a key is assigned at random (a uniform bucket drawn per
request), so unkeyed traffic still splits by the configured shares.

A ``RoutingTable`` is an immutable snapshot: a reload builds a new one and
swaps it in one assignment, and a request keeps the version it was routed to.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from ..config import Config

BUCKETS = 10000
STABLE = "stable"
CANARY = "canary"


def bucket(salt: str, key: str) -> int:
    digest = hashlib.sha256((salt + "\x1f" + key).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % BUCKETS


@dataclass(frozen=True)
class Arm:
    name: str
    upper: int              # cumulative bucket bound (exclusive) of this arm
    version: str | None


@dataclass(frozen=True)
class Experiment:
    id: str
    model: str
    salt: str
    covered: int            # buckets below this are in the experiment
    arms: tuple[Arm, ...]

    def arm(self, b: int) -> Arm | None:
        if b >= self.covered:
            return None
        for a in self.arms:
            if b < a.upper:
                return a
        return self.arms[-1]  # rounding of the cumulative split


@dataclass(frozen=True)
class Rollout:
    model: str
    stable: str
    candidate: str
    salt: str
    weight: float           # 0 when rolled back

    @property
    def threshold(self) -> int:
        return int(round(self.weight * BUCKETS))


class UnknownExperiment(LookupError):
    pass


class RoutingTable:
    def __init__(self, default_version: dict[str, str], rollouts: dict[str, Rollout],
                 experiments: dict[str, Experiment], routed: dict[str, list] | None = None):
        self.default_version = default_version
        self.rollouts = rollouts
        self.experiments = experiments
        # model -> [stable, canary] requests routed by the rollout's hash (not
        # pinned, not sent to a version by an experiment arm): the observed
        # lane shares that the guardrails' sample-ratio check compares with
        # the weight.
        self.routed = routed or {}
        self._rand = random.Random()

    def route(self, model: str, key: str | None, exp: str | None,
              version: str | None) -> tuple[str, str, str | None]:
        """(version, lane, arm) for a request; the model must exist."""
        ro = self.rollouts.get(model)
        if version is not None:
            return version, (CANARY if ro is not None and version == ro.candidate else STABLE), None
        arm = None
        if exp is not None:
            ex = self.experiments.get(exp)
            if ex is None or ex.model != model:
                raise UnknownExperiment(exp)
            b = bucket(ex.salt, key) if key is not None else self._rand.randrange(BUCKETS)
            a = ex.arm(b)
            if a is not None:
                arm = a.name
                if a.version is not None:
                    return a.version, (CANARY if ro is not None and a.version == ro.candidate
                                       else STABLE), arm
        if ro is not None:
            b = bucket(ro.salt, key) if key is not None else self._rand.randrange(BUCKETS)
            counts = self.routed.get(model)
            if b < ro.threshold:
                if counts is not None:
                    counts[1] += 1
                return ro.candidate, CANARY, arm
            if counts is not None:
                counts[0] += 1
            return ro.stable, STABLE, arm
        return self.default_version[model], STABLE, arm

    @classmethod
    def from_config(cls, cfg: Config, weights: dict[str, float] | None = None,
                    routed: dict[str, list] | None = None) -> "RoutingTable":
        """Build from a Config. ``weights`` (rollout model -> weight) overrides
        the configured stage: what the rollout state says now (auto-advanced,
        rolled back). ``routed`` (model -> [stable, canary]) counts what the
        rollouts route."""
        default: dict[str, str] = {}
        for m in cfg.models:
            default.setdefault(m.name, m.version)
        rollouts = {}
        for r in getattr(cfg, "rollouts", ()):
            w = (weights or {}).get(r.model, r.stages[r.stage])
            rollouts[r.model] = Rollout(r.model, r.stable, r.candidate, r.salt, w)
            default[r.model] = r.stable
        experiments = {}
        for e in getattr(cfg, "experiments", ()):
            covered = int(round(e.coverage * BUCKETS))
            arms, cum = [], 0.0
            for a in e.arms:
                cum += a.split
                arms.append(Arm(a.name, int(round(cum * covered)), a.version))
            experiments[e.id] = Experiment(e.id, e.model, e.salt, covered, tuple(arms))
        return cls(default, rollouts, experiments, routed)
