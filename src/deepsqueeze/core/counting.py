"""Parameter counts that see through compressed representations.

A module that stores weights in another form (packed integers, CSR, codebooks) implements
``deepsqueeze_param_count()`` and ``deepsqueeze_nonzero_count()`` giving its logical counts.
"""

from __future__ import annotations

from torch import nn


def _walk(model: nn.Module, method: str, fallback) -> int:
    own = getattr(model, method, None)
    if callable(own):
        return int(own())
    total = sum(fallback(p) for p in model.parameters(recurse=False))
    return total + sum(_walk(child, method, fallback) for child in model.children())


def count_params(model: nn.Module) -> int:
    """Logical parameter count (weights of quantized or sparse layers count at their dense size)."""
    return _walk(model, "deepsqueeze_param_count", lambda p: p.numel())


def count_nonzero_params(model: nn.Module) -> int:
    """Parameters that are not exactly zero (pruned weights do not count)."""
    return _walk(model, "deepsqueeze_nonzero_count", lambda p: int((p != 0).sum()))
