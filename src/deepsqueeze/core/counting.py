"""Parameter counts that see through compressed representations and count shared tensors once.

A module that stores weights in another form (packed integers, CSR, codebooks) implements
``deepsqueeze_param_count()`` and ``deepsqueeze_nonzero_count()`` giving its logical counts.

Tied weights (a GPT-2 ``lm_head`` whose weight is the embedding table) and modules reused at several
places in the tree are counted once: a plain parameter by its identity, a compressed module when every
its weight tensor (``codes`` or ``weight``) was already seen under another module (the representation of
a tied weight shares its buffers with the first one): then only its bias counts.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


def _walk(model: nn.Module, method: str, fallback: Callable[[torch.Tensor], int]) -> int:
    seen_tensors: set[int] = set()
    seen_modules: set[int] = set()

    def visit(module: nn.Module) -> int:
        if id(module) in seen_modules:
            return 0  # the same module reused at another path
        seen_modules.add(id(module))
        own = getattr(module, method, None)
        if callable(own):
            tensors = [t for t in (*module.parameters(), *module.buffers()) if t is not None]
            primary = getattr(module, "codes", None)
            primary = getattr(module, "weight", None) if primary is None else primary
            shared = isinstance(primary, torch.Tensor) and id(primary) in seen_tensors
            seen_tensors.update(id(t) for t in tensors)
            if not shared:
                return int(own())
            bias = getattr(module, "bias", None)  # the weight is counted where it was first seen
            return fallback(bias) if isinstance(bias, torch.Tensor) else 0
        total = 0
        for p in module.parameters(recurse=False):
            if id(p) not in seen_tensors:
                seen_tensors.add(id(p))
                total += fallback(p)
        return total + sum(visit(child) for child in module.children())

    return visit(model)


def count_params(model: nn.Module) -> int:
    """Logical parameter count (weights of quantized or sparse layers count at their dense size; shared once)."""
    return _walk(model, "deepsqueeze_param_count", lambda p: p.numel())


def count_nonzero_params(model: nn.Module) -> int:
    """Parameters that are not exactly zero (pruned weights do not count; shared tensors once)."""
    return _walk(model, "deepsqueeze_nonzero_count", lambda p: int((p != 0).sum()))
