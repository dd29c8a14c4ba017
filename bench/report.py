"""Figures derived from the raw measurements, and the table a person reads.

Everything printed is also in the JSON document (``--json``), under the
same names, so a script never has to parse the table.
"""

from __future__ import annotations

from collections import Counter

# --sweep's default rates, as fractions of the first run's throughput: dense
# around saturation, where the knee is.
SWEEP_FRACTIONS = (0.1, 0.25, 0.5, 0.75, 0.9, 1.0, 1.2)
# A sweep point is before the knee while it delivers what was offered and
# its p99 stays within this factor of the p99 at the lowest rate.
KNEE_P99_FACTOR = 2.0
KNEE_DELIVERED = 0.95
# A load process above this share of a core may be what limits the run.
LOADGEN_BUSY_PCT = 90.0


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


def sweep_point(rate: float, run: dict) -> dict:
    lat = run["latency_us"] or {}
    return {"offered_rps": rate, "throughput_rps": run["throughput_rps"],
            "p50_us": lat.get("p50"), "p99_us": lat.get("p99"), "p99.9_us": lat.get("p99.9"),
            "not_ok": sum(v for k, v in run["statuses"].items() if k != "0"),
            "unanswered": run["unanswered"], "dropped": run["dropped"],
            "send_lag_p99_us": (run["send_lag_us"] or {}).get("p99"),
            "server_cpu_us_per_answer": run.get("server_cpu_us_per_answer"),
            # what else ran: machine busy less the server and the generator
            "others_cpu_pct": _others_cpu(run)}


def _others_cpu(run: dict) -> float | None:
    """% of a core the machine spent on neither the server nor the load
    generator during ``run``: other work sharing the cores disturbs it."""
    busy = (run.get("machine_cpu") or {}).get("busy_pct")
    server = (run.get("server_cpu") or {}).get("cpu_pct")
    if busy is None or server is None:
        return None
    return round(max(0.0, busy - server - run["loadgen_cpu_pct"]), 1)


def knee(points: list[dict]) -> dict | None:
    """The highest offered rate before the knee (see KNEE_P99_FACTOR), or None."""
    pts = sorted((p for p in points if p["p99_us"] is not None), key=lambda p: p["offered_rps"])
    if not pts:
        return None
    base = pts[0]["p99_us"]
    best = None
    for p in pts:
        if (p["throughput_rps"] >= KNEE_DELIVERED * p["offered_rps"] and not p["not_ok"]
                and p["p99_us"] <= KNEE_P99_FACTOR * base):
            best = p
        else:
            break
    return best


def batching(on: dict, on_stats: dict | None, off: dict, off_stats: dict | None) -> dict:
    """Batching on against off (max_batch = 1), the same load on the same model."""
    p99 = lambda r: (r["latency_us"] or {}).get("p99")   # noqa: E731
    return {"throughput_on_over_off": _ratio(on["throughput_rps"], off["throughput_rps"], 2),
            "p99_on_over_off": _ratio(p99(on), p99(off), 2),
            "mean_batch_on": (on_stats or {}).get("mean_batch"),
            "mean_batch_off": (off_stats or {}).get("mean_batch"),
            "cpu_per_answer_on_over_off": _ratio(on.get("server_cpu_us_per_answer"),
                                                 off.get("server_cpu_us_per_answer"), 2)}


def loadgen_note(run: dict) -> str | None:
    """Why the load generator might be what limited ``run``, or None."""
    hot = [p for p in run["loadgen_cpu_pct_by_proc"] if p >= LOADGEN_BUSY_PCT]
    machine = run.get("machine_cpu") or {}
    full = machine.get("busy_pct", 0) >= 95.0 * machine.get("cores", 1)
    if hot:
        return (f"{len(hot)} of {run['procs']} load process(es) used over {LOADGEN_BUSY_PCT:g}% "
                "of a core: the generator may be the bottleneck (try more --procs)")
    if full and run["mode"] == "closed":
        return ("every core was busy: the generator and the server shared them, so throughput "
                "is a lower bound; CPU per answer does not depend on it")
    return None


