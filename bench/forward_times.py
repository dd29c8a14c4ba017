"""In-process forward times per bucket, compile mode and dtype: the model
alone, loaded and run the way a worker runs it (``daemon.workers.runtime.Runner``),
with no server around it.

    python -m bench.forward_times --model demo --device cuda:0 --out FILE
        [--buckets 1,8,64] [--modes eager,reduce-overhead,default]
        [--dtypes float32,bfloat16] [--min-time-s 0.3] [--deadline-s S]

One JSON object per line is appended to FILE as each cell is measured, so
that ``bench/gpu_check.py``, which runs this as a child with a time limit,
keeps every figure measured before a limit or a crash cut the run short.
Cells not reached before ``--deadline-s`` (seconds from the start) are
written as skipped.

A cell: one (mode, dtype, bucket). Modes are ``eager`` (compile off),
``default`` and ``reduce-overhead`` (torch.compile; CUDA graphs on CUDA).
Each (mode, dtype) loads its own Runner after ``torch._dynamo.reset()``, so
compiled graphs of one group neither count against nor serve another.
Figures:

- ``first_calls_s``: the bucket's first two ``run_batch`` calls, which a
  worker makes during warm-up: the compile and, with reduce-overhead, the
  CUDA graph recording;
- ``run_batch_us``: ``Runner.run_batch`` from page-locked host tensors, the
  call a worker times per batch (copies in and out, one synchronise),
  best of 3 rounds; ``samples_per_s`` is ``bucket / run_batch_us``;
- ``forward_us``: ``Runner.infer`` on inputs already on the device, calls
  back to back and one synchronise per round (the model's own throughput);
- ``h2d_us``: on CUDA, the input copy of ``run_batch`` (CUDA events);
- ``graphs`` / ``cudagraph_skips``: what torch.compile built for the bucket;
- ``max_abs_diff``: against eager float32 at the same bucket.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

# The models the GPU check times: the demo scorer (serving machinery bound)
# and the compute-bound encoder of bench/models.py.
MODELS = {
    "demo": {"factory": "daemon.workers.zoo:mlp_scorer", "dtype": "float32", "shape": [128]},
    "encoder": {"factory": "bench.models:encoder", "dtype": "int64", "shape": [32]},
}
MODES = ("eager", "reduce-overhead", "default")   # reduce-overhead first: the daemon check needs it
DTYPES = ("float32", "bfloat16")
COMPILE = {"eager": "off", "default": "default", "reduce-overhead": "reduce-overhead"}


def _inputs(model: str, bucket: int, pinned: bool):
    import torch
    m = MODELS[model]
    gen = torch.Generator().manual_seed(bucket)
    if m["dtype"] == "int64":   # token ids
        x = torch.randint(0, 1000, (bucket, *m["shape"]), generator=gen, dtype=torch.int64)
    else:
        x = torch.randn((bucket, *m["shape"]), generator=gen)
    return [x.pin_memory() if pinned else x]


def _best_us(fn, min_time_s: float, per_call: int = 1) -> float:
    """Best of 3 rounds of ``fn`` called until a round lasts min_time_s / 3;
    microseconds per call. ``fn`` may run ``per_call`` calls itself."""
    best = float("inf")
    for _ in range(3):
        n, t0 = 0, time.perf_counter()
        while True:
            fn()
            n += per_call
            elapsed = time.perf_counter() - t0
            if elapsed >= min_time_s / 3:
                break
        best = min(best, elapsed / n)
    return best * 1e6


def _group(model: str, device: str, mode: str, dtype: str, buckets: list[int],
           min_time_s: float, deadline: float, refs: dict, emit) -> None:
    import torch
    from torch import _dynamo

    from daemon.workers.runtime import TORCH_DTYPES, ModelSpec, Runner, TensorDecl

    m = MODELS[model]
    base = {"model": model, "device": device, "mode": mode, "dtype": dtype}
    cuda = device.startswith("cuda")
    if mode != "eager":
        _dynamo.reset()
    spec = ModelSpec(name=model, version="check", factory=m["factory"], artifact=None,
                     checkpoint=None, inputs=[TensorDecl("input", m["dtype"], tuple(m["shape"]))],
                     single_input=True, device=device, dtype=dtype, compile=COMPILE[mode],
                     threads=1, buckets=list(buckets))
    t0 = time.perf_counter()
    try:
        runner = Runner(spec)
        runner.load()
    except Exception as e:   # noqa: BLE001 - reported per cell
        for b in buckets:
            emit({**base, "bucket": b, "status": "error",
                  "error": f"load: {type(e).__name__}: {e}"[:2000]})
        return
    load_s = time.perf_counter() - t0
    for b in buckets:
        cell = {**base, "bucket": b}
        if time.monotonic() > deadline:
            emit({**cell, "status": "skipped", "reason": "the step's time limit (--deadline-s)"})
            continue
        try:
            ins = _inputs(model, b, cuda)
            outs = [torch.empty((b, *o.shape), dtype=TORCH_DTYPES[o.dtype], pin_memory=cuda)
                    for o in runner.outputs]
            before = runner.compile_counts()
            t1 = time.perf_counter()
            for _ in range(2):   # what warm-up does per bucket
                runner.run_batch(ins, outs, b)
            first_s = time.perf_counter() - t1
            after = runner.compile_counts()
            got = outs[0].float().clone()
            if mode == "eager" and dtype == "float32":
                refs[b] = got
            ref = refs.get(b)
            if runner.h2d is not None:
                runner.h2d.reset()
            run_us = _best_us(lambda ins=ins, outs=outs, b=b: runner.run_batch(ins, outs, b),
                              min_time_s)
            h2d = runner.h2d.snapshot()["mean_us"] if runner.h2d is not None else None
            xs = [x.to(device) for x in ins]
            for _ in range(3):
                runner.infer(xs)
            if cuda:
                def rounds(k=20, xs=xs):
                    for _ in range(k):
                        runner.infer(xs)
                    torch.cuda.synchronize()
                fwd_us = _best_us(rounds, min_time_s, per_call=20)
            else:
                fwd_us = _best_us(lambda xs=xs: runner.infer(xs), min_time_s)
            emit({**cell, "status": "ok", "compile": runner.compile_mode,
                  "load_s": round(load_s, 3), "first_calls_s": round(first_s, 3),
                  "run_batch_us": round(run_us, 2), "samples_per_s": round(b / run_us * 1e6, 1),
                  "forward_us": round(fwd_us, 2),
                  "forward_samples_per_s": round(b / fwd_us * 1e6, 1),
                  "h2d_us": h2d,
                  "graphs": (after["graphs"] - before["graphs"]) if after else None,
                  "cudagraph_skips": (after["cudagraph_skips"] - before["cudagraph_skips"])
                  if after else None,
                  "max_abs_diff": (round(float((got - ref).abs().max()), 6)
                                   if ref is not None else None)})
        except Exception as e:   # noqa: BLE001 - reported per cell
            emit({**cell, "status": "error", "error": f"{type(e).__name__}: {e}"[:2000]})
        load_s = 0.0   # charged to the group's first cell only


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.forward_times",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=sorted(MODELS), required=True)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", required=True, help="JSON lines, appended as cells finish")
    p.add_argument("--buckets", default="1,8,64")
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--dtypes", default=",".join(DTYPES))
    p.add_argument("--min-time-s", type=float, default=0.3, help="timed seconds per figure")
    p.add_argument("--deadline-s", type=float, default=1e9,
                   help="stop starting cells after this many seconds")
    a = p.parse_args(argv)
    deadline = time.monotonic() + a.deadline_s
    buckets = sorted({int(b) for b in a.buckets.split(",")})
    modes = [m for m in a.modes.split(",") if m]
    dtypes = [d for d in a.dtypes.split(",") if d]
    for m in modes:
        if m not in COMPILE:
            p.error(f"--modes: {m!r} is not one of {', '.join(COMPILE)}")
    import torch
    if a.device == "cpu":
        torch.set_num_threads(1)
    out = open(a.out, "a", buffering=1)

    def emit(rec: dict) -> None:
        out.write(json.dumps(rec) + "\n")

    refs: dict = {}
    # eager float32 first (the reference), then the modes in the order given
    order = sorted(((m, d) for d in dtypes for m in modes),
                   key=lambda md: (md != ("eager", "float32"), dtypes.index(md[1]),
                                   modes.index(md[0])))
    for mode, dtype in order:
        if time.monotonic() > deadline:
            for b in buckets:
                emit({"model": a.model, "device": a.device, "mode": mode, "dtype": dtype,
                      "bucket": b, "status": "skipped",
                      "reason": "the step's time limit (--deadline-s)"})
            continue
        _group(a.model, a.device, mode, dtype, buckets, a.min_time_s, deadline, refs, emit)
    out.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
