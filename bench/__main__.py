"""``python -m bench``: load-test a ringserve daemon and print what it did.

    python -m bench [--config FILE | --target HOST:PORT [--server-pid PID]]
                    [--connections C] [--depth D] [--duration S] [--warmup S]
                    [--requests N] [--rate R] [--procs P] [--fronts N|auto]
                    [--keys N [--key-dist uniform|zipf] [--exp ID]]
                    [--limits] [--compare-batching] [--sweep [--sweep-rates R,R,...]]
                    [--json FILE] [--plot FILE.png]

Without ``--target`` it starts the daemon itself (``--config``, default
configs/default.toml) on an ephemeral port and stops it afterwards; with
``--fronts N`` it runs a variant of that config with ``[server] fronts = N``
(written beside it and removed after: bench/variants.py; the file itself is
not touched). The runs, one after the other so that they never compete for
cores:

1. the load against the daemon (closed loop, or open loop with ``--rate``);
2. ``--sweep``: open loop on the same daemon at rising rates (by default
   fractions of run 1's throughput), throughput against p99, to find the knee;
3. ``--compare-batching``: run 1 again against the same config with every
   model's ``max_batch = 1`` (bench/variants.py), batching on against off;
4. ``--limits``: run 1 against the echo server (the transport ceiling,
   bench/echo.py), and the model timed in-process at the batch sizes the
   server used (bench/ceiling.py), with the daemon stopped.

Server CPU is the daemon's whole process tree: the supervisor, every front
and every worker (bench/servers.py). The daemon's batch figures (mean batch,
batch sizes) come from its ``stats`` op, which each front answers for itself
for itself only in a daemon before the supervisor answered it for the
machine: there, with several fronts, the bench holds a connection to each
front and sums them (bench/fronts.py). A daemon whose ``stats`` lists its
``fronts`` sums them itself, and is asked once. The report says which.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import sys

import numpy as np

from clients._core import read_token

from . import report, servers, variants
from .fronts import FrontStats
from .keys import DISTRIBUTIONS
from .load import Plan, run_load

# What --target without a "models" op (the echo server, say) is sent: the
# demo model's input.
_FALLBACK_INPUT = {"dtype": "float32", "shape": [128]}


def _sample(decl: dict) -> dict:
    """One request tensor for ``decl`` ({dtype, shape}), with fixed contents."""
    dtype, shape = decl["dtype"], [int(x) for x in decl["shape"]]
    rng = np.random.default_rng(0)
    if dtype == "bfloat16":   # numpy has none: the top half of float32
        data = ((rng.standard_normal(shape).astype(np.float32).view(np.uint32) >> 16)
                .astype(np.uint16))
    elif dtype.startswith("float"):
        data = rng.standard_normal(shape).astype(dtype)
    elif dtype == "bool":
        data = np.zeros(shape, dtype=dtype)
    else:   # small non-negative ints: valid token ids, indices and counts
        data = rng.integers(0, 100, shape).astype(dtype)
    return {"dtype": dtype, "shape": shape, "data": data.tobytes()}


def _request(host: str, port: int, model: str | None,
             token: str | None = None) -> tuple[dict, str, str]:
    """The request to send over and over, from the server's own schema."""
    try:
        models = servers.call(host, port, {"op": "models"}, token=token).get("models")
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


def _token(path: str | None) -> str | None:
    try:
        return read_token(path)
    except ValueError as e:
        raise SystemExit(f"python -m bench: {e}") from None


def _args(argv):
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=None,
                   help=f"daemon config (default {servers.DEFAULT_CONFIG})")
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
    p.add_argument("--fronts", type=_fronts, default=None, metavar="N|auto",
                   help="run the daemon with [server] fronts = N (1 to 32, or auto), in a "
                        "variant of --config written beside it")
    p.add_argument("--grace", type=float, default=5.0,
                   help="seconds to wait for outstanding answers after sending stops")
    p.add_argument("--keys", type=int, default=None, metavar="N",
                   help="send routing keys drawn from N users (default: no key)")
    p.add_argument("--key-dist", choices=DISTRIBUTIONS, default="uniform",
                   help="how the keys are drawn (zipf: a few heavy users, a long tail)")
    p.add_argument("--zipf-s", type=float, default=1.1, help="the Zipf exponent")
    p.add_argument("--exp", default=None, help="experiment id to send with every request")
    p.add_argument("--token-file", default=None,
                   help="with --target: the server's [auth] token, read from this file "
                   "(default: $RINGSERVE_TOKEN, if set); sent once per connection")
    p.add_argument("--limits", action="store_true",
                   help="also run the echo server and the in-process model ceiling")
    p.add_argument("--compare-batching", action="store_true",
                   help="also run the same load with every model's max_batch = 1")
    p.add_argument("--sweep", action="store_true",
                   help="also run open loop at rising rates: throughput against p99")
    p.add_argument("--sweep-rates", default=None, metavar="R,R,...",
                   help="the sweep's rates (default: fractions "
                        f"{','.join(f'{f:g}' for f in report.SWEEP_FRACTIONS)} of the first run's "
                        "throughput)")
    p.add_argument("--sweep-duration", type=float, default=3.0,
                   help="measured seconds per sweep rate")
    p.add_argument("--startup-timeout", type=float, default=300.0)
    p.add_argument("--json", default=None, metavar="FILE", help="write every figure here as JSON")
    p.add_argument("--plot", default=None, metavar="FILE.png",
                   help="latency over time, latency CDF and the sweep, as a PNG (needs matplotlib)")
    a = p.parse_args(argv)
    if a.target and a.compare_batching:
        p.error("--compare-batching starts daemons from --config; it cannot change a --target's")
    if a.target and a.fronts is not None:
        p.error("--fronts starts a daemon from --config; it cannot change a --target's")
    if a.sweep_rates is not None:
        try:
            a.sweep_rates = [float(r) for r in a.sweep_rates.split(",")]
        except ValueError:
            p.error(f"--sweep-rates: a comma-separated list of numbers, got {a.sweep_rates!r}")
        a.sweep = True
    if a.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            p.error("--plot needs matplotlib: pip install 'ringserve[plot]'")
    return a


