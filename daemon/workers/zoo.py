"""Built-in models that need no download.

``mlp_scorer`` is the demo model of ``configs/default.toml``: 128 float32
features in, 2 class probabilities out. Its weights come from a fixed seed, so
every process that builds it (the daemon's workers, the tests, an offline job)
gets bit-identical weights and can check the daemon's answers.
"""

from __future__ import annotations

import torch
from torch import nn


def _seeded(module: nn.Module, seed: int) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(module.named_parameters()):
            fan_in = p.shape[1] if p.dim() > 1 else p.shape[0]
            p.copy_(torch.randn(p.shape, generator=gen) / fan_in ** 0.5)
    return module.eval()


class MLPScorer(nn.Module):
    def __init__(self, features: int = 128, hidden: int = 256, classes: int = 2) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(features, hidden), nn.ReLU(),
            nn.Linear(hidden, hidden), nn.ReLU(),
            nn.Linear(hidden, classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.net(x), dim=-1)


def mlp_scorer(seed: int = 0) -> nn.Module:
    """The demo scorer: MLP 128-256-256-2 with softmax, deterministic weights."""
    return _seeded(MLPScorer(), seed)
