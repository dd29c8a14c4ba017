"""``ringserve report``: the A/B report over the request log.

    ringserve report --log DIR [--exp ID] [--model M] [--control ARM]
                     [--split a=0.5,b=0.5] [--alpha 0.05] [--srm-alpha 0.001]
                     [--json FILE] [--plot FILE.png]

Reads every ``*.jsonl*`` file of DIR in name order (rotated files included,
``.gz`` too), joins answers with feedback by ``rid`` and reports, per arm of
each experiment (only ``--exp`` when given) and per lane of each model:
answers, error rate, latency p50/p95/p99, the KPI (mean outcome of the
answers that have feedback, with a confidence interval), the difference
against the control with its interval and p-value, and for the arms a
sample-ratio-mismatch check. A table on stdout; ``--json`` writes the same
figures; ``--plot`` draws them (matplotlib, an optional extra).

Exit status: 0 report written; 1 the log holds no answer that matches the
filters; 2 bad invocation (no such directory, no log files, bad option).

The records it reads (one JSON object a line, written by the daemon):

- ``{"type": "answer", "ts", "rid", "key", "exp", "arm", "lane", "model",
  "version", "status", "latency_us", "queue_us", "compute_us", "batch",
  "score", "features"}``; used here: rid, exp, arm, lane, model, version,
  status, latency_us, ts.
- ``{"type": "feedback", "ts", "rid", "outcome", "joined", "model",
  "version", "lane", "arm"}``; used here: rid, outcome, joined. The join
  is redone here by rid (not taken from the record's own lane/arm) because
  the experiment and the filters live on the answer.

Choices, and why:

- The unit is the answer. An answer's outcome is the *sum* of the outcomes
  reported for it (a click reported once is 1; two purchases add up); an
  answer with no feedback has no outcome and is left out of the KPI, so the
  KPI is over joined answers and the report says how many joined, per group.
  Answers join whatever file their feedback is in, in either order.
- Intervals are normal ones with each group's own variance (Welch's
  unpooled standard error, normal quantile): with the thousands of answers an
  A/B test needs the t and normal quantiles agree to the third digit, and no
  scipy is needed. The p-value is two-sided and per comparison: with several
  treatment arms it is not corrected for multiplicity.
- The sample-ratio check is a chi-square goodness of fit of the arms' answer
  counts (errors included: assignment happens before the model runs) against
  the expected split, ``--split`` or equal. Its default threshold is 0.001,
  the usual one for SRM (a mismatch means a broken assignment or a lossy log,
  not a small effect). Lanes get no SRM check: their weights change with the
  rollout stages, which the log does not record.
- Error rate counts the statuses the guardrails count as the server's
  failure (DEADLINE_EXCEEDED, INTERNAL, UNAVAILABLE); ``non_ok_rate`` counts
  every non-OK answer (BUSY and INVALID_ARGUMENT included). Latency
  percentiles are over OK answers, from the guardrails' log-spaced histogram:
  each is the upper edge of its 4.7 %-wide bin.

Memory: the files are streamed line by line. Per answer that passes the
filters the join keeps its rid and a group code (10 bytes in two flat
arrays); per joined feedback record its rid and outcome (16 bytes). All else
is per group (experiment, arm, model, lane) and fixed-size: counters and a
450-bin latency histogram. 100 million answers take about 1 GB. rids must be
unique within the directory (the daemon's carry 23 random bits of its boot,
so restarts and several front processes do not collide); repeated rids are
counted and reported, and a repeated answer takes the feedback of the first.
Cache hits (``"cache": true``) are answers like any other, latency included.
Answers given by a version's fallback (``"fallback"`` set; docs/operations.md,
"Degraded mode") count as a failure of their group (status ``FALLBACK``,
in the error rate, not in the latency), as the guardrails count them; their
feedback is never joined online, so the daemon logs it unjoined and the KPI
here leaves it out.
"""

from __future__ import annotations

import argparse
import array
import gzip
import json
import math
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from statistics import NormalDist
from typing import Any

import numpy as np

from ipc.status import Status

from ..rollout.guardrails import ERROR_STATUSES, FALLBACK, LatencyHistogram

