"""In-memory datasets: image classification tensors and sentence lists."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch


@dataclass
class ClassificationData:
    """Normalised images ``(N, C, H, W)`` float32 and int64 labels, split into train and test."""

    name: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.train_x.shape[1:])

    def batches(self, split: str = "train", batch_size: int = 256, shuffle: bool = False,
                seed: int = 0, limit: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Mini-batches of a split; shuffling uses its own generator so results depend only on ``seed``."""
        x, y = (self.train_x, self.train_y) if split == "train" else (self.test_x, self.test_y)
        n = len(x) if limit is None else min(limit, len(x))
        if shuffle:
            order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:n]
        else:
            order = torch.arange(n)
        for i in range(0, n, batch_size):
            idx = order[i : i + batch_size]
            yield x[idx], y[idx]


@dataclass
class TextData:
    """A list of sentences (for sentence encoders: calibration, fine-tuning or evaluation)."""

    name: str
    sentences: list[str]

    def batches(self, batch_size: int = 64) -> Iterator[list[str]]:
        for i in range(0, len(self.sentences), batch_size):
            yield self.sentences[i : i + batch_size]
