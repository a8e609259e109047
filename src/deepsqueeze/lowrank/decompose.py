"""``decompose_``: replace Linear / Conv2d layers by low-rank products, with the rank chosen per layer.

Rank rules: ``energy`` (keep a fraction of the squared singular values; for Tucker-2 the HOSVD
error), ``fixed`` (a rank or a rank ratio), ``budget`` (keep a fraction of the selected layers'
parameters or MACs, spread across layers greedily: each step buys the rank with the largest drop in
sensitivity-weighted squared error per parameter/MAC). A layer whose factorization would not save
parameters stays dense. Every replacement is recorded as a transform so the loader rebuilds it.
"""

from __future__ import annotations

import heapq
import math
import warnings
from dataclasses import dataclass
from enum import StrEnum
from typing import Annotated, Any, ClassVar

import pydantic
import torch
from pydantic import Field, model_validator
from torch import nn

from deepsqueeze.core.config import Count, Flag, Fraction, StageConfig, register_stage
from deepsqueeze.core.context import StageContext
from deepsqueeze.core.model import Model
from deepsqueeze.core.record import Size, TransformParams, record_transform, register_transform
from deepsqueeze.core.walker import get_submodule, iter_modules, set_submodule
from deepsqueeze.errors import ArtifactError, DeepsqueezeWarning, RecipeError, UnsupportedLayerError
from deepsqueeze.primitives.factorize import (
    cp_params,
    energy_rank,
    hosvd_error_table,
    linear_factored_params,
    singular_values,
    svd_relative_errors,
    tucker2_params,
)
from deepsqueeze.runtime import CPConv2d, LowRankLinear, Tucker2Conv2d, conv_geometry


class RankRule(StrEnum):
    ENERGY = "energy"
    FIXED = "fixed"
    BUDGET = "budget"


class ConvMethod(StrEnum):
    TUCKER2 = "tucker2"
    CP = "cp"
    NONE = "none"


class BudgetMetric(StrEnum):
    PARAMS = "params"
    MACS = "macs"


class Allocation(StrEnum):
    ENERGY = "energy"  # equal weight per layer: equalise relative squared error per unit of cost
    SENSITIVITY = "sensitivity"  # weight each layer by how much the model's output moves when it is factored


class LowRankConfig(StageConfig):
    """Which layers to factor and how their ranks are chosen.

    ``energy``: kept fraction of squared singular values (rule=energy). ``rank`` / ``rank_ratio``:
    a fixed rank, or a fraction of ``min(out, in)`` (Linear) / of the channels (Tucker-2) (rule=fixed).
    ``budget``: fraction of the selected layers' parameters or MACs to keep (rule=budget).
    """

    stage_type: ClassVar[str] = "lowrank"

    rule: RankRule = RankRule.ENERGY
    energy: Fraction = Field(0.9, gt=0)
    rank: Count | None = None
    rank_ratio: Fraction | None = Field(None, gt=0)
    budget: Fraction | None = Field(None, gt=0, lt=1)
    budget_metric: BudgetMetric = BudgetMetric.PARAMS
    allocation: Allocation = Allocation.ENERGY
    linear: Flag = True
    conv: ConvMethod = ConvMethod.TUCKER2
    include: list[str] | None = None
    exclude: list[str] | None = None
    min_rank: Count = 1

    @model_validator(mode="after")
    def _check_rule(self) -> LowRankConfig:
        if self.rule is RankRule.FIXED and (self.rank is None) == (self.rank_ratio is None):
            raise RecipeError("lowrank rule 'fixed' needs exactly one of rank or rank_ratio")
        if self.rule is RankRule.BUDGET and self.budget is None:
            raise RecipeError("lowrank rule 'budget' needs budget (fraction of parameters or MACs to keep, e.g. 0.25)")
        if self.rule is RankRule.ENERGY and self.conv is ConvMethod.CP:
            raise RecipeError("lowrank rule 'energy' is not defined for CP: use rule 'fixed' or 'budget' with conv 'cp'")
        return self


