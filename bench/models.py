"""Models for the benchmark beside the demo scorer (``daemon.workers.zoo``).

``noop`` computes nothing: the demo's request and answer shapes (float32
[128] in, [2] out: the first two features, copied), so a run against it is
the serving machinery alone (``python -m bench.scale --models noop``).

The demo MLP costs a worker about 0.1 ms a batch, so it measures the
serving machinery. ``encoder`` is its opposite, a model where compute
dominates: a small transformer encoder over 32 tokens (2 layers, width 64,
4 heads), mean-pooled to 2 class probabilities. Run one sample at a time,
most of its time is per-call overhead of some forty torch ops; run a batch,
that overhead is shared, which is the gain batching must show
(``python -m bench --config bench/configs/encoder.toml --compare-batching``).

Weights come from a fixed seed, as in ``daemon.workers.zoo``, so every process that
builds it gets bit-identical weights.
"""

from __future__ import annotations

import torch
from torch import nn

TOKENS = 32
VOCAB = 1024


class Encoder(nn.Module):
    def __init__(self, vocab: int = VOCAB, tokens: int = TOKENS, width: int = 64, heads: int = 4,
                 layers: int = 2, classes: int = 2):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.position = nn.Parameter(torch.zeros(tokens, width))
        layer = nn.TransformerEncoderLayer(width, heads, dim_feedforward=4 * width, dropout=0.0,
                                           batch_first=True)
        # enable_nested_tensor=False: every sample has all 32 tokens (no
        # padding mask), so nested tensors would only add a conversion.
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(width, classes)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.encoder(self.embed(ids) + self.position)
        return torch.softmax(self.head(h.mean(dim=1)), dim=-1)


def encoder(seed: int = 0) -> nn.Module:
    """int64 token ids [32] (0 to 1023) in, float32 [2] class probabilities out."""
    gen = torch.Generator().manual_seed(seed)
    model = Encoder()
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    return model.eval()


class Noop(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[..., :2].clone()


def noop() -> nn.Module:
    """float32 [128] in, float32 [2] out (the first two features): no compute."""
    return Noop().eval()
