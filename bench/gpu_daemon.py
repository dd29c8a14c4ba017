"""The daemon parts of ``python -m bench.gpu_check``: the daemon on one
device under the bench's load at given buckets, and kill -9 of its worker
under load.

Both start a real daemon (``bench.servers.daemon``: ``python -m daemon`` on
an ephemeral port, stopped with SIGTERM, SIGKILL if it hangs, when the
``with`` block ends, also on an exception or Ctrl-C) and drive it with
``bench.load.run_load`` in spawned processes, the generator of
``python -m bench``.

``serve``: one daemon with ``buckets = [1, 8, max_batch]``, so every batch
it runs is padded to one of the buckets the in-process step timed. One
closed-loop run per bucket b: 1 connection for b = 1 (batches of one), b
connections for a middle bucket (batches of at most b), 2 x max_batch
connections for max_batch (full batches). For each run:

- ``throughput_rps``: answers per second, the daemon end to end;
- ``inprocess_rps``: the same batches (the server's own batch-size
  histogram for the window, each batch charged its bucket's
  ``run_batch_us`` from the in-process step, same model, device, compile
  mode and dtype) run back to back by the model in-process: what one
  worker could do if the model were all it did (bench/ceiling.py's method);
- ``ratio`` = throughput_rps / inprocess_rps (the target is >= 0.8), and
  ``ratio_full_bucket``, against full batches of b in-process.

The worker's own figures come from ``stats``: ``pinned`` (the ring slot is
registered with CUDA, as the driver reports), ``h2d`` (input copy time per
batch from the ring slot, by bucket, CUDA events) and ``compiled`` (graphs).
"""

from __future__ import annotations

import os
import signal
import tempfile
import time
from pathlib import Path

import psutil

from ipc.status import Status

from . import servers
from .__main__ import _request, _Server
from .forward_times import MODELS
from .load import Plan, run_load

SHM = Path("/dev/shm")
REPORT_WAIT_S = 0.8   # a worker reports its figures every 0.5 s (daemon/workers/child.py REPORT_S)


def buckets_for(max_batch: int) -> list[int]:
    return sorted({b for b in (1, 8, max_batch) if b <= max_batch})


def config_text(model: str, device: str, compile_mode: str, max_batch: int,
                start_timeout_s: float) -> str:
    m = MODELS[model]
    return f"""
[server]
host = "127.0.0.1"
start_timeout_s = {start_timeout_s:.0f}
restart_backoff_max_s = 1.0

[metrics]
port = 0

[[models]]
name = "{model}"
version = "gpu-check"
factory = "{m['factory']}"
input = {{ dtype = "{m['dtype']}", shape = {m['shape']} }}
devices = ["{device}"]
compile = "{compile_mode}"
dtype = "float32"
threads = 1
max_batch = {max_batch}
buckets = {buckets_for(max_batch)}
window_ms = 2.0
queue_limit = 4096
"""


def segments(front_pid: int) -> list[str]:
    """The shared-memory segments a front made (ipc/shm.py names them after its pid)."""
    try:
        return sorted(n for n in os.listdir(SHM) if n.startswith(f"ringserve-{front_pid}-"))
    except FileNotFoundError:
        return []


