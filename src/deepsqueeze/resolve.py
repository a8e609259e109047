"""Resolve any model reference, artifacts included."""

from __future__ import annotations

from pathlib import Path

import torch

from deepsqueeze.artifact import load
from deepsqueeze.core.model import Model
from deepsqueeze.zoo.resolve import ModelCode, resolve_base_model


def resolve_model(ref: str, weights: str | None = None, progress: bool = True,
                  device: str | torch.device = "cpu", model_code: ModelCode = None) -> Model:
    """``FILE.dsq`` loads an artifact (``model_code``: the architecture of a ``py:`` model's artifact,
    see :func:`deepsqueeze.load`); anything else goes to the zoo resolver."""
    if ref.endswith(".dsq") or (Path(ref).is_file() and not ref.startswith(("zoo:", "hf:", "py:"))):
        model = load(ref, model_code)
        model.module.to(device)
        return model
    return resolve_base_model(ref, weights=weights, progress=progress, device=device)
