"""Pruning masks as pure tensor math: keep the top-k scores, keep scores above a threshold, N:M.

A mask is a bool tensor shaped like the scores: True = keep. Ties are broken by position
(lower flat index wins) so the same scores always give the same mask.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch


def _check_fraction(sparsity: float) -> None:
    if not 0.0 <= sparsity <= 1.0:
        raise ValueError(f"sparsity must be in [0, 1], got {sparsity}")


def keep_count(numel: int, sparsity: float) -> int:
    """How many of ``numel`` entries survive at ``sparsity`` (rounded to the nearest count)."""
    _check_fraction(sparsity)
    return numel - int(round(sparsity * numel))


def topk_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the ``k`` highest scores (stable: among equal scores the earlier ones are kept)."""
    flat = scores.detach().reshape(-1).float()
    if not 0 <= k <= flat.numel():
        raise ValueError(f"k must be in [0, {flat.numel()}], got {k}")
    mask = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
    if k > 0:
        order = torch.sort(flat, descending=True, stable=True).indices
        mask[order[:k]] = True
    return mask.reshape(scores.shape)


def sparsity_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Drop the ``sparsity`` fraction of entries with the lowest scores."""
    return topk_mask(scores, keep_count(scores.numel(), sparsity))


def threshold_mask(scores: torch.Tensor, threshold: float) -> torch.Tensor:
    """Keep entries whose score is at least ``threshold`` (``|w| < θ`` is pruned when scores are |w|)."""
    return scores.detach() >= threshold


def global_sparsity_masks(scores: Sequence[torch.Tensor], sparsity: float,
                          min_density: float = 0.01) -> list[torch.Tensor]:
    """One ranking across all tensors: drop the ``sparsity`` fraction of all entries with the lowest scores.

    Each tensor keeps at least its best ``max(1, ceil(min_density * numel))`` entries, so a layer whose
    scores are all small is never cut out entirely (that disconnects the network); the total count
    kept is still exact unless these floors alone exceed it.
    """
    if not scores:
        return []
    _check_fraction(min_density)
    flat = torch.cat([s.detach().reshape(-1).float() for s in scores])
    keep = keep_count(flat.numel(), sparsity)
    if keep > 0:
        floors, start = [], 0
        for s in scores:
            if s.numel():
                floor = max(1, math.ceil(min_density * s.numel()))
                floors.append(start + torch.nonzero(topk_mask(s, floor).reshape(-1)).reshape(-1))
            start += s.numel()
        reserved = torch.cat(floors)
        flat = flat.clone()
        flat[reserved] = float("inf")
        keep = max(keep, reserved.numel())
    mask = topk_mask(flat, keep)
    out, start = [], 0
    for s in scores:
        out.append(mask[start : start + s.numel()].reshape(s.shape))
        start += s.numel()
    return out


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """N:M semi-structured mask: in every run of ``m`` consecutive entries along the last dim keep the ``n`` best.

    The last dimension must be a multiple of ``m`` (2:4 and 4:8 are the hardware-supported patterns).
    """
    if not 0 < n <= m:
        raise ValueError(f"N:M needs 0 < N <= M, got {n}:{m}")
    if scores.dim() == 0 or scores.shape[-1] % m:
        raise ValueError(f"the last dimension ({tuple(scores.shape)}) must be a multiple of M={m} for {n}:{m}")
    blocks = scores.detach().float().reshape(-1, m)
    order = torch.sort(blocks, dim=1, descending=True, stable=True).indices
    mask = torch.zeros_like(blocks, dtype=torch.bool)
    mask.scatter_(1, order[:, :n], True)
    return mask.reshape(scores.shape)


def sparsity_of(mask: torch.Tensor) -> float:
    """Fraction of False entries (pruned) in a mask, or of zeros in a tensor."""
    if mask.numel() == 0:
        return 0.0
    kept = mask.sum() if mask.dtype == torch.bool else (mask != 0).sum()
    return 1.0 - float(kept) / mask.numel()
