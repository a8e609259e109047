"""One-shot pruning of large models from calibration data: SparseGPT, Wanda and the magnitude baseline.

The algorithms are pure functions of a weight (out x in) and its input Hessian (in x in, ``2 X X^T / n``);
the ``prune_oneshot`` stage walks the model's Linear layers in execution order with
:func:`deepsqueeze.core.calibrate.layerwise_convert`, so each layer is calibrated on what the pruned layers
before it produce (block by block for transformers), as both papers do.
"""

from __future__ import annotations

import time

import torch
from torch import nn

from deepsqueeze.core.config import register_stage
from deepsqueeze.core.context import StageContext
from deepsqueeze.core.coverage import register_planner, report_coverage
from deepsqueeze.core.kinds import as_linear_
from deepsqueeze.core.model import Model
from deepsqueeze.core.record import CoverageEntry, record_coverage, record_encoding
from deepsqueeze.errors import ModelError, RecipeError
from deepsqueeze.primitives.masks import nm_mask, sparsity_mask, sparsity_of
from deepsqueeze.prune.config import OneShotMethod, Pattern, PruneOneShotConfig, Storage
from deepsqueeze.prune.unstructured import prune_coverage


def nm_of(pattern: Pattern) -> tuple[int, int] | None:
    """``(kept, group)`` of an N:M pattern (``2:4`` -> ``(2, 4)``), None for unstructured."""
    if pattern is Pattern.UNSTRUCTURED:
        return None
    n, m = pattern.value.split(":")
    return int(n), int(m)


def magnitude_mask(weight: torch.Tensor, sparsity: float, nm: tuple[int, int] | None = None) -> torch.Tensor:
    """Keep-mask (out x in, bool) dropping the smallest ``|w|`` of the whole layer, or per N:M group."""
    scores = weight.detach().abs().float()
    return nm_mask(scores, *nm) if nm else sparsity_mask(scores, sparsity)


def wanda_mask(weight: torch.Tensor, hessian: torch.Tensor, sparsity: float,
               nm: tuple[int, int] | None = None) -> torch.Tensor:
    """Wanda's keep-mask (out x in, bool): scores ``|W_ij| * ||X_j||_2`` (``||X_j||^2`` is proportional to
    ``H_jj``), compared within each output row (Sun et al., 2023), or within each N:M group of a row."""
    scores = weight.detach().abs().float() * torch.diagonal(hessian).clamp_min(0).sqrt().float().unsqueeze(0)
    if nm:
        return nm_mask(scores, *nm)
    pruned = int(round(weight.shape[1] * sparsity))
    mask = torch.ones_like(scores, dtype=torch.bool)
    if pruned:
        order = torch.sort(scores, dim=1, stable=True).indices[:, :pruned]
        mask.scatter_(1, order, False)
    return mask


