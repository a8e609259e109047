"""GPTQ (Frantar et al., 2022): weight-only quantization that corrects rounding error column by column.

For a Linear layer with weight ``W`` (out x in) and calibration inputs ``X``, GPTQ minimises the
layer-output error ``||W X - Q X||^2`` one input column at a time: each column is rounded, and its
rounding error is spread over the columns not yet quantized through the inverse Hessian
``H = 2 X X^T / n`` (the closed-form Optimal Brain Quantization update). Two tricks make it fast:
the inverse Hessian rows needed are read from one upper Cholesky factor, and updates are applied
lazily in blocks of columns.

This module holds the pure algorithm (``gptq_quantize``: weight + Hessian -> integer codes and
group parameters) and the Hessian accumulation. Which quantizer rounds a column (bits, symmetric or
not) comes from ``deepsqueeze.primitives.quantize``; the model-level driver is :func:`gptq_model_`, and
the ``gptq`` method of the ``quantize`` stage installs its output as :class:`PackedIntLinear` modules, the
same packed representation round-to-nearest produces.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from deepsqueeze.core.calibrate import as_calib_batches, layerwise_convert
from deepsqueeze.core.sharing import tied_weight_groups
from deepsqueeze.core.walker import iter_modules
from deepsqueeze.errors import DataError, ModelError, UnsupportedLayerError
from deepsqueeze.primitives import quantize as Q
from deepsqueeze.primitives.kquant import SUPER_BLOCK, KGrid, kquant_qparams
from deepsqueeze.quant.api import METHODS, install, register_method, select_layers
from deepsqueeze.quant.config import Method, QuantizeConfig
from deepsqueeze.quant.gguf_types import TensorGrid, tensor_grids
from deepsqueeze.runtime import PackedIntLinear

# (weights of one group, or of one span of groups: rows x n) -> (scale, zero_point), each (rows,) or (rows, groups)
ParamsFn = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
# (one column: rows, scale, zero_point) -> integer codes (rows,)
QuantFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
# (codes, scale, zero_point) -> reconstructed values (rows,)
DequantFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class ColumnQuantizer:
    """How GPTQ rounds: group parameters from weights, then quantize / dequantize one column. ``span``: the
    columns whose groups' parameters are chosen together (a k-quant super-block of 256), None for one group."""

    params: ParamsFn
    quantize: QuantFn
    dequantize: DequantFn
    span: int | None = None


@dataclass
class GPTQResult:
    """Integer codes in the layer's natural column order plus one (scale, zero_point) per row and group."""

    codes: torch.Tensor  # (out, in) integer codes
    scale: torch.Tensor  # (out, n_groups)
    zero_point: torch.Tensor  # (out, n_groups)
    group_size: int

    def dequantize(self, dequant: DequantFn) -> torch.Tensor:
        """The reconstructed float weight (out x in)."""
        group_of = torch.arange(self.codes.shape[1]) // self.group_size
        return dequant(self.codes, self.scale[:, group_of], self.zero_point[:, group_of])


