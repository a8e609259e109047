"""Toy models and data shared by the test suites (small enough to train in a second).

NOTE: the first version of this file was overwritten by accident (two engineers wrote it in the same
second); this is a reconstruction of ``TinyMLP``, ``tiny_classification_data`` and
``tiny_model_handle`` from how tests/prune uses them. Their author should check it.
"""

from __future__ import annotations

import torch
from torch import nn

from deepsqueeze.core.counting import count_params
from deepsqueeze.core.model import Model, Task
from deepsqueeze.data.datasets import ClassificationData

TINY_SHAPE = (1, 4, 4)
TINY_CLASSES = 4


class TinyMLP(nn.Module):
    """16 -> 32 -> 16 -> 4 MLP with named layers fc1, fc2, fc3."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(16, 32)
        self.fc2 = nn.Linear(32, 16)
        self.fc3 = nn.Linear(16, TINY_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def tiny_classification_data(n_train: int = 512, n_test: int = 128, seed: int = 0) -> ClassificationData:
    """Four Gaussian blobs in 16 dimensions, shaped (1, 4, 4): learnable in a few steps."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(TINY_CLASSES, 16, generator=g) * 2

    def sample(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.randint(0, TINY_CLASSES, (n,), generator=g)
        x = centers[y] + torch.randn(n, 16, generator=g)
        return x.reshape(n, *TINY_SHAPE), y

    train_x, train_y = sample(n_train)
    test_x, test_y = sample(n_test)
    return ClassificationData("tiny", train_x, train_y, test_x, test_y, TINY_CLASSES)


def tiny_model_handle() -> Model:
    """A ``Model`` around a fresh, seeded ``TinyMLP`` (rebuildable as ``py:deepsqueeze.testing.models:TinyMLP``)."""
    torch.manual_seed(0)
    module = TinyMLP()
    return Model(module, {"kind": "py", "factory": "deepsqueeze.testing.models:TinyMLP"}, Task.CLASSIFIER,
                 "py:deepsqueeze.testing.models:TinyMLP", count_params(module), TINY_SHAPE, TINY_CLASSES)
