"""A tiny transformer-shaped model for the layer-wise quantizers (GPTQ, mixed precision) tests.

Token embedding -> a ModuleList of blocks (three projections reading the same input, like query/key/
value, then a two-layer MLP) -> mean over tokens. Small enough to calibrate in milliseconds, shaped so
the sequential, block-by-block calibration paths are exercised.
"""

from __future__ import annotations

import torch
from torch import nn

from deepsqueeze.core.counting import count_params
from deepsqueeze.core.model import Model, Task, py_base

VOCAB, DIM, TOKENS = 64, 32, 12


class TinyBlock(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.query, self.key, self.value = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.up = nn.Linear(dim, 2 * dim)
        self.down = nn.Linear(2 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        attn = torch.softmax(self.query(x) @ self.key(x).transpose(1, 2) / x.shape[-1] ** 0.5, dim=-1)
        x = x + attn @ self.value(x)
        return x + self.down(torch.relu(self.up(x)))


class TinyBlockNet(nn.Module):
    """Token ids (batch x tokens) -> (batch x DIM) mean-pooled features; seeded, deterministic weights."""

    def __init__(self, blocks: int = 2) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.embed = nn.Embedding(VOCAB, DIM)
        self.blocks = nn.ModuleList(TinyBlock(DIM) for _ in range(blocks))
        self.head = nn.Linear(DIM, 8)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * (0.3 if p.dim() > 1 else 0.05))
        self.eval()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        for block in self.blocks:
            x = block(x)
        return self.head(x.mean(1))


def tiny_block_batches(n_batches: int = 4, batch: int = 16, seed: int = 0) -> list[torch.Tensor]:
    """Token-id batches with a skewed (Zipf-like) token distribution, so layer inputs are correlated."""
    g = torch.Generator().manual_seed(seed)
    probs = 1.0 / torch.arange(1, VOCAB + 1, dtype=torch.float64)
    return [torch.multinomial(probs, batch * TOKENS, replacement=True, generator=g).reshape(batch, TOKENS)
            for _ in range(n_batches)]


def tiny_block_handle() -> Model:
    """A ``Model`` around :class:`TinyBlockNet` (rebuildable as ``py:deepsqueeze.testing.block_models:TinyBlockNet``)."""
    module = TinyBlockNet()
    return Model(module, py_base(module),
                 Task.CLASSIFIER, "py:deepsqueeze.testing.block_models:TinyBlockNet", count_params(module))