SRM_ALPHA = 0.001
CONTROL_LANE = "stable"
_MAX_VERSIONS = 16  # versions listed per group; more are counted, not named

# -- statistics (no scipy) ----------------------------------------------------


def z_quantile(alpha: float) -> float:
    """The two-sided normal critical value: 1.96 for alpha 0.05."""
    return NormalDist().inv_cdf(1 - alpha / 2)


def two_sided_p(z: float) -> float:
    return math.erfc(abs(z) / math.sqrt(2))


def chi2_sf(x: float, df: int) -> float:
    """P(X >= x) for X ~ chi-square(df): the regularized upper incomplete
    gamma Q(df/2, x/2), by its series below a + 1 and its continued fraction
    above (Numerical Recipes 6.2), to about 1e-14."""
    if df <= 0:
        raise ValueError("df must be positive")
    if x <= 0:
        return 1.0
    a, x = df / 2.0, x / 2.0
    log_front = a * math.log(x) - x - math.lgamma(a)
    if x < a + 1:
        term = total = 1.0 / a
        k = a
        for _ in range(10_000):
            k += 1
            term *= x / k
            total += term
            if term < total * 1e-16:
                break
        return max(0.0, 1.0 - total * math.exp(log_front))
    tiny = 1e-300   # Lentz's method for the continued fraction
    b = x + 1 - a
    c, d = 1 / tiny, 1 / b
    h = d
    for i in range(1, 10_000):
        an = -i * (i - a)
        b += 2
        d = an * d + b
        d = tiny if abs(d) < tiny else d
        c = b + an / c
        c = tiny if abs(c) < tiny else c
        d = 1 / d
        h *= d * c
        if abs(d * c - 1) < 1e-16:
            break
    return min(1.0, math.exp(log_front) * h)


def srm_check(observed: dict[str, int], expected: dict[str, float],
              alpha: float = SRM_ALPHA) -> dict[str, Any]:
    """Chi-square goodness of fit of the arms' counts against the expected
    shares (normalised here). An arm of ``expected`` that got nothing counts
    as 0; an arm that got traffic but is not in ``expected`` is an error."""
    extra = sorted(set(observed) - set(expected))
    if extra:
        return {"error": f"arm(s) {', '.join(extra)} not in the expected split", "mismatch": None}
    arms = sorted(expected)
    total_w = sum(expected.values())
    n = sum(observed.get(a, 0) for a in arms)
    shares = {a: expected[a] / total_w for a in arms}
    out = {"observed": {a: observed.get(a, 0) for a in arms}, "expected": shares,
           "alpha": alpha, "chi2": None, "df": len(arms) - 1, "p_value": None, "mismatch": None}
    if len(arms) < 2 or n == 0:
        return out
    chi2 = sum((observed.get(a, 0) - n * s) ** 2 / (n * s) for a, s in shares.items())
    p = chi2_sf(chi2, len(arms) - 1)
    out.update(chi2=chi2, p_value=p, mismatch=p < alpha)
    return out


# -- per-group figures ---------------------------------------------------------


