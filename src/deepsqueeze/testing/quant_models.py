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
