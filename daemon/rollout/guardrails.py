"""Canary guardrails: is the candidate worse than the stable version?

Pure maths and bookkeeping, no I/O: ``Guardrail.observe`` takes each answer
of the two lanes, ``Guardrail.check(now)`` returns a ``Verdict`` with the
figures behind it. ``daemon/rollout/controller.py`` runs the checks on a timer and acts
on the verdicts.

Why these rules (the complaints about Argo Rollouts and Flagger we set out
to fix):

- Fixed thresholds on noisy windows roll back healthy canaries. So every
  *relative* rule (canary against stable) is a sequential test that may be
  looked at after every check without inflating its error: the mixture
  sequential probability ratio test (mSPRT, Robbins 1970; Johari et al.,
  "Always valid inference", 2017) on the difference of the two lanes, with a
  normal mixing distribution. Its false-rollback rate over the whole stage is
  at most ``alpha`` (asymptotically; ``tests/unit/rollout/test_guardrails.py``
  measures it on A/A streams), however often it is checked. The data of a
  test is everything since the stage began, not a sliding window: a sliding
  window forgets and restarts, and a test restarted every window is no longer
  anytime-valid. Each stage is a fresh test, so a rollout of S stages has a
  false-rollback rate of at most S x alpha.
- "No data" is not a failure (flagger#1633): fewer than ``min_samples``
  answers in a lane means HOLD: never advance, never roll back on it.
- Failure counters reset on a passing check (Flagger's never reset): the
  *absolute* limits (canary error rate and p95 over ``window_s``) roll back
  only after ``failing_checks`` failing checks in a row.
- A hard floor does not wait for statistics: a canary error rate above
  ``hard_error_rate`` over at least ``hard_min_samples`` answers, or a
  candidate worker that crash-loops, rolls back at once.
- A sample-ratio mismatch (the canary's observed share of routed traffic is
  not its weight) means the comparison with stable is biased: it freezes the
  relative tests and advancing, and is reported; the hard floor and the
  absolute limits still act, so a broken canary is still rolled back. The
  check counts requests, and routing is sticky per key: a few very heavy
  keys make it fire on honest traffic (a known limit; counting distinct keys
  would fix it).

The tests:

- errors: ``canary_rate - stable_rate - error_rate_margin > 0`` with the
  pooled binomial variance; the mixing scale is the pooled rate (it has the
  most power near a doubling of the error rate).
- latency: an answer is *slow* when it takes longer than ``(1 +
  latency_margin)`` x the stable lane's p95 in this stage; the test is on the
  difference of the slow fractions, so it compares the tails (what p95
  guardrails are for) with a proportion test that needs no distribution.
  Both lanes are counted against the same threshold, so under A/A the two
  fractions are equal whatever the threshold is.
- KPI (when ``kpi`` is on): the stable lane's mean outcome minus the
  canary's, less ``kpi_margin``, with sample variances (a drop of the canary
  is the regression; higher outcomes are better).
"""

from __future__ import annotations

import collections
import math
from dataclasses import dataclass, field

# What a guardrail is told of an answer its version's fallback gave
# (daemon/serving/fallback.py): not a status of the protocol (the caller got OK),
# but the version's failure all the same.
FALLBACK = -1
# DEADLINE_EXCEEDED, INTERNAL, UNAVAILABLE, fallback
ERROR_STATUSES = frozenset((4, 13, 14, FALLBACK))
STABLE = "stable"
CANARY = "canary"

# -- statistics ---------------------------------------------------------------


def msprt_log_lr(theta: float, var: float, tau2: float) -> float:
    """log of the mixture likelihood ratio for an observed effect ``theta``
    with sampling variance ``var``, normal mixture N(0, tau2) over the true
    effect. H0 (no effect) is rejected, anytime-validly, once this reaches
    log(1/alpha)."""
    if var <= 0 or tau2 <= 0:
        return 0.0
    return 0.5 * math.log(var / (var + tau2)) + tau2 * theta * theta / (2 * var * (var + tau2))


