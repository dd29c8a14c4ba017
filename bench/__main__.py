"""``python -m bench``: load-test a ringserve daemon and print what it did.

    python -m bench [--config FILE | --target HOST:PORT [--server-pid PID]]
                    [--connections C] [--depth D] [--duration S] [--warmup S]
                    [--requests N] [--rate R] [--procs P] [--limits] [--json FILE]

Without ``--target`` it starts the daemon itself (``--config``, default
configs/default.toml) on an ephemeral port and stops it afterwards. With
``--limits`` the same load then runs against the echo server (the transport
ceiling, bench/echo.py), and the model is timed in-process at the batch
sizes the server used (bench/ceiling.py). The daemon is stopped before
either, so they do not compete with it for cores.
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np

from . import report, servers
from .load import Plan, run_load

# What --target without a "models" op (the echo server, say) is sent: the
# demo model's input.
_FALLBACK_INPUT = {"dtype": "float32", "shape": [128]}


def _sample(decl: dict) -> dict:
    """One request tensor for ``decl`` ({dtype, shape}), with fixed contents."""
    dtype, shape = decl["dtype"], [int(x) for x in decl["shape"]]
    rng = np.random.default_rng(0)
    if dtype == "bfloat16":   # numpy has none: the top half of float32
        data = (rng.standard_normal(shape).astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)
    elif dtype.startswith("float"):
        data = rng.standard_normal(shape).astype(dtype)
    else:
        data = np.zeros(shape, dtype=dtype)
    return {"dtype": dtype, "shape": shape, "data": data.tobytes()}


def _request(host: str, port: int, model: str | None) -> tuple[dict, str, str]:
    """The request to send over and over, from the server's own schema."""
    try:
        models = servers.call(host, port, {"op": "models"}).get("models")
    except (OSError, ValueError):
        models = None
    entry = None
    if isinstance(models, list) and models:
        entry = next((m for m in models if m.get("name") == model), None) if model else models[0]
        if entry is None:
            raise SystemExit(f"model {model!r} is not served at {host}:{port}; "
                             f"it serves {sorted({m.get('name') for m in models})}")
    name = entry["name"] if entry else (model or "demo")
    if entry and "inputs" in entry:
        inputs = {k: _sample(d) for k, d in entry["inputs"].items()}
        shown = ", ".join(f"{k}: {d['dtype']}{d['shape']}" for k, d in entry["inputs"].items())
    else:
        decl = entry["input"] if entry else _FALLBACK_INPUT
        inputs, shown = _sample(decl), f"{decl['dtype']}{list(decl['shape'])}"
    return {"model": name, "inputs": inputs}, name, shown


def _measure(plan: Plan, host: str, port: int, pid: int | None, role: str, with_stats: bool) -> dict:
    """Run the load at host:port; sample the server (CPU, stats) at the window's marks."""

    def mark(label):
        out = {"machine": servers.machine_sample()}
        if pid is not None:
            out["cpu"] = servers.cpu_sample(pid, role)
        if with_stats:
            try:
                out["stats"] = servers.call(host, port, {"op": "stats"})
            except OSError:
                out["stats"] = None
        return out

    plan.host, plan.port = host, port
    run = run_load(plan, mark)
    marks = run.pop("marks")
    run["machine_cpu"] = servers.machine_delta(marks["start"]["machine"], marks["end"]["machine"])
    if pid is not None:
        cpu = servers.cpu_delta(marks["start"]["cpu"], marks["end"]["cpu"])
        run["server_cpu"] = cpu
        run["server_cpu_us_per_answer"] = (round(cpu["cpu_s"] * 1e6 / run["answers"], 1)
                                           if run["answers"] else None)
    run["_marks"] = marks
    return run


def _args(argv):
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=None, help=f"daemon config (default {servers.DEFAULT_CONFIG})")
    p.add_argument("--target", default=None, metavar="HOST:PORT",
                   help="load a server that is already running instead of starting one")
    p.add_argument("--server-pid", type=int, default=None,
                   help="with --target: the server's pid, to measure its CPU")
    p.add_argument("--model", default=None, help="model to load (default: the first served)")
    p.add_argument("--connections", "-c", type=int, default=16)
    p.add_argument("--depth", "-d", type=int, default=1, help="requests in flight per connection")
    p.add_argument("--duration", type=float, default=10.0, help="measured seconds")
    p.add_argument("--warmup", type=float, default=2.0, help="seconds of load before measuring")
    p.add_argument("--requests", type=int, default=None,
                   help="measure this many requests instead of a duration (closed loop)")
    p.add_argument("--rate", type=float, default=None,
                   help="open loop: Poisson arrivals per second, over all connections")
    p.add_argument("--procs", type=int, default=1, help="load-generator processes")
    p.add_argument("--grace", type=float, default=5.0,
                   help="seconds to wait for outstanding answers after sending stops")
    p.add_argument("--limits", action="store_true",
                   help="also run the echo server and the in-process model ceiling")
    p.add_argument("--startup-timeout", type=float, default=300.0)
    p.add_argument("--json", default=None, metavar="FILE", help="write every figure here as JSON")
    return p.parse_args(argv)


def main(argv=None) -> int:
    a = _args(argv)
    config = a.config or str(servers.DEFAULT_CONFIG)
    plan = Plan("", 0, {}, connections=a.connections, depth=a.depth, duration=a.duration,
                warmup=a.warmup, requests=a.requests, rate=a.rate, procs=a.procs, grace=a.grace)
    doc: dict = {"params": {"argv": sys.argv[1:] if argv is None else list(argv),
                            "duration": a.duration, "warmup": a.warmup, "requests": a.requests,
                            "rate": a.rate},
                 "ringserve": None, "server_stats": None, "echo": None, "ceiling": None, "ratios": None}

    if a.target:
        host, _, port = a.target.rpartition(":")
        plan.request, model, shown = _request(host, int(port), a.model)
        doc["params"]["target"] = a.target
        ours = _measure(plan, host, int(port), a.server_pid, "server", True)
        after = _stats_or_none(host, int(port))
    else:
        with servers.daemon(config, a.startup_timeout) as d:
            plan.request, model, shown = _request(d.host, d.port, a.model)
            doc["params"]["target"] = f"daemon started with {config}"
            ours = _measure(plan, d.host, d.port, d.pid, "front", True)
            after = _stats_or_none(d.host, d.port)
    doc["params"].update(model=model, request=shown)
    doc["ringserve"] = ours
    doc["server_stats"] = report.server_stats(ours.pop("_marks"), after, model)

    if a.limits:
        with servers.echo(a.startup_timeout) as e:
            doc["echo"] = _measure(plan, e.host, e.port, e.pid, "echo", False)
            doc["echo"].pop("_marks")
        sizes = (doc["server_stats"] or {}).get("batch_sizes")
        if sizes:
            from . import ceiling
            doc["ceiling"] = ceiling.measure(config, model, sizes)
        doc["ratios"] = report.ratios(ours, doc.get("echo"), doc.get("ceiling"))

    print(report.render(doc))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(doc, f, indent=2)
            f.write("\n")
    # Error statuses and unanswered requests are results (an overload test
    # wants them); a generator that lost connections or got answers it
    # cannot match did not measure what it claims to.
    return 1 if ours["errors"] else 0


def _stats_or_none(host: str, port: int) -> dict | None:
    try:
        return servers.call(host, port, {"op": "stats"})
    except OSError:
        return None


if __name__ == "__main__":
    sys.exit(main())
