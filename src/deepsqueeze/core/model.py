"""The model handle passed between resolver, stages, artifact writer and evaluation."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from torch import nn


class Task(str, Enum):
    CLASSIFIER = "classifier"
    SENTENCE_ENCODER = "sentence-encoder"


@dataclass
class Model:
    """An ``nn.Module`` plus what is needed to rebuild and evaluate it.

    ``base`` is the JSON-serializable description the loader uses to rebuild the
    uncompressed architecture (``{"kind": "zoo", "name": "lenet5", ...}``); ``base_params`` is
    that architecture's parameter count, the denominator of every compression ratio.
    """

    module: nn.Module
    base: dict[str, Any]
    task: Task
    ref: str
    base_params: int
    input_shape: tuple[int, ...] | None = None
    num_classes: int | None = None
    artifact_path: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)
