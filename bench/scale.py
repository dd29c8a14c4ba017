"""``python -m bench.scale``: throughput and CPU per answer against the number
of fronts (``[server] fronts``), per model.

    python -m bench.scale [--fronts 1,2,4,8] [--models noop,default] [--procs P]
                          [--connections C] [--depth D] [--duration S] [--warmup S]
                          [--json FILE]

For each model and each front count, one after the other (they never share
the cores): start the daemon from a variant of the model's config with
``[server] fronts = N`` (bench/variants.py; ``[metrics]`` off at every
count, since the daemon refuses it with several fronts), drive it closed
loop from ``--procs`` load-generator processes, and stop it. The table shows
per run: answers/s and its ratio to the first front count's, the daemon's
CPU per answer (its whole process tree: supervisor, fronts, workers) and
that ratio, the mean batch (summed over every front: bench/fronts.py), p50
and p99, and what the load generator and the machine used.

Models (``--models``, comma-separated): ``noop`` (bench/models.py: no
compute, the demo's shapes, so the run is the serving machinery alone),
``default`` (configs/default.toml, the demo MLP scorer), ``encoder``
(bench/configs/encoder.toml), or a path to a config file.

Meant for a machine of 16 cores or more, where fronts have cores of their
own beside the workers and the load generator. Figures for such a machine
have not been measured yet: this was run only as a smoke on a 2-core
development machine (``--fronts 1,2 --duration 2 --models default``), where
fronts beyond one share the same two cores with the worker and the
generator, and cannot be faster.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

from . import report, servers, variants
from .__main__ import _request, _Server
from .load import Plan

CONFIGS = {"default": servers.DEFAULT_CONFIG,
           "encoder": servers.REPO / "bench" / "configs" / "encoder.toml"}

NOOP_CONFIG = """\
# The no-op model for python -m bench.scale: written by it, removed after the run.
[server]
host = "127.0.0.1"
port = 0

[[models]]
name = "noop"
version = "1"
factory = "bench.models:noop"
input = { dtype = "float32", shape = [128] }
output = { dtype = "float32", shape = [2] }
devices = ["cpu"]
max_batch = 64
window_ms = 2.0
queue_limit = 1024
"""


def _ints(v: str) -> list[int]:
    try:
        out = [int(x) for x in v.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"a comma-separated list of integers, got {v!r}") from None
    if not out or any(not 1 <= n <= variants.MAX_FRONTS for n in out):
        raise argparse.ArgumentTypeError(f"front counts from 1 to {variants.MAX_FRONTS}, got {v!r}")
    return out


def _args(argv):
    p = argparse.ArgumentParser(prog="python -m bench.scale", description=__doc__.split("\n\n")[0])
    p.add_argument("--fronts", type=_ints, default=[1, 2, 4, 8], metavar="N,N,...",
                   help="front counts to run (default 1,2,4,8)")
    p.add_argument("--models", default="noop,default", metavar="M,M,...",
                   help="noop, default, encoder or config paths (default noop,default)")
    p.add_argument("--procs", type=int, default=4, help="load-generator processes (default 4)")
    p.add_argument("--connections", "-c", type=int, default=256,
                   help="connections over all load processes (default 256)")
    p.add_argument("--depth", "-d", type=int, default=1, help="requests in flight per connection")
    p.add_argument("--duration", type=float, default=10.0, help="measured seconds per run")
    p.add_argument("--warmup", type=float, default=2.0, help="seconds of load before measuring")
    p.add_argument("--startup-timeout", type=float, default=300.0)
    p.add_argument("--json", default=None, metavar="FILE", help="write every figure here as JSON")
    a = p.parse_args(argv)
    a.models = [m.strip() for m in a.models.split(",") if m.strip()]
    for m in a.models:
        if m != "noop" and m not in CONFIGS and not Path(m).is_file():
            p.error(f"--models: {m!r} is neither noop, {', '.join(CONFIGS)} nor a config file")
    if not 1 <= a.procs <= a.connections:
        p.error(f"need 1 <= --procs <= --connections, got {a.procs} and {a.connections}")
    return a


def _row(model: str, fronts: int, run: dict) -> dict:
    s = run.get("server_stats") or {}
    lat = run.get("latency_us") or {}
    roles = (run.get("server_cpu") or {}).get("by_role") or {}
    return {"model": model, "fronts": fronts, "answers_per_s": run["throughput_rps"],
            "answers": run["answers"],
            "cpu_us_per_answer": run.get("server_cpu_us_per_answer"),
            "server_cpu_pct": (run.get("server_cpu") or {}).get("cpu_pct"),
            "cpu_pct_by_role": {k: v["cpu_pct"] for k, v in roles.items()},
            "processes": {k: v["procs"] for k, v in roles.items()},
            "mean_batch": s.get("mean_batch"), "stats_fronts": s.get("fronts"),
            "p50_us": lat.get("p50"), "p99_us": lat.get("p99"),
            "not_ok": sum(v for k, v in run["statuses"].items() if k != "0"),
            "unanswered": run["unanswered"], "errors": run["errors"],
            "loadgen_cpu_pct": run["loadgen_cpu_pct"],
            "machine_busy_pct": (run.get("machine_cpu") or {}).get("busy_pct"),
            "note": report.loadgen_note(run)}


def _ratios(rows: list[dict]) -> None:
    """Each row's answers/s and CPU per answer over its model's first row's."""
    base: dict[str, dict] = {}
    for r in rows:
        b = base.setdefault(r["model"], r)
        r["answers_per_s_vs_first"] = report._ratio(r["answers_per_s"], b["answers_per_s"], 2)
        r["cpu_per_answer_vs_first"] = report._ratio(r["cpu_us_per_answer"],
                                                     b["cpu_us_per_answer"], 2)