class Group:
    """What the report keeps of one (exp, arm, model, lane), or of a sum of
    them: fixed-size whatever the traffic."""

    __slots__ = ("answers", "statuses", "latency", "versions", "kpi_n", "kpi_mean", "kpi_m2")

    def __init__(self) -> None:
        self.answers = 0
        self.statuses: dict[int, int] = {}
        self.latency = LatencyHistogram()
        self.versions: dict[str, int] = {}
        self.kpi_n = 0
        self.kpi_mean = 0.0
        self.kpi_m2 = 0.0   # sum of squared deviations from the mean

    def add(self, status: int, latency_us: float, version: str | None) -> None:
        self.answers += 1
        self.statuses[status] = self.statuses.get(status, 0) + 1
        if status == 0:
            self.latency.add(latency_us)
        if version is not None and (version in self.versions or len(self.versions) < _MAX_VERSIONS):
            self.versions[version] = self.versions.get(version, 0) + 1

    def merge(self, o: "Group") -> None:
        self.answers += o.answers
        for s, c in o.statuses.items():
            self.statuses[s] = self.statuses.get(s, 0) + c
        self.latency.merge(o.latency)
        for v, c in o.versions.items():
            self.versions[v] = self.versions.get(v, 0) + c
        # Chan et al.'s parallel update: means and squared deviations combine exactly.
        n = self.kpi_n + o.kpi_n
        if o.kpi_n:
            delta = o.kpi_mean - self.kpi_mean
            self.kpi_m2 += o.kpi_m2 + delta * delta * self.kpi_n * o.kpi_n / n
            self.kpi_mean += delta * o.kpi_n / n
        self.kpi_n = n

    def kpi_var(self) -> float | None:
        return self.kpi_m2 / (self.kpi_n - 1) if self.kpi_n > 1 else None

    def summary(self, name: str, z: float) -> dict[str, Any]:
        errors = sum(c for s, c in self.statuses.items() if s in ERROR_STATUSES)
        non_ok = self.answers - self.statuses.get(0, 0)
        var = self.kpi_var()
        se = math.sqrt(var / self.kpi_n) if var is not None else None
        mean = self.kpi_mean if self.kpi_n else None
        return {
            "name": name, "answers": self.answers,
            "error_rate": errors / self.answers if self.answers else None,
            "non_ok_rate": non_ok / self.answers if self.answers else None,
            "status": {_status_name(s): c for s, c in sorted(self.statuses.items())},
            "latency_us": {f"p{q}": self.latency.quantile_us(q / 100) for q in (50, 95, 99)},
            "versions": sorted(self.versions),
            "kpi": {"joined": self.kpi_n,
                    "joined_share": self.kpi_n / self.answers if self.answers else None,
                    "mean": mean, "stderr": se,
                    "ci": None if se is None or mean is None else [mean - z * se, mean + z * se]},
            "vs_control": None,
        }


def _status_name(s: int) -> str:
    if s == FALLBACK:
        return "FALLBACK"
    try:
        return Status(s).name
    except ValueError:
        return str(s)


def compare(t: Group, c: Group, z: float) -> dict[str, Any] | None:
    """Treatment minus control: difference of KPI means, Welch standard
    error, normal interval, two-sided p-value, relative difference."""
    vt, vc = t.kpi_var(), c.kpi_var()
    if vt is None or vc is None:
        return None
    diff = t.kpi_mean - c.kpi_mean
    se = math.sqrt(vt / t.kpi_n + vc / c.kpi_n)
    if se == 0:
        p = 1.0 if diff == 0 else 0.0
    else:
        p = two_sided_p(diff / se)
    return {"diff": diff, "stderr": se, "ci": [diff - z * se, diff + z * se], "p_value": p,
            "relative": diff / c.kpi_mean if c.kpi_mean else None}


# -- reading the log -----------------------------------------------------------


def log_files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.glob("*.jsonl*") if p.is_file())


def read_records(paths: Iterable[Path], tally: dict[str, int]) -> Iterator[dict[str, Any]]:
    """Yield each record (a dict) of the files in turn. A last line with no
    newline that does not parse is a torn write (a crash mid-record): it is
    skipped and counted in ``tally["torn_lines"]``; any other line that does
    not parse is counted in ``tally["bad_lines"]``."""
    for path in paths:
        opener = gzip.open if path.name.endswith(".gz") else open
        with opener(path, "rb") as f:
            for line in f:
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except ValueError:
                    tally["torn_lines" if not line.endswith(b"\n") else "bad_lines"] += 1
                    continue
                if isinstance(rec, dict):
                    yield rec
                else:
                    tally["bad_lines"] += 1


