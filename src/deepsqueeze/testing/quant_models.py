"""Toy models for the quantization tests (deterministic factories usable as ``py:`` references)."""

from __future__ import annotations

import torch
from torch import nn

from deepsqueeze.core.counting import count_params
from deepsqueeze.core.model import Model, Task, py_base


class TinyBNConvNet(nn.Sequential):
    """conv-BN-ReLU x2 -> pool -> flatten -> Linear, on (1, 8, 8) inputs, fixed non-trivial BN statistics."""

    def __init__(self) -> None:
        torch.manual_seed(0)
        super().__init__(
            nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.MaxPool2d(2), nn.Flatten(), nn.Linear(16 * 4 * 4, 10),
        )
        g = torch.Generator().manual_seed(1)
        for m in self.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)
        self.eval()


def tiny_bn_convnet_handle() -> Model:
    """A ``Model`` around :class:`TinyBNConvNet` (rebuildable as ``py:deepsqueeze.testing.quant_models:TinyBNConvNet``)."""
    module = TinyBNConvNet()
    return Model(module, py_base(module),
                 Task.CLASSIFIER, "py:deepsqueeze.testing.quant_models:TinyBNConvNet", count_params(module),
                 (1, 8, 8), 10)


class OutlierMLPBlock(nn.Module):
    """A pre-norm GPT-2-style FFN (``ln_2`` -> ``mlp.c_fc`` -> GELU -> ``mlp.c_proj``) whose LayerNorm
    affine weight has a few outlier channels, as LLM activations do (the case AWQ is built for)."""

    def __init__(self, width: int = 64, hidden: int = 128, outliers: int = 4, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Module()
        self.mlp.c_fc = nn.Linear(width, hidden)
        self.mlp.c_proj = nn.Linear(hidden, width)
        with torch.no_grad():
            gain = torch.ones(width)
            gain[torch.randperm(width, generator=g)[:outliers]] = 25.0
            self.ln_2.weight.copy_(gain)
            for lin in (self.mlp.c_fc, self.mlp.c_proj):
                lin.weight.copy_(torch.randn(lin.weight.shape, generator=g) / lin.in_features ** 0.5)
                lin.bias.copy_(0.1 * torch.randn(lin.bias.shape, generator=g))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp.c_proj(torch.nn.functional.gelu(self.mlp.c_fc(self.ln_2(x))))


def outlier_batches(n: int = 8, seed: int = 0, width: int = 64) -> list[torch.Tensor]:
    """``n`` batches of 16 x 8 tokens x ``width`` Gaussian inputs (fixed seed)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(16, 8, width, generator=g) for _ in range(n)]