def render(doc: dict) -> str:
    p = doc["params"]
    lines = [f"ringserve bench.scale: closed loop, {p['connections']} connections x depth "
             f"{p['depth']} from {p['procs']} load process(es), {p['duration']:g} s after "
             f"{p['warmup']:g} s warm-up; {doc['machine']['cpus']} usable CPUs", ""]
    rows = [(r["model"], [str(r["fronts"]), report._n(r["answers_per_s"]),
                          report._n(r["answers_per_s_vs_first"], 2),
                          report._n(r["cpu_us_per_answer"], 1),
                          report._n(r["cpu_per_answer_vs_first"], 2),
                          report._n(r["mean_batch"], 2),
                          report._n(r["p50_us"]), report._n(r["p99_us"]),
                          report._n(r["server_cpu_pct"]), report._n(r["loadgen_cpu_pct"]),
                          report._n(r["machine_busy_pct"])])
            for r in doc["runs"]]
    lines += report._table(["model", "fronts", "answers/s", "x first", "CPU us/answer", "x first",
                            "mean batch", "p50 us", "p99 us", "daemon CPU %", "load-gen %",
                            "machine %"], rows)
    lines.append(f"(\"x first\": over the same model's run at "
                 f"{doc['params']['fronts'][0]} front(s); "
                 "CPU is the daemon's whole tree; % are of one core)")
    for r in doc["runs"]:
        f = r["stats_fronts"] or {}
        tag = f"{r['model']}, {r['fronts']} front(s)"
        if f and not f.get("all"):
            lines.append(f"{tag}: mean batch {report.fronts_note({'fronts': f})}")
        if r["not_ok"] or r["unanswered"]:
            lines.append(f"{tag}: {r['not_ok']:,} answers not OK, {r['unanswered']:,} unanswered")
        for e in r["errors"] or []:
            lines.append(f"{tag}: error: {e}")
        if r["note"]:
            lines.append(f"{tag}: note: {r['note']}")
    return "\n".join(lines)


def main(argv=None) -> int:
    a = _args(argv)
    cpus = len(os.sched_getaffinity(0))
    doc = {"params": {"argv": sys.argv[1:] if argv is None else list(argv), "fronts": a.fronts,
                      "models": a.models, "procs": a.procs, "connections": a.connections,
                      "depth": a.depth, "duration": a.duration, "warmup": a.warmup},
           "machine": {"cpus": cpus, "cores": os.cpu_count()}, "runs": []}
    with tempfile.TemporaryDirectory(prefix="ringserve-scale-") as tmp:
        for model in a.models:
            if model == "noop":
                config = Path(tmp) / "noop.toml"
                config.write_text(NOOP_CONFIG)
            else:
                config = CONFIGS.get(model, model)
            for n in a.fronts:
                plan = Plan("", 0, {}, connections=a.connections, depth=a.depth,
                            duration=a.duration, warmup=a.warmup, procs=a.procs)
                with variants.variant(config, variants.with_fronts(n, metrics=False),
                                      f"fronts-{n}") as path, \
                        servers.daemon(path, a.startup_timeout) as d:
                    plan.request, name, _ = _request(d.host, d.port, None)
                    run = _Server(d.host, d.port, d.pid, d.role).measure(plan)
                row = _row(model, n, run)
                doc["runs"].append(row)
                print(f"{model}, {n} front(s): {report._n(row['answers_per_s'])} answers/s, "
                      f"{report._n(row['cpu_us_per_answer'], 1)} us CPU per answer",
                      file=sys.stderr, flush=True)
    _ratios(doc["runs"])
    print(render(doc))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(doc, f, indent=2)
            f.write("\n")
    return 1 if any(r["errors"] for r in doc["runs"]) else 0


if __name__ == "__main__":
    sys.exit(main())
