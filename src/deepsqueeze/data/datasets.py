"""In-memory datasets: image classification tensors and sentence lists."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

# The validation split search scores on: a fixed sixth of the train split (never the test split).
VAL_FRACTION = 1 / 6
VAL_SEED = 1234


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

    def validation_view(self, fraction: float = VAL_FRACTION, seed: int = VAL_SEED) -> ClassificationData:
        """The same data with a fixed ``fraction`` of the train split held out as the evaluation split.

        The returned data's ``train_*`` tensors are the train split minus the held-out rows (what stages
        train and calibrate on) and its ``test_*`` tensors are the held-out rows (the validation split
        that search scores trials on); the original test split is not part of it. The held-out rows
        depend only on ``seed`` and the train size, so every process cuts the same split.
        """
        n = len(self.train_x)
        n_val = max(1, int(round(n * fraction)))
        if n_val >= n:
            raise ValueError(f"{self.name}: {n} training samples are too few to hold out a validation split")
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
        val, fit = order[:n_val].sort().values, order[n_val:].sort().values
        return ClassificationData(f"{self.name}:val", self.train_x[fit], self.train_y[fit], self.train_x[val],
                                  self.train_y[val], self.num_classes)


@dataclass
class TextData:
    """A list of sentences (for sentence encoders: calibration, fine-tuning or evaluation)."""

    name: str
    sentences: list[str]

    def batches(self, batch_size: int = 64) -> Iterator[list[str]]:
        for i in range(0, len(self.sentences), batch_size):
            yield self.sentences[i : i + batch_size]