def proportion_test(x1: int, n1: int, x2: int, n2: int, margin: float,
                    tau: float) -> tuple[float, float]:
    """(effect, log LR) for "lane 1's rate exceeds lane 2's by more than
    margin"; the log LR is 0 unless the effect is positive (one-sided)."""
    if n1 == 0 or n2 == 0:
        return 0.0, 0.0
    effect = x1 / n1 - x2 / n2 - margin
    pooled = (x1 + x2 + 0.5) / (n1 + n2 + 1)
    var = pooled * (1 - pooled) * (1 / n1 + 1 / n2)
    if effect <= 0:
        return effect, 0.0
    return effect, msprt_log_lr(effect, var, max(tau, 1e-4) ** 2)


def srm_p_value(n_canary: int, n_total: int, weight: float) -> float:
    """Two-sided p-value of the canary's share of routed traffic against its
    weight (normal approximation of the binomial)."""
    if n_total == 0 or not 0 < weight < 1:
        return 1.0
    sd = math.sqrt(n_total * weight * (1 - weight))
    z = abs(n_canary - weight * n_total) / sd
    return math.erfc(z / math.sqrt(2))


class LatencyHistogram:
    """Log-spaced latency bins, 50 per decade (4.7 % wide) from 1 us: bounded
    memory, O(1) to record, mergeable, good enough for a p95 compared at a
    10 % margin."""

    PER_DECADE = 50
    BINS = 9 * PER_DECADE  # 1 us .. 1000 s
    __slots__ = ("counts", "n")

    def __init__(self):
        self.counts = [0] * self.BINS
        self.n = 0

    @classmethod
    def bin_of(cls, us: float) -> int:
        if us < 1:
            return 0
        return min(cls.BINS - 1, int(math.log10(us) * cls.PER_DECADE))

    @classmethod
    def upper_us(cls, i: int) -> float:
        return 10 ** ((i + 1) / cls.PER_DECADE)

    def add(self, us: float) -> None:
        self.counts[self.bin_of(us)] += 1
        self.n += 1

    def add_many(self, us) -> None:
        """Record an array of latencies at once (simulations, offline replays)."""
        import numpy as np
        us = np.maximum(np.asarray(us, dtype=np.float64), 1.0)
        idx = np.minimum((np.log10(us) * self.PER_DECADE).astype(np.int64), self.BINS - 1)
        for i, v in enumerate(np.bincount(idx, minlength=self.BINS).tolist()):
            if v:
                self.counts[i] += v
        self.n += len(us)

    def merge(self, other: "LatencyHistogram", sign: int = 1) -> None:
        c = self.counts
        for i, v in enumerate(other.counts):
            if v:
                c[i] += sign * v
        self.n += sign * other.n

    def quantile_bin(self, q: float) -> int | None:
        if not self.n:
            return None
        need = q * self.n
        run = 0
        for i, v in enumerate(self.counts):
            run += v
            if run >= need:
                return i
        return self.BINS - 1

    def quantile_us(self, q: float) -> float | None:
        i = self.quantile_bin(q)
        return None if i is None else self.upper_us(i)

    def count_above_bin(self, i: int) -> int:
        return sum(self.counts[i + 1:])


# -- bookkeeping ---------------------------------------------------------------


class LaneCounts:
    """Answers of one lane over some span: count, errors, latency, outcomes."""

    __slots__ = ("n", "errors", "latency", "kpi_n", "kpi_sum", "kpi_sumsq")

    def __init__(self):
        self.n = 0
        self.errors = 0
        self.latency = LatencyHistogram()
        self.kpi_n = 0
        self.kpi_sum = 0.0
        self.kpi_sumsq = 0.0

    def add(self, status: int, latency_us: float) -> None:
        self.n += 1
        if status in ERROR_STATUSES:
            self.errors += 1
        elif status == 0:
            self.latency.add(latency_us)

    def add_many(self, errors: int, ok_latencies_us) -> None:
        """``errors`` failed answers and one OK answer per latency given."""
        self.n += errors + len(ok_latencies_us)
        self.errors += errors
        self.latency.add_many(ok_latencies_us)

    def add_outcome(self, x: float) -> None:
        self.kpi_n += 1
        self.kpi_sum += x
        self.kpi_sumsq += x * x

    def merge(self, o: "LaneCounts", sign: int = 1) -> None:
        """Add (sign 1) or take away (sign -1) another span's counts."""
        self.n += sign * o.n
        self.errors += sign * o.errors
        self.latency.merge(o.latency, sign)
        self.kpi_n += sign * o.kpi_n
        self.kpi_sum += sign * o.kpi_sum
        self.kpi_sumsq += sign * o.kpi_sumsq

    @property
    def error_rate(self) -> float | None:
        return self.errors / self.n if self.n else None

    def kpi_mean_var(self) -> tuple[float, float] | None:
        if self.kpi_n < 2:
            return None
        mean = self.kpi_sum / self.kpi_n
        return mean, max(0.0, self.kpi_sumsq / self.kpi_n - mean * mean)

    def summary(self) -> dict:
        p95 = self.latency.quantile_us(0.95)
        mv = self.kpi_mean_var()
        return {"n": self.n, "errors": self.errors,
                "error_rate": None if self.error_rate is None else round(self.error_rate, 6),
                "p95_us": None if p95 is None else round(p95),
                "kpi_n": self.kpi_n, "kpi_mean": None if mv is None else round(mv[0], 6)}