def ratios(ours: dict, echo: dict | None, ceiling: dict | None) -> dict:
    return {
        "throughput_ours_over_echo": _ratio(ours["throughput_rps"],
                                            (echo or {}).get("throughput_rps")),
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
    keys = (f"; keys from {p['keys']:,} users ({p['key_dist']})" if p.get("keys") else "") + \
        (f", experiment {p['exp']}" if p.get("exp") else "")
    return [f"ringserve bench: {load}, {r['procs']} load process(es), {span}",
            f"target: {p['target']}; model {p['model']}, request {p['request']}{keys}"]


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
                     [f"{_n((r['send_lag_us'] or {}).get('p50'))}/"
                      f"{_n((r['send_lag_us'] or {}).get('p99'))}"
                      for r in runs.values()]))
    rows += [("statuses (measured)", [statuses(r) for r in runs.values()])]
    # Routing shows only where there is some: a lane other than stable, or an arm.
    if any(set(r.get("routes") or {}) - {"stable/-", "None/-"} for r in runs.values()):
        rows.append(("lane/arm (measured)", [" ".join(f"{k}:{v:,}" for k, v in r["routes"].items())
                                             or "-" for r in runs.values()]))
    rows += [("unanswered / dropped",
              [f"{r['unanswered']} / {r['dropped']}" for r in runs.values()]),
             ("server CPU us per answer",
              [_n(r.get("server_cpu_us_per_answer"), 1) for r in runs.values()]),
             ("  = CPU s per 1,000 answers", [_n(r["server_cpu_us_per_answer"] / 1000, 3)
                                              if r.get("server_cpu_us_per_answer") else "-"
                                              for r in runs.values()]),
             ("server CPU (% of a core)", [_n((r.get("server_cpu") or {}).get("cpu_pct"), 1)
                                           for r in runs.values()])]
    by_role = [_by_role(r) for r in runs.values()]
    for role in dict.fromkeys(k for d in by_role for k in d):
        rows.append((f"  {role}", [_n(d.get(role), 1) for d in by_role]))
    totals = [(r.get("server_cpu") or {}).get("by_role") or {} for r in runs.values()]
    for role in dict.fromkeys(k for t in totals for k, v in t.items() if v["procs"] > 1):
        rows.append((f"  {role}, all {max(t.get(role, {}).get('procs', 0) for t in totals)}",
                     [_n(t[role]["cpu_pct"], 1) if role in t else "-" for t in totals]))
    rows.append(("load-gen CPU (% of a core)",
                 [f"{_n(r['loadgen_cpu_pct'], 1)}"
                  + (f" ({'+'.join(_n(x) for x in r['loadgen_cpu_pct_by_proc'])})"
                     if r["procs"] > 1 else "")
                  for r in runs.values()]))
    cores = max((r.get("machine_cpu") or {}).get("cores", 0) for r in runs.values())
    rows.append((f"machine CPU busy (% of a core, {cores} cores)",
                 [_n((r.get("machine_cpu") or {}).get("busy_pct"), 1) for r in runs.values()]))
    rows.append(("  of which other work (% of a core)",
                 [_n(_others_cpu(r), 1) for r in runs.values()]))
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
    out = [header[0].ljust(w0)
           + "".join("  " + h.rjust(w) for h, w in zip(header[1:], ws, strict=True))]
    out.append("-" * len(out[0]))
    out += [name.ljust(w0) + "".join("  " + c.rjust(w) for c, w in zip(cells, ws, strict=False))
            for name, cells in rows]
    return out