@dataclass
class _Candidate:
    spec: Any  # rank (int) or ranks (r_out, r_in); None means "keep dense"
    params: int
    macs: int
    err2: float  # relative squared Frobenius error of the weight


@dataclass
class _Layer:
    name: str
    module: nn.Module
    kind: str  # "linear" | "tucker2" | "cp"
    dense_params: int
    dense_macs: int
    candidates: list[_Candidate]


def decompose_(model: nn.Module | Model, config: LowRankConfig, example_inputs: Any = None) -> dict[str, dict]:
    """Factor the selected layers of ``model`` in place; return ``{layer: {kind, rank, params before/after}}``.

    ``example_inputs`` (a batch tensor, or a dict of keyword tensors) is needed for a MAC budget (to
    learn the conv output sizes) and for ``allocation="sensitivity"`` (to measure output change).
    """
    root = model.module if isinstance(model, Model) else model
    if config.rule is RankRule.BUDGET and config.budget_metric is BudgetMetric.MACS and example_inputs is None:
        raise RecipeError("a MAC budget needs example inputs to size the convolutions: give the model an input_shape")
    if config.allocation is Allocation.SENSITIVITY and example_inputs is None:
        raise RecipeError("allocation 'sensitivity' needs calibration inputs: run the stage with data")
    layers = _collect(root, config, example_inputs)
    if not layers:
        warnings.warn("lowrank: no layer matched (check include/exclude and the layer types)", DeepsqueezeWarning,
                      stacklevel=2)
        return {}
    choice = _choose(root, layers, config, example_inputs)
    summary: dict[str, dict] = {}
    for layer in layers:
        cand = choice[layer.name]
        if cand.spec is None:
            continue
        new = _factor(layer, cand.spec)
        set_submodule(root, layer.name, new)
        record_transform(root, f"lowrank.{layer.kind}", layer.name, **_replay_params(layer, cand.spec))
        summary[layer.name] = {"kind": layer.kind, "rank": cand.spec, "params_before": layer.dense_params,
                               "params_after": cand.params, "macs_before": layer.dense_macs,
                               "macs_after": cand.macs, "weight_rel_error": math.sqrt(cand.err2)}
    return summary


# ---------------------------------------------------------------------------------------------- selection


def _collect(root: nn.Module, config: LowRankConfig, example_inputs: Any) -> list[_Layer]:
    types: tuple[type[nn.Module], ...] = ()
    if config.linear:
        types += (nn.Linear,)
    if config.conv is not ConvMethod.NONE:
        types += (nn.Conv2d,)
    if not types:
        return []
    spatial = _conv_spatial(root, example_inputs) if example_inputs is not None else {}
    layers = []
    for name, module in iter_modules(root, types=types, include=config.include, exclude=config.exclude):
        if isinstance(module, nn.Linear):
            layers.append(_linear_layer(name, module, config))
        else:
            try:
                conv_geometry(module)  # type: ignore[arg-type]
            except UnsupportedLayerError as exc:
                warnings.warn(f"lowrank: skipping {name}: {exc}", DeepsqueezeWarning, stacklevel=3)
                continue
            if module.kernel_size == (1, 1):
                continue  # a 1x1 conv is a Linear over channels; Tucker-2 of it only adds layers
            layers.append(_conv_layer(name, module, config, spatial.get(name)))  # type: ignore[arg-type]
    return [layer for layer in layers if len(layer.candidates) > 1]


def _linear_layer(name: str, module: nn.Linear, config: LowRankConfig) -> _Layer:
    out_f, in_f = module.weight.shape
    dense = out_f * in_f
    errs = svd_relative_errors(module.weight.data) ** 2
    cands = [
        _Candidate(r, linear_factored_params(out_f, in_f, r), linear_factored_params(out_f, in_f, r), float(errs[r - 1]))
        for r in range(config.min_rank, min(out_f, in_f) + 1)
        if linear_factored_params(out_f, in_f, r) < dense
    ]
    cands.append(_Candidate(None, dense, dense, 0.0))
    return _Layer(name, module, "linear", dense, dense, cands)


