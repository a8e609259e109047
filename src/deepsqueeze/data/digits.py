"""scikit-learn's bundled 8x8 digits with a fixed train/test split: tiny, always available."""

from __future__ import annotations

import numpy as np
import torch

from deepsqueeze.data.datasets import ClassificationData

TEST_FRACTION = 0.25
SPLIT_SEED = 0


def load_digits() -> ClassificationData:
    from sklearn.datasets import load_digits as sk_load_digits

    bunch = sk_load_digits()
    x = torch.from_numpy((bunch.data.astype(np.float32) / 16.0 - 0.5) / 0.5).reshape(-1, 1, 8, 8)
    y = torch.from_numpy(bunch.target.astype(np.int64))
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(SPLIT_SEED))
    n_test = int(len(x) * TEST_FRACTION)
    test, train = order[:n_test], order[n_test:]
    return ClassificationData("digits", x[train], y[train], x[test], y[test], num_classes=10)
