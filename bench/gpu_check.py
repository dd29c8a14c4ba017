"""``python -m bench.gpu_check``: the GPU paths, proved in one command.

    python -m bench.gpu_check [--out gpu-check.json] [--budget-s 280]
                              [--cpu-smoke] [--models demo,encoder] [--max-batch 64]
                              [--modes eager,reduce-overhead,default]
                              [--dtypes float32,bfloat16] [--device cuda:0]

From a plain checkout, with no install step and no network: what a GPU host
has (CUDA torch, uvloop, msgpack, psutil, prometheus_client, pyarrow,
pytest) is enough. The steps, in this order, so that a run cut short has
measured what matters most first:

1. ``env``: torch, CUDA, the device, package versions, the locked-memory
   limit (cudaHostRegister needs it), and which front path runs (the pure
   Python one unless a compiled extension is in the checkout and imports).
2. ``cuda_tests``: ``pytest tests/integration/workers/test_cuda.py
   tests/unit/workers/test_runtime_devices.py`` with ``RINGSERVE_REQUIRE=cuda``, so
   that a missing CUDA fails them instead of skipping them.
3. ``inprocess_demo``: forward times per bucket (1, 8, max_batch), eager,
   ``compile = "default"`` and ``"reduce-overhead"``, float32 and bfloat16
   (bench/forward_times.py, in a child process with a time limit).
4. ``daemon_demo``: the daemon on the device at the same buckets under the
   bench's load: throughput against the in-process reduce-overhead
   figures (target >= 0.8), H2D time per batch from the pinned ring slot,
   and whether the slot is really registered (bench/gpu_daemon.py).
5. ``kill9``: kill -9 of the worker under load: every request answered,
   the worker restarted, no segment left.
6. ``inprocess_encoder``, ``daemon_encoder``: 3 and 4 for the encoder.
7. ``leaks``: no process this run started is left, no ``/dev/shm/ringserve-*``
   segment that one of them made remains (any found is removed, and fails).

The JSON file is rewritten after every step and every measured figure, so
a run stopped by its budget, a time limit, Ctrl-C or SIGTERM still holds
what it measured; every step always has a ``status``: pending, running, ok,
partial (stopped by the budget), skipped (with a reason), failed (a check
did not hold), error (it could not run), interrupted.

The run stops itself at ``--budget-s`` (default 280: under 5 minutes).
Every child process runs under a time limit in its own process group and is
stopped on every exit path.

Without CUDA (or with ``--cpu-smoke``) the same steps run on the CPU:
in-process timings (eager only, unless ``--modes`` says otherwise:
torch.compile takes seconds per graph there), the daemon on ``cpu``, kill -9
of its worker; the CUDA tests are skipped. That run takes about half a
minute on two cores (tests/integration/bench/test_gpu_check.py runs it).

Exit status: 0 every step ok (or skipped for a stated reason), 1 a step
failed or could not run, 3 the run is incomplete (budget or interrupt).
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

from ipc import shm

from .forward_times import COMPILE, DTYPES, MODELS, MODES

REPO = Path(__file__).resolve().parent.parent
KILL_GRACE_S = 5.0
OVERRUN_S = 15.0   # past --budget-s, the run is interrupted wherever it is
# Processes the standard library or torch keep for the life of their parent.
HELPERS = ("multiprocessing.resource_tracker", "multiprocessing.forkserver", "compile_worker")
# What the daemon, its tests and the load generator import (torch aside).
REQUIRED = ("numpy", "uvloop", "msgpack", "psutil", "prometheus_client", "pytest")


class Terminated(BaseException):
    """SIGTERM: unwinds like Ctrl-C, so every ``finally`` stops what it started."""


# -- the record -------------------------------------------------------------------------

class Record:
    """The JSON document, written atomically (temporary file, rename) on every save."""

    def __init__(self, path: str, doc: dict):
        self.path = path
        self.doc = doc
        self.lock = threading.Lock()

    def step(self, name: str) -> dict:
        return self.doc["steps"][name]

    def save(self) -> None:
        with self.lock:
            self.doc["elapsed_s"] = round(time.monotonic() - T0, 1)
            tmp = f"{self.path}.tmp"
            with open(tmp, "w") as f:
                json.dump(self.doc, f, indent=1, default=str)
                f.write("\n")
            os.replace(tmp, self.path)


T0 = time.monotonic()


class Budget:
    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()


# -- what this run started ----------------------------------------------------------------

class Tree:
    """Every process below this one, sampled every 0.2 s (so daemons that
    pytest starts, and their workers, are known too), and the ringserve
    segments that appeared during the run."""

    def __init__(self):
        self.me = os.getpid()
        self.seen: set[psutil.Process] = set()
        self.segments_before = shm.segments()
        self.lock = threading.Lock()
        threading.Thread(target=self._run, name="tree", daemon=True).start()

    def _run(self) -> None:
        while True:
            self.sample()
            time.sleep(0.2)

    def sample(self) -> None:
        try:
            kids = psutil.Process(self.me).children(recursive=True)
        except psutil.Error:
            return
        with self.lock:
            self.seen.update(kids)

    def leftovers(self) -> tuple[list[psutil.Process], list[str]]:
        self.sample()
        with self.lock:
            seen = set(self.seen)
        pids = {p.pid for p in seen} | {self.me}
        procs = [p for p in seen if _alive(p) and not _helper(p)]
        segs = [s for s in shm.segments() - self.segments_before if shm.creator(s) in pids]
        return procs, sorted(segs)


def _alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _helper(p: psutil.Process) -> bool:
    try:
        return any(h in " ".join(p.cmdline()) for h in HELPERS)
    except psutil.Error:
        return False


CHILDREN: set[subprocess.Popen] = set()


def _stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM to the child's process group, SIGKILL after KILL_GRACE_S."""
    for sig, wait in ((signal.SIGTERM, KILL_GRACE_S), (signal.SIGKILL, 30)):
        if proc.poll() is not None:
            break
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(wait)
        except subprocess.TimeoutExpired:
            continue
    CHILDREN.discard(proc)