def _conv_layer(name: str, module: nn.Conv2d, config: LowRankConfig, sizes: tuple[int, int] | None) -> _Layer:
    out_c, in_c, kh, kw = module.weight.shape
    hw_in, hw_out = sizes if sizes is not None else (1, 1)
    dense = out_c * in_c * kh * kw
    cands: list[_Candidate] = []
    if config.conv is ConvMethod.TUCKER2:
        table = hosvd_error_table(module.weight.data) if config.rule is not RankRule.FIXED else None
        for r_out in range(config.min_rank, out_c + 1):
            r_in = max(config.min_rank, min(in_c, math.ceil(r_out * in_c / out_c)))
            params = tucker2_params(out_c, in_c, kh, kw, (r_out, r_in))
            if params >= dense:
                break
            macs = r_in * in_c * hw_in + (r_out * r_in * kh * kw + out_c * r_out) * hw_out
            err2 = float(table[r_out - 1, r_in - 1]) ** 2 if table is not None else 0.0
            cands.append(_Candidate((r_out, r_in), params, macs, err2))
        kind = "tucker2"
    else:
        r = config.min_rank
        while cp_params(out_c, in_c, kh, kw, r) < dense:
            params = cp_params(out_c, in_c, kh, kw, r)
            macs = r * in_c * hw_in + (r * (kh + kw) + out_c * r) * hw_out
            cands.append(_Candidate(r, params, macs, 0.0))
            r += 1
        kind = "cp"
    cands.append(_Candidate(None, dense, dense * hw_out, 0.0))
    return _Layer(name, module, kind, dense, dense * hw_out, cands)


def _conv_spatial(root: nn.Module, example_inputs: Any) -> dict[str, tuple[int, int]]:
    """Input and output pixel counts of every Conv2d, from one forward pass."""
    sizes: dict[str, tuple[int, int]] = {}
    handles = []
    for name, module in root.named_modules():
        if isinstance(module, nn.Conv2d):
            def hook(mod: nn.Module, args: tuple, out: torch.Tensor, name: str = name) -> None:
                sizes[name] = (args[0].shape[-2] * args[0].shape[-1], out.shape[-2] * out.shape[-1])
            handles.append(module.register_forward_hook(hook))
    try:
        _run(root, example_inputs[:1] if isinstance(example_inputs, torch.Tensor) else example_inputs)
    finally:
        for h in handles:
            h.remove()
    return sizes


def _run(root: nn.Module, inputs: Any) -> torch.Tensor:
    was_training = root.training
    root.eval()
    try:
        with torch.no_grad():
            return root(**inputs) if isinstance(inputs, dict) else root(inputs)
    finally:
        root.train(was_training)


def _choose(root: nn.Module, layers: list[_Layer], config: LowRankConfig, example_inputs: Any) -> dict[str, _Candidate]:
    if config.rule is RankRule.ENERGY:
        return {layer.name: _energy_choice(layer, config.energy) for layer in layers}
    if config.rule is RankRule.FIXED:
        return {layer.name: _fixed_choice(layer, config) for layer in layers}
    weights = {layer.name: 1.0 for layer in layers}
    if config.allocation is Allocation.SENSITIVITY:
        weights = _sensitivities(root, layers, config, example_inputs)
    return _budget_choice(layers, config.budget or 1.0, config.budget_metric, weights)


def _energy_choice(layer: _Layer, energy: float) -> _Candidate:
    if layer.kind == "linear":
        rank = energy_rank(singular_values(layer.module.weight.data), energy)
        return next((c for c in layer.candidates if c.spec == rank), layer.candidates[-1])
    return next((c for c in layer.candidates if c.err2 <= 1.0 - energy + 1e-12), layer.candidates[-1])


