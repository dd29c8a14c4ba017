"""Models that exist only to exercise the daemon in tests. Workers import
them by module path (``tests.models:...``) from the repository root."""

from __future__ import annotations

import os
import time

import torch
from torch import nn


class TwoInputs(nn.Module):
    """Named inputs in, named outputs out: score = sum(dense) + sum(ids)."""

    def forward(self, ids: torch.Tensor, dense: torch.Tensor):
        s = dense.sum(dim=1, keepdim=True) + ids.sum(dim=1, keepdim=True).to(dense.dtype)
        return {"score": s, "twice": dense * 2}


def two_inputs() -> nn.Module:
    return TwoInputs()


class Slow(nn.Module):
    """Sleeps SLOW_MS (env RINGSERVE_TEST_SLOW_MS, default 100) per batch."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 2)
        self.ms = float(os.environ.get("RINGSERVE_TEST_SLOW_MS", "100"))

    def forward(self, x):
        time.sleep(self.ms / 1000)
        return self.lin(x)


def slow() -> nn.Module:
    torch.manual_seed(0)
    return Slow()


class RaisesOnMagic(nn.Module):
    """Fails the whole batch when any sample's first feature is 777."""

    def forward(self, x):
        if bool((x[:, 0] == 777).any()):
            raise ValueError("magic value 777 in the batch")
        return x * 3


def raises_on_magic() -> nn.Module:
    return RaisesOnMagic()


def broken() -> nn.Module:
    raise RuntimeError("this factory is broken on purpose")


class TwoX(nn.Module):
    def forward(self, x):
        return x * 2


def two_x() -> nn.Module:
    return TwoX()


def slow_load() -> nn.Module:
    """Takes RINGSERVE_TEST_LOAD_S seconds (default 3600: it hangs) to build,
    for start_timeout_s and reloads that wait for a new version."""
    time.sleep(float(os.environ.get("RINGSERVE_TEST_LOAD_S", "3600")))
    return TwoX()


def crash_on_load() -> nn.Module:
    """The worker process dies while loading, as a segfault would: not a load
    error (exit 3, not restarted) but a crash (restarted with backoff)."""
    os._exit(1)


class LinearMagic(nn.Module):
    """score = Linear(4, 1)(x), with weights (a checkpoint can change them);
    fails the whole batch when any sample's first feature is 777."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 1)

    def forward(self, x):
        if bool((x[:, 0] == 777).any()):
            raise ValueError("magic value 777 in the batch")
        return self.lin(x)


def linear_magic() -> nn.Module:
    torch.manual_seed(0)
    return LinearMagic()


class SlowTwoX(nn.Module):
    """2 * x after sleeping SLOW_MS per batch: exact in any batch, and slow
    enough for batches of several fronts to wait together."""

    def __init__(self):
        super().__init__()
        self.ms = float(os.environ.get("RINGSERVE_TEST_SLOW_MS", "100"))

    def forward(self, x):
        time.sleep(self.ms / 1000)
        return x * 2


def slow_two_x() -> nn.Module:
    return SlowTwoX()