def _fronts(v: str):
    if v == "auto":
        return v
    try:
        n = int(v)
    except ValueError:
        n = 0
    if not 1 <= n <= 32:
        raise argparse.ArgumentTypeError(f'an integer from 1 to 32 or "auto", got {v!r}')
    return n


def config_change(fronts, batching: bool = True):
    """The change (dict -> dict) and file tag of the config variant a run
    needs, or (None, None) when it runs the config as it is."""
    changes, tags = [], []
    if fronts is not None:
        changes.append(variants.with_fronts(fronts))
        tags.append(f"fronts-{fronts}")
    if not batching:
        changes.append(variants.without_batching)
        tags.append("max_batch-1")
    if not changes:
        return None, None

    def change(doc):
        for c in changes:
            doc = c(doc)
        return doc
    return change, ".".join(tags)


@contextlib.contextmanager
def config_for(config: str, fronts=None, batching: bool = True):
    """The config file to start the daemon with: ``config``, or a variant."""
    change, tag = config_change(fronts, batching)
    if change is None:
        yield config
    else:
        with variants.variant(config, change, tag) as path:
            yield path


class _Server:
    """Where runs go: host, port, and the pid whose CPU is measured (if known)."""

    def __init__(self, host: str, port: int, pid: int | None, role: str):
        self.host, self.port, self.pid, self.role = host, port, pid, role
        # Front processes under the pid (0: the root serves itself); None: unknown.
        self.fronts = servers.fronts(pid) if pid is not None else None

    def _front_stats(self, plan: Plan):
        """Connections to every front, or None (one front, unknown, or a
        daemon whose ``stats`` covers the machine), with why not."""
        first = _stats_or_none(self.host, self.port, plan.token)
        if first is not None and isinstance(first.get("fronts"), list):
            return None, "machine"    # the supervisor sums its fronts itself
        if not self.fronts or self.fronts < 2:
            return None, None
        try:
            return FrontStats(self.host, self.port, self.fronts, plan.request, plan.token), None
        except (OSError, ValueError) as e:
            return None, f"cannot reach the fronts one by one: {e}"

    def _fronts_seen(self, probes, why, after: dict | None) -> dict:
        if probes is not None:
            return probes.describe()
        if why == "machine":
            listed = (after or {}).get("fronts") or []
            n = sum(1 for f in listed if f.get("alive", True)) or len(listed)
            return {"count": n, "reached": n, "slots": None, "summed": n > 1, "all": True,
                    "machine_wide": True, "why_not_all": None}
        count = None if self.fronts is None else max(1, self.fronts)
        return {"count": count, "reached": 1, "slots": None, "summed": False,
                "all": count == 1,
                "why_not_all": why or (None if count == 1 else
                                       "the number of fronts is unknown (no --server-pid)")}

    def measure(self, plan: Plan, with_stats: bool = True) -> dict:
        """One run at this server, which is sampled (CPU, and ``stats`` if
        ``with_stats``) at the measured window's marks: its figures, with the
        server's own for the window under ``server_stats`` (summed over its
        fronts where there are several: bench/fronts.py)."""
        host, port, pid, role = self.host, self.port, self.pid, self.role
        plan.host, plan.port = host, port
        probes, why = self._front_stats(plan) if with_stats else (None, None)

        def stats_now():
            if probes is not None and probes.conns:
                return probes.stats()
            return _stats_or_none(host, port, plan.token)

        def mark(label):
            out = {"machine": servers.machine_sample()}
            if pid is not None:
                out["cpu"] = servers.cpu_sample(pid, role)
            if with_stats:
                out["stats"] = stats_now()
            return out

        try:
            run = run_load(plan, mark)
            after = stats_now() if with_stats else None
            seen = self._fronts_seen(probes, why, after) if with_stats else None
        finally:
            if probes is not None:
                probes.close()
        marks = run.pop("marks")
        run["machine_cpu"] = servers.machine_delta(marks["start"]["machine"],
                                                   marks["end"]["machine"])
        if pid is not None:
            cpu = servers.cpu_delta(marks["start"]["cpu"], marks["end"]["cpu"])
            run["server_cpu"] = cpu
            run["server_cpu_us_per_answer"] = (round(cpu["cpu_s"] * 1e6 / run["answers"], 1)
                                               if run["answers"] else None)
        if with_stats:
            run["server_stats"] = report.server_stats(marks, after, plan.request["model"])
            if run["server_stats"] is not None:
                run["server_stats"]["fronts"] = seen
        return run