def build(paths: Iterable[Path], exp: str | None = None,
          model: str | None = None) -> dict[str, Any]:
    """Stream the files and join; returns the raw material of the report:
    groups by (exp, arm, model, lane) with their KPI filled in, and tallies."""
    tally = {"answers": 0, "feedback": 0, "other": 0, "bad_lines": 0, "torn_lines": 0,
             "bad_records": 0, "filtered_out": 0}
    codes: dict[tuple, int] = {}
    groups: list[Group] = []
    a_rid, a_code = array.array("q"), array.array("H")
    f_rid, f_y = array.array("q"), array.array("d")
    fb_unjoined = 0
    ts_min, ts_max = math.inf, -math.inf
    for rec in read_records(paths, tally):
        kind = rec.get("type")
        try:
            if kind == "answer":
                tally["answers"] += 1
                if ((exp is not None and rec.get("exp") != exp)
                        or (model is not None and rec["model"] != model)):
                    tally["filtered_out"] += 1
                    continue
                g = (rec.get("exp"), rec.get("arm"), rec["model"], rec["lane"])
                code = codes.get(g)
                if code is None:
                    if len(groups) >= 65535:
                        raise ValueError("more than 65535 (exp, arm, model, lane) groups")
                    code = codes[g] = len(groups)
                    groups.append(Group())
                rid, status, latency = int(rec["rid"]), int(rec["status"]), float(rec["latency_us"])
                if rec.get("fallback"):  # answered by the routed version's fallback: its failure
                    status = FALLBACK
                a_rid.append(rid)   # raises OverflowError past int64, before anything is counted
                a_code.append(code)
                groups[code].add(status, latency, rec.get("version"))
                ts = rec.get("ts")
                if isinstance(ts, (int, float)):
                    ts_min, ts_max = min(ts_min, ts), max(ts_max, ts)
            elif kind == "feedback":
                tally["feedback"] += 1
                if rec.get("rid") is None or not rec.get("joined", True):
                    fb_unjoined += 1
                    continue
                f_y.append(float(rec["outcome"]))
                f_rid.append(int(rec["rid"]))
            else:
                tally["other"] += 1
        except (KeyError, TypeError, ValueError, OverflowError):
            tally["bad_records"] += 1
    join = _join(a_rid, a_code, f_rid, f_y, groups)
    join["feedback_unjoined"] = fb_unjoined
    span = None if ts_min > ts_max else [ts_min, ts_max]
    return {"tally": tally, "join": join, "codes": codes, "groups": groups, "span": span}


def _join(a_rid: array.array[int], a_code: array.array[int], f_rid: array.array[int],
          f_y: array.array[float], groups: list[Group]) -> dict[str, int]:
    """Sort the answers' rids once, find each feedback's answer by binary
    search, sum the outcomes per answer, then per group: count, mean and
    squared deviations (two passes, so the variance does not cancel)."""
    ar = np.frombuffer(a_rid, dtype=np.int64) if len(a_rid) else np.zeros(0, np.int64)
    ac = np.frombuffer(a_code, dtype=np.uint16) if len(a_code) else np.zeros(0, np.uint16)
    fr = np.frombuffer(f_rid, dtype=np.int64) if len(f_rid) else np.zeros(0, np.int64)
    fy = np.frombuffer(f_y, dtype=np.float64) if len(f_y) else np.zeros(0)
    order = np.argsort(ar, kind="stable")
    sorted_rid = ar[order]
    duplicates = int(np.count_nonzero(sorted_rid[1:] == sorted_rid[:-1]))
    out = {"answers": len(ar), "joined": 0, "feedback_matched": 0,
           "feedback_unmatched": len(fr), "answers_with_repeat_feedback": 0,
           "duplicate_rids": duplicates}
    if not len(ar) or not len(fr):
        return out
    pos = np.minimum(np.searchsorted(sorted_rid, fr), len(ar) - 1)
    hit = sorted_rid[pos] == fr
    answer_of = order[pos[hit]]
    fb_count = np.bincount(answer_of, minlength=len(ar))
    y_sum = np.bincount(answer_of, weights=fy[hit], minlength=len(ar))
    joined = fb_count > 0
    y, code = y_sum[joined], ac[joined].astype(np.intp)
    n = np.bincount(code, minlength=len(groups))
    mean = np.bincount(code, weights=y, minlength=len(groups)) / np.maximum(n, 1)
    m2 = np.bincount(code, weights=(y - mean[code]) ** 2, minlength=len(groups))
    for i, g in enumerate(groups):
        g.kpi_n, g.kpi_mean, g.kpi_m2 = int(n[i]), float(mean[i]), float(m2[i])
    matched = int(np.count_nonzero(hit))
    out.update(joined=int(np.count_nonzero(joined)), feedback_matched=matched,
               feedback_unmatched=len(fr) - matched,
               answers_with_repeat_feedback=int(np.count_nonzero(fb_count > 1)))
    return out