def affine_column_quantizer(bits: int, symmetric: bool = False, float_zero: bool = False) -> ColumnQuantizer:
    """Min-max affine codes (unsigned; integer zero point, or float with ``float_zero``) from
    ``deepsqueeze.primitives.quantize``.

    The same parameters and rounding as round-to-nearest, so GPTQ and RTN output pack identically.
    """

    def params(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        qp = Q.choose_qparams(w, bits, symmetric=symmetric, signed=False, granularity=Q.PerChannel(0),
                              float_zero=float_zero)
        return qp.scale, qp.zero_point

    def quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        return Q.quantize(w, Q.QParams(scale.float(), zero, bits, False, Q.PerTensor()))

    def dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        return Q.dequantize(q, Q.QParams(scale.float(), zero, bits, False, Q.PerTensor()))

    return ColumnQuantizer(params, quantize, dequantize)


def kquant_column_quantizer(grid: KGrid) -> ColumnQuantizer:
    """Codes on llama.cpp's k-quant ``grid`` (:mod:`deepsqueeze.primitives.kquant`): each super-block's scales
    and minimums are chosen together from its current weights when GPTQ first reaches one of its columns."""
    affine = affine_column_quantizer(grid.bits, grid.symmetric, not grid.symmetric)
    return ColumnQuantizer(lambda w: kquant_qparams(w, grid), affine.quantize, affine.dequantize, SUPER_BLOCK)


def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    quantizer: ColumnQuantizer,
    group_size: int | None = None,
    *,
    act_order: bool = False,
    damp: float = 0.01,
    block_size: int = 128,
) -> GPTQResult:
    """Quantize ``weight`` (out x in) with GPTQ given the input Hessian (in x in).

    ``group_size`` None means one group per row (per-channel). ``act_order`` processes columns by
    decreasing Hessian diagonal (largest activations first); group parameters still belong to the
    natural, contiguous groups of ``group_size`` input columns, each computed from that group's
    current (error-compensated) weights when its first column is reached, so the result packs like
    round-to-nearest output. ``damp`` is added to the diagonal as a fraction of its mean. A weight that is
    exactly zero (pruned) stays exactly zero: it is rounded to the zero point's code and its whole value
    counts as error for the columns after it, as in SparseGPT's joint sparsification and quantization.
    """
    rows, cols = weight.shape
    if hessian.shape != (cols, cols):
        raise ModelError(f"Hessian of shape {tuple(hessian.shape)} does not fit a weight with {cols} input columns")
    group = cols if group_size is None else int(group_size)
    if group <= 0 or cols % group:
        raise ModelError(f"group size {group} does not divide the {cols} input columns: choose a divisor of {cols}")
    dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
    W = weight.detach().to(dtype).clone()
    H = hessian.detach().to(dtype).clone()

    dead = torch.diagonal(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0

    perm = torch.argsort(torch.diagonal(H), descending=True, stable=True) if act_order else torch.arange(cols)
    W = W[:, perm]
    pruned = W == 0
    H = H[perm][:, perm]
    H.diagonal().add_(damp * torch.diagonal(H).mean())
    U = _inverse_hessian_factor(H)  # upper Cholesky factor of H^-1: row i holds the OBQ update of column i

    n_groups = cols // group
    per = 1 if quantizer.span is None else quantizer.span // group
    if per < 1 or quantizer.span is not None and (quantizer.span % group or cols % quantizer.span):
        raise ModelError(f"parameters chosen over {quantizer.span} columns do not fit groups of {group} in "
                         f"{cols} columns")
    scale = torch.zeros(rows, n_groups, dtype=dtype)
    zero: torch.Tensor | None = None  # dtype follows the quantizer (integer zero points for affine codes)
    done = torch.zeros(n_groups, dtype=torch.bool)
    codes = torch.zeros(rows, cols, dtype=torch.int32)
    group_of = perm // group  # group of each permuted column
    position = torch.empty(cols, dtype=torch.long)  # permuted position of each natural column
    position[perm] = torch.arange(cols)

    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        W1 = W[:, i1:i2].clone()
        E1 = torch.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            g = int(group_of[i1 + i])
            if not done[g]:  # the parameters of g's span (its group, or every group of its super-block)
                first = g - g % per
                members = position[first * group : (first + per) * group]
                current = _current_columns(W, W1, E1, U, i1, i2, i, members)
                s, z = quantizer.params(current.masked_fill(pruned[:, members], 0.0))
                if zero is None:
                    zero = torch.zeros(rows, n_groups, dtype=z.dtype)
                scale[:, first : first + per] = s.reshape(rows, per).to(dtype)
                zero[:, first : first + per] = z.reshape(rows, per)
                done[first : first + per] = True
            w = W1[:, i]
            q = quantizer.quantize(w.masked_fill(pruned[:, i1 + i], 0.0), scale[:, g], zero[:, g])
            codes[:, i1 + i] = q.to(torch.int32)
            err = (w - quantizer.dequantize(q, scale[:, g], zero[:, g]).to(dtype)) / U1[i, i]
            W1[:, i:].sub_(err.unsqueeze(1) * U1[i, i:].unsqueeze(0))
            E1[:, i] = err
        W[:, i2:].sub_(E1 @ U[i1:i2, i2:])

    natural = torch.empty_like(codes)
    natural[:, perm] = codes
    if zero is None:
        raise ModelError("cannot quantize a weight with no input columns")
    return GPTQResult(natural, scale, zero, group)


def _inverse_hessian_factor(H: torch.Tensor) -> torch.Tensor:
    """Upper Cholesky factor of ``H^-1``; raises a ModelError when H is not positive definite."""
    try:
        L = torch.linalg.cholesky(H)
        Hinv = torch.cholesky_inverse(L)
        return torch.linalg.cholesky(Hinv, upper=True)
    except torch.linalg.LinAlgError:
        raise ModelError(
            "the layer's Hessian is not positive definite even after dampening: raise damp (e.g. 0.1) "
            "or calibrate on more samples"
        ) from None


def _current_columns(W: torch.Tensor, W1: torch.Tensor, E1: torch.Tensor, U: torch.Tensor,
                     i1: int, i2: int, i: int, members: torch.Tensor) -> torch.Tensor:
    """Current (error-compensated) values of permuted columns ``members``, all not yet quantized.

    Columns inside the current block are up to date in ``W1``; columns after it still owe the lazy
    update of the block's first ``i`` errors, which is applied here on the fly.
    """
    out = torch.empty(W.shape[0], len(members), dtype=W.dtype)
    inside = members < i2
    if inside.any():
        out[:, inside] = W1[:, members[inside] - i1]
    outside = ~inside
    if outside.any():
        cols = members[outside]
        out[:, outside] = W[:, cols] - E1[:, :i] @ U[i1 : i1 + i, cols]
    return out


# (layer name, original Linear, GPTQ result, bits) -> the module that replaces the layer
LayerBuilder = Callable[[str, nn.Linear, GPTQResult, int], nn.Module]


def packed_linear(name: str, layer: nn.Linear, result: GPTQResult, bits: int) -> PackedIntLinear:
    """The product builder: GPTQ's codes and group parameters in a :class:`PackedIntLinear`."""
    out = PackedIntLinear(layer.in_features, layer.out_features, bits, result.group_size, layer.bias is not None,
                          float_zero=result.zero_point.is_floating_point())
    out.set_codes(result.codes, result.scale, result.zero_point)
    if layer.bias is not None:
        out.bias.copy_(layer.bias.detach().float())
    return out.to(layer.weight.device)


def dequantized_linear(name: str, layer: nn.Linear, result: GPTQResult, bits: int) -> nn.Linear:
    """Simulation builder: a float Linear holding the dequantized GPTQ weight (for experiments)."""
    out = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None)
    with torch.no_grad():
        float_zero = result.zero_point.is_floating_point()
        out.weight.copy_(result.dequantize(affine_column_quantizer(bits, float_zero=float_zero).dequantize)
                         .to(layer.weight.dtype))
        if layer.bias is not None:
            out.bias.copy_(layer.bias)
    return out.to(layer.weight.device)