def _procs_for(connections: int) -> int:
    return max(1, min(4, connections // 32, (os.cpu_count() or 2) // 4))


def _connections(bucket: int, max_batch: int) -> int:
    if bucket == 1:
        return 1
    return 2 * max_batch if bucket == max_batch else bucket


def _inprocess_rps(sizes: dict, buckets: list[int], us: dict) -> float | None:
    """Samples per second of the server's batch mix run back to back in-process."""
    samples = busy_us = 0.0
    for n, count in sizes.items():
        n = int(n)
        bucket = next(b for b in buckets if b >= n)
        if bucket not in us:
            return None
        samples += n * count
        busy_us += us[bucket] * count
    return round(samples / busy_us * 1e6, 1) if busy_us else None


def _write(dirname: str, text: str) -> str:
    path = os.path.join(dirname, "ringserve.toml")
    with open(path, "w") as f:
        f.write(text)
    return path


def serve(model: str, device: str, compile_mode: str, max_batch: int, inprocess_us: dict,
          duration: float, warmup: float, time_left, update) -> dict:
    """``inprocess_us``: {bucket: run_batch_us} of the same model, device,
    mode and dtype (float32), or {} when the in-process step has none.
    ``time_left()``: seconds this step may still take. ``update(result)``
    is called after every run with the result so far."""
    buckets = buckets_for(max_batch)
    res: dict = {"model": model, "device": device, "compile": compile_mode, "dtype": "float32",
                 "max_batch": max_batch, "buckets": buckets, "runs": [], "target_ratio": 0.8}
    with tempfile.TemporaryDirectory(prefix="ringserve-gpu-check-") as tmp:
        path = _write(tmp, config_text(model, device, compile_mode, max_batch,
                                       max(10.0, time_left() - 5)))
        t0 = time.monotonic()
        with servers.daemon(path, max(10.0, time_left() - 5)) as d:
            res["start_s"] = round(time.monotonic() - t0, 2)
            res["front_pid"] = d.pid
            (w,) = servers.call(d.host, d.port, {"op": "health"})["models"]
            res["worker"] = {k: w.get(k) for k in ("device", "compile", "pinned", "pid", "hash")}
            request, _, shown = _request(d.host, d.port, model)
            res["request"] = shown
            update(res)
            server = _Server(d.host, d.port, d.pid, d.role)
            for b in buckets:
                need = warmup + duration + 5
                if time_left() < need:
                    res["runs"].append({"bucket": b, "status": "skipped",
                                        "reason": f"budget: {time_left():.0f} s left, "
                                                  f"a run needs ~{need:.0f} s"})
                    continue
                c = _connections(b, max_batch)
                plan = Plan(d.host, d.port, request, connections=c, depth=1, duration=duration,
                            warmup=warmup, procs=_procs_for(c), grace=5.0)
                run = server.measure(plan)
                st = run.get("server_stats") or {}
                sizes = st.get("batch_sizes") or {}
                rps = run["throughput_rps"]
                inproc = _inprocess_rps(sizes, buckets, inprocess_us)
                full = round(b / inprocess_us[b] * 1e6, 1) if b in inprocess_us else None
                ratio = round(rps / inproc, 3) if inproc else None
                res["runs"].append({
                    "bucket": b, "status": "ok", "connections": c, "procs": plan.procs,
                    "throughput_rps": rps, "latency_us": run["latency_us"],
                    "statuses": run["statuses"], "unanswered": run["unanswered"],
                    "errors": run["errors"], "mean_batch": st.get("mean_batch"),
                    "batch_sizes": sizes, "inprocess_rps": inproc,
                    "inprocess_full_bucket_rps": full, "ratio": ratio,
                    "ratio_full_bucket": round(rps / full, 3) if full else None,
                    "target_met": None if ratio is None else ratio >= 0.8,
                    "worker_busy": st.get("worker_busy"),
                    "server_cpu_us_per_answer": run.get("server_cpu_us_per_answer"),
                    "loadgen_cpu_pct": run.get("loadgen_cpu_pct"),
                    "machine_busy_pct": (run.get("machine_cpu") or {}).get("busy_pct")})
                update(res)
            time.sleep(REPORT_WAIT_S)   # the worker's last figures
            (ws,) = servers.call(d.host, d.port, {"op": "stats"})["models"][0]["workers"]
            res["worker"].update(pinned=ws.get("pinned"), compiled=ws.get("compiled"),
                                 h2d=ws.get("h2d"), batches=ws.get("batches"))
            front = d.pid
        res["segments_left"] = segments(front)
    ok = [r for r in res["runs"] if r["status"] == "ok"]
    problems = [f"bucket {r['bucket']}: {r['unanswered']} unanswered, errors {r['errors']}"
                for r in ok if r["unanswered"] or r["errors"]]
    if device.startswith("cuda") and res["worker"].get("pinned") is not True:
        problems.append(f"the worker's ring is not pinned (pinned = {res['worker'].get('pinned')})")
    if res["segments_left"]:
        problems.append(f"segments left after stop: {res['segments_left']}")
    res["status"] = "failed" if problems else ("ok" if len(ok) == len(buckets) else "partial")
    res["problems"] = problems
    return res


def kill9(device: str, duration: float, time_left, update) -> dict:
    """kill -9 of the demo model's worker in the middle of a measured load
    window: every request answered (OK before, UNAVAILABLE for those it held
    and while no worker is ready, OK again once it is back if the window
    lasts), the worker restarted (a new pid, ready), the killed generation's
    segment unlinked, nothing left once the daemon stops."""
    res: dict = {"device": device, "model": "demo"}
    unavailable = str(int(Status.UNAVAILABLE))
    with tempfile.TemporaryDirectory(prefix="ringserve-gpu-check-") as tmp:
        path = _write(tmp, config_text("demo", device, "off", 32, max(10.0, time_left() - 5)))
        with servers.daemon(path, max(10.0, time_left() - 5)) as d:
            front = res["front_pid"] = d.pid
            (w,) = servers.call(d.host, d.port, {"op": "health"})["models"]
            old_pid = res["killed_pid"] = w["pid"]
            before = res["segments_before"] = segments(front)
            request, _, _ = _request(d.host, d.port, "demo")
            plan = Plan(d.host, d.port, request, connections=16, depth=2, duration=duration,
                        warmup=0.5, procs=1, grace=10.0)
            killed: dict = {}

            def mark(label):
                if label == "mid":
                    os.kill(old_pid, signal.SIGKILL)
                    killed["t"] = time.monotonic()

            run = run_load(plan, mark)
            run.pop("_timeline", None)
            res["load"] = {k: run[k] for k in ("answers", "measured", "statuses", "unanswered",
                                               "dropped", "errors", "throughput_rps")}
            update(res)
            t_end = time.monotonic() + max(5.0, time_left() - 5)
            h = None
            while time.monotonic() < t_end:
                (h,) = servers.call(d.host, d.port, {"op": "health"})["models"]
                if h["ready"] and h["pid"] != old_pid:
                    break
                time.sleep(0.05)
            ready = bool(h and h["ready"] and h["pid"] != old_pid)
            res["restart"] = {"ready": ready, "new_pid": h and h["pid"],
                              "restarts": h and h["restarts"], "state": h and h["state"],
                              "seconds_after_kill": round(time.monotonic() - killed["t"], 2)
                              if ready and "t" in killed else None}
            try:
                old = psutil.Process(old_pid)
                res["killed_pid_gone"] = old.status() == psutil.STATUS_ZOMBIE
            except psutil.NoSuchProcess:
                res["killed_pid_gone"] = True
            res["segments_after_restart"] = segments(front)
            if ready:
                x = servers.call(d.host, d.port, {**request, "op": "infer"})
                res["answer_after_restart"] = x.get("status")
        res["segments_left"] = segments(front)
    load = res["load"]
    checks = {
        "all_answered": load["unanswered"] == 0 and not load["errors"] and not load["dropped"],
        "ok_before_the_kill": load["statuses"].get("0", 0) > 0,
        "some_unavailable": load["statuses"].get(unavailable, 0) > 0,
        "restarted": ready and (res["restart"]["restarts"] or 0) >= 1,
        "answers_after_restart": res.get("answer_after_restart") == 0,
        "killed_pid_gone": res["killed_pid_gone"],
        "killed_segment_unlinked": not (set(before) & set(res["segments_after_restart"])),
        "no_segment_left": not res["segments_left"],
    }
    res["checks"] = checks
    # some_unavailable is informative: a kill between two batches holds nothing
    res["status"] = "ok" if all(v for k, v in checks.items() if k != "some_unavailable") \
        else "failed"
    return res
