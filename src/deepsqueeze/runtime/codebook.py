"""The codebook representation (weight sharing, Deep Compression): a weight whose values are the centroids
of a small codebook, each weight an index into it.

While the ``share`` stage fine-tunes centroids, a weight is the parametrization :class:`CodebookWeight`
(``centroids[indices]``, zero where pruned): autograd's gather backward sums the gradients of every weight
sharing a centroid. Afterwards the layer is an ordinary float layer whose weight takes at most
``2**bits`` distinct values; the file stores it with the codebook encodings (:mod:`deepsqueeze.codec.codebook`)
and exports turn it back into indices (:func:`shared_values` finds the codebook of such a layer).
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["CODEBOOK_MIN_WEIGHTS", "CODEBOOK_TYPES", "CodebookWeight", "shared_values"]

#: Smaller weights are exported as they are (the indices would save next to nothing).
CODEBOOK_MIN_WEIGHTS = 4096
#: The float layer types whose shared weight an export stores as codebook indices.
CODEBOOK_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Embedding)


class CodebookWeight(nn.Module):
    """Parametrization ``weight = centroids[indices]`` (zero where ``mask`` is False) for centroid
    fine-tuning: the gather's backward adds up the gradients of all weights sharing a centroid."""

    def __init__(self, centroids: torch.Tensor, indices: torch.Tensor, mask: torch.Tensor) -> None:
        super().__init__()
        self.centroids = nn.Parameter(centroids.clone())
        self.register_buffer("indices", indices)
        self.register_buffer("mask", mask)

    def forward(self, original: torch.Tensor) -> torch.Tensor:
        shared = self.centroids[self.indices]
        return torch.where(self.mask, shared, torch.zeros((), dtype=shared.dtype, device=shared.device))


def shared_values(layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(codebook, index)`` of a float Linear / Conv / Embedding (exactly those types) whose weight of at least
    :data:`CODEBOOK_MIN_WEIGHTS` entries takes at most 256 distinct values: the sorted values and each
    weight's index into them (the weight's shape, flattened). None for any other layer."""
    if type(layer) not in CODEBOOK_TYPES:
        return None
    weight = layer.weight.detach()
    if weight.numel() < CODEBOOK_MIN_WEIGHTS or not weight.is_floating_point():
        return None
    values, index = torch.unique(weight, return_inverse=True)
    if len(values) > 256:
        return None
    return values, index