def sparsegpt_prune(weight: torch.Tensor, hessian: torch.Tensor, sparsity: float,
                    nm: tuple[int, int] | None = None, *, block_size: int = 128,
                    damp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """SparseGPT (Frantar & Alistarh, 2023): ``(pruned weight, keep-mask)``, both out x in.

    Columns are visited left to right in blocks of ``block_size``. Unstructured: at the start of a block the
    ``sparsity`` fraction of its weights with the smallest OBS saliency ``w^2 / [H^-1]_jj^2`` is chosen
    (adaptive mask selection); N:M: the mask of every group of ``m`` columns is chosen when its first column is
    reached. Each removed weight's error ``w / [H^-1]_jj`` is spread over the row's columns not yet visited
    through the upper Cholesky factor of ``H^-1`` (the same update GPTQ applies to rounding errors).

    Raises:
        ModelError: shapes disagree, or ``H`` is not positive definite even after ``damp``.
    """
    rows, cols = weight.shape
    if hessian.shape != (cols, cols):
        raise ModelError(f"Hessian of shape {tuple(hessian.shape)} does not fit a weight with {cols} input columns")
    if nm and cols % nm[1]:
        raise ModelError(f"{nm[0]}:{nm[1]} needs the {cols} input columns to be a multiple of {nm[1]}")
    W = weight.detach().to(torch.float64 if weight.dtype == torch.float64 else torch.float32).clone()
    H = hessian.detach().to(W.dtype).clone()
    dead = torch.diagonal(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    H.diagonal().add_(damp * torch.diagonal(H).mean())
    U = inverse_hessian_factor(H)
    mask = torch.ones(rows, cols, dtype=torch.bool)
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        W1, U1 = W[:, i1:i2].clone(), U[i1:i2, i1:i2]
        E1 = torch.zeros_like(W1)
        saliency_scale = torch.diagonal(U1).square().unsqueeze(0)
        if nm is None:
            mask[:, i1:i2] = sparsity_mask(W1.square() / saliency_scale, sparsity) if sparsity else True
        for i in range(i2 - i1):
            if nm is not None and i % nm[1] == 0:
                mask[:, i1 + i : i1 + i + nm[1]] = nm_mask(
                    W1[:, i : i + nm[1]].square() / saliency_scale[:, i : i + nm[1]], *nm)
            w = W1[:, i]
            kept = torch.where(mask[:, i1 + i], w, torch.zeros_like(w))
            err = (w - kept) / U1[i, i]
            W1[:, i:].sub_(err.unsqueeze(1) * U1[i, i:].unsqueeze(0))
            W1[:, i] = kept
            E1[:, i] = err
        W[:, i1:i2] = W1
        W[:, i2:].sub_(E1 @ U[i1:i2, i2:])
    W[~mask] = 0.0
    return W.to(weight.dtype), mask


def inverse_hessian_factor(H: torch.Tensor) -> torch.Tensor:
    """Upper Cholesky factor of ``H^-1``; ModelError when H is not positive definite."""
    try:
        return torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    except torch.linalg.LinAlgError:
        raise ModelError("the layer's Hessian is not positive definite even after dampening: raise damp (e.g. 0.1) "
                         "or calibrate on more samples") from None


def _what(config: PruneOneShotConfig) -> str:
    pattern = config.pattern.value if config.pattern is not Pattern.UNSTRUCTURED else f"{round(100 * config.sparsity)}%"
    return f"{config.method.value} {pattern}"


def _entries(module: nn.Module, config: PruneOneShotConfig, targets: list[str]) -> list[CoverageEntry]:
    params = {f"{name}.weight": module.get_submodule(name).weight for name in targets}
    return prune_coverage(module, params, _what(config), config.include, config.exclude, "prune_oneshot")


@register_planner("prune_oneshot")
def plan_prune_oneshot(module: nn.Module, config: PruneOneShotConfig, example: object = None) -> list[CoverageEntry]:
    """The coverage a ``prune_oneshot`` stage will record (nothing runs)."""
    return _entries(module, config, config.targets(module))


def prune_oneshot_(model: Model, config: PruneOneShotConfig, batches: list | None) -> dict[str, float]:
    """Prune ``model.module`` in place; returns each pruned layer's sparsity. ``batches`` are calibration
    batches (``deepsqueeze.core.calibrate.calibration_batches``); magnitude needs none.

    Raises:
        UnsupportedLayerError: no Linear layer matches.
        RecipeError: N:M on a layer whose input width is not a multiple of M.
    """
    config.preflight(model)
    module = model.module
    targets = config.targets(module)
    for name in targets:
        if not isinstance(module.get_submodule(name), nn.Linear):
            as_linear_(module, name)  # GPT-2's Conv1D: the equal Linear, recorded for the loader
    nm = nm_of(config.pattern)
    sparsities: dict[str, float] = {}

    def convert(name: str, layer: nn.Module, hessian: torch.Tensor | None) -> nn.Module:
        assert isinstance(layer, nn.Linear)
        weight = layer.weight.detach()
        if config.method is OneShotMethod.SPARSEGPT:
            assert hessian is not None
            new, mask = sparsegpt_prune(weight.cpu(), hessian, config.sparsity, nm, block_size=config.block_size,
                                        damp=config.damp)
        else:
            mask = (wanda_mask(weight.cpu(), hessian, config.sparsity, nm) if config.method is OneShotMethod.WANDA
                    else magnitude_mask(weight.cpu(), config.sparsity, nm))
            new = weight.cpu() * mask
        with torch.no_grad():
            layer.weight.copy_(new.to(layer.weight.device, layer.weight.dtype))
        sparsities[name] = sparsity_of(mask)
        return layer

    if config.method is OneShotMethod.MAGNITUDE:
        for name in targets:
            convert(name, module.get_submodule(name), None)
    else:
        from deepsqueeze.core.calibrate import layerwise_convert

        if not batches:
            raise RecipeError(f"{config.method.value} calibrates on data: pass --data (e.g. wiki:calib)")
        layerwise_convert(module, targets, batches, convert, sequential=True)
    if config.storage is Storage.SPARSE:
        for name in targets:
            record_encoding(module, f"{name}.weight", "sparse")
    return sparsities


@register_stage(PruneOneShotConfig)
def prune_oneshot_stage(model: Model, config: PruneOneShotConfig, ctx: StageContext) -> None:
    """Apply a ``prune_oneshot`` stage (calibration from ``ctx.data``, never an eval split)."""
    start = time.perf_counter()
    batches = None
    if config.needs_data():
        from deepsqueeze.core.calibrate import calibration_batches

        batches = calibration_batches(model, ctx.data, samples=config.calibration_samples)
    sparsities = prune_oneshot_(model, config, batches)
    entries = _entries(model.module, config, list(sparsities))
    record_coverage(model.module, entries)
    report_coverage(entries, ctx.on_unsupported)
    total = sum(model.module.get_submodule(n).weight.numel() for n in sparsities)
    overall = sum(s * model.module.get_submodule(n).weight.numel() for n, s in sparsities.items()) / total
    ctx.report.append({"stage": "prune_oneshot", "method": config.method.value, "pattern": config.pattern.value,
                       "sparsity": round(overall, 4), "layers": len(sparsities),
                       "calibration_batches": len(batches) if batches else 0,
                       "seconds": round(time.perf_counter() - start, 2)})
