"""One way to read a model's forward output, whatever its container.

Models return a tensor, a tuple or list (``(logits, aux)``), a dict (detection heads), a Hugging Face
``ModelOutput`` (an ordered dict whose unset fields are ``None``) or nestings of these. Every place
that inspects outputs (tracing checks, calibration, evaluation, export) goes through these helpers
instead of assuming ``.shape``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from deepsqueeze.errors import ModelError

__all__ = ["MAX_FLOAT_MAGNITUDE", "class_logits", "out_of_range", "output_shapes", "output_tensors", "primary_output"]

#: The largest magnitude a loaded float (a stored weight, a probe output) may have. No trained weight, scale,
#: statistic or logit comes near it (fp32 overflows at 3.4e38, about 2**128): a value this large is finite on one
#: input and Inf on the next (a planted 3.4e38 times an activation above 1), so loaders refuse it up front.
MAX_FLOAT_MAGNITUDE = 2.0**64


def out_of_range(tensor: torch.Tensor) -> bool:
    """Whether a floating-point ``tensor`` holds NaN, Inf or a value beyond ``MAX_FLOAT_MAGNITUDE``."""
    if not tensor.is_floating_point() or tensor.numel() == 0:
        return False
    return not bool(torch.isfinite(tensor).all()) or float(tensor.abs().max()) > MAX_FLOAT_MAGNITUDE


def output_tensors(output: Any) -> list[torch.Tensor]:
    """Every tensor in ``output``, depth first in container order (dict/ModelOutput: insertion order).

    ``None`` and non-tensor leaves (ints, strings, caches without tensors) are skipped.
    """
    out: list[torch.Tensor] = []
    _collect(output, out)
    return out


def _collect(value: Any, out: list[torch.Tensor]) -> None:
    if isinstance(value, torch.Tensor):
        out.append(value)
    elif isinstance(value, Mapping):
        for item in value.values():
            _collect(item, out)
    elif isinstance(value, (tuple, list)):
        for item in value:
            _collect(item, out)


def flat_outputs(output: Any) -> torch.Tensor:
    """Every tensor of a batch's ``output`` flattened per sample and concatenated, as float32: ``(N, features)``."""
    return torch.cat([t.flatten(1).float() for t in output_tensors(output)], dim=1)


def primary_output(output: Any) -> torch.Tensor:
    """The first tensor of ``output`` (``logits`` / ``last_hidden_state`` of a ``ModelOutput``).

    Raises ModelError when the output holds no tensor at all.
    """
    tensors = output_tensors(output)
    if not tensors:
        raise ModelError(f"the model's forward returned {type(output).__name__} without any tensor in it")
    return tensors[0]


def output_shapes(output: Any) -> list[tuple[int, ...]]:
    """The shape of every tensor of ``output`` (a signature to compare before and after a rewrite)."""
    return [tuple(t.shape) for t in output_tensors(output)]


def class_logits(output: Any, num_classes: int | None = None) -> torch.Tensor | None:
    """The class logits in ``output``: the output itself when it is a ``(N, C)`` tensor, else its ``logits``
    entry (a dict or ``ModelOutput``); None when it holds none (a detector's boxes and scores, a decoder's
    image). ``num_classes``, when known, must be the last dimension."""
    if isinstance(output, Mapping):
        output = output.get("logits")
    elif not isinstance(output, torch.Tensor):
        output = getattr(output, "logits", None)
    if not isinstance(output, torch.Tensor) or output.dim() != 2:
        return None
    if num_classes is not None and output.shape[-1] != num_classes:
        return None
    return output
