"""Fashion-MNIST from its IDX .gz files (as installed by Debian's dataset-fashion-mnist)."""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path

import numpy as np
import torch

from deepsqueeze.data.datasets import ClassificationData
from deepsqueeze.errors import DataError

DEFAULT_DIR = "/usr/share/datasets/fashion-mnist"
ENV_VAR = "DEEPSQUEEZE_FASHION_MNIST"
FILES = {
    "train_x": "train-images-idx3-ubyte",
    "train_y": "train-labels-idx1-ubyte",
    "test_x": "t10k-images-idx3-ubyte",
    "test_y": "t10k-labels-idx1-ubyte",
}
# Per-pixel statistics of the training split, so inputs are roughly zero-mean, unit-variance.
MEAN, STD = 0.2860, 0.3530


def fashion_mnist_dir(override: str | None = None) -> Path:
    return Path(override or os.environ.get(ENV_VAR) or DEFAULT_DIR)


def read_idx(path: Path) -> np.ndarray:
    """Parse an IDX file (optionally gzipped) into a uint8 array."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as fh:
            raw = fh.read()
    except (OSError, EOFError) as exc:
        raise DataError(f"cannot read {path}: {exc}; reinstall dataset-fashion-mnist") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DataError(f"{path} is not an unsigned-byte IDX file")
    ndim = raw[3]
    dims = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    body = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise DataError(f"{path} is truncated: expected {int(np.prod(dims))} values, found {body.size}")
    return body.reshape(dims)


def _find(folder: Path, stem: str) -> Path:
    for candidate in (folder / f"{stem}.gz", folder / stem):
        if candidate.exists():
            return candidate
    raise DataError(
        f"fashion-mnist not found in {folder} (missing {stem}.gz): install the Debian package "
        f"dataset-fashion-mnist, or pass fashion-mnist:DIR or set {ENV_VAR}"
    )


def load_fashion_mnist(folder: str | None = None) -> ClassificationData:
    root = fashion_mnist_dir(folder)
    arrays = {key: read_idx(_find(root, stem)) for key, stem in FILES.items()}

    def images(a: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(a.astype(np.float32) / 255.0).unsqueeze(1)
        return (x - MEAN) / STD

    return ClassificationData(
        name="fashion-mnist",
        train_x=images(arrays["train_x"]),
        train_y=torch.from_numpy(arrays["train_y"].astype(np.int64)),
        test_x=images(arrays["test_x"]),
        test_y=torch.from_numpy(arrays["test_y"].astype(np.int64)),
        num_classes=10,
    )
