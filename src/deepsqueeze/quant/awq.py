"""AWQ (Lin et al., 2023, "AWQ: Activation-aware Weight Quantization for LLM Compression and Acceleration").

Weight-only quantization that protects the input channels with large activations. For a group of
layers reading the same input ``X`` (query/key/value after a norm, an FFN's gate and up projections,
the FFN output after its up projection), AWQ scales input channel ``j`` of every weight by
``s_j = mean|X_j| ** alpha`` (normalised so ``sqrt(max s * min s) = 1``) and divides the producer of
``X`` (the norm's affine weight, or the producing layer's output rows) by ``s``, which leaves the
float function unchanged. ``alpha`` is chosen on a grid over [0, 1] to minimise the output error of
the round-to-nearest quantized group on calibration inputs (``alpha = 0`` is plain RTN, so the search
never does worse than RTN on the calibration sample). A second search clips each weight group's range
(``[r min, r max]``, ``r`` on a grid down to ``1 - max_shrink``) per output row, again minimising the
output error. The result is quantized by round-to-nearest into the same :class:`PackedIntLinear` codes
RTN and GPTQ produce: AWQ changes which codes are chosen, not the representation.

Scale groups are found by structure (pre-norm decoders: Llama / Mistral / Qwen2 and GPT-2; a layer
whose input comes from a post-norm residual, as in BERT, has no foldable producer and gets only the
clip search). Layers without calibration inputs are left to round-to-nearest.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from deepsqueeze.core.sharing import tied_weight_groups
from deepsqueeze.errors import DataError
from deepsqueeze.primitives import quantize as Q
from deepsqueeze.quant.api import METHODS, register_method, run_calibration, select_layers
from deepsqueeze.quant.config import Method, QuantizeConfig

__all__ = ["ScaleGroup", "awq_method", "awq_scale_", "find_scale_groups", "search_clip", "search_scale"]

# (producer, consumers) inside one block; names relative to the block.
_RULES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),  # Llama, Mistral, Qwen2
    ("self_attn.v_proj", ("self_attn.o_proj",)),  # only where shapes match (not under GQA)
    ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
    ("mlp.up_proj", ("mlp.down_proj",)),
    ("ln_1", ("attn.c_attn",)),  # GPT-2
    ("ln_2", ("mlp.c_fc",)),
)

MAX_ROWS = 2048  # calibration rows kept per layer for the error searches


@dataclass(frozen=True)
class ScaleGroup:
    """Layers ``consumers`` read the output channels of ``producer`` (a norm or a projection)."""

    producer: str
    consumers: tuple[str, ...]


def _is_conv1d(m: nn.Module) -> bool:
    return type(m).__name__ == "Conv1D" and hasattr(m, "nf")


def _weight(m: nn.Module) -> torch.Tensor:
    """The (out x in) float weight of a Linear or transformers Conv1D."""
    return m.weight.detach().t() if _is_conv1d(m) else m.weight.detach()


def _in_features(m: nn.Module) -> int:
    return int(_weight(m).shape[1])


def _out_features(m: nn.Module) -> int | None:
    if isinstance(m, nn.Linear) or _is_conv1d(m):
        return int(_weight(m).shape[0])
    w = getattr(m, "weight", None)
    if isinstance(w, torch.Tensor) and w.dim() == 1 and ("norm" in type(m).__name__.lower()):
        return int(w.numel())
    return None


def find_scale_groups(module: nn.Module, targets: set[str]) -> list[ScaleGroup]:
    """The foldable (producer, consumers) groups of ``module`` whose consumers are all in ``targets``."""
    modules = dict(module.named_modules())
    groups = []
    for name in modules:
        prefix = f"{name}." if name else ""
        for producer, consumers in _RULES:
            p_name, c_names = prefix + producer, tuple(prefix + c for c in consumers)
            p = modules.get(p_name)
            if p is None or not all(c in modules and c in targets for c in c_names):
                continue
            width = _out_features(p)
            if width is None or any(_in_features(modules[c]) != width for c in c_names):
                continue
            groups.append(ScaleGroup(p_name, c_names))
    return groups


def _fake_quant(w: torch.Tensor, bits: int, group_size: int | None, symmetric: bool,
                float_zero: bool = False) -> torch.Tensor:
    """Round-to-nearest at the packed layout's groups, dequantized (rows x in)."""
    gran = Q.PerGroup(group_size) if group_size else Q.PerChannel(0)
    qp = Q.choose_qparams(w, bits, symmetric=symmetric, signed=False, granularity=gran, float_zero=float_zero)
    return Q.dequantize(Q.quantize(w, qp), qp)