def run_child(argv: list[str], timeout: float, log_path: Path, env: dict | None = None,
              poll=None) -> tuple[int | None, bool]:
    """Run ``argv`` in its own process group with output to ``log_path``;
    ``poll()`` is called every half second while it runs. Returns
    (exit code, timed out). Stopped on every exit path."""
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(argv, cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
    CHILDREN.add(proc)
    t_end = time.monotonic() + timeout
    try:
        while proc.poll() is None:
            if time.monotonic() > t_end:
                _stop_group(proc)
                return proc.returncode, True
            try:
                proc.wait(0.5)
            except subprocess.TimeoutExpired:
                pass
            if poll is not None:
                poll()
        return proc.returncode, False
    finally:
        _stop_group(proc)
        if poll is not None:
            poll()


def _tail(path: Path, chars: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except FileNotFoundError:
        return ""


# -- steps --------------------------------------------------------------------------------

def probe() -> dict:
    """What this machine has (run in a child: CUDA is initialised there, not here)."""
    import importlib.metadata
    import platform
    import resource

    import torch
    info = {"python": platform.python_version(), "torch": torch.__version__,
            "torch_cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available(),
            "cpu_count": os.cpu_count(), "affinity": len(os.sched_getaffinity(0))}
    soft, hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    info["memlock_limit"] = {"soft": None if soft == resource.RLIM_INFINITY else soft,
                             "hard": None if hard == resource.RLIM_INFINITY else hard}
    if info["cuda_available"]:
        info["devices"] = []
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            info["devices"].append({"index": i, "name": p.name,
                                    "memory_gib": round(p.total_memory / 2 ** 30, 1),
                                    "capability": f"{p.major}.{p.minor}"})
        info["bf16_supported"] = torch.cuda.is_bf16_supported()
    pkgs = {}
    for name in ("numpy", "uvloop", "msgpack", "psutil", "prometheus_client", "pyarrow",
                 "pytest", "pytest-timeout", "triton"):
        try:
            pkgs[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pkgs[name] = None
    info["packages"] = pkgs
    info["front_path"] = front_path()
    return info


def front_path() -> dict:
    """Which front hot path runs: ``compiled`` when an extension module in
    the checkout imports, else ``pure`` (the Python one, always there)."""
    import importlib
    found = sorted(str(p.relative_to(REPO)) for d in ("ipc", "daemon", "clients")
                   for p in (REPO / d).glob("*.so"))
    loaded, failed = [], {}
    for f in found:
        mod = f.split(".", 1)[0].replace("/", ".")
        try:
            importlib.import_module(mod)
            loaded.append(mod)
        except Exception as e:   # noqa: BLE001 - reported
            failed[mod] = f"{type(e).__name__}: {e}"
    return {"ran": "compiled" if loaded else "pure", "extensions": found, "imported": loaded,
            "import_errors": failed,
            "note": None if found else "no compiled extension in this checkout: the pure "
                                       "Python front ran"}


def step_env(rec: Record, ctx: dict) -> dict:
    out = ctx["dir"] / "probe.json"
    rc, timed_out = run_child([sys.executable, "-m", "bench.gpu_check", "--probe", str(out)],
                              ctx["cap"], ctx["dir"] / "probe.log")
    if rc != 0 or not out.exists():
        return {"status": "error", "error": "the probe failed" + (" (time limit)" if timed_out
                                                                 else f" (exit {rc})"),
                "log": _tail(ctx["dir"] / "probe.log")}
    info = json.loads(out.read_text())
    ctx["cuda"] = info["cuda_available"]
    missing = [n for n in REQUIRED if not info["packages"].get(n)]
    if missing:
        return {"status": "failed", "reason": f"missing packages: {', '.join(missing)}; the "
                "steps that need them fail", **info}
    return {"status": "ok", **info}


_COUNTS = re.compile(r"(\d+) (passed|failed|skipped|errors?|xfailed|xpassed|deselected)")


def step_cuda_tests(rec: Record, ctx: dict) -> dict:
    files = ["tests/integration/workers/test_cuda.py"]
    env = dict(os.environ)
    if ctx["smoke"]:
        env.pop("RINGSERVE_REQUIRE", None)
    else:
        files.append("tests/unit/workers/test_runtime_devices.py")
        env["RINGSERVE_REQUIRE"] = ",".join(
            x for x in (env.get("RINGSERVE_REQUIRE", ""), "cuda") if x)
    log = ctx["dir"] / "pytest.log"
    t0 = time.monotonic()
    rc, timed_out = run_child([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                               *files], ctx["cap"], log, env=env)
    text = _tail(log, 20000)
    last = [ln for ln in text.splitlines() if re.search(r" in [\d.]+s", ln)]
    counts = {k.rstrip("s") if k.startswith("error") else k: int(n)
              for n, k in _COUNTS.findall(last[-1] if last else "")}
    res = {"files": files, "require": env.get("RINGSERVE_REQUIRE"), "rc": rc,
           "timed_out": timed_out, "counts": counts,
           "summary": last[-1].strip("= ") if last else None,
           "elapsed_s": round(time.monotonic() - t0, 1)}
    if timed_out:
        return {**res, "status": "failed", "reason": "time limit", "log": text[-3000:]}
    if ctx["smoke"]:
        if rc == 0 and counts.get("skipped") and not counts.get("passed"):
            return {**res, "status": "skipped",
                    "reason": "no CUDA here: test_cuda.py skipped, as it does without "
                              "RINGSERVE_REQUIRE=cuda (with it, they fail)"}
        return {**res, "status": "ok" if rc == 0 else "failed", "log": text[-3000:]}
    ok = rc == 0 and counts.get("passed", 0) > 0 and not counts.get("skipped")
    return {**res, "status": "ok" if ok else "failed", **({} if ok else {"log": text[-3000:]})}


def step_inprocess(rec: Record, ctx: dict, model: str) -> dict:
    a = ctx["args"]
    jsonl = ctx["dir"] / f"forward-{model}.jsonl"
    jsonl.unlink(missing_ok=True)
    res = rec.step(f"inprocess_{model}")
    res.update(device=ctx["device"], buckets=ctx["buckets"], cells=[])
    grid = [(m, d, b) for d in DTYPES for m in MODES for b in ctx["buckets"]]
    chosen = {(m, d) for m in a.modes for d in a.dtypes}

    def read():
        cells = []
        try:
            for line in jsonl.read_text().splitlines():
                try:
                    cells.append(json.loads(line))
                except ValueError:
                    pass   # a line being written
        except FileNotFoundError:
            pass
        if len(cells) != len(res["cells"]):
            res["cells"] = cells
            rec.save()

    cap = ctx["cap"]
    argv = [sys.executable, "-m", "bench.forward_times", "--model", model,
            "--device", ctx["device"], "--out", str(jsonl),
            "--buckets", ",".join(map(str, ctx["buckets"])), "--modes", ",".join(a.modes),
            "--dtypes", ",".join(a.dtypes), "--min-time-s", str(ctx["min_time_s"]),
            # stop starting cells in time to finish the one running
            "--deadline-s", str(max(1.0, cap - 20))]
    rc, timed_out = run_child(argv, cap, ctx["dir"] / f"forward-{model}.log", poll=read)
    read()
    have = {(c["mode"], c["dtype"], c["bucket"]) for c in res["cells"]}
    for m, d, b in grid:
        if (m, d, b) in have:
            continue
        if (m, d) not in chosen:
            reason = "not selected (--modes / --dtypes)"
        elif timed_out:
            reason = "not reached: the step's time limit stopped it"
        else:
            reason = f"not reached: the child exited with {rc}"
        res["cells"].append({"model": model, "device": ctx["device"], "mode": m, "dtype": d,
                             "bucket": b, "status": "skipped", "reason": reason})
    order = {k: i for i, k in enumerate(grid)}
    res["cells"].sort(key=lambda c: order.get((c["mode"], c["dtype"], c["bucket"]), 1 << 30))
    statuses = [c["status"] for c in res["cells"] if (c["mode"], c["dtype"]) in chosen]
    errors = [f"{c['mode']}/{c['dtype']}/{c['bucket']}: {c['error']}"
              for c in res["cells"] if c["status"] == "error"]
    if rc not in (0, None) and not timed_out:
        tail = _tail(ctx['dir'] / f'forward-{model}.log', 1500)
        errors.append(f"forward_times exited with {rc}: {tail}")
    status = ("failed" if errors else "ok" if all(s == "ok" for s in statuses) else "partial")
    return {"status": status, "errors": errors[:10], "timed_out": timed_out}


def _inprocess_us(rec: Record, model: str, mode: str) -> dict:
    step = rec.step(f"inprocess_{model}")
    return {c["bucket"]: c["run_batch_us"] for c in step.get("cells", [])
            if c["status"] == "ok" and c["mode"] == mode and c["dtype"] == "float32"}


def step_daemon(rec: Record, ctx: dict, model: str) -> dict:
    from . import gpu_daemon
    res = rec.step(f"daemon_{model}")
    if ctx["smoke"]:
        mode, why = "eager", "the CPU smoke: torch.compile is off on the CPU by default"
    else:
        mode, why = "reduce-overhead", "the mode the issue asks for"
        for fallback in ("reduce-overhead", "default", "eager"):
            if _inprocess_us(rec, model, fallback):
                if fallback != mode:
                    why = (f"{mode} did not run in-process (see inprocess_{model}); "
                           f"the daemon ran {fallback}")
                mode = fallback
                break
    res.update(compile_reason=why)
    us = _inprocess_us(rec, model, mode)
    if not us:
        res["note"] = "no in-process figures to compare with: ratios are null"
    budget_end = time.monotonic() + ctx["cap"]

    def update(partial):
        res.update(partial)
        rec.save()

    out = gpu_daemon.serve(model, ctx["device"], COMPILE[mode], ctx["max_batch"], us,
                           ctx["duration"], ctx["warmup"],
                           lambda: budget_end - time.monotonic(), update)
    return {**out, "status": out["status"]}


def step_kill9(rec: Record, ctx: dict) -> dict:
    from . import gpu_daemon
    res = rec.step("kill9")
    budget_end = time.monotonic() + ctx["cap"]

    def update(partial):
        res.update(partial)
        rec.save()

    return gpu_daemon.kill9(ctx["device"], ctx["kill_duration"],
                            lambda: budget_end - time.monotonic(), update)


def step_leaks(rec: Record, ctx: dict) -> dict:
    for proc in list(CHILDREN):
        _stop_group(proc)
    tree: Tree = ctx["tree"]
    t_end = time.monotonic() + 10   # exiting processes unlink what they made
    while True:
        procs, segs = tree.leftovers()
        if not procs or time.monotonic() > t_end:
            break
        time.sleep(0.2)
    for p in procs:
        try:
            p.kill()
        except psutil.Error:
            pass
    for s in segs:
        shm.unlink_name(s)
    names = []
    for p in procs:
        try:
            names.append(f"{p.pid} {' '.join(p.cmdline())[:100]}")
        except psutil.Error:
            names.append(str(p.pid))
    return {"status": "failed" if procs or segs else "ok", "processes_left": names,
            "segments_left": segs,
            "note": "anything listed was killed or unlinked after being recorded"}


# -- the run ------------------------------------------------------------------------------

def plan(models: list[str]) -> list[tuple]:
    """(name, step, time cap in seconds, the least it needs to start), in
    running order: kill -9 right after the first model's daemon step."""
    steps = [("env", step_env, 40, 5), ("cuda_tests", step_cuda_tests, 90, 20)]
    for i, m in enumerate(sorted(models, key=lambda m: m != "demo")):
        steps.append((f"inprocess_{m}", functools.partial(step_inprocess, model=m),
                      75 if m == "demo" else 90, 15))
        steps.append((f"daemon_{m}", functools.partial(step_daemon, model=m), 60, 20))
        if i == 0:
            steps.append(("kill9", step_kill9, 45, 15))
    if not models:
        steps.append(("kill9", step_kill9, 45, 15))
    return steps


def configure(ctx: dict, a) -> None:
    """After ``env``: the smoke when asked for or when CUDA is absent, and
    the figures' sizes for the mode."""
    smoke = ctx["smoke"] = a.cpu_smoke or not ctx.get("cuda")
    ctx.update(device="cpu" if smoke else a.device,
               max_batch=a.max_batch or (16 if smoke else 64),
               min_time_s=0.06 if smoke else 0.2,
               duration=0.6 if smoke else 3.0, warmup=0.2 if smoke else 1.0,
               kill_duration=1.6 if smoke else 4.0)
    ctx["buckets"] = sorted({b for b in (1, 8, ctx["max_batch"]) if b <= ctx["max_batch"]})
    if a.modes is None:
        a.modes = ["eager"] if smoke else list(MODES)


def _args(argv):
    p = argparse.ArgumentParser(prog="python -m bench.gpu_check",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="gpu-check.json", help="the JSON file, rewritten as it goes")
    p.add_argument("--budget-s", type=float, default=280.0,
                   help="stop at this many seconds, writing what was measured")
    p.add_argument("--cpu-smoke", action="store_true",
                   help="run every step on the CPU (automatic when CUDA is absent)")
    p.add_argument("--device", default="cuda:0")
    p.add_argument("--models", default="demo,encoder")
    p.add_argument("--max-batch", type=int, default=None, help="default 64 (16 in the smoke)")
    p.add_argument("--modes", default=None,
                   help=f"in-process modes (default {','.join(MODES)}; eager in the smoke)")
    p.add_argument("--dtypes", default=",".join(DTYPES))
    p.add_argument("--probe", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    a.models = [m for m in a.models.split(",") if m]
    a.dtypes = [d for d in a.dtypes.split(",") if d]
    for m in a.models:
        if m not in MODELS:
            p.error(f"--models: {m!r} is not one of {', '.join(MODELS)}")
    for d in a.dtypes:
        if d not in DTYPES:
            p.error(f"--dtypes: {d!r} is not one of {', '.join(DTYPES)}")
    if a.modes is not None:
        a.modes = [m for m in a.modes.split(",") if m]
        for m in a.modes:
            if m not in MODES:
                p.error(f"--modes: {m!r} is not one of {', '.join(MODES)}")
    return a


def _line(name: str, res: dict) -> str:
    extra = res.get("reason") or res.get("summary") or res.get("error") or ""
    if name.startswith("daemon_"):
        extra = "; ".join(f"b{r['bucket']}: {r.get('throughput_rps')}/s ratio {r.get('ratio')}"
                          for r in res.get("runs", []) if r.get("status") == "ok")
    if name == "kill9" and "checks" in res:
        extra = ", ".join(f"{k}={v}" for k, v in res["checks"].items())
    return f"[{time.monotonic() - T0:6.1f} s] {name}: {res.get('status')}" + \
        (f" ({extra})" if extra else "")


def main(argv=None) -> int:
    a = _args(argv)
    if a.probe:
        Path(a.probe).write_text(json.dumps(probe()))
        return 0
    budget = Budget(a.budget_s)
    tree = Tree()
    steps = plan(a.models)
    rec = Record(a.out, {
        "schema": 1, "command": [sys.executable, "-m", "bench.gpu_check", *sys.argv[1:]]
        if argv is None else ["python", "-m", "bench.gpu_check", *argv],
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "finished": None, "budget_s": a.budget_s, "mode": None,
        "steps": {n: {"status": "pending"} for n, *_ in steps} | {"leaks": {"status": "pending"}},
        "summary": None})
    import tempfile
    workdir = tempfile.TemporaryDirectory(prefix="ringserve-gpu-check-")
    ctx = {"args": a, "dir": Path(workdir.name), "tree": tree, "smoke": a.cpu_smoke,
           "cuda": None}
    rec.save()

    # Where the handler's exception lands inside an event loop's C callbacks
    # (uvloop) it can be reported and swallowed instead of unwinding; the flag
    # stops the run after that step all the same.
    stopped: list[str] = []

    def on_term(signum, frame):
        stopped.append("SIGTERM")
        raise Terminated("SIGTERM")

    def on_alarm(signum, frame):
        raise Terminated(f"the overall budget ran out (--budget-s {a.budget_s:g} "
                         f"+ {OVERRUN_S:g} s)")

    old_term = signal.signal(signal.SIGTERM, on_term)
    # Steps check the budget before they start and give their children
    # time limits within it; this is the net under a step that overruns.
    old_alarm = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, a.budget_s + OVERRUN_S)
    current = None
    try:
        for name, fn, cap, least in steps:
            left = budget.left() - 3   # keep a little for the leak check and the summary
            if left < least:
                rec.doc["steps"][name] = {"status": "skipped",
                                          "reason": f"budget: {max(0, left):.0f} s left of "
                                                    f"--budget-s {a.budget_s:g}, the step needs "
                                                    f"at least {least} s"}
                print(_line(name, rec.step(name)), flush=True)
                rec.save()
                continue
            ctx["cap"] = min(cap, left)
            current = name
            res = rec.step(name)
            res["status"] = "running"
            rec.save()
            t0 = time.monotonic()
            try:
                out = fn(rec, ctx)
            except Exception as e:   # noqa: BLE001 - a step that cannot run is reported
                import traceback
                out = {"status": "error", "error": f"{type(e).__name__}: {e}"[:3000],
                       "traceback": traceback.format_exc(limit=6)[-3000:]}
            if stopped:
                raise Terminated(stopped[0])
            res.update(out)
            res["elapsed_s"] = round(time.monotonic() - t0, 1)
            current = None
            rec.save()
            print(_line(name, res), flush=True)
            if name == "env":
                configure(ctx, a)
                rec.doc["mode"] = "cpu-smoke" if ctx["smoke"] else "gpu"
                if ctx["smoke"] and not a.cpu_smoke:
                    rec.doc["mode_reason"] = "CUDA is not available: every step on the CPU"
                rec.save()
    except (KeyboardInterrupt, Terminated) as e:
        why = str(e) if isinstance(e, Terminated) else "Ctrl-C"
        if current is not None:
            rec.step(current).update(status="interrupted", reason=why)
        for name, res in rec.doc["steps"].items():
            if res["status"] == "pending" and name != "leaks":
                res.update(status="skipped", reason="the run was interrupted")
        print(f"\ninterrupted ({why}): stopping what was started and writing {a.out}",
              file=sys.stderr)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old_alarm)
        signal.signal(signal.SIGTERM, old_term)
        res = rec.step("leaks")
        try:
            res.update(step_leaks(rec, ctx))
        except Exception as e:   # noqa: BLE001
            res.update(status="error", error=f"{type(e).__name__}: {e}")
        print(_line("leaks", res), flush=True)
        rec.doc["finished"] = datetime.datetime.now(datetime.timezone.utc).isoformat(
            timespec="seconds")
        rec.doc["summary"] = summary(rec.doc)
        rec.save()
        workdir.cleanup()
    print(render(rec.doc))
    print(f"\nwritten: {a.out}")
    return rec.doc["summary"]["exit_code"]


def summary(doc: dict) -> dict:
    steps = {n: s["status"] for n, s in doc["steps"].items()}
    bad = [n for n, s in steps.items() if s in ("failed", "error")]
    incomplete = [n for n, s in steps.items() if s not in ("ok", "skipped", "failed", "error")
                  or (s == "skipped" and any(w in (doc["steps"][n].get("reason") or "")
                                             for w in ("budget", "interrupted")))]
    ratios = {}
    for n, s in doc["steps"].items():
        if n.startswith("daemon_"):
            for r in s.get("runs", []):
                if r.get("status") == "ok":
                    ratios[f"{n[7:]}/b{r['bucket']}"] = r.get("ratio")
    env = doc["steps"].get("env", {})
    return {"mode": doc.get("mode"), "steps": steps,
            "front_path": (env.get("front_path") or {}).get("ran"),
            "device": ((env.get("devices") or [{}])[0]).get("name") if doc.get("mode") == "gpu"
            else "cpu",
            "daemon_ratio_vs_inprocess": ratios,
            "ratio_target_met": {k: (v is not None and v >= 0.8) for k, v in ratios.items()},
            "failed": bad, "incomplete": incomplete,
            "exit_code": 1 if bad else 3 if incomplete else 0}


def render(doc: dict) -> str:
    """The figures as text: in-process cells, daemon runs, kill -9, leaks."""
    s = doc["summary"]
    out = [f"\nbench.gpu_check: mode {s['mode']}, device {s['device']}, front path "
           f"{s['front_path']}, {doc['elapsed_s']} s of --budget-s {doc['budget_s']:g}"]
    for name, step in doc["steps"].items():
        if name.startswith("inprocess_") and step.get("cells"):
            out.append(f"\n{name} ({step.get('device')}): us per batch (run_batch: host "
                       "memory in and out, page-locked on CUDA; forward: the model alone), "
                       "samples/s of run_batch")
            out.append(f"  {'mode':<16}{'dtype':<10}{'bucket':>7}{'run_batch':>11}"
                       f"{'forward':>10}{'samples/s':>12}{'h2d us':>8}{'graphs':>7}  status")
            for c in step["cells"]:
                if c["status"] == "ok":
                    out.append(f"  {c['mode']:<16}{c['dtype']:<10}{c['bucket']:>7}"
                               f"{c['run_batch_us']:>11.1f}{c['forward_us']:>10.1f}"
                               f"{c['samples_per_s']:>12,.0f}{_f(c.get('h2d_us')):>8}"
                               f"{_f(c.get('graphs')):>7}  ok")
                else:
                    out.append(f"  {c['mode']:<16}{c['dtype']:<10}{c['bucket']:>7}"
                               f"{'':>48}  {c['status']}: "
                               f"{(c.get('reason') or c.get('error') or '')[:70]}")
        if name.startswith("daemon_") and step.get("runs"):
            w = step.get("worker") or {}
            out.append(f"\n{name}: daemon on {step.get('device')}, compile {step.get('compile')}, "
                       f"pinned {w.get('pinned')}, compiled {w.get('compiled')}")
            out.append(f"  {'bucket':>6}{'conns':>6}{'answers/s':>11}{'p50 us':>9}{'p99 us':>9}"
                       f"{'mean batch':>11}{'in-process/s':>14}{'ratio':>7}")
            for r in step["runs"]:
                if r["status"] != "ok":
                    out.append(f"  {r['bucket']:>6}  {r['status']}: {r.get('reason')}")
                    continue
                lat = r.get("latency_us") or {}
                out.append(f"  {r['bucket']:>6}{r['connections']:>6}{r['throughput_rps']:>11,.0f}"
                           f"{_f(lat.get('p50')):>9}{_f(lat.get('p99')):>9}"
                           f"{_f(r.get('mean_batch')):>11}{_f(r.get('inprocess_rps')):>14}"
                           f"{_f(r.get('ratio')):>7}")
            h2d = w.get("h2d")
            if h2d:
                out.append("  H2D per batch from the ring slot: " + ", ".join(
                    f"bucket {b} {v['mean_us']} us ({v['batches']} batches)"
                    for b, v in h2d["by_bucket"].items()))
    k = doc["steps"].get("kill9", {})
    if "checks" in k:
        out.append(f"\nkill9: {k['status']}: "
                   + ", ".join(f"{n} {v}" for n, v in k["checks"].items())
                   + f"; load {k['load']['statuses']}, restart after "
                     f"{(k.get('restart') or {}).get('seconds_after_kill')} s")
    out.append("\nsteps: " + ", ".join(f"{n} {st}" for n, st in s["steps"].items()))
    if s["daemon_ratio_vs_inprocess"]:
        out.append("daemon / in-process (target >= 0.8): " + ", ".join(
            f"{n} {v}" for n, v in s["daemon_ratio_vs_inprocess"].items()))
    return "\n".join(out)


def _f(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:,.1f}" if abs(v) >= 10 else f"{v:.3g}"
    return str(v)


if __name__ == "__main__":
    sys.exit(main())