def gptq_model_(module: nn.Module, batches: list[Any], *, bits: int | dict[str, int] = 4,
                group_size: int | None = 64, symmetric: bool = False, act_order: bool = False,
                damp: float = 0.01, block_size: int = 128, sequential: bool = True,
                targets: list[str] | None = None, build: LayerBuilder = packed_linear,
                progress: Callable[[str], None] | None = None, float_zero: bool = False,
                grids: dict[str, TensorGrid | None] | None = None) -> dict[str, GPTQResult]:
    """Quantize the Linear layers ``targets`` (default: all) of ``module`` in place with GPTQ.

    ``batches`` are calibration inputs (tensors, tuples, kwargs dicts or ``CalibBatch``) from the
    calibration split. ``bits`` may be one width or a per-layer dict (mixed precision); a layer whose
    inputs ``group_size`` does not divide falls back to one group per row. ``sequential`` calibrates
    every layer on the outputs of the already-quantized layers before it (block by block for
    transformers). ``build`` turns a result into the replacement module: :func:`packed_linear` (the
    product) or :func:`dequantized_linear` (simulation). ``grids`` (from :func:`~deepsqueeze.quant.gguf_types.
    tensor_grids`) replace bits, groups and zero points per layer with llama.cpp's tensor types. Returns the
    results by layer name.
    """
    if targets is None:
        targets = [n for n, _ in iter_modules(module, types=nn.Linear)]
    results: dict[str, GPTQResult] = {}

    def convert(name: str, layer: nn.Module, hessian: torch.Tensor) -> nn.Module:
        if not isinstance(layer, nn.Linear):
            raise UnsupportedLayerError(f"{name} is a {type(layer).__name__}: GPTQ quantizes nn.Linear layers only")
        grid = None if grids is None else grids[name]
        if grid is not None:
            b, group = grid.bits, grid.group
            quantizer = (affine_column_quantizer(b, grid.symmetric, grid.float_zero) if grid.kgrid is None
                         else kquant_column_quantizer(grid.kgrid))
        else:
            b = bits[name] if isinstance(bits, dict) else bits
            group = Q.fitting_group(layer.in_features, group_size)
            quantizer = affine_column_quantizer(b, symmetric, float_zero)
        result = gptq_quantize(layer.weight.detach().cpu(), hessian, quantizer, group,
                               act_order=act_order, damp=damp, block_size=block_size)
        results[name] = result
        return build(name, layer, result, b)

    layerwise_convert(module, list(targets), as_calib_batches(batches), convert, sequential=sequential,
                      progress=progress)
    return results