def search_scale(x: torch.Tensor, mean_abs: torch.Tensor, weights: list[torch.Tensor], bits: int,
                 group_size: int | None, symmetric: bool, grid: int = 20,
                 float_zero: bool = False) -> tuple[torch.Tensor, float]:
    """AWQ's scale search: ``s = mean_abs ** alpha`` for alpha in ``{0, 1/grid, ..., (grid-1)/grid}``.

    ``x`` (n x in) are calibration inputs, ``weights`` the (out x in) weights reading them. Returns the
    per-input-channel scale (in,) minimising ``sum ||x W^T - x (Q(W diag(s)) diag(1/s))^T||^2`` and the
    chosen alpha.
    """
    x = x.float()
    refs = [x @ w.float().t() for w in weights]
    best: tuple[float, torch.Tensor, float] | None = None
    base = mean_abs.float().clamp_min(1e-8)
    for i in range(grid):
        alpha = i / grid
        s = base.pow(alpha)
        s = s / (s.max() * s.min()).sqrt()
        err = 0.0
        for w, ref in zip(weights, refs, strict=True):
            wq = _fake_quant(w.float() * s, bits, group_size, symmetric, float_zero) / s
            err += float((x @ wq.t() - ref).pow(2).sum())
        if best is None or err < best[0]:
            best = (err, s, alpha)
    if best is None:
        raise ValueError(f"the AWQ grid needs at least one point, got {grid}")
    return best[1], best[2]


def search_clip(x: torch.Tensor, w: torch.Tensor, bits: int, group_size: int | None, symmetric: bool,
                grid: int = 20, max_shrink: float = 0.5, float_zero: bool = False) -> torch.Tensor:
    """AWQ's clip search: per output row and group, the range ``r * [min, max]`` (r from 1 down to
    ``1 - max_shrink``) whose round-to-nearest codes give the least output error on inputs ``x``.
    Returns the clipped weight (out x in); quantizing it by RTN gives the chosen codes."""
    out, cols = w.shape
    g = group_size or cols
    n_groups = cols // g
    wg = w.float().reshape(out, n_groups, g)
    xg = x.float().reshape(-1, n_groups, g)
    w_max, w_min = wg.amax(-1, keepdim=True), wg.amin(-1, keepdim=True)
    if symmetric:
        w_max = torch.maximum(w_max.abs(), w_min.abs())
        w_min = -w_max
    best_err = torch.full((out, n_groups), float("inf"))
    best = wg.clone()
    steps = max(1, int(grid * max_shrink))
    for i in range(steps):
        r = 1 - i / grid
        clipped = torch.minimum(torch.maximum(wg, r * w_min), r * w_max)
        wq = _fake_quant(clipped.reshape(out, cols), bits, g, symmetric, float_zero).reshape(out, n_groups, g)
        err = torch.einsum("ngk,ogk->ogn", xg, wq - wg).pow(2).sum(-1)  # (out, groups)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better.unsqueeze(-1), clipped, best)
    return best.reshape(out, cols)


@torch.no_grad()
def _scale_producer_(p: nn.Module, s: torch.Tensor) -> None:
    """Divide the producer's output channels by ``s``."""
    if _is_conv1d(p):
        p.weight.div_(s.to(p.weight.dtype).unsqueeze(0))
    elif isinstance(p, nn.Linear):
        p.weight.div_(s.to(p.weight.dtype).unsqueeze(1))
    else:
        p.weight.div_(s.to(p.weight.dtype))
    bias = getattr(p, "bias", None)
    if isinstance(bias, torch.Tensor):
        bias.div_(s.to(bias.dtype))


@torch.no_grad()
def _scale_consumer_(c: nn.Module, s: torch.Tensor) -> None:
    """Multiply the consumer's input channels by ``s``."""
    if _is_conv1d(c):
        c.weight.mul_(s.to(c.weight.dtype).unsqueeze(1))
    else:
        c.weight.mul_(s.to(c.weight.dtype).unsqueeze(0))


@torch.no_grad()
def _set_weight_(m: nn.Module, w: torch.Tensor) -> None:
    m.weight.copy_((w.t() if _is_conv1d(m) else w).to(m.weight.dtype))


