"""Mixed precision: per-layer bit widths chosen from measured sensitivity under a size budget.

Three steps, kept apart so each can be tested and reused:

1. :func:`layer_sensitivity` measures, on calibration data, how much the model's output moves when one
   layer alone is quantized to each candidate width (relative squared error of the outputs; the layer
   is rounded exactly as the packed module would round it, every other layer stays float).
2. :func:`allocate_bits` picks one width per layer so the sum of the layers' errors is small and the
   budget holds: start every layer at the narrowest width, then repeatedly take the upgrade with the
   best error reduction per extra byte that still fits (a greedy multiple-choice knapsack). The result
   is maximal: no single further upgrade fits the budget.
3. :func:`mixed_precision_` quantizes with those widths: Linear layers with GPTQ (sequential), Conv2d
   layers and embedding tables by round-to-nearest, all into the same packed modules as ``rtn``/``gptq``.

Budgets: ``max_bytes`` bounds the model's whole tensor payload (what the .dsq stores, before its small
JSON manifest): float tensors left as they are plus the packed codes, scales and zero points of the
quantized layers. ``avg_bits`` bounds the mean code width over the quantized layers' weights,
weighted by their element counts.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from deepsqueeze.core.outputs import primary_output
from deepsqueeze.core.walker import iter_modules
from deepsqueeze.errors import DataError, RecipeError
from deepsqueeze.primitives import packing
from deepsqueeze.primitives import quantize as Q
from deepsqueeze.quant.api import install, register_method, run_batch, select_layers
from deepsqueeze.quant.config import Method, QuantizeConfig
from deepsqueeze.runtime import PackedIntConv2d, PackedIntEmbedding, PackedIntLinear

__all__ = [
    "DEFAULT_CANDIDATES",
    "LayerCost",
    "allocate_bits",
    "layer_costs",
    "layer_sensitivity",
    "mixed_precision_",
    "packed_weight_bytes",
]

DEFAULT_CANDIDATES = (2, 3, 4, 8)
MIXED_TYPES = (nn.Linear, nn.Conv2d, nn.Embedding)


@dataclass(frozen=True)
class LayerCost:
    """One quantizable layer: its weight elements and the bytes its weight takes at each width."""

    name: str
    elements: int
    bytes_by_bits: dict[int, int]


def _rows(layer: nn.Module) -> tuple[int, int]:
    w = layer.weight
    return w.shape[0], w[0].numel()


def _group(cols: int, group_size: int | None) -> int:
    """The group actually used for a row of ``cols`` elements (per row when ``group_size`` does not divide)."""
    return Q.fitting_group(cols, group_size) or cols


def packed_weight_bytes(rows: int, cols: int, bits: int, group_size: int | None) -> int:
    """Bytes of a packed weight as the packed modules store it: codes, fp32 scales, uint8 zero points."""
    groups = cols // _group(cols, group_size)
    return rows * packing.packed_length(cols, bits) + rows * groups * (4 + 1)


def layer_costs(module: nn.Module, names: Sequence[str], candidates: Sequence[int],
                group_size: int | None) -> list[LayerCost]:
    """The weight size of every layer in ``names`` at every candidate width."""
    costs = []
    for name in names:
        rows, cols = _rows(module.get_submodule(name))
        costs.append(LayerCost(name, rows * cols,
                               {b: packed_weight_bytes(rows, cols, b, group_size) for b in candidates}))
    return costs


def _fake_quantized(weight: torch.Tensor, bits: int, group_size: int | None, symmetric: bool) -> torch.Tensor:
    rows = weight.reshape(weight.shape[0], -1)
    gran = Q.PerGroup(_group(rows.shape[1], group_size))
    return Q.fake_quantize(rows.float(), bits, symmetric=symmetric, signed=False,
                           granularity=gran).reshape(weight.shape).to(weight.dtype)


def _outputs(module: nn.Module, batches: Sequence[Any]) -> list[torch.Tensor]:
    out = []
    for batch in batches:
        y = run_batch(module, batch)
        out.append(primary_output(y).detach().float())
    return out


def layer_sensitivity(module: nn.Module, batches: Sequence[Any], names: Sequence[str],
                      candidates: Sequence[int] = DEFAULT_CANDIDATES, group_size: int | None = 64,
                      symmetric: bool = False, progress: Callable[[str], None] | None = None
                      ) -> dict[str, dict[int, float]]:
    """Relative output error ``sum ||f_q(x) - f(x)||^2 / sum ||f(x)||^2`` with only one layer quantized.

    ``batches`` are calibration inputs (never the evaluation split); the weights are restored after.
    """
    if not batches:
        raise DataError("mixed precision measures layer sensitivity on data: pass calibration batches")
    was_training = module.training
    module.eval()
    result: dict[str, dict[int, float]] = {}
    try:
        with torch.no_grad():
            reference = _outputs(module, batches)
            energy = sum(float(r.pow(2).sum()) for r in reference) or 1.0
            for name in names:
                weight = module.get_submodule(name).weight
                original = weight.detach().clone()
                result[name] = {}
                try:
                    for bits in candidates:
                        weight.copy_(_fake_quantized(original, bits, group_size, symmetric))
                        outs = _outputs(module, batches)
                        err = sum(float((o - r).pow(2).sum()) for o, r in zip(outs, reference, strict=True))
                        result[name][bits] = err / energy
                finally:
                    weight.copy_(original)
                if progress is not None:
                    progress(name)
    finally:
        module.train(was_training)
    return result


def allocate_bits(costs: Sequence[LayerCost], sensitivity: dict[str, dict[int, float]],
                  budget_bytes: float | None = None, avg_bits: float | None = None) -> dict[str, int]:
    """One width per layer minimising the summed sensitivity under the budget.

    Greedy knapsack by sensitivity gained per byte, started from the narrowest width and from every uniform
    width that fits; the best finish wins, so the result is maximal (no single upgrade still fits) and never
    worse than the best uniform width. ``budget_bytes`` bounds the summed weight bytes of these layers;
    ``avg_bits`` the element-weighted mean width. Raises RecipeError when even the narrowest widths do not fit.
    """
    if (budget_bytes is None) == (avg_bits is None):
        raise RecipeError("mixed precision needs exactly one budget: max_bytes or avg_bits")
    if not costs:
        return {}
    candidates = sorted(next(iter(costs)).bytes_by_bits)
    if budget_bytes is not None:
        def size(c: LayerCost, b: int) -> float:
            return c.bytes_by_bits[b]
        budget = float(budget_bytes)
    else:
        def size(c: LayerCost, b: int) -> float:
            return c.elements * b
        budget = float(avg_bits) * sum(c.elements for c in costs)  # type: ignore[arg-type]
    narrowest = sum(size(c, candidates[0]) for c in costs)
    if narrowest > budget:
        need = narrowest if budget_bytes is not None else narrowest / sum(c.elements for c in costs)
        raise RecipeError(f"the budget is below what {candidates[0]}-bit weights everywhere take "
                          f"({need:.6g} {'bytes' if budget_bytes is not None else 'bits on average'}): raise it")
    finishes = []
    for start in candidates:
        if sum(size(c, start) for c in costs) <= budget:
            choice = _greedy_upgrades({c.name: start for c in costs}, costs, sensitivity, candidates, size, budget)
            finishes.append((sum(sensitivity[c.name][choice[c.name]] for c in costs), start, choice))
    return min(finishes, key=lambda f: (f[0], f[1]))[2]


def _greedy_upgrades(choice: dict[str, int], costs: Sequence[LayerCost], sensitivity: dict[str, dict[int, float]],
                     candidates: Sequence[int], size: Callable[[LayerCost, int], float],
                     budget: float) -> dict[str, int]:
    """Apply the upgrade with the best sensitivity gain per byte until none fits."""
    used = sum(size(c, choice[c.name]) for c in costs)
    while True:
        best: tuple[float, str, int, float] | None = None
        for c in costs:
            now = choice[c.name]
            for b in candidates:
                if b <= now:
                    continue
                extra = size(c, b) - size(c, now)
                if used + extra > budget:
                    continue
                gain = sensitivity[c.name][now] - sensitivity[c.name][b]
                ratio = gain / max(extra, 1e-12)
                if best is None or ratio > best[0] or (ratio == best[0] and extra < best[3]):
                    best = (ratio, c.name, b, extra)
        if best is None:
            return choice
        _, name, bits, extra = best
        choice[name] = bits
        used += extra


def _budget_for_layers(module: nn.Module, names: Sequence[str], max_bytes: int) -> int:
    """Bytes left for the quantized layers' weights once every other tensor (kept as is) is counted."""
    targets = {f"{n}.weight" for n in names}
    fixed = sum(t.numel() * t.element_size() for k, t in module.state_dict().items() if k not in targets)
    return max_bytes - fixed