# -- the report ----------------------------------------------------------------


def _combine(members: dict[str, list[Group]]) -> dict[str, Group]:
    out = {}
    for name, gs in sorted(members.items()):
        total = Group()
        for g in gs:
            total.merge(g)
        out[name] = total
    return out


def _section(groups: dict[str, Group], control: str, z: float) -> list[dict[str, Any]]:
    rows = []
    for name, g in groups.items():
        row = g.summary(name, z)
        if name != control:
            row["vs_control"] = compare(g, groups[control], z)
        rows.append(row)
    return rows


def report(raw: dict[str, Any], *, alpha: float = 0.05, control: str | None = None,
           split: dict[str, float] | None = None,
           srm_alpha: float = SRM_ALPHA) -> dict[str, Any]:
    """The report as a JSON-ready dict, from ``build``'s output."""
    z = z_quantile(alpha)
    arms: dict[str, dict[str, list[Group]]] = {}
    lanes: dict[str, dict[str, list[Group]]] = {}
    for (exp, arm, model, lane), code in raw["codes"].items():
        g = raw["groups"][code]
        if exp is not None and arm is not None:
            arms.setdefault(exp, {}).setdefault(arm, []).append(g)
        lanes.setdefault(model, {}).setdefault(lane, []).append(g)
    experiments = []
    for exp in sorted(arms):
        groups = _combine(arms[exp])
        ctl = control if control is not None else next(iter(groups))
        if ctl not in groups:
            raise LookupError(f"experiment {exp} has no arm {ctl!r} (arms: {', '.join(groups)})")
        expected = split if split is not None else {a: 1.0 for a in groups}
        srm = srm_check({a: g.answers for a, g in groups.items()}, expected, srm_alpha)
        experiments.append({"exp": exp, "control": ctl, "arms": _section(groups, ctl, z),
                            "srm": srm})
    models = []
    for model in sorted(lanes):
        groups = _combine(lanes[model])
        ctl = CONTROL_LANE if CONTROL_LANE in groups else next(iter(groups))
        models.append({"model": model, "control": ctl, "lanes": _section(groups, ctl, z)})
    return {"alpha": alpha, "confidence": 1 - alpha, "records": raw["tally"], "join": raw["join"],
            "span": raw["span"], "experiments": experiments, "models": models}


# -- output ----------------------------------------------------------------------


def _us(v: float | None) -> str:
    if v is None:
        return "-"
    if v < 1000:
        return f"{v:.0f}us"
    if v < 1_000_000:
        return f"{v / 1000:.3g}ms"
    return f"{v / 1e6:.3g}s"


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.2f}%"


def _num(v: float | None, signed: bool = False) -> str:
    return "-" if v is None else (f"{v:+.4g}" if signed else f"{v:.4g}")


def _interval(ci: Sequence[float] | None, signed: bool = False) -> str:
    return "" if ci is None else f" [{_num(ci[0], signed)}, {_num(ci[1], signed)}]"


def _table(rows: list[dict[str, Any]], label: str, control: str, conf: float) -> list[str]:
    head = (label, "answers", "err", "non-OK", "p50", "p95", "p99", "joined",
            f"KPI mean [{conf:.0%} CI]", f"diff vs control [{conf:.0%} CI]", "p")
    body = []
    for r in rows:
        k, v, lat = r["kpi"], r["vs_control"], r["latency_us"]
        body.append((r["name"], str(r["answers"]), _pct(r["error_rate"]), _pct(r["non_ok_rate"]),
                     _us(lat["p50"]), _us(lat["p95"]), _us(lat["p99"]),
                     f"{k['joined']} ({_pct(k['joined_share'])})",
                     _num(k["mean"]) + _interval(k["ci"]),
                     "(control)" if r["name"] == control else
                     ("-" if v is None else _num(v["diff"], True) + _interval(v["ci"], True)),
                     "" if v is None else f"{v['p_value']:.2g}"))
    widths = [max(len(row[i]) for row in [head, *body]) for i in range(len(head))]

    def fmt(row: Sequence[str]) -> str:
        return "  " + "  ".join(c.ljust(w) if i in (0, 8, 9) else c.rjust(w)
                                for i, (c, w) in enumerate(zip(row, widths, strict=True))).rstrip()

    return [fmt(head), *map(fmt, body)]