class _Inputs:
    """Per-layer calibration statistics: mean |x| per input channel and up to MAX_ROWS input rows."""

    def __init__(self) -> None:
        self.abs_sum: torch.Tensor | None = None
        self.count = 0
        self.rows: list[torch.Tensor] = []
        self.kept = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float().cpu()
        self.abs_sum = x.abs().sum(0) if self.abs_sum is None else self.abs_sum + x.abs().sum(0)
        self.count += x.shape[0]
        if self.kept < MAX_ROWS:
            step = max(1, x.shape[0] // 256)  # spread the kept rows over the batch
            take = x[::step][: MAX_ROWS - self.kept]
            self.rows.append(take)
            self.kept += take.shape[0]

    def x(self) -> torch.Tensor:
        return torch.cat(self.rows)

    def mean_abs(self) -> torch.Tensor:
        return self.abs_sum / max(self.count, 1)  # type: ignore[operator]


def awq_scale_(module: nn.Module, batches: list[Any], targets: list[str], *, bits: int = 4,
               group_size: int | None = 128, symmetric: bool = False, grid: int = 20, clip: bool = True,
               float_zero: bool = False) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    """Apply AWQ's scales and clipping to the float weights of ``targets`` in place (function unchanged
    by the scales; clipping changes only what RTN will round). Returns the chosen alpha per group
    (keyed by producer name) and, per clipped layer, its scaled weight before clipping (to restore a
    layer the quantizer then leaves in float). Quantize afterwards by RTN at the same bits and groups.
    """
    modules = dict(module.named_modules())
    stats = {name: _Inputs() for name in targets}
    handles = [modules[name].register_forward_pre_hook(
        lambda _m, args, st=stats[name]: st.add(args[0])) for name in targets]
    run_calibration(module, batches, handles)
    seen = {name for name, st in stats.items() if st.count}
    alphas: dict[str, float] = {}
    for group in find_scale_groups(module, seen):
        st = stats[group.consumers[0]]
        weights = [_weight(modules[c]).float() for c in group.consumers]
        row_group = Q.fitting_group(weights[0].shape[1], group_size)
        s, alpha = search_scale(st.x(), st.mean_abs(), weights, bits, row_group, symmetric, grid, float_zero)
        alphas[group.producer] = alpha
        _scale_producer_(modules[group.producer], s)
        for c in group.consumers:
            _scale_consumer_(modules[c], s)
            stats[c].rows = [r / s for r in stats[c].rows]
    unclipped: dict[str, torch.Tensor] = {}
    if clip:
        for name in sorted(seen):
            m = modules[name]
            w = _weight(m).float()
            unclipped[name] = w.clone()
            _set_weight_(m, search_clip(stats[name].x(), w, bits, Q.fitting_group(w.shape[1], group_size), symmetric,
                                        grid, float_zero=float_zero))
    return alphas, unclipped


@register_method(Method.AWQ)
def awq_method(module: nn.Module, config: QuantizeConfig, batches: list[Any] | None) -> list[str]:
    """The ``awq`` method of the ``quantize`` stage: AWQ scales and clipping on the calibration batches,
    then round-to-nearest into the packed layouts (``bits``, ``group_size``, ``symmetric``; embeddings at
    ``embedding_bits``), exactly as the ``rtn`` method packs them."""
    if not batches:
        raise DataError("quantize method awq calibrates on data: pass calibration batches "
                        "(recipes: --data, e.g. pydoc-sentences:calib)")
    # GPT-2's Conv1D projections are selected as equal nn.Linear layers; a weight tied to an earlier module
    # (GPT-2's lm_head) is left to RTN with that module, so both keep one set of codes
    tied = {name for places in tied_weight_groups(module) for name, _ in places[1:]}
    targets = [name for name, _ in select_layers(module, config, (nn.Linear,)) if name not in tied]
    _, unclipped = awq_scale_(module, batches, targets, bits=config.bits, group_size=config.group_size,
                              symmetric=config.symmetric, grid=config.awq_grid, float_zero=config.float_zero)
    done = METHODS[Method.RTN.value](module, config, batches)
    for name in set(unclipped) - set(done):  # left in float by RTN: undo the clipping (scales are exact)
        _set_weight_(module.get_submodule(name), unclipped[name])
    return done