def mixed_precision_(module: nn.Module, batches: Sequence[Any], *, max_bytes: int | None = None,
                     avg_bits: float | None = None, candidates: Sequence[int] = DEFAULT_CANDIDATES,
                     group_size: int | None = 64, symmetric: bool = False, names: Sequence[str] | None = None,
                     gptq: bool = True, damp: float = 0.01, act_order: bool = False,
                     sensitivity_batches: int = 4, progress: Callable[[str], None] | None = None,
                     float_zero: bool = False) -> dict[str, int]:
    """Measure, allocate and quantize in place; returns the width chosen for every layer.

    ``names`` defaults to every Linear, Conv2d and Embedding layer. Layers are replaced by packed
    modules but no transform is recorded here (the ``mixed`` method of the quantize stage does that).
    """
    from deepsqueeze.quant.gptq import gptq_model_

    if names is None:
        names = [n for n, _ in iter_modules(module, types=MIXED_TYPES)]
    candidates = sorted(set(candidates))
    for b in candidates:
        if not 2 <= b <= 8:
            raise RecipeError(f"mixed precision packs 2..8-bit weights: candidate {b} is out of range")
    costs = layer_costs(module, names, candidates, group_size)
    budget = None if max_bytes is None else _budget_for_layers(module, names, max_bytes)
    if budget is not None and budget <= 0:
        raise RecipeError(f"max_bytes {max_bytes} does not even hold the tensors left in float: raise it")
    sens = layer_sensitivity(module, list(batches)[:sensitivity_batches], names, candidates, group_size, symmetric,
                             progress)
    choice = allocate_bits(costs, sens, budget, avg_bits)
    linears = [n for n in names if isinstance(module.get_submodule(n), nn.Linear)]
    if gptq and linears:
        gptq_model_(module, list(batches), bits={n: choice[n] for n in linears}, group_size=group_size,
                    symmetric=symmetric, act_order=act_order, damp=damp, targets=linears, progress=progress,
                    float_zero=float_zero)
    from deepsqueeze.core.walker import set_submodule

    for name in names:
        layer = module.get_submodule(name)
        if not isinstance(layer, MIXED_TYPES):
            continue  # already replaced by GPTQ
        bits, group = choice[name], _group(_rows(layer)[1], group_size)
        if isinstance(layer, nn.Linear):
            new: nn.Module = PackedIntLinear.from_float(layer, bits, group, symmetric, float_zero=float_zero)
        elif isinstance(layer, nn.Conv2d):
            new = PackedIntConv2d.from_float(layer, bits, group, symmetric)
        else:
            new = PackedIntEmbedding.from_float(layer, bits, group, symmetric, float_zero)
        set_submodule(module, name, new)
    return choice


