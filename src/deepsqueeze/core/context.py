"""What a recipe stage gets besides the model and its config."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from deepsqueeze.core.model import Model


@dataclass
class StageContext:
    """Shared state for the stages of one ``compress`` run.

    ``data`` is the resolved training/calibration data (a ``ClassificationData`` or ``TextData``),
    never the evaluation split of a text corpus. ``reference`` is a frozen copy of the model
    as it was before the first stage: the default teacher and fidelity target.
    ``report`` collects one dict per stage for ``compress --report``.
    """

    model: Model
    data: Any = None
    reference: Model | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    seed: int = 0
    progress: bool = True
    report: list[dict[str, Any]] = field(default_factory=list)
    evaluate: bool = True  # stages may score the model for their report rows (off: the caller scores it)
    on_unsupported: str = "warn"  # the recipe's choice for layer kinds a stage does not handle (warn|skip|error)
    model_code: str | None = None  # --model-code: architecture for artifacts of py: models (teachers too)
    named_refs: tuple[str | None, ...] = ()  # references the user named (--model, --model-code, --teacher)
    extras: dict[str, Any] = field(default_factory=dict)
