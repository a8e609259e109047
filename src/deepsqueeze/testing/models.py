"""Toy models and data shared by the test suites (small enough to train in a second).

NOTE: the first version of this file was overwritten by accident (two engineers wrote it in the same
second); this is a reconstruction of ``TinyMLP``, ``tiny_classification_data`` and
``tiny_model_handle`` from how tests/prune uses them. Their author should check it.
"""

from __future__ import annotations

import torch
from torch import nn

from deepsqueeze.core.counting import count_params
from deepsqueeze.core.model import Model, Task, py_base
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
    return Model(module, py_base(module), Task.CLASSIFIER,
                 "py:deepsqueeze.testing.models:TinyMLP", count_params(module), TINY_SHAPE, TINY_CLASSES)


# ---------------------------------------------------------------------------------------------------------
# Architectures for structured pruning tests (never special-cased by deepsqueeze.prune).


class ResidualBlock(nn.Module):
    """conv-bn-relu-conv-bn + identity (or a 1x1 projection when the width changes), then relu."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Identity() if stride == 1 and cin == cout else nn.Sequential(
            nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class TinyResNet(nn.Module):
    """A ResNet-style net for (1, 8, 8) inputs: stem, two residual stages, global pooling, classifier."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.layer1 = nn.Sequential(ResidualBlock(16, 16), ResidualBlock(16, 16))
        self.layer2 = nn.Sequential(ResidualBlock(16, 32, stride=2), ResidualBlock(32, 32))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer2(self.layer1(self.stem(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


class DepthwiseSeparableCNN(nn.Module):
    """MobileNet-style: conv stem, depthwise 3x3 + pointwise 1x1 blocks with BatchNorm, concat branch, fc; any
    input of at least 8x8 pixels (pooled to 4x4 before the fc)."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU6())
        self.dw1 = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False), nn.BatchNorm2d(16),
                                 nn.ReLU6())
        self.pw1 = nn.Sequential(nn.Conv2d(16, 32, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU6())
        self.dw2 = nn.Sequential(nn.Conv2d(32, 32, 3, stride=2, padding=1, groups=32, bias=False),
                                 nn.BatchNorm2d(32), nn.ReLU6())
        self.pw2 = nn.Sequential(nn.Conv2d(32, 24, 1, bias=False), nn.BatchNorm2d(24), nn.ReLU6())
        self.side = nn.Conv2d(32, 8, 1, stride=2)  # concatenated with pw2's output
        self.pool = nn.AdaptiveAvgPool2d(4)  # the identity on (1, 8, 8) inputs; (1, 28, 28) ones pool to 4x4
        self.fc = nn.Linear(32 * 4 * 4, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pw1(self.dw1(self.stem(x)))
        x = torch.cat([self.pw2(self.dw2(x)), self.side(x)], dim=1)
        return self.fc(self.pool(x).flatten(1))


class PlainMLP(nn.Module):
    """64 -> 48 -> 32 -> 10 with ReLU (input (1, 8, 8), flattened)."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 32), nn.ReLU())
        self.head = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


class TinyBertEncoder(nn.Module):
    """A 3-layer, 4-head BERT (hidden 32, FFN 64) with mean pooling, built offline from a config."""

    def __init__(self) -> None:
        super().__init__()
        from transformers import BertConfig, BertModel

        config = BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                            intermediate_size=64, max_position_embeddings=32, hidden_dropout_prob=0.0,
                            attention_probs_dropout_prob=0.0)
        self.transformer = BertModel(config, add_pooling_layer=False)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        hidden = self.transformer(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1)
