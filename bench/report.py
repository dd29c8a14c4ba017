"""Figures derived from the raw measurements, and the table a person reads.

Everything printed is also in the JSON document (``--json``), under the
same names, so a script never has to parse the table.
"""

from __future__ import annotations

from collections import Counter


# -- derived figures -----------------------------------------------------------------------

def _entries(stats: dict | None, model: str) -> list[dict]:
    return [m for m in (stats or {}).get("models", []) if m.get("name") == model]


def _hist(stats: dict | None, model: str, key: str) -> Counter:
    c: Counter = Counter()
    for m in _entries(stats, model):
        c.update({int(k): v for k, v in m.get(key, {}).items()})
    return c


def server_stats(marks: dict, after: dict | None, model: str) -> dict | None:
    """The daemon's own figures for the measured window: its counters at the
    window's end less those at its start, so warm-up and health checks do
    not count; queue depth sampled mid-window (under load) and after the run."""
    start, mid, end = (marks.get(k) or {} for k in ("start", "mid", "end"))
    start, mid, end = start.get("stats"), mid.get("stats"), end.get("stats")
    if not _entries(end, model):
        return None
    sizes = _hist(end, model, "batch_sizes") - _hist(start, model, "batch_sizes")
    counts = _hist(end, model, "counts") - _hist(start, model, "counts")
    batches = sum(sizes.values())
    samples = sum(n * c for n, c in sizes.items())

    def total(stats, key):
        es = _entries(stats, model)
        return sum(e.get(key) or 0 for e in es) if es else None

    return {
        "model": model,
        "batches": batches,
        "mean_batch": round(samples / batches, 2) if batches else None,
        "batch_sizes": {str(k): v for k, v in sorted(sizes.items())},
        "counts": {str(k): v for k, v in sorted(counts.items())},
        "queue_depth_mid": total(mid, "queue_depth"),
        "in_flight_batches_mid": total(mid, "in_flight_batches"),
        "queue_depth_after": total(after, "queue_depth"),
        "worker_busy": [w.get("busy") for e in _entries(end, model) for w in e.get("workers", [])],
        "server_latency_us_after": [e.get("latency_us") for e in _entries(after, model)],
        "padded_rows": (total(end, "padded_rows") or 0) - (total(start, "padded_rows") or 0),
    }


def _ratio(a, b, digits=3):
    return round(a / b, digits) if a is not None and b else None


def ratios(ours: dict, echo: dict | None, ceiling: dict | None) -> dict:
    return {
        "throughput_ours_over_echo": _ratio(ours["throughput_rps"], (echo or {}).get("throughput_rps")),
        "cpu_per_answer_ours_over_echo": _ratio(ours.get("server_cpu_us_per_answer"),
                                                (echo or {}).get("server_cpu_us_per_answer")),
        # = the share of the window one worker would spend computing these
        # batches back to back: near 1 means the model is the bottleneck.
        "throughput_ours_over_model_ceiling": _ratio(ours["throughput_rps"],
                                                     (ceiling or {}).get("mix_samples_per_s")),
    }


# -- the table -----------------------------------------------------------------------------

def _n(v, digits=0) -> str:
    if v is None:
        return "-"
    return f"{v:,.{digits}f}"


def _describe(doc: dict) -> list[str]:
    p, r = doc["params"], doc["ringserve"]
    if r["mode"] == "open":
        load = f"open loop, Poisson {p['rate']:,.0f} req/s over {r['connections']} connections"
    else:
        load = f"closed loop, {r['connections']} connections x depth {r['depth']}"
    span = (f"{p['requests']:,} requests" if p.get("requests") is not None
            else f"{p['duration']:g} s") + f" after {p['warmup']:g} s warm-up"
    return [f"ringserve bench: {load}, {r['procs']} load process(es), {span}",
            f"target: {p['target']}; model {p['model']}, request {p['request']}"]


def _run_rows(runs: dict[str, dict]) -> list[tuple[str, list[str]]]:
    def lat(k):
        return [_n((r["latency_us"] or {}).get(k)) for r in runs.values()]

    def statuses(r):
        return " ".join(f"{k}:{v:,}" for k, v in r["statuses"].items()) or "-"

    rows = [("throughput (answers/s)", [_n(r["throughput_rps"]) for r in runs.values()]),
            ("answers in window", [_n(r["answers"]) for r in runs.values()])]
    rows += [(f"latency {k} (us)", lat(k)) for k in ("p50", "p90", "p95", "p99", "p99.9", "max")]
    if any(r["send_lag_us"] for r in runs.values()):
        rows.append(("  of which send lag p50/p99",
                     [f"{_n((r['send_lag_us'] or {}).get('p50'))}/{_n((r['send_lag_us'] or {}).get('p99'))}"
                      for r in runs.values()]))
    rows += [("statuses (measured)", [statuses(r) for r in runs.values()]),
             ("unanswered / dropped", [f"{r['unanswered']} / {r['dropped']}" for r in runs.values()]),
             ("server CPU us per answer", [_n(r.get("server_cpu_us_per_answer"), 1) for r in runs.values()]),
             ("server CPU (% of a core)", [_n((r.get("server_cpu") or {}).get("cpu_pct"), 1)
                                           for r in runs.values()])]
    by_role = [_by_role(r) for r in runs.values()]
    for role in dict.fromkeys(k for d in by_role for k in d):
        rows.append((f"  {role}", [_n(d.get(role), 1) for d in by_role]))
    rows.append(("load-gen CPU (% of a core)",
                 [f"{_n(r['loadgen_cpu_pct'], 1)}" + (f" ({'+'.join(_n(x) for x in r['loadgen_cpu_pct_by_proc'])})"
                                                        if r["procs"] > 1 else "")
                  for r in runs.values()]))
    cores = max((r.get("machine_cpu") or {}).get("cores", 0) for r in runs.values())
    rows.append((f"machine CPU busy (% of a core, {cores} cores)",
                 [_n((r.get("machine_cpu") or {}).get("busy_pct"), 1) for r in runs.values()]))
    return rows


