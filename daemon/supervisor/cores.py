"""How many CPUs this process may use, and how many fronts that makes.

``usable_cpus()`` is the smaller of the CPUs in this process's affinity mask
(``os.sched_getaffinity``: taskset, cpusets) and the cgroup's CPU quota
rounded up (``cpu.max`` on cgroup v2, ``cpu.cfs_quota_us`` /
``cpu.cfs_period_us`` on v1): a pod limited to 2 CPUs on a 64-core node sees
64 cores in its affinity mask but may only use 2.

``auto_fronts(cfg)`` is the rule of ``[server] fronts = "auto"``
(docs/architecture.md, "How many fronts")::

    cpus <= 2:  1
    otherwise:  clamp(cpus - cpu_worker_threads - gpu_workers, 1, MAX_FRONTS)

where ``cpu_worker_threads`` is the torch threads of every CPU worker
(``threads``, or its share of the cores when 0) and each GPU worker counts
one CPU for its own loop.
"""

from __future__ import annotations

import math
import os

from ..config import MAX_FRONTS

CGROUP_ROOT = "/sys/fs/cgroup"


def _cgroup_quota(root: str = CGROUP_ROOT) -> float | None:
    """The CPU quota of this process's cgroup in CPUs, or None if unlimited."""
    try:
        with open("/proc/self/cgroup") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # cgroup v2
            for p in (os.path.join(root, path.lstrip("/"), "cpu.max"),
                      os.path.join(root, "cpu.max")):
                try:
                    quota, period = open(p).read().split()
                except (OSError, ValueError):
                    continue
                return None if quota == "max" else int(quota) / int(period)
        elif "cpu" in controllers.split(","):  # v1
            base = os.path.join(root, "cpu,cpuacct") if os.path.isdir(
                os.path.join(root, "cpu,cpuacct")) else os.path.join(root, "cpu")
            try:
                quota = int(open(os.path.join(base, "cpu.cfs_quota_us")).read())
                period = int(open(os.path.join(base, "cpu.cfs_period_us")).read())
            except (OSError, ValueError):
                continue
            return None if quota <= 0 else quota / period
    return None


def single_front_parts(cfg) -> list[str]:
    """What this config uses that is still decided inside one front: with
    several fronts each would keep its own (the drift monitor's reference
    and its side file), so they need ``fronts = 1`` for now
    (docs/architecture.md, "What is still per front")."""
    return ["models.drift"] if any(m.drift for m in cfg.models) else []


def front_count(cfg) -> tuple[int, str | None]:
    """The number of fronts to start, and a note when "auto" was held to
    one; ValueError when an explicit count cannot be honoured."""
    parts = single_front_parts(cfg)
    if cfg.server.fronts == "auto":
        n = auto_fronts(cfg)
        if n > 1 and parts:
            return 1, (f"fronts = \"auto\" would start {n} fronts, but this config uses "
                       f"{', '.join(parts)}, which one front alone decides for now: starting 1")
        return n, None
    n = cfg.server.fronts
    if n > 1 and parts:
        raise ValueError(f"server.fronts = {n}, but this config uses {', '.join(parts)}, which "
                         "one front alone decides for now; set fronts = 1 (or \"auto\"), or "
                         "turn those off (docs/architecture.md, \"What is still per front\")")
    return n, None


def usable_cpus() -> int:
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        n = os.cpu_count() or 1
    quota = _cgroup_quota()
    if quota is not None:
        n = min(n, max(1, math.ceil(quota)))
    return n


def auto_fronts(cfg, cpus: int | None = None) -> int:
    cpus = usable_cpus() if cpus is None else cpus
    if cpus <= 2:
        return 1
    cpu_devices = [m for m in cfg.models for d in m.devices if d == "cpu"]
    shared = max(1, (cpus - 1) // max(1, len(cpu_devices)))  # spec.share_cores with one front
    cpu_threads = sum(m.threads or shared for m in cpu_devices)
    gpu_workers = sum(1 for m in cfg.models for d in m.devices if d != "cpu")
    return max(1, min(MAX_FRONTS, cpus - cpu_threads - gpu_workers))
