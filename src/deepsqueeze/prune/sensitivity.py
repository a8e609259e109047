"""Sensitivity analysis: prune one layer (or one channel group) at a time, measure the metric, and turn an
overall target into per-layer sparsities or per-group channel ratios (the most sensitive pruned least)."""

from __future__ import annotations

import copy
import fnmatch
import glob
from collections.abc import Callable, Sequence

import torch
from torch import nn

from deepsqueeze.errors import RecipeError
from deepsqueeze.primitives.masks import sparsity_mask
from deepsqueeze.prune.graph import analyze
from deepsqueeze.prune.importance import Criterion, ElementCriterion, magnitude_l1
from deepsqueeze.prune.structured import ChannelPlan, prune_channels_
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


# No group loses more than three quarters of its channels (or the stage's own ratio, if higher): one-shot scans
# (no fine-tuning) rank the deepest cuts poorly, and a group cut to an eighth did not recover in fine-tuning.
CHANNEL_RATIOS = (0.125, 0.25, 0.375, 0.5, 0.625, 0.75)


def multiply_adds(module: nn.Module, example: torch.Tensor) -> int:
    """Multiply-adds of one sample through ``module``'s Linear and Conv layers (``example``: a batch of one)."""
    total = 0

    def count(layer: nn.Module, _inputs: object, out: torch.Tensor) -> None:
        nonlocal total
        if isinstance(out, torch.Tensor):
            per_output = layer.weight[0].numel() if isinstance(layer, nn.modules.conv._ConvNd) else layer.in_features
            total += out[0].numel() * per_output

    hooks = [m.register_forward_hook(count) for m in module.modules() if isinstance(m, (nn.Linear, nn.Conv1d,
                                                                                        nn.Conv2d, nn.Conv3d))]
    try:
        with torch.no_grad():
            module(example)
    finally:
        for hook in hooks:
            hook.remove()
    return total


@torch.no_grad()
def allocate_channels(module: nn.Module, example: torch.Tensor, plan: ChannelPlan,
                      metric: Callable[[nn.Module], float], criterion: ElementCriterion | Criterion,
                      ratios: Sequence[float] = CHANNEL_RATIOS) -> dict[str, float]:
    """Per-group channel ratios (keys: the escaped name of each group's first producer layer) that leave at
    most the multiply-adds of ``plan`` applied uniformly, at the smallest summed ``metric`` drop.

    Filter-pruning sensitivity analysis (Li et al., ICLR 2017, "Pruning Filters for Efficient ConvNets",
    section 3.3): each group that ``plan`` prunes at its default ratio is cut alone, on a copy, to each of
    ``ratios``; greedily, the group whose next ratio costs the least metric per multiply-add saved moves,
    until the combined cut, measured on a copy, leaves no more multiply-adds than the uniform plan's.
    """
    graph = analyze(module, example)
    free = [g for g in graph.prunable_groups() if plan.ratio_for(g) == plan.ratio and not any(
        fnmatch.fnmatchcase(n, p) for n in g.producers for p in plan.overrides)]
    if not free or plan.ratio <= 0:
        return {}
    key = {g.id: glob.escape(g.producers[0]) for g in free}

    def cut(ratios_by_group: dict[int, float]) -> nn.Module:
        copy_plan = ChannelPlan(0.0, {**plan.overrides, **{key[g]: r for g, r in ratios_by_group.items() if r > 0}},
                                plan.include, plan.exclude, plan.round_to, plan.min_channels)
        pruned = copy.deepcopy(module)
        prune_channels_(pruned, example, copy_plan, criterion)
        return pruned.eval()

    budget = multiply_adds(cut({g.id: plan.ratio for g in free}), example)
    base_metric, base_macs = metric(module), multiply_adds(module, example)
    curves = {}  # group id -> [(ratio, metric, multiply-adds saved)]
    for group in free:
        curve = [(0.0, base_metric, 0)]
        for ratio in sorted({*ratios, plan.ratio}):  # the uniform cut itself stays reachable
            pruned = cut({group.id: ratio})
            curve.append((ratio, metric(pruned), base_macs - multiply_adds(pruned, example)))
        curves[group.id] = curve
    level = dict.fromkeys(curves, 0)

    def fits() -> bool:
        return multiply_adds(cut({g: curves[g][level[g]][0] for g in curves}), example) <= budget

    while (step := _cheapest_step(curves, level)) is not None:
        level[step] += 1
        # savings are taken to add up (coupled groups save less together): the cut itself decides
        if base_macs - sum(curves[g][level[g]][2] for g in curves) <= budget and fits():
            break
    undone = True
    while undone:  # the last steps may overshoot: give back the dearest ones that the budget still allows
        undone = False
        for group in sorted(curves, key=lambda g: -_step_cost(curves[g], level[g] - 1)):
            if level[group] > 0:
                level[group] -= 1
                if fits():
                    undone = True
                    break
                level[group] += 1
    return {key[g]: curves[g][level[g]][0] for g in curves}


def _cheapest_step(curves: dict[int, list[tuple[float, float, int]]], level: dict[int, int]) -> int | None:
    """The group whose next scanned ratio loses the least metric per multiply-add saved (None: all at the end)."""
    best, best_cost = None, float("inf")
    for group, curve in curves.items():
        if level[group] + 1 < len(curve) and (cost := _step_cost(curve, level[group])) < best_cost:
            best, best_cost = group, cost
    return best


def _step_cost(curve: list[tuple[float, float, int]], i: int) -> float:
    """Metric lost per multiply-add saved going from ``curve[i]`` to ``curve[i + 1]`` (-1 when ``i`` < 0)."""
    if i < 0:
        return -1.0
    (_, m0, s0), (_, m1, s1) = curve[i], curve[i + 1]
    return max(0.0, m0 - m1) / max(s1 - s0, 1)