@register_method(Method.GPTQ)
def gptq_method(module: nn.Module, config: QuantizeConfig, batches: list[Any] | None) -> list[str]:
    """The ``gptq`` method of the ``quantize`` stage: GPTQ for Linear layers, round-to-nearest for the rest.

    Linear layers become :class:`PackedIntLinear` (``bits``, ``group_size``, ``symmetric``, ``damp``,
    ``act_order``); Conv2d layers and embedding tables (``embedding_bits``) get the same packed
    layouts by round-to-nearest, since GPTQ's Hessian is defined here for Linear inputs only.
    """
    if not batches:
        raise DataError("quantize method gptq calibrates on data: pass calibration batches "
                        "(recipes: --data, e.g. pydoc-sentences:calib or fashion-mnist)")
    tied = {name for places in tied_weight_groups(module) for name, _ in places[1:]}
    # a weight tied to an earlier module (GPT-2's lm_head) is rounded by RTN below, as that module is,
    # so both share one set of codes
    targets = [name for name, _ in select_layers(module, config, (nn.Linear,)) if name not in tied]
    grids = None if config.gguf_type is None else tensor_grids(module, config.gguf_type)
    if grids is not None:  # a layer no GGUF type holds is left to round-to-nearest, which reports it
        targets = [name for name in targets if grids.get(name) is not None]
    gptq_model_(module, batches, bits={n: config.bits_for(n) for n in targets}, group_size=config.group_size,
                symmetric=config.symmetric, act_order=config.act_order, damp=config.damp, targets=targets,
                float_zero=config.float_zero, grids=grids)
    for name in targets:
        install(module, name, module.get_submodule(name))
    return targets + METHODS[Method.RTN.value](module, config, batches)