@dataclass
class Verdict:
    """What one check found. ``action``: hold, pass, fail (an absolute limit
    broken, not yet enough times in a row) or rollback; ``reasons`` say why
    in words, ``measured`` and ``thresholds`` give the figures."""

    action: str
    reasons: list[str] = field(default_factory=list)
    measured: dict = field(default_factory=dict)
    thresholds: dict = field(default_factory=dict)
    srm: bool = False

    def record(self) -> dict:
        return {"verdict": self.action, "reasons": self.reasons, "measured": self.measured,
                "thresholds": self.thresholds, "srm": self.srm}


class Guardrail:
    """The guardrail state of one rollout stage: counts since the stage began
    (for the sequential tests), per-check buckets (for the windowed absolute
    limits), the consecutive-failure counter and the routed-traffic counts
    (for the sample-ratio check).

    ``cfg`` is a ``daemon.config.GuardrailConfig``; ``weight`` the canary's
    share of routed traffic in this stage."""

    def __init__(self, cfg, weight: float, now: float):
        self.cfg = cfg
        self.weight = weight
        self.started = now
        self.stage = {STABLE: LaneCounts(), CANARY: LaneCounts()}
        self.current = {STABLE: LaneCounts(), CANARY: LaneCounts()}
        self.windows: collections.deque = collections.deque()  # (t_closed, {lane: LaneCounts})
        self.window = {STABLE: LaneCounts(), CANARY: LaneCounts()}  # sum of self.windows
        self.failing = 0
        self.routed = [0, 0]  # [stable, canary] requests the rollout routed (not pinned)
        self.restarts = 0     # candidate worker crashes in this stage
        self.restart_base = 0  # the candidate's restart count when the stage began
        self.identity = None   # the rollout (versions, salt, retry) this stage belongs to
        self.stage_id = 0      # names this stage to the fronts (rollouts._stage_ids)

    def totals(self, lane: str) -> LaneCounts:
        """The stage so far, the bucket not yet checked included."""
        t = LaneCounts()
        t.merge(self.stage[lane])
        t.merge(self.current[lane])
        return t

    def absorb(self, lanes: dict, routed) -> None:
        """A front's counts since its last report (``Tally.take``)."""
        for lane, c in lanes.items():
            mine = self.current.get(lane)
            if mine is not None:
                mine.merge(c)
        self.routed[0] += routed[0]
        self.routed[1] += routed[1]

    # what the tests of this module feed directly (a front feeds a Tally)
    def observe(self, lane: str, status: int, latency_us: float) -> None:
        c = self.current.get(lane)
        if c is not None:
            c.add(status, latency_us)

    def outcome(self, lane: str, x: float) -> None:
        c = self.current.get(lane)
        if c is not None:
            c.add_outcome(x)


    def _roll(self, now: float) -> dict[str, LaneCounts]:
        """Close the current bucket; the window's sums per lane."""
        win = self.window
        for lane, c in self.current.items():
            self.stage[lane].merge(c)
            win[lane].merge(c)
        self.windows.append((now, self.current))
        self.current = {STABLE: LaneCounts(), CANARY: LaneCounts()}
        horizon = now - self.cfg.window_s
        while self.windows and self.windows[0][0] <= horizon:
            for lane, c in self.windows.popleft()[1].items():
                win[lane].merge(c, -1)
        return win

    def check(self, now: float, candidate_failed: bool = False) -> Verdict:
        cfg = self.cfg
        win = self._roll(now)
        st, ca = self.stage[STABLE], self.stage[CANARY]
        v = Verdict("hold")
        v.measured = {"stage_s": round(now - self.started, 3), "weight": self.weight,
                      "stage": {STABLE: st.summary(), CANARY: ca.summary()},
                      "window": {STABLE: win[STABLE].summary(), CANARY: win[CANARY].summary()},
                      "routed": {STABLE: self.routed[0], CANARY: self.routed[1]},
                      "candidate_restarts": self.restarts, "failing_checks": self.failing}
        v.thresholds = {"alpha": cfg.alpha, "min_samples": cfg.min_samples,
                        "max_error_rate": cfg.max_error_rate, "max_p95_ms": cfg.max_p95_ms,
                        "failing_checks": cfg.failing_checks,
                        "error_rate_margin": cfg.error_rate_margin,
                        "latency_margin": cfg.latency_margin, "kpi": cfg.kpi,
                        "kpi_margin": cfg.kpi_margin, "hard_error_rate": cfg.hard_error_rate,
                        "hard_min_samples": cfg.hard_min_samples,
                        "max_restarts": cfg.max_restarts, "srm_alpha": cfg.srm_alpha}

        # 1. the hard floor: at once, whatever else holds
        wc = win[CANARY]
        if candidate_failed:
            v.reasons.append("a candidate worker failed to load")
        if self.restarts >= cfg.max_restarts:
            v.reasons.append(f"candidate workers crashed {self.restarts} times in this stage "
                             f"(max_restarts = {cfg.max_restarts})")
        if wc.n >= cfg.hard_min_samples and wc.errors / wc.n >= cfg.hard_error_rate:
            v.reasons.append(f"canary error rate {wc.errors / wc.n:.3f} over {wc.n} answers "
                             f">= hard_error_rate {cfg.hard_error_rate}")
        if v.reasons:
            v.action = "rollback"
            return v

        # 2. sample-ratio mismatch freezes decisions
        p = srm_p_value(self.routed[1], sum(self.routed), self.weight)
        v.measured["srm_p"] = p
        if sum(self.routed) >= cfg.min_samples and p < cfg.srm_alpha:
            v.srm = True
            v.reasons.append(f"sample-ratio mismatch: the canary got {self.routed[1]} of "
                             f"{sum(self.routed)} routed requests at weight {self.weight} "
                             f"(p = {p:.2g} < srm_alpha {cfg.srm_alpha}); the comparison with "
                             "stable is frozen, absolute limits still apply")

        # 3. sequential tests, canary against stable, over the whole stage
        threshold = math.log(1 / cfg.alpha)
        before = len(v.reasons)
        tests = {}
        if not v.srm and st.n >= cfg.min_samples and ca.n >= cfg.min_samples:
            pooled = (st.errors + ca.errors) / (st.n + ca.n)
            eff, llr = proportion_test(ca.errors, ca.n, st.errors, st.n, cfg.error_rate_margin,
                                       tau=max(pooled, 1e-3))
            tests["errors"] = {"effect": round(eff, 6), "log_lr": round(llr, 3)}
            if llr >= threshold:
                v.reasons.append(
                    f"canary error rate {ca.error_rate:.4f} is significantly above stable "
                    f"{st.error_rate:.4f} + margin {cfg.error_rate_margin} "
                    f"(log LR {llr:.2f} >= {threshold:.2f})")
            b = st.latency.quantile_bin(0.95)
            if b is not None and ca.latency.n:
                cut = LatencyHistogram.bin_of(LatencyHistogram.upper_us(b)
                                              * (1 + cfg.latency_margin))
                slow_c, slow_s = ca.latency.count_above_bin(cut), st.latency.count_above_bin(cut)
                eff, llr = proportion_test(slow_c, ca.latency.n, slow_s, st.latency.n, 0.0,
                                           tau=0.05)
                tests["latency"] = {"slow_us": round(LatencyHistogram.upper_us(cut)),
                                    "slow_canary": slow_c, "slow_stable": slow_s,
                                    "effect": round(eff, 6), "log_lr": round(llr, 3)}
                if llr >= threshold:
                    v.reasons.append(
                        f"canary answers are significantly more often slower than "
                        f"{LatencyHistogram.upper_us(cut) / 1000:.2f} ms ((1 + latency_margin) x "
                        f"stable p95): {slow_c}/{ca.latency.n} against {slow_s}/{st.latency.n} "
                        f"(log LR {llr:.2f} >= {threshold:.2f})")
        kpi_c, kpi_s = ca.kpi_mean_var(), st.kpi_mean_var()
        if (not v.srm and cfg.kpi and kpi_c and kpi_s
                and min(ca.kpi_n, st.kpi_n) >= cfg.min_samples):
            drop = kpi_s[0] - kpi_c[0] - cfg.kpi_margin
            var = kpi_c[1] / ca.kpi_n + kpi_s[1] / st.kpi_n
            pooled_sd = math.sqrt((kpi_c[1] + kpi_s[1]) / 2)
            llr = msprt_log_lr(drop, var, max(0.1 * pooled_sd, 1e-9) ** 2) if drop > 0 else 0.0
            tests["kpi"] = {"drop": round(drop, 6), "log_lr": round(llr, 3)}
            if llr >= threshold:
                v.reasons.append(f"canary KPI {kpi_c[0]:.4f} is significantly below stable "
                                 f"{kpi_s[0]:.4f} - margin {cfg.kpi_margin} (log LR {llr:.2f})")
        v.measured["tests"] = tests
        if len(v.reasons) > before:
            v.action = "rollback"
            return v

        # 4. absolute limits over the window, N failing checks in a row
        if wc.n < cfg.min_samples:
            v.reasons.append(f"holding: {wc.n} canary answers in the window, "
                             f"min_samples = {cfg.min_samples}")
            return v
        broken = []
        if wc.errors / wc.n > cfg.max_error_rate:
            broken.append(f"canary error rate {wc.errors / wc.n:.4f} > max_error_rate "
                          f"{cfg.max_error_rate}")
        p95 = wc.latency.quantile_us(0.95)
        if cfg.max_p95_ms and p95 is not None and p95 > cfg.max_p95_ms * 1000:
            broken.append(f"canary p95 {p95 / 1000:.2f} ms > max_p95_ms {cfg.max_p95_ms}")
        if broken:
            self.failing += 1
            v.reasons += broken
            v.measured["failing_checks"] = self.failing
            v.action = "rollback" if self.failing >= cfg.failing_checks else "fail"
            return v
        self.failing = 0
        v.measured["failing_checks"] = 0
        if v.srm:
            return v  # hold: no advance on a biased comparison
        if st.n < cfg.min_samples and self.weight < 1:
            v.reasons.append(f"holding: {st.n} stable answers in this stage, "
                             f"min_samples = {cfg.min_samples}")
            return v
        v.action = "pass"
        return v