def _by_role(run: dict) -> dict[str, float]:
    """% of a core per server process, by role; a second worker is "worker#2"."""
    out: dict[str, float] = {}
    for p in (run.get("server_cpu") or {}).get("by_process", []):
        name, i = p["role"], 1
        while name in out:
            i += 1
            name = f"{p['role']}#{i}"
        out[name] = p["cpu_pct"]
    return out


def _table(header: list[str], rows: list[tuple[str, list[str]]]) -> list[str]:
    w0 = max(len(h) for h in [header[0]] + [r[0] for r in rows])
    ws = [max(len(header[i + 1]), *(len(r[1][i]) for r in rows)) for i in range(len(header) - 1)]
    out = [header[0].ljust(w0) + "".join("  " + h.rjust(w) for h, w in zip(header[1:], ws))]
    out.append("-" * len(out[0]))
    out += [name.ljust(w0) + "".join("  " + c.rjust(w) for c, w in zip(cells, ws)) for name, cells in rows]
    return out


def render(doc: dict) -> str:
    runs = {k: doc[k] for k in ("ringserve", "echo") if doc.get(k)}
    lines = _describe(doc) + [""]
    lines += _table([""] + list(runs), _run_rows(runs))
    for name, r in runs.items():
        for e in r.get("errors") or []:
            lines.append(f"{name} error: {e}")

    s = doc.get("server_stats")
    if s:
        lines += ["", f"server stats, measured window (model {s['model']}): {s['batches']:,} batches, "
                      f"mean batch {_n(s['mean_batch'], 2)}, padded rows {s['padded_rows']:,}",
                  f"  queue depth mid-run {_n(s['queue_depth_mid'])}, in-flight batches mid-run "
                  f"{_n(s['in_flight_batches_mid'])}, queue depth after the run {_n(s['queue_depth_after'])}, "
                  f"worker busy {s['worker_busy']}",
                  "  batch sizes (size:batches):", "    " + _wrap([f"{k}:{v:,}" for k, v in s["batch_sizes"].items()])]

    c = doc.get("ceiling")
    if c:
        lines += ["", f"in-process model ceiling ({c['model']}, {c['torch_threads']} torch thread, "
                      "padded to the server's buckets):"]
        lines += ["  " + ln for ln in _table(
            ["batch sizes", "bucket", "batches", "us/batch", "samples/s at mean", "at full bucket"],
            _ceiling_rows(c["by_batch"]))]
        lines.append(f"  at the server's batch mix: {_n(c['mix_samples_per_s'])} samples/s "
                     f"({_n(c['mix_compute_s'], 2)} s of compute for the window's batches)")

    q = doc.get("ratios")
    if q:
        lines += ["", "limits:",
                  f"  throughput, ours / echo:               {_n(q['throughput_ours_over_echo'], 3)}",
                  f"  CPU per answer, ours / echo:           {_n(q['cpu_per_answer_ours_over_echo'], 2)}",
                  f"  throughput, ours / in-process ceiling: {_n(q['throughput_ours_over_model_ceiling'], 3)}"
                  "  (share of the window the model alone would need)"]
    return "\n".join(lines)


def _ceiling_rows(by_batch: list[dict]) -> list[tuple[str, list[str]]]:
    """One row per bucket (every size in it costs the same padded batch);
    the JSON keeps one entry per batch size."""
    rows = []
    for bucket in sorted({r["bucket"] for r in by_batch}):
        rs = [r for r in by_batch if r["bucket"] == bucket]
        batches = sum(r["batches"] for r in rs)
        mean_n = sum(r["batch"] * r["batches"] for r in rs) / batches
        us = rs[0]["us_per_batch"]
        lo, hi = rs[0]["batch"], rs[-1]["batch"]
        rows.append((str(lo) if lo == hi else f"{lo}-{hi}",
                     [str(bucket), _n(batches), _n(us, 1), _n(mean_n / us * 1e6), _n(bucket / us * 1e6)]))
    return rows


def _wrap(items: list[str], width: int = 96) -> str:
    lines, cur = [], ""
    for it in items:
        if cur and len(cur) + 1 + len(it) > width:
            lines.append(cur)
            cur = it
        else:
            cur = f"{cur} {it}".strip()
    lines.append(cur)
    return "\n    ".join(lines) if lines else "-"
