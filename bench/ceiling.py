"""The model's in-process ceiling: how fast the model itself runs the batches
the server ran, with no server around it.

The model is loaded the way a worker loads it (``daemon.workers.runtime.Runner``:
same factory or artifact, checkpoint, dtype and compile choices) with one
torch thread, and each batch runs through ``Runner.run_batch``, the call a
worker times as ``compute_us``. A worker pads a batch of n samples up to the
next bucket, so n is timed at its bucket and credited with n samples.
"""

from __future__ import annotations

import time


def measure(config_path: str, model: str, batch_sizes: dict, min_time_s: float = 0.3) -> dict:
    """``batch_sizes``: {n: batches}, the server's histogram for the window."""
    import torch

    from daemon.config import load_config
    from daemon.workers.runtime import TORCH_DTYPES, Runner
    from daemon.workers.spec import spec_for

    cfg = load_config(config_path).model(model)
    if cfg is None:
        raise ValueError(f"model {model!r} is not in {config_path}")
    torch.set_num_threads(1)
    runner = Runner(spec_for(cfg, "cpu", 1))
    runner.load()
    gen = torch.Generator().manual_seed(0)
    us_per_bucket: dict[int, float] = {}

    def time_bucket(bucket: int) -> float:
        ins = []
        for _, s in cfg.inputs:
            dt = TORCH_DTYPES[s.dtype]
            x = torch.randn((bucket, *s.shape), generator=gen) if dt.is_floating_point else \
                torch.zeros((bucket, *s.shape))
            ins.append(x.to(dt))
        outs = [torch.empty((bucket, *o.shape), dtype=TORCH_DTYPES[o.dtype])
                for o in runner.outputs]
        for _ in range(20):   # warm caches and the allocator
            runner.run_batch(ins, outs, bucket)
        best = float("inf")
        for _ in range(3):    # best of 3: the least disturbed by anything else running
            n, t_start = 0, time.perf_counter()
            while True:
                runner.run_batch(ins, outs, bucket)
                n += 1
                elapsed = time.perf_counter() - t_start
                if elapsed >= min_time_s / 3:
                    break
            best = min(best, elapsed / n)
        return best * 1e6

    rows = []
    for n, count in sorted((int(k), v) for k, v in batch_sizes.items()):
        bucket = next(b for b in cfg.buckets if b >= n)
        if bucket not in us_per_bucket:
            us_per_bucket[bucket] = time_bucket(bucket)
        us = us_per_bucket[bucket]
        rows.append({"batch": n, "bucket": bucket, "batches": count, "us_per_batch": round(us, 1),
                     "samples_per_s": round(n / us * 1e6, 1)})
    samples = sum(r["batch"] * r["batches"] for r in rows)
    busy_us = sum(r["us_per_batch"] * r["batches"] for r in rows)
    return {
        "model": model, "torch_threads": 1, "by_batch": rows,
        # The server's batch mix run back to back: what one worker could
        # deliver if the model were all it did.
        "mix_samples_per_s": round(samples / busy_us * 1e6, 1) if busy_us else None,
        "mix_compute_s": round(busy_us / 1e6, 3),
    }