def render(doc: dict[str, Any], log_dir: str, files: int) -> str:
    rec, join = doc["records"], doc["join"]
    lines = [f"ringserve report: {files} file(s) in {log_dir}: {rec['answers']} answers, "
             f"{rec['feedback']} feedback records"]
    if doc["span"]:
        t0, t1 = (time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(t)) for t in doc["span"])
        lines.append(f"  from {t0} to {t1} UTC")
    skipped = [f"{rec[k]} {k.replace('_', ' ')}"
               for k in ("torn_lines", "bad_lines", "bad_records") if rec[k]]
    if skipped:
        lines.append("  skipped: " + ", ".join(skipped))
    if rec["filtered_out"]:
        lines.append(f"  {rec['filtered_out']} answers left out by --exp/--model")
    share = join["joined"] / join["answers"] if join["answers"] else 0
    lines.append(f"join: {join['joined']} of {join['answers']} answers have an outcome "
                 f"({share:.1%}); "
                 f"{join['feedback_unmatched']} feedback records match no answer reported here, "
                 f"{join['feedback_unjoined']} were not joined online")
    if join["duplicate_rids"]:
        lines.append(f"  warning: {join['duplicate_rids']} answers repeat an earlier rid "
                     "(two daemons or a restart writing to one directory?)")
    for e in doc["experiments"]:
        lines += ["", f"experiment {e['exp']} (control: {e['control']})",
                  *_table(e["arms"], "arm", e["control"], doc["confidence"])]
        s = e["srm"]
        if s.get("error"):
            lines.append(f"  sample ratio: not checked: {s['error']}")
        elif s["p_value"] is not None:
            obs = " / ".join(f"{a} {n}" for a, n in s["observed"].items())
            exp_ = "/".join(f"{v:.3g}" for v in s["expected"].values())
            verdict = ("SAMPLE RATIO MISMATCH: the arms did not get the expected split; "
                       "the comparison above is biased" if s["mismatch"] else "ok")
            lines.append(f"  sample ratio: {obs} against {exp_}: chi2 {s['chi2']:.2f}, "
                         f"p {s['p_value']:.2g} (alpha {s['alpha']:g}): {verdict}")
    for m in doc["models"]:
        lines += ["", f"lanes of model {m['model']} (control: {m['control']})",
                  *_table(m["lanes"], "lane", m["control"], doc["confidence"])]
        for r in m["lanes"]:
            if r["versions"]:
                lines.append(f"  {r['name']} served version(s) {', '.join(r['versions'])}")
    return "\n".join(lines)