def _fixed_choice(layer: _Layer, config: LowRankConfig) -> _Candidate:
    out_c, in_c = layer.module.weight.shape[:2]
    if layer.kind == "linear":
        rank = config.rank if config.rank is not None else math.ceil(config.rank_ratio * min(out_c, in_c))  # type: ignore[operator]
        return next((c for c in layer.candidates if c.spec == rank), layer.candidates[-1])
    if layer.kind == "tucker2":
        r_out = config.rank if config.rank is not None else math.ceil(config.rank_ratio * out_c)  # type: ignore[operator]
        return next((c for c in layer.candidates if c.spec is not None and c.spec[0] == r_out), layer.candidates[-1])
    rank = config.rank if config.rank is not None else math.ceil(config.rank_ratio * min(out_c, in_c))  # type: ignore[operator]
    return next((c for c in layer.candidates if c.spec == rank), layer.candidates[-1])


def _cost(c: _Candidate, metric: BudgetMetric) -> int:
    return c.params if metric is BudgetMetric.PARAMS else c.macs


def _budget_choice(layers: list[_Layer], budget: float, metric: BudgetMetric,
                   weights: dict[str, float]) -> dict[str, _Candidate]:
    """Greedy allocation: start every layer at its smallest rank, then buy the best error drop per cost."""
    if any(layer.kind == "cp" for layer in layers):
        # CP has no cheap error estimate: every layer keeps the same fraction of its cost.
        chosen = {}
        for layer in layers:
            limit = budget * _cost(layer.candidates[-1], metric)
            fits = [c for c in layer.candidates[:-1] if _cost(c, metric) <= limit]
            chosen[layer.name] = fits[-1] if fits else layer.candidates[0]
        return chosen
    total = budget * sum(_cost(layer.candidates[-1], metric) for layer in layers)
    index = {layer.name: 0 for layer in layers}
    spent = sum(_cost(layer.candidates[0], metric) for layer in layers)
    if spent > total:
        warnings.warn(f"lowrank: budget {budget} is below the smallest ranks ({spent / total * budget:.3f}); "
                      "using the smallest ranks", DeepsqueezeWarning, stacklevel=4)
    by_name = {layer.name: layer for layer in layers}

    def gain(layer: _Layer, i: int) -> float:
        cur, nxt = layer.candidates[i], layer.candidates[i + 1]
        dc = max(_cost(nxt, metric) - _cost(cur, metric), 1)
        return weights[layer.name] * (cur.err2 - nxt.err2) / dc

    heap = [(-gain(layer, 0), layer.name) for layer in layers if len(layer.candidates) > 1]
    heapq.heapify(heap)
    while heap:
        _, name = heapq.heappop(heap)
        layer, i = by_name[name], index[name]
        step = _cost(layer.candidates[i + 1], metric) - _cost(layer.candidates[i], metric)
        if spent + step > total:
            continue  # this layer's next rank does not fit; cheaper upgrades elsewhere still may
        spent += step
        index[name] = i + 1
        if i + 2 < len(layer.candidates):
            heapq.heappush(heap, (-gain(layer, i + 1), name))
    return {name: by_name[name].candidates[i] for name, i in index.items()}


def _sensitivities(root: nn.Module, layers: list[_Layer], config: LowRankConfig,
                   example_inputs: Any) -> dict[str, float]:
    """Output change per unit of weight error: factor each layer alone at the uniform budget, measure
    ``||f'(x) - f(x)||^2 / ||f(x)||^2`` on the calibration batch, divide by the layer's weight error."""
    reference = _run(root, example_inputs).float()
    ref_norm = float((reference**2).sum()) or 1.0
    out = {}
    for layer in layers:
        limit = (config.budget or 1.0) * _cost(layer.candidates[-1], config.budget_metric)
        fits = [c for c in layer.candidates[:-1] if _cost(c, config.budget_metric) <= limit]
        probe = fits[-1] if fits else layer.candidates[0]
        if probe.err2 <= 0.0:
            out[layer.name] = 1.0
            continue
        set_submodule(root, layer.name, _factor(layer, probe.spec))
        try:
            changed = _run(root, example_inputs).float()
        finally:
            set_submodule(root, layer.name, layer.module)
        out[layer.name] = max(float(((changed - reference) ** 2).sum()) / ref_norm / probe.err2, 1e-12)
    return out