def _sweep(server: _Server, plan: Plan, rates: list[float], duration: float) -> dict:
    points = []
    for rate in rates:
        step = dataclasses.replace(plan, rate=rate, requests=None, duration=duration,
                                   warmup=min(plan.warmup, 1.0), depth=1)
        run = server.measure(step, with_stats=False)
        points.append(report.sweep_point(rate, run))
    return {"duration": duration, "points": points, "knee": report.knee(points)}


def main(argv=None) -> int:
    a = _args(argv)
    config = a.config or str(servers.DEFAULT_CONFIG)
    plan = Plan("", 0, {}, connections=a.connections, depth=a.depth, duration=a.duration,
                warmup=a.warmup, requests=a.requests, rate=a.rate, procs=a.procs, grace=a.grace,
                keys=a.keys, key_dist=a.key_dist, zipf_s=a.zipf_s,
                token=_token(a.token_file))
    doc: dict = {"params": {"argv": sys.argv[1:] if argv is None else list(argv),
                            "duration": a.duration, "warmup": a.warmup, "requests": a.requests,
                            "rate": a.rate, "keys": a.keys, "key_dist": a.key_dist,
                            "exp": a.exp, "fronts": a.fronts},
                 "ringserve": None, "server_stats": None, "sweep": None, "batching_off": None,
                 "batching": None, "echo": None, "ceiling": None, "ratios": None}

    def first_runs(server: _Server) -> None:
        plan.request, model, shown = _request(server.host, server.port, a.model, plan.token)
        if a.exp is not None:
            plan.request["exp"] = a.exp
        doc["params"].update(model=model, request=shown)
        doc["ringserve"] = server.measure(plan)
        doc["server_stats"] = doc["ringserve"].pop("server_stats")
        if a.sweep:
            rates = a.sweep_rates or [round(f * doc["ringserve"]["throughput_rps"], 1)
                                      for f in report.SWEEP_FRACTIONS]
            doc["sweep"] = _sweep(server, plan, [r for r in rates if r > 0], a.sweep_duration)

    if a.target:
        host, _, port = a.target.rpartition(":")
        doc["params"]["target"] = a.target
        first_runs(_Server(host, int(port), a.server_pid, "server"))
    else:
        doc["params"]["target"] = f"daemon started with {config}" + (
            f", [server] fronts = {a.fronts}" if a.fronts is not None else "")
        with config_for(config, a.fronts) as path, servers.daemon(path, a.startup_timeout) as d:
            first_runs(_Server(d.host, d.port, d.pid, d.role))
    ours = doc["ringserve"]

    if a.compare_batching:
        with config_for(config, a.fronts, batching=False) as path, \
                servers.daemon(path, a.startup_timeout) as d:
            off = doc["batching_off"] = _Server(d.host, d.port, d.pid, d.role).measure(plan)
        doc["batching"] = report.batching(ours, doc["server_stats"], off, off["server_stats"])

    if a.limits:
        with servers.echo(a.startup_timeout) as e:
            doc["echo"] = _Server(e.host, e.port, e.pid, "echo").measure(plan, with_stats=False)
        sizes = (doc["server_stats"] or {}).get("batch_sizes")
        if sizes:
            from . import ceiling
            doc["ceiling"] = ceiling.measure(config, doc["params"]["model"], sizes)
        doc["ratios"] = report.ratios(ours, doc.get("echo"), doc.get("ceiling"))

    print(report.render(doc))
    if a.plot:
        from . import plot
        plot.save(doc, a.plot)
        print(f"\nplot: {a.plot}")
    for key in ("ringserve", "batching_off", "echo"):   # per-request arrays: plots only
        if doc.get(key):
            doc[key].pop("_timeline", None)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(doc, f, indent=2)
            f.write("\n")
    # Error statuses and unanswered requests are results (an overload test
    # wants them); a generator that lost connections or got answers it
    # cannot match did not measure what it claims to.
    return 1 if any(doc[k]["errors"] for k in ("ringserve", "batching_off", "echo") if doc.get(k)) \
        else 0


def _stats_or_none(host: str, port: int, token: str | None = None) -> dict | None:
    try:
        return servers.call(host, port, {"op": "stats"}, token=token)
    except OSError:
        return None


if __name__ == "__main__":
    sys.exit(main())