def plot(doc: dict[str, Any], path: str) -> None:
    """One row per experiment and per model: the KPI mean of each arm (lane)
    with its interval, and its latency p50/p95/p99."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sections = [(f"experiment {e['exp']}", e["arms"]) for e in doc["experiments"]]
    sections += [(f"model {m['model']} lanes", m["lanes"]) for m in doc["models"]]
    fig, axes = plt.subplots(len(sections), 2, figsize=(10, 3.2 * len(sections)), squeeze=False)
    for (title, rows), (ax_kpi, ax_lat) in zip(sections, axes, strict=True):
        names = [r["name"] for r in rows]
        x = np.arange(len(rows))
        means = [r["kpi"]["mean"] if r["kpi"]["mean"] is not None else np.nan for r in rows]
        err = [[m - r["kpi"]["ci"][0], r["kpi"]["ci"][1] - m] if r["kpi"]["ci"] else [0, 0]
               for m, r in zip(means, rows, strict=True)]
        ax_kpi.errorbar(x, means, yerr=np.array(err).T, fmt="o", capsize=6)
        ax_kpi.set_xticks(x, names)
        ax_kpi.set_xlim(-0.5, len(rows) - 0.5)
        ax_kpi.set_title(f"{title}: KPI mean, {doc['confidence']:.0%} CI", fontsize=9)
        width = 0.25
        for i, q in enumerate(("p50", "p95", "p99")):
            vals = [(r["latency_us"][q] or 0) / 1000 for r in rows]
            ax_lat.bar(x + (i - 1) * width, vals, width, label=q)
        ax_lat.set_xticks(x, names)
        ax_lat.set_ylabel("ms")
        ax_lat.set_title(f"{title}: latency of OK answers", fontsize=9)
        ax_lat.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# -- command line ----------------------------------------------------------------


def _parse_split(text: str) -> dict[str, float]:
    out = {}
    for part in text.split(","):
        name, sep, share = part.partition("=")
        try:
            value = float(share)
        except ValueError:
            value = -1.0
        if not sep or not name.strip() or not value > 0 or not math.isfinite(value):
            raise argparse.ArgumentTypeError("expected ARM=SHARE,ARM=SHARE with positive shares, "
                                             f"got {text!r}")
        out[name.strip()] = value
    return out


def _unit_interval(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        v = -1.0
    if not 0 < v < 1:
        raise argparse.ArgumentTypeError(f"must be strictly between 0 and 1, got {text!r}")
    return v


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ringserve report",
                                description="A/B report over the request log: "
                                            "per arm and per lane.")
    p.add_argument("--log", required=True, metavar="DIR", help="the request log directory")
    p.add_argument("--exp", help="only this experiment's answers")
    p.add_argument("--model", help="only this model's answers")
    p.add_argument("--control", help="the control arm (default: the first arm by name)")
    p.add_argument("--split", type=_parse_split, metavar="ARM=SHARE,...",
                   help="expected traffic split of the arms for the sample-ratio check "
                        "(default: equal)")
    p.add_argument("--alpha", type=_unit_interval, default=0.05,
                   help="1 - confidence of the intervals (default 0.05)")
    p.add_argument("--srm-alpha", type=_unit_interval, default=SRM_ALPHA,
                   help=f"p-value below which a sample ratio is a mismatch (default {SRM_ALPHA})")
    p.add_argument("--json", metavar="FILE", help="write the report as JSON here ('-': stdout)")
    p.add_argument("--plot", metavar="FILE.png", help="draw the report as a PNG (needs matplotlib)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    try:
        a = parser().parse_args(sys.argv[1:] if argv is None else argv)
    except SystemExit as e:   # --help (0) or a usage error (2): a status, not an exception
        return int(e.code or 0)

    def fail(msg: str, code: int = 2) -> int:
        print(f"ringserve report: {msg}", file=sys.stderr)
        return code

    log_dir = Path(a.log)
    if not log_dir.is_dir():
        return fail(f"no such log directory: {log_dir}")
    files = log_files(log_dir)
    if not files:
        return fail(f"no log files (*.jsonl*) in {log_dir}")
    if a.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            return fail("--plot needs matplotlib: pip install 'ringserve[plot]'")
    try:
        raw = build(files, exp=a.exp, model=a.model)
    except (OSError, ValueError) as e:
        return fail(f"cannot read the log: {e}")
    if not raw["join"]["answers"]:
        what = " and ".join(f"{k} {v}" for k, v in (("--exp", a.exp), ("--model", a.model)) if v)
        return fail(f"no answers{' with ' + what if what else ''} in {log_dir} "
                    f"({raw['tally']['answers']} answers in all)", 1)
    try:
        doc = report(raw, alpha=a.alpha, control=a.control, split=a.split, srm_alpha=a.srm_alpha)
    except LookupError as e:
        return fail(str(e))
    doc.update(log=str(log_dir), files=[f.name for f in files],
               filters={"exp": a.exp, "model": a.model})
    if a.json != "-":
        print(render(doc, str(log_dir), len(files)))
    if a.json:
        text = json.dumps(doc, indent=1)
        if a.json == "-":
            print(text)
        else:
            Path(a.json).write_text(text + "\n")
    if a.plot:
        plot(doc, a.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