@register_method(Method.MIXED)
def mixed_method(module: nn.Module, config: QuantizeConfig, batches: list[Any] | None) -> list[str]:
    """The ``mixed`` method: candidates are the widths 2, 3, 4, 8 up to ``bits``; budget ``max_bytes``/``avg_bits``."""
    if not batches:
        raise DataError("quantize method mixed measures layer sensitivity on data: pass calibration batches "
                        "(recipes: --data, e.g. pydoc-sentences:calib or fashion-mnist)")
    if (config.max_bytes is None) == (config.avg_bits is None):
        raise RecipeError("quantize method mixed needs exactly one budget: set max_bytes or avg_bits")
    candidates = [b for b in DEFAULT_CANDIDATES if b <= config.bits]
    if not candidates:
        raise RecipeError(f"quantize method mixed chooses among {DEFAULT_CANDIDATES} up to bits: "
                          f"bits={config.bits} leaves none (use bits: 8)")
    names = [name for name, _ in select_layers(module, config, MIXED_TYPES)]
    mixed_precision_(module, batches, max_bytes=config.max_bytes, avg_bits=config.avg_bits, candidates=candidates,
                     group_size=config.group_size, symmetric=config.symmetric, names=names, damp=config.damp,
                     act_order=config.act_order, float_zero=config.float_zero)
    for name in names:
        install(module, name, module.get_submodule(name))
    return names
