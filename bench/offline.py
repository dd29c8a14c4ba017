"""Throughput of the offline batch path against its two limits, in one run.

    python -m bench.offline [--rows 1000000] [--formats csv,parquet] [--json FILE]

For each input format, on the same table (``--rows`` rows of ``id`` plus
128 float32 features, the demo model's input; generated once into ``--dir``):

- parse-only: the job's own reader over the whole file (same engine, same
  blocks, ids and arrays built), no model;
- in-process ceiling: the model loaded as a worker loads it
  (``daemon.workers.runtime.Runner``, same torch threads, same batch size), running
  as many full batches back to back on data already in memory;
- batch path: ``python -m daemon batch`` end to end as a user runs it (data
  hash, workers, checkpoints, output file); its rows/s is the scoring loop's
  (first batch read to last row written), and its wall time includes the
  workers' start-up and the publish.

The target is the batch path within 20% of the slower of the two limits
(``ratio_to_limit`` >= 0.8).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FEATURES = 128


def ensure_tables(directory: str, rows: int, formats: list[str], seed: int = 0) -> dict[str, str]:
    """The benchmark tables (generated once, then reused): values drawn from
    a pool of 4096 normal floats printed with 6 significant digits, so the
    CSV holds ~1.2 kB per row like a real feature dump."""
    os.makedirs(directory, exist_ok=True)
    paths = {f: os.path.join(directory, f"offline-{rows}-{seed}.{f}") for f in formats}
    todo = [f for f in formats if not os.path.exists(paths[f])]
    if not todo:
        return paths
    rng = np.random.default_rng(seed)
    text = np.array(["%.6g" % v for v in rng.standard_normal(4096)], dtype=object)
    values = np.array([float(t) for t in text], np.float32)
    header = "id," + ",".join(f"f{i}" for i in range(FEATURES))
    tmp = {f: paths[f] + f".tmp-{os.getpid()}" for f in todo}
    csv_f = open(tmp["csv"], "w") if "csv" in todo else None
    pq_w = None
    if "parquet" in todo:
        import pyarrow as pa
        import pyarrow.parquet as pq
        schema = pa.schema([("id", pa.int64())]
                           + [(f"f{i}", pa.float32()) for i in range(FEATURES)])
        pq_w = pq.ParquetWriter(tmp["parquet"], schema)
    if csv_f:
        csv_f.write(header + "\n")
    step = 65536
    for s in range(0, rows, step):
        m = min(step, rows - s)
        idx = rng.integers(0, text.size, (m, FEATURES))
        if csv_f:
            csv_f.write("".join(f"{s + i},{','.join(r)}\n"
                                for i, r in enumerate(text[idx].tolist())))
        if pq_w:
            x = values[idx]
            cols = ([pa.array(np.arange(s, s + m, dtype=np.int64))]
                    + [pa.array(x[:, i]) for i in range(FEATURES)])
            pq_w.write_table(pa.Table.from_arrays(cols, schema=schema))
    if csv_f:
        csv_f.close()
    if pq_w:
        pq_w.close()
    for f in todo:
        os.replace(tmp[f], paths[f])
    return paths


def _job_reader(path: str, fmt: str, model, engine: str):
    from daemon.offline.columns import plan_columns
    from daemon.offline.job import cpu_threads
    from daemon.offline.readers import open_reader
    from daemon.workers.spec import spec_for
    spare = len(os.sched_getaffinity(0)) - cpu_threads(model) * model.devices.count("cpu")
    reader = open_reader(path, fmt, engine=engine, threads=spare >= 2)
    plan = plan_columns(reader.header, spec_for(model, "cpu", 1).inputs, {}, "id", reader.source)
    return reader, plan


def parse_only(path: str, fmt: str, model, engine: str) -> dict:
    reader, plan = _job_reader(path, fmt, model, engine)
    t0 = time.perf_counter()
    rows = sum(c.rows for c in reader.chunks(plan))
    dt = time.perf_counter() - t0
    return {"rows": rows, "seconds": round(dt, 3), "rows_per_s": round(rows / dt, 1),
            "engine": getattr(reader, "engine", "pyarrow"), "threads": reader.threads}


def ceiling(model, rows: int, batch: int) -> dict:
    import torch

    from daemon.offline.job import cpu_threads
    from daemon.workers.runtime import Runner
    from daemon.workers.spec import spec_for
    threads = cpu_threads(model)
    torch.set_num_threads(threads)
    spec = spec_for(model, "cpu", threads)
    spec.buckets = [batch]
    runner = Runner(spec)
    runner.load()
    gen = torch.Generator().manual_seed(0)
    ins = [torch.randn((batch, *t.shape), generator=gen) for t in spec.inputs]
    outs = [torch.empty((batch, *o.shape)) for o in runner.outputs]
    for _ in range(3):
        runner.run_batch(ins, outs, batch)
    n = -(-rows // batch)
    t0 = time.perf_counter()
    for _ in range(n):
        runner.run_batch(ins, outs, batch)
    dt = time.perf_counter() - t0
    return {"rows": n * batch, "seconds": round(dt, 3), "rows_per_s": round(n * batch / dt, 1),
            "torch_threads": threads}


# The most one scoring run may take: 1M rows run in about 15 s (docs/batch.md),
# so an hour is a hung job, not a slow one.
BATCH_TIMEOUT_S = 3600


def batch_path(path: str, config: str, model: str, batch: int, engine: str) -> dict:
    out = tempfile.mkdtemp(prefix="ringserve-offline-")
    try:
        t0 = time.perf_counter()
        p = subprocess.run(
            [sys.executable, "-m", "daemon", "batch", "--config", config, "--model", model,
             "--input", path, "--output", out, "--id-column", "id", "--batch-size", str(batch),
             "--csv-engine", engine, "--progress", "off", "--restart"],
            cwd=REPO, capture_output=True, text=True, timeout=BATCH_TIMEOUT_S)
        wall = time.perf_counter() - t0
        if p.returncode != 0:
            raise RuntimeError(f"ringserve batch failed ({p.returncode}):\n{p.stderr[-3000:]}")
        s = json.loads(p.stdout.strip().splitlines()[-1])
        return {"rows": s["rows"], "rows_per_s": s["rows_per_s"], "scoring_s": s["scoring_s"],
                "job_wall_s": s["wall_s"], "process_wall_s": round(wall, 3),
                "end_to_end_rows_per_s": round(s["rows"] / wall, 1)}
    finally:
        shutil.rmtree(out, ignore_errors=True)


def _ratios(parse: dict, ceil: dict, run: dict) -> dict:
    limit = min(parse["rows_per_s"], ceil["rows_per_s"])
    return {"ratio_to_parse": round(run["rows_per_s"] / parse["rows_per_s"], 3),
            "ratio_to_ceiling": round(run["rows_per_s"] / ceil["rows_per_s"], 3),
            "ratio_to_limit": round(run["rows_per_s"] / limit, 3)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.offline",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--formats", default="csv,parquet", help="comma-separated: csv, parquet")
    p.add_argument("--dir", default=os.path.join(tempfile.gettempdir(), "ringserve-bench-offline"),
                   help="where the generated tables are kept between runs")
    p.add_argument("--config", default=os.path.join(REPO, "configs", "default.toml"))
    p.add_argument("--model", default="demo")
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--csv-engine", default="auto", choices=("auto", "numpy", "pyarrow"))
    p.add_argument("--repeat", type=int, default=1,
                   help="rounds of all three measurements; the best of each is reported "
                        "(on a shared machine the best is the least disturbed)")
    p.add_argument("--json", metavar="FILE", help="also write the figures here")
    a = p.parse_args(argv)
    sys.path.insert(0, REPO)
    from daemon.config import load_config
    model = load_config(a.config).model(a.model)
    formats = [f.strip() for f in a.formats.split(",") if f.strip()]
    t = time.perf_counter()
    paths = ensure_tables(a.dir, a.rows, formats)
    print(f"tables ready in {time.perf_counter() - t:.1f} s: {', '.join(paths.values())}",
          flush=True)
    rounds = []
    for i in range(a.repeat):
        ceil = ceiling(model, a.rows, a.batch_size)
        r = {"ceiling": ceil, "formats": {}}
        print(f"round {i + 1}: in-process ceiling {ceil['rows_per_s']:>10,.0f} rows/s "
              f"({ceil['torch_threads']} torch thread(s))", flush=True)
        for fmt in formats:
            parse = parse_only(paths[fmt], fmt, model, a.csv_engine)
            run = batch_path(paths[fmt], a.config, a.model, a.batch_size, a.csv_engine)
            r["formats"][fmt] = {"parse_only": parse, "batch": run, **_ratios(parse, ceil, run)}
            print(f"{fmt:>9}: parse-only {parse['rows_per_s']:>10,.0f} rows/s "
                  f"({parse['engine']})  batch {run['rows_per_s']:>10,.0f} rows/s  ratio to the "
                  f"slower limit {r['formats'][fmt]['ratio_to_limit']:.2f}  (end to end "
                  f"{run['end_to_end_rows_per_s']:,.0f} rows/s, {run['process_wall_s']:.1f} s with "
                  "start-up)", flush=True)
        rounds.append(r)
    best = lambda xs: max(xs, key=lambda d: d["rows_per_s"])  # noqa: E731
    doc = {"rows": a.rows, "batch_size": a.batch_size, "cores": len(os.sched_getaffinity(0)),
           "rounds": rounds,
           "best": {"ceiling": best([r["ceiling"] for r in rounds]), "formats": {}}}
    ceil = doc["best"]["ceiling"]
    if a.repeat > 1:
        print(f"best of {a.repeat}: in-process ceiling {ceil['rows_per_s']:>10,.0f} rows/s")
    for fmt in formats:
        parse = best([r["formats"][fmt]["parse_only"] for r in rounds])
        run = best([r["formats"][fmt]["batch"] for r in rounds])
        doc["best"]["formats"][fmt] = {"parse_only": parse, "batch": run,
                                       **_ratios(parse, ceil, run)}
        if a.repeat > 1:
            b = doc["best"]["formats"][fmt]
            print(f"{fmt:>9}: parse-only {parse['rows_per_s']:>10,.0f}  batch "
                  f"{run['rows_per_s']:>10,.0f}  to parse {b['ratio_to_parse']:.2f}  to ceiling "
                  f"{b['ratio_to_ceiling']:.2f}  to the slower limit {b['ratio_to_limit']:.2f}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(doc, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