class Tally:
    """What one front counted of a rollout's stage since its last report:
    the answers of each lane (the queues' ``observer``), KPI outcomes, and
    the requests the router sent each way (``routed``, a list the routing
    table bumps in place). ``take`` hands the counts over and starts afresh;
    the supervisor's Guardrail absorbs them."""

    __slots__ = ("stage_id", "lanes", "routed")

    def __init__(self, stage_id: int):
        self.stage_id = stage_id
        self.lanes = {STABLE: LaneCounts(), CANARY: LaneCounts()}
        self.routed = [0, 0]

    def observe(self, lane: str, status: int, latency_us: float) -> None:
        c = self.lanes.get(lane)
        if c is not None:
            c.add(status, latency_us)

    def outcome(self, lane: str, x: float) -> None:
        c = self.lanes.get(lane)
        if c is not None:
            c.add_outcome(x)

    def empty(self) -> bool:
        return not (self.routed[0] or self.routed[1] or self.lanes[STABLE].n or
                    self.lanes[CANARY].n or self.lanes[STABLE].kpi_n or self.lanes[CANARY].kpi_n)

    def take(self) -> tuple[int, dict, tuple[int, int]]:
        out = (self.stage_id, self.lanes, (self.routed[0], self.routed[1]))
        self.lanes = {STABLE: LaneCounts(), CANARY: LaneCounts()}
        self.routed[0] = self.routed[1] = 0
        return out