def render(doc: dict) -> str:
    runs = {name: doc[k]
            for k, name in (("ringserve", "ringserve"), ("batching_off", "max_batch=1"),
                            ("echo", "echo")) if doc.get(k)}
    lines = _describe(doc)
    procs = processes(doc["ringserve"])
    if procs:
        lines.append(f"server processes (CPU counted over all): {procs}")
    lines.append("")
    lines += _table([""] + list(runs), _run_rows(runs))
    for name, r in runs.items():
        for e in r.get("errors") or []:
            lines.append(f"{name} error: {e}")
        note = loadgen_note(r)
        if note:
            lines.append(f"{name}: note: {note}")

    for s, label in ((doc.get("server_stats"), ""),
                     ((doc.get("batching_off") or {}).get("server_stats"), " with max_batch=1")):
        if s:
            lines += _server_stats_lines(s, label)

    b = doc.get("batching")
    if b:
        lines += ["", "batching on / off (max_batch=1), same load:",
                  f"  throughput: {_n(b['throughput_on_over_off'], 2)}x   p99: "
                  f"{_n(b['p99_on_over_off'], 2)}x   CPU per answer: "
                  f"{_n(b['cpu_per_answer_on_over_off'], 2)}x   mean batch "
                  f"{_n(b['mean_batch_on'], 2)} vs {_n(b['mean_batch_off'], 2)}"]

    sw = doc.get("sweep")
    if sw:
        lines += ["", f"rate sweep (open loop, {sw['duration']:g} s per rate):"]
        lines += ["  " + ln for ln in _table(
            ["offered/s", "answers/s", "p50 us", "p99 us", "p99.9 us", "not OK", "unanswered",
             "send lag p99 us", "other CPU %"],
            [(_n(p["offered_rps"]), [_n(p["throughput_rps"]), _n(p["p50_us"]), _n(p["p99_us"]),
                                     _n(p["p99.9_us"]), _n(p["not_ok"]), _n(p["unanswered"]),
                                     _n(p["send_lag_p99_us"]), _n(p["others_cpu_pct"])])
             for p in sw["points"]])]
        k = sw["knee"]
        lines.append(f"  knee: {_n(k['offered_rps'])}/s offered, "
                     f"{_n(k['throughput_rps'])}/s answered, "
                     f"p99 {_n(k['p99_us'])} us (the last rate that delivered >= "
                     f"{KNEE_DELIVERED:.0%} with p99 <= {KNEE_P99_FACTOR:g}x the lowest rate's)"
                     if k else "  knee: below the lowest rate")

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
                  "  throughput, ours / echo:               "
                  f"{_n(q['throughput_ours_over_echo'], 3)}",
                  "  CPU per answer, ours / echo:           "
                  f"{_n(q['cpu_per_answer_ours_over_echo'], 2)}",
                  "  throughput, ours / in-process ceiling: "
                  f"{_n(q['throughput_ours_over_model_ceiling'], 3)}"
                  "  (share of the window the model alone would need)"]
    return "\n".join(lines)


def processes(run: dict) -> str | None:
    """"1 supervisor, 2 front, 1 worker": the server's processes by role."""
    roles = (run.get("server_cpu") or {}).get("by_role")
    return ", ".join(f"{r['procs']} {k}" for k, r in roles.items()) if roles else None


def fronts_note(s: dict) -> str | None:
    """Over which fronts the daemon's ``stats`` figures were taken, or None
    when it has a single front (bench/fronts.py)."""
    f = s.get("fronts")
    if not f or f["count"] == 1:
        return None
    if f["count"] is None:
        return ("from the one front this connection reached; the daemon's number of fronts "
                "is unknown (give --server-pid), and each front answers stats for itself only")
    if f.get("machine_wide"):
        return f"for the whole daemon: its supervisor sums all {f['count']} fronts"
    if f["all"]:
        return f"summed over all {f['count']} fronts (one connection to each)"
    if f["reached"] <= 1:
        return (f"from ONE of {f['count']} fronts only: each front answers stats for itself "
                f"({f['why_not_all']}); the batch counts are a part of the daemon's")
    return (f"summed over {f['reached']} of {f['count']} fronts ({f['why_not_all']}); the "
            "batch counts are a part of the daemon's")


def _server_stats_lines(s: dict, label: str) -> list[str]:
    lines = ["", f"server stats{label}, measured window (model {s['model']}): {s['batches']:,} "
                 f"batches, mean batch {_n(s['mean_batch'], 2)}, padded rows {s['padded_rows']:,}"]
    note = fronts_note(s)
    if note:
        lines.append(f"  stats {note}")
    return lines + [
        f"  queue depth mid-run {_n(s['queue_depth_mid'])}, in-flight batches mid-run "
        f"{_n(s['in_flight_batches_mid'])}, queue depth after the run "
        f"{_n(s['queue_depth_after'])}, worker busy {s['worker_busy']}",
        "  batch sizes (size:batches):",
        "    " + _wrap([f"{k}:{v:,}" for k, v in s["batch_sizes"].items()])]


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
                     [str(bucket), _n(batches), _n(us, 1), _n(mean_n / us * 1e6),
                      _n(bucket / us * 1e6)]))
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