def _factor(layer: _Layer, spec: Any) -> nn.Module:
    if layer.kind == "linear":
        return LowRankLinear.from_linear(layer.module, int(spec))  # type: ignore[arg-type]
    if layer.kind == "tucker2":
        return Tucker2Conv2d.from_conv(layer.module, tuple(spec))  # type: ignore[arg-type]
    return CPConv2d.from_conv(layer.module, int(spec))  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------------ replay


def _replay_params(layer: _Layer, spec: Any) -> dict[str, Any]:
    if layer.kind == "tucker2":
        return {"ranks": [int(spec[0]), int(spec[1])]}
    return {"rank": int(spec)}


class RankParams(TransformParams):
    rank: Size


class Tucker2Params(TransformParams):
    ranks: Annotated[list[Size], pydantic.Field(min_length=2, max_length=2)]


def _check_rank(rank: int, limit: int, target: str) -> None:
    if rank > limit:
        raise ArtifactError(f"rank {rank} of {target!r} exceeds {limit}, more than the layer can use")


@register_transform("lowrank.linear", params=RankParams)
def _replay_linear(root: nn.Module, target: str, params: dict[str, Any]) -> None:
    base = get_submodule(root, target)
    if not isinstance(base, nn.Linear):
        raise UnsupportedLayerError(f"lowrank.linear replay expects a Linear at {target}, found {type(base).__name__}")
    _check_rank(int(params["rank"]), max(base.in_features, base.out_features), target)
    set_submodule(root, target, LowRankLinear(base.in_features, base.out_features, int(params["rank"]),
                                              bias=base.bias is not None))


@register_transform("lowrank.tucker2", params=Tucker2Params)
def _replay_tucker2(root: nn.Module, target: str, params: dict[str, Any]) -> None:
    base = get_submodule(root, target)
    if not isinstance(base, nn.Conv2d):
        raise UnsupportedLayerError(f"lowrank.tucker2 replay expects a Conv2d at {target}, found {type(base).__name__}")
    _check_rank(int(params["ranks"][0]), base.out_channels, target)
    _check_rank(int(params["ranks"][1]), base.in_channels, target)
    set_submodule(root, target, Tucker2Conv2d(**conv_geometry(base), ranks=tuple(params["ranks"])))


@register_transform("lowrank.cp", params=RankParams)
def _replay_cp(root: nn.Module, target: str, params: dict[str, Any]) -> None:
    base = get_submodule(root, target)
    if not isinstance(base, nn.Conv2d):
        raise UnsupportedLayerError(f"lowrank.cp replay expects a Conv2d at {target}, found {type(base).__name__}")
    _check_rank(int(params["rank"]), base.weight.numel(), target)
    set_submodule(root, target, CPConv2d(**conv_geometry(base), rank=int(params["rank"])))


# ------------------------------------------------------------------------------------------------- stage


def stage_example_inputs(model: Model, data: Any, n: int = 64) -> Any:
    """A calibration batch for a stage: images from the data's train split, or tokenized sentences."""

    if model.task.is_text:
        sentences = getattr(data, "sentences", None)
        if not sentences:
            return None
        return dict(model.module.tokenize(list(sentences[:n])))  # type: ignore[operator]
    train_x = getattr(data, "train_x", None)
    if train_x is not None:
        return train_x[:n]
    if model.input_shape:
        return torch.zeros((1, *model.input_shape))
    return None


@register_stage(LowRankConfig)
def lowrank_stage(model: Model, config: LowRankConfig, ctx: StageContext) -> None:
    """Recipe stage ``{"type": "lowrank", ...}``: factor the model and report what changed."""
    from deepsqueeze.core.counting import count_params

    before = count_params(model.module)
    summary = decompose_(model, config, example_inputs=stage_example_inputs(model, ctx.data))
    ctx.report.append({"stage": "lowrank", "layers_factored": len(summary), "params_before": before,
                       "params_after": count_params(model.module)})

