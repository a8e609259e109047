"""Unstructured and N:M weight pruning of Linear/Conv2d layers: masks, enforcement and the driver.

Masks are plain bool tensors keyed by parameter name (``"0.weight"``); pruned weights are zeroed in
place and kept at zero during fine-tuning by re-applying the masks after every optimiser step
(``MaskSet.after_step`` plugs into ``deepsqueeze.train``'s ``after_step`` hook).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from deepsqueeze.core.coverage import snapshot
from deepsqueeze.core.kinds import weight_bearing_modules
from deepsqueeze.core.record import EXCLUDED, TIED, UNSUPPORTED, CoverageEntry, get_record
from deepsqueeze.core.walker import has_empty_weight
from deepsqueeze.errors import RecipeError
from deepsqueeze.primitives.masks import (
    global_sparsity_masks,
    nm_mask,
    sparsity_mask,
    sparsity_of,
    threshold_mask,
)
from deepsqueeze.prune.importance import ElementCriterion

PRUNABLE_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv2d, nn.Conv1d)  # kept for callers
# Layer kinds (deepsqueeze.core.kinds) whose every weight tensor unstructured and N:M pruning cover.
PRUNE_KINDS = frozenset({"linear", "hf-conv1d", "conv1d", "conv2d", "conv3d", "conv-transpose1d",
                         "conv-transpose2d", "lstm", "gru", "rnn", "multihead-attention"})
# Embedding tables are pruned only when an include pattern names them (rows are looked up, not multiplied).
OPT_IN_KINDS = frozenset({"embedding"})


def prunable_weights(module: nn.Module, include: Sequence[str] | None = None,
                     exclude: Sequence[str] | None = None) -> dict[str, nn.Parameter]:
    """``{"layer.weight": parameter}`` for every weight of the prunable layer kinds matching the patterns.

    Kinds: Linear, transformers' Conv1D, Conv1d/2d/3d, ConvTranspose, the ``weight_*`` tensors of
    LSTM/GRU/RNN and the projections of ``nn.MultiheadAttention`` (``attn.in_proj_weight``,
    ``attn.out_proj.weight``); embedding tables only when ``include`` names them. A weight shared by
    several layers (a tied ``lm_head``) appears once, under the name ``module.named_parameters()``
    gives it (the first place it is reached), so it gets one mask.
    """
    canonical = {id(p): name for name, p in module.named_parameters()}
    out: dict[str, nn.Parameter] = {}
    for name, sub, kind in weight_bearing_modules(module):
        if kind is None or kind.name not in PRUNE_KINDS | OPT_IN_KINDS or has_empty_weight(sub):
            continue
        if kind.name in OPT_IN_KINDS and not include:
            continue
        if include and not any(fnmatch.fnmatchcase(name, p) for p in include):
            continue
        if exclude and any(fnmatch.fnmatchcase(name, p) for p in exclude):
            continue
        for wname in kind.weights(sub):
            path, _, attr = wname.rpartition(".")
            param = getattr(sub.get_submodule(path) if path else sub, attr, None)
            if isinstance(param, nn.Parameter) and param.numel() > 0:
                out.setdefault(canonical.get(id(param), f"{name}.{wname}"), param)
    return out


def prune_coverage(module: nn.Module, params: Mapping[str, torch.Tensor], what: str,
                   include: Sequence[str] | None = None, exclude: Sequence[str] | None = None,
                   stage_type: str = "prune") -> list[CoverageEntry]:
    """Coverage of an unstructured/N:M stage: modules whose weights are in ``params`` are masked
    (``what`` names the pattern, e.g. ``mask 90%``), the others skipped (pattern, embedding) or float."""
    ids = {id(p) for p in params.values()}
    stage = len(get_record(module).stages)
    entries = []
    for snap in snapshot(module):
        kind = snap.kind or f"other:{type(snap.module).__name__}"
        tensors = [t for t in snap.module.parameters() if id(t) in ids]
        if tensors:
            reason = f"{TIED}: {snap.tied_to}" if snap.tied_to else None
            entries.append(CoverageEntry(stage, stage_type, snap.name, kind, snap.weights, "compressed", what, reason))
        elif (include and not any(fnmatch.fnmatchcase(snap.name, p) for p in include)) or (
                exclude and any(fnmatch.fnmatchcase(snap.name, p) for p in exclude)):
            entries.append(CoverageEntry(stage, stage_type, snap.name, kind, snap.weights, "skipped", None,
                                         f"{EXCLUDED}"))
        elif snap.kind in OPT_IN_KINDS:
            entries.append(CoverageEntry(stage, stage_type, snap.name, kind, snap.weights, "skipped", None,
                                         f"{EXCLUDED}: embedding tables are pruned only when include names them"))
        else:
            entries.append(CoverageEntry(stage, stage_type, snap.name, kind, snap.weights, "float", None,
                                         UNSUPPORTED))
    return entries


@dataclass
class MaskSet:
    """Bool masks (True = keep) for named parameters of one module, with in-place application."""

    module: nn.Module
    masks: dict[str, torch.Tensor] = field(default_factory=dict)

    def params(self) -> dict[str, nn.Parameter]:
        named = dict(self.module.named_parameters())
        return {name: named[name] for name in self.masks}

    @torch.no_grad()
    def apply(self) -> None:
        """Zero every pruned weight."""
        for name, param in self.params().items():
            param.mul_(self.masks[name].to(param.device, param.dtype))

    def after_step(self, step: int, total: int) -> None:
        """``after_step`` hook for the training loop: keep pruned weights at zero."""
        self.apply()

    def sparsity(self) -> dict[str, float]:
        return {name: sparsity_of(mask) for name, mask in self.masks.items()}

    def overall_sparsity(self) -> float:
        total = sum(m.numel() for m in self.masks.values())
        kept = sum(int(m.sum()) for m in self.masks.values())
        return 1.0 - kept / total if total else 0.0


def masks_from_zeros(module: nn.Module, include: Sequence[str] | None = None,
                     exclude: Sequence[str] | None = None) -> MaskSet:
    """Recover masks from a pruned model: every exact zero in a Linear/Conv weight counts as pruned."""
    return MaskSet(module, {name: p.detach() != 0 for name, p in prunable_weights(module, include, exclude).items()})


def enforce_masks(module: nn.Module, masks: Mapping[str, torch.Tensor]) -> Callable[[int, int], None]:
    """An ``after_step`` hook that re-applies ``masks`` to ``module`` (for other techniques' fine-tuning)."""
    return MaskSet(module, dict(masks)).after_step


def layer_sparsities(module: nn.Module) -> dict[str, float]:
    """Fraction of exact zeros in each Linear/Conv weight."""
    return {name: sparsity_of(p.detach()) for name, p in prunable_weights(module).items()}


@dataclass
class UnstructuredPlan:
    """What to prune: target sparsity (or a threshold, or N:M), scope and per-layer overrides."""

    sparsity: float = 0.5
    threshold: float | None = None
    nm: tuple[int, int] | None = None
    global_scope: bool = False
    overrides: dict[str, float] = field(default_factory=dict)  # fnmatch pattern on layer name -> sparsity

    def layer_target(self, param_name: str) -> float | None:
        layer = param_name.rsplit(".", 1)[0]
        for pattern, value in self.overrides.items():
            if fnmatch.fnmatchcase(layer, pattern):
                return value
        return None


def compute_masks(params: Mapping[str, nn.Parameter], plan: UnstructuredPlan, criterion: ElementCriterion,
                  fraction: float = 1.0, grads: Mapping[str, torch.Tensor] | None = None,
                  previous: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Masks for ``params`` at ``fraction`` of the way to each target (schedules pass their progress).

    ``fraction`` scales the sparsity targets: the schedule's current sparsity divided by its final one.
    Entries pruned in ``previous`` masks stay pruned (their score becomes -inf), so gradual schedules
    only ever remove weights, whatever the criterion.
    """
    grads = grads or {}
    scores = {name: criterion(p, grads.get(name)).float() for name, p in params.items()}
    for name, mask in (previous or {}).items():
        if name in scores:
            scores[name] = scores[name].masked_fill(~mask.to(scores[name].device), float("-inf"))
    if plan.nm is not None:
        n, m = plan.nm
        out = {}
        for name, s in scores.items():
            flat = s.reshape(s.shape[0], -1)
            if flat.shape[1] % m:
                raise RecipeError(f"{name} has {flat.shape[1]} inputs per output, not a multiple of {m}: "
                                  f"exclude it from {n}:{m} pruning (exclude: [{name.rsplit('.', 1)[0]!r}])")
            out[name] = nm_mask(flat, n, m).reshape(s.shape)
        return out
    if plan.threshold is not None:
        return {name: threshold_mask(s, plan.threshold) for name, s in scores.items()}
    masks: dict[str, torch.Tensor] = {}
    pooled = []
    for name, s in scores.items():
        target = plan.layer_target(name)
        if target is not None:
            masks[name] = sparsity_mask(s, target * fraction)
        elif plan.global_scope:
            pooled.append(name)
        else:
            masks[name] = sparsity_mask(s, plan.sparsity * fraction)
    if pooled:
        for name, mask in zip(pooled, global_sparsity_masks([scores[n] for n in pooled], plan.sparsity * fraction),
                              strict=True):
            masks[name] = mask
    return {name: masks[name] for name in scores}


def prune_weights_(module: nn.Module, plan: UnstructuredPlan, criterion: ElementCriterion,
                   include: Sequence[str] | None = None, exclude: Sequence[str] | None = None,
                   grads: Mapping[str, torch.Tensor] | None = None) -> MaskSet:
    """One-shot: compute masks for the matching layers, zero the pruned weights, return the masks."""
    params = prunable_weights(module, include, exclude)
    if not params:
        raise RecipeError("no Linear/Conv layers match the include/exclude patterns: nothing to prune")
    masks = MaskSet(module, compute_masks(params, plan, criterion, grads=grads))
    masks.apply()
    return masks
