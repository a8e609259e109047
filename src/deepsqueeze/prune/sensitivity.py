"""Sensitivity analysis: prune one layer at a time, measure the metric, and turn a global sparsity target
into per-layer sparsities (the most sensitive layers are pruned least)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from deepsqueeze.errors import RecipeError
from deepsqueeze.primitives.masks import sparsity_mask
from deepsqueeze.prune.importance import ElementCriterion, magnitude_l1
from deepsqueeze.prune.unstructured import prunable_weights

DEFAULT_SPARSITIES = (0.3, 0.5, 0.7, 0.8, 0.9, 0.95)
Curves = dict[str, list[tuple[float, float]]]  # layer -> [(sparsity, metric)], sparsity 0 first


@torch.no_grad()
def sensitivity_scan(module: nn.Module, metric: Callable[[nn.Module], float],
                     sparsities: Sequence[float] = DEFAULT_SPARSITIES, criterion: ElementCriterion = magnitude_l1,
                     include: Sequence[str] | None = None, exclude: Sequence[str] | None = None) -> Curves:
    """For each Linear/Conv layer alone: prune it to each sparsity, score ``metric(module)``, restore it."""
    if any(not 0 < s < 1 for s in sparsities):
        raise RecipeError(f"sparsities must be in (0, 1), got {list(sparsities)}")
    params = prunable_weights(module, include, exclude)
    if not params:
        raise RecipeError("no Linear/Conv layers match the include/exclude patterns: nothing to scan")
    baseline = metric(module)
    curves: Curves = {}
    for name, weight in params.items():
        original = weight.detach().clone()
        scores = criterion(weight, None)
        curve = [(0.0, baseline)]
        for s in sorted(sparsities):
            weight.copy_(original * sparsity_mask(scores, s).to(original.dtype))
            curve.append((float(s), float(metric(module))))
        weight.copy_(original)
        curves[name.removesuffix(".weight")] = curve
    return curves


def allocate_sparsity(curves: Curves, sizes: dict[str, int], target: float) -> dict[str, float]:
    """Per-layer sparsities reaching ``target`` of all weights with the smallest worst-case metric drop.

    One tolerance applies to every layer: each takes the highest scanned sparsity whose drop stays within
    it; the tolerance grows until the size-weighted sparsity reaches ``target``. If even the highest scanned
    sparsities do not reach it, those are returned (the caller sees the shortfall in the overall figure).
    """
    if not 0 <= target < 1:
        raise RecipeError(f"target sparsity must be in [0, 1), got {target}")
    total = sum(sizes[n] for n in curves)
    # A pruned point may score above the unpruned one (a negative drop): tolerances start at 0, which every
    # layer meets at sparsity 0.
    drops = sorted({max(0.0, round(curve[0][1] - m, 12)) for curve in curves.values() for _, m in curve})
    choice: dict[str, float] = {}
    for tolerance in drops:
        choice = {name: max(s for s, m in curve if curve[0][1] - m <= tolerance + 1e-12)
                  for name, curve in curves.items()}
        if sum(choice[n] * sizes[n] for n in choice) / total >= target:
            return _trim(choice, sizes, target)
    return choice


def _trim(choice: dict[str, float], sizes: dict[str, int], target: float) -> dict[str, float]:
    """Scale the allocation down uniformly so it meets ``target`` without overshooting much."""
    total = sum(sizes[n] for n in choice)
    reached = sum(choice[n] * sizes[n] for n in choice) / total
    if reached <= 0:
        return choice
    factor = target / reached
    return {n: round(s * factor, 4) for n, s in choice.items()}


def allocate_sparsity_greedy(curves: Curves, sizes: dict[str, int], target: float) -> dict[str, float]:
    """Per-layer sparsities reaching ``target`` of all weights with the smallest summed metric drop.

    Greedy on the scanned points: every step moves the layer whose next scanned sparsity costs the least
    metric per weight removed, until the size-weighted sparsity reaches ``target`` (then the last step is
    scaled back to land on it). Drops are taken as additive across layers, as in a sensitivity scan.
    """
    if not 0 <= target < 1:
        raise RecipeError(f"target sparsity must be in [0, 1), got {target}")
    total = sum(sizes[n] for n in curves)
    level = {name: 0 for name in curves}  # index into the curve
    removed = 0.0
    while removed < target * total:
        best, best_cost = None, float("inf")
        for name, curve in curves.items():
            i = level[name]
            if i + 1 >= len(curve):
                continue
            (s0, m0), (s1, m1) = curve[i], curve[i + 1]
            gained = (s1 - s0) * sizes[name]
            cost = max(0.0, m0 - m1) / max(gained, 1e-12)
            if cost < best_cost:
                best, best_cost = name, cost
        if best is None:
            break
        i = level[best]
        gained = (curves[best][i + 1][0] - curves[best][i][0]) * sizes[best]
        level[best] = i + 1
        removed += gained
    choice = {name: curves[name][level[name]][0] for name in curves}
    return _trim(choice, sizes, target) if removed > target * total else choice
