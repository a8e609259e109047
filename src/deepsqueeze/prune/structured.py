"""The structured-pruning driver: score dependency groups, pick the channels to keep, cut every coupled layer.

The pieces stay separate (DESIGN.md): ``graph.analyze`` finds the groups, ``importance`` scores
weights, ``surgery`` cuts one layer; this module only decides and orchestrates, then checks the
rewritten model with a forward pass.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from deepsqueeze.core.outputs import output_shapes
from deepsqueeze.errors import RecipeError, UnsupportedLayerError
from deepsqueeze.prune.graph import DependencyGraph, Group, Layout, analyze
from deepsqueeze.prune.importance import (
    Criterion,
    ElementCriterion,
    bn_scale,
    channel_scores,
    element_criterion,
)
from deepsqueeze.prune.surgery import cut_


@dataclass
class ChannelPlan:
    """How many channels each group loses: ``ratio`` (overridable per producer-layer pattern)."""

    ratio: float = 0.5
    overrides: dict[str, float] = field(default_factory=dict)
    include: list[str] | None = None
    exclude: list[str] = field(default_factory=list)
    round_to: int = 1
    min_channels: int = 1

    def ratio_for(self, group: Group) -> float | None:
        """The pruning ratio of ``group``, or None when the include/exclude patterns leave it alone."""
        names = group.producers
        if self.exclude and any(fnmatch.fnmatchcase(n, p) for n in names for p in self.exclude):
            return None
        for pattern, value in self.overrides.items():
            if any(fnmatch.fnmatchcase(n, pattern) for n in names):
                return value
        if self.include is not None and not any(fnmatch.fnmatchcase(n, p) for n in names for p in self.include):
            return None
        return self.ratio

    def keep_count(self, channels: int, ratio: float) -> int:
        keep = channels - int(round(ratio * channels))
        if self.round_to > 1:
            keep = -(-keep // self.round_to) * self.round_to
        return max(min(self.min_channels, channels), min(keep, channels))


def _segment_slices(layout: Layout, gid: int) -> list[tuple[int, int, int]]:
    """``(offset, channels, repeat)`` of every segment of ``layout`` that belongs to group ``gid``."""
    out, offset = [], 0
    for seg in layout:
        if seg.group == gid:
            out.append((offset, seg.channels, seg.repeat))
        offset += seg.channels * seg.repeat
    return out


def group_scores(graph: DependencyGraph, group: Group, criterion: ElementCriterion | Criterion,
                 grads: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
    """One score per channel of ``group``: element scores summed over every coupled weight slice
    (producers' output rows, consumers' input columns, depthwise filters, BatchNorm scales), or only |γ|
    of its BatchNorms for ``bn_scale`` (channels without a BatchNorm then fall back to L2 magnitude)."""
    grads = grads or {}
    total = torch.zeros(group.channels)
    if isinstance(criterion, str):
        criterion = Criterion(criterion)
    norms = [(role.module, offset, n) for role in graph.layers.values()
             if isinstance(role.module, nn.modules.batchnorm._BatchNorm) and role.module.affine
             for offset, n, _ in _segment_slices(role.in_layout, group.id)]
    if criterion is Criterion.BN_SCALE:
        if norms:  # channels without a BatchNorm (e.g. fc neurons) fall back to L2 magnitude below
            for bn, offset, n in norms:
                total += bn_scale(bn.weight[offset:offset + n]).cpu().float()
            return total
        criterion = Criterion.L2
    score_fn = element_criterion(criterion) if isinstance(criterion, Criterion) else criterion
    for name, role in graph.layers.items():
        module = role.module
        if not isinstance(module, nn.Linear | nn.Conv1d | nn.Conv2d):
            continue
        weight = module.weight
        scores = score_fn(weight, grads.get(f"{name}.weight")).float().cpu()
        if role.out_group == group.id:
            total += channel_scores(scores, 0)
        if getattr(module, "groups", 1) > 1:
            continue  # a depthwise conv's filters were counted with its output channels
        for offset, n, repeat in _segment_slices(role.in_layout, group.id):
            cols = channel_scores(scores, 1)[offset:offset + n * repeat]
            total += cols.reshape(n, repeat).sum(1)
    for bn, offset, n in norms:  # the BatchNorm scale is part of the channel's weights (as Torch-Pruning counts it)
        gamma = bn.weight[offset:offset + n]
        total += score_fn(gamma, grads.get(_param_name(graph, bn) + ".weight")).float().cpu()
    return total


def _param_name(graph: DependencyGraph, module: nn.Module) -> str:
    return next((name for name, role in graph.layers.items() if role.module is module), "")


def _check_requested(graph: DependencyGraph, plan: ChannelPlan) -> None:
    """A layer named explicitly (include/overrides) whose group cannot be pruned is an error, with the reason."""
    explicit = list(plan.include or []) + list(plan.overrides)
    if not explicit:
        return
    for group in graph.groups.values():
        if group.prunable or not group.producers:
            continue
        hit = [n for n in group.producers for p in explicit if fnmatch.fnmatchcase(n, p) and "*" not in p]
        if hit:
            raise UnsupportedLayerError(f"cannot prune the output channels of {hit[0]}: {'; '.join(group.blocked)}")


@dataclass
class ChannelPruneResult:
    kept: dict[int, list[int]]  # group id -> kept channel indices
    groups: dict[int, Group]
    params_before: int
    params_after: int


def prune_channels_(module: nn.Module, example: torch.Tensor, plan: ChannelPlan,
                    criterion: ElementCriterion | Criterion = Criterion.L2,
                    grads: Mapping[str, torch.Tensor] | None = None) -> ChannelPruneResult:
    """Physically remove the lowest-scoring channels of every selected group of ``module`` (in place).

    ``example`` is one input batch (shapes only). Every cut is recorded for replay; afterwards a
    forward pass must give an output of the same shape, else UnsupportedLayerError.
    """
    if not 0.0 <= plan.ratio < 1.0:
        raise RecipeError(f"ratio must be in [0, 1), got {plan.ratio}")
    with torch.no_grad():
        before_shape = output_shapes(_forward(module, example))
    params_before = sum(p.numel() for p in module.parameters())
    graph = analyze(module, example)
    _check_requested(graph, plan)
    kept: dict[int, list[int]] = {}
    for group in graph.prunable_groups():
        ratio = plan.ratio_for(group)
        if ratio is None or ratio <= 0:
            continue
        n_keep = plan.keep_count(group.channels, ratio)
        if n_keep >= group.channels:
            continue
        scores = group_scores(graph, group, criterion, grads)
        order = torch.sort(scores, descending=True, stable=True).indices[:n_keep]
        kept[group.id] = sorted(int(i) for i in order)
    for name, role in graph.layers.items():
        depthwise = getattr(role.module, "groups", 1) > 1
        if role.out_group in kept:
            cut_(module, name, "out", kept[role.out_group])
        if not depthwise and _touches(role.in_layout, kept):
            cut_(module, name, "in", _in_indices(role.in_layout, kept))
    with torch.no_grad():
        try:
            after_shape = output_shapes(_forward(module, example))
        except RuntimeError as exc:
            raise UnsupportedLayerError(f"the pruned model no longer runs ({str(exc)[:200]}): a coupling was missed; "
                                        "exclude the layers involved and report the model") from None
    if after_shape != before_shape:
        raise UnsupportedLayerError(f"structured pruning changed the output shape {before_shape} -> {after_shape}")
    return ChannelPruneResult(kept, graph.groups, params_before, sum(p.numel() for p in module.parameters()))


def _touches(layout: Layout, kept: Mapping[int, list[int]]) -> bool:
    return any(seg.group in kept for seg in layout)


def _in_indices(layout: Layout, kept: Mapping[int, list[int]]) -> list[int]:
    """Kept input features of a layer whose input is made of ``layout``'s segments."""
    out: list[int] = []
    offset = 0
    for seg in layout:
        channels = kept.get(seg.group, range(seg.channels))
        for c in channels:
            start = offset + c * seg.repeat
            out.extend(range(start, start + seg.repeat))
        offset += seg.channels * seg.repeat
    return out


def _forward(module: nn.Module, example: torch.Tensor | Sequence[torch.Tensor]) -> Any:
    was_training = module.training
    module.eval()
    try:
        return module(example) if isinstance(example, torch.Tensor) else module(*example)
    finally:
        module.train(was_training)
