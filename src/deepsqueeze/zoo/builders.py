"""Zoo architectures. Builders take the dataset's input shape and class count."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class ZooEntry:
    build: Callable[[tuple[int, ...], int], nn.Module]
    epochs: int
    lr: float
    optimizer: str
    schedule: str
    batch_size: int = 128
    weight_decay: float = 0.0


def lenet300(input_shape: tuple[int, ...], num_classes: int) -> nn.Sequential:
    """LeNet-300-100: a 300-100 fully-connected network."""
    c, h, w = input_shape
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(c * h * w, 300), nn.ReLU(),
        nn.Linear(300, 100), nn.ReLU(),
        nn.Linear(100, num_classes),
    )


def lenet5(input_shape: tuple[int, ...], num_classes: int) -> nn.Sequential:
    """Caffe's LeNet-5: conv20(5x5)-pool-conv50(5x5)-pool-fc500-fc10 (padded on inputs under 20 px)."""
    c, h, w = input_shape
    pad = 2 if min(h, w) < 20 else 0
    h2 = ((h + 2 * pad - 4) // 2 + 2 * pad - 4) // 2
    w2 = ((w + 2 * pad - 4) // 2 + 2 * pad - 4) // 2
    return nn.Sequential(
        nn.Conv2d(c, 20, 5, padding=pad), nn.MaxPool2d(2),
        nn.Conv2d(20, 50, 5, padding=pad), nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(50 * h2 * w2, 500), nn.ReLU(),
        nn.Linear(500, num_classes),
    )


def vgg_small(input_shape: tuple[int, ...], num_classes: int) -> nn.Sequential:
    """A VGG-style CNN with BatchNorm: conv 32-32-64-64-128-128 in three pooled blocks, fc 256."""
    c, h, w = input_shape
    layers: list[nn.Module] = []
    in_ch = c
    for out_ch in (32, 64, 128):
        for _ in range(2):
            layers += [nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=False), nn.BatchNorm2d(out_ch), nn.ReLU()]
            in_ch = out_ch
        layers.append(nn.MaxPool2d(2))
        h, w = h // 2, w // 2
    return nn.Sequential(
        *layers, nn.Flatten(),
        nn.Linear(128 * h * w, 256), nn.ReLU(), nn.Dropout(0.3),
        nn.Linear(256, num_classes),
    )


ZOO: dict[str, ZooEntry] = {
    "lenet300": ZooEntry(lenet300, epochs=10, lr=1e-3, optimizer="adam", schedule="cosine"),
    "lenet5": ZooEntry(lenet5, epochs=6, lr=1e-3, optimizer="adam", schedule="cosine"),
    "vgg-small": ZooEntry(vgg_small, epochs=5, lr=2e-3, optimizer="adamw", schedule="onecycle", weight_decay=5e-4),
}


def build_zoo_model(name: str, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    return ZOO[name].build(tuple(input_shape), int(num_classes))
