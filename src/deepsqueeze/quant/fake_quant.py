"""Fake-quantized modules for quantization-aware training (the ``prepare`` step installs them).

* :class:`WeightFakeQuant`: a weight viewed as rows ``(out, K)`` on an integer grid
  ``(q - z) * s`` with one learned step size ``s`` per output channel or per group of ``K``
  (LSQ, Esser et al. 2020), or binary (XNOR-Net) / ternary (TWN, TTQ) levels.
* :class:`ActFakeQuant`: activations on a learned per-tensor grid (LSQ step or PACT clipping level,
  Choi et al. 2018) with a fixed integer zero point from the observer that initialised it, or the
  dynamic per-token grid of ``Int8Linear``.
* :class:`FakeQuantLinear` / :class:`FakeQuantConv2d`: the float layer with its quantizers; the conv
  optionally carries the BatchNorm that followed it, folded into its weight during training
  (Jacob et al. 2018; Krishnamoorthi 2018, sec. 3.2): until ``bn_frozen`` the batch statistics
  normalise (and update the running ones) while the weight is quantized folded with the running
  statistics; once frozen the folded weight and bias are exactly what the integer conv will hold.

Every fake-quantized value equals what the integer module made by ``convert`` computes with
(:mod:`deepsqueeze.quant.qat`), so the trained model and its integer conversion agree up to the
kernels' own rounding.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from deepsqueeze.primitives import fake_quant as FQ
from deepsqueeze.primitives.observers import Observer

__all__ = ["ActFakeQuant", "FakeQuantConv2d", "FakeQuantLinear", "WeightFakeQuant", "weight_grid"]

LEVELS = ("uniform", "binary", "ternary", "ttq")


def weight_grid(bits: int, symmetric: bool = True, narrow: bool = False) -> tuple[int, int]:
    """Signed code range of ``bits``-bit weights: ``[-2^(b-1), 2^(b-1) - 1]`` (``narrow``: ``[-(2^(b-1) - 1), ...]``,
    what the int8 kernels take) when symmetric, ``[0, 2^b - 1]`` with a zero point otherwise."""
    if symmetric:
        half = 1 << (bits - 1)
        return (-(half - 1) if narrow else -half), half - 1
    return 0, (1 << bits) - 1


class WeightFakeQuant(nn.Module):
    """Fake quantization of weight rows ``(out, K)``; ``scale`` and ``zero_point`` are ``(out, K // group)``.

    ``levels="uniform"``: LSQ on the grid ``[qmin, qmax]`` (:func:`weight_grid`), learned ``scale``,
    fixed ``zero_point`` (0 when symmetric). ``"binary"``: ``sign(w) * mean|w|`` per row.
    ``"ternary"``: TWN ``{-1, 0, 1} * scale`` per row. ``"ttq"``: ``+pos_scale / 0 / -neg_scale`` per row,
    both learned.
    """

    def __init__(self, rows: int, cols: int, bits: int = 8, group_size: int | None = None, symmetric: bool = True,
                 narrow: bool = False, levels: str = "uniform") -> None:
        super().__init__()
        if levels not in LEVELS:
            raise ValueError(f"levels must be one of {LEVELS}, got {levels!r}")
        group = cols if group_size is None else group_size
        if cols % group:
            raise ValueError(f"group size {group} does not divide the {cols} inputs of each row")
        self.rows, self.cols, self.group_size, self.levels = rows, cols, group, levels
        self.bits = {"binary": 1, "ternary": 2, "ttq": 2}.get(levels, bits)
        self.symmetric, self.narrow = symmetric, narrow
        self.qmin, self.qmax = weight_grid(bits, symmetric, narrow) if levels == "uniform" else (-1, 1)
        groups = cols // group
        self.scale = nn.Parameter(torch.ones(rows, groups), requires_grad=levels == "uniform")
        self.register_buffer("zero_point", torch.zeros(rows, groups))
        if levels == "ttq":
            self.pos_scale = nn.Parameter(torch.ones(rows, 1))
            self.neg_scale = nn.Parameter(torch.ones(rows, 1))

    @torch.no_grad()
    def initialize(self, w: torch.Tensor, search: bool = True) -> None:
        """Post-training parameters for ``w``: per row/group, the clipping of ``max|w|`` (or min-max range)
        that minimises the squared rounding error (``search``; 1.0 = plain min-max is among the candidates)."""
        rows = w.detach().float().reshape(self.rows, -1, self.group_size)
        if self.levels == "ttq":
            codes = FQ.ternary_codes(rows.reshape(self.rows, -1))
            a = rows.reshape(self.rows, -1).abs()
            for sign, p in ((1, self.pos_scale), (-1, self.neg_scale)):
                keep = codes == sign
                p.copy_(((a * keep).sum(1) / keep.sum(1).clamp_min(1)).reshape(-1, 1).clamp_min(1e-8))
            return
        if self.levels != "uniform":
            return
        best_err = torch.full(rows.shape[:2], float("inf"))
        for ratio in (torch.linspace(0.3, 1.0, 36) if search else torch.ones(1)):
            scale, zero = self._range_params(rows, float(ratio))
            q = torch.clamp(torch.round(rows / scale[..., None]) + zero[..., None], self.qmin, self.qmax)
            err = ((q - zero[..., None]) * scale[..., None] - rows).pow(2).sum(-1)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            self.scale.data = torch.where(better, scale, self.scale.data)
            self.zero_point.copy_(torch.where(better, zero, self.zero_point))

    def _range_params(self, rows: torch.Tensor, ratio: float) -> tuple[torch.Tensor, torch.Tensor]:
        if self.symmetric:
            amax = rows.abs().amax(-1) * ratio
            return torch.where(amax > 0, amax / self.qmax, torch.ones_like(amax)), torch.zeros_like(amax)
        lo, hi = rows.amin(-1).clamp(max=0) * ratio, rows.amax(-1).clamp(min=0) * ratio
        span = hi - lo
        scale = torch.where(span > 0, span / (self.qmax - self.qmin), torch.ones_like(span))
        return scale, torch.clamp(torch.round(self.qmin - lo / scale), self.qmin, self.qmax)

    def set_params(self, scale: torch.Tensor, zero_point: torch.Tensor) -> None:
        """Set the grid (e.g. GPTQ's group scales and zero points, in this grid's code convention)."""
        with torch.no_grad():
            self.scale.copy_(scale.reshape(self.scale.shape).float())
            self.zero_point.copy_(zero_point.reshape(self.zero_point.shape).float())

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        rows = w.reshape(self.rows, self.cols)
        if self.levels == "binary":
            out = FQ.binary_ste(rows)
        elif self.levels == "ternary":
            out = FQ.ternary_ste(rows)
        elif self.levels == "ttq":
            out = FQ.ternary_ste(rows, self.pos_scale.abs(), self.neg_scale.abs())
        else:
            g = FQ.lsq_grad_scale(self.group_size, self.qmax)
            grouped = rows.reshape(self.rows, -1, self.group_size)
            scale = self.scale.abs().clamp_min(1e-8)[..., None]
            out = FQ.lsq_fake_quantize(grouped, scale, self.qmin, self.qmax, self.zero_point[..., None], g)
        return out.reshape(w.shape)

    @torch.no_grad()
    def codes(self, w: torch.Tensor) -> torch.Tensor:
        """The integer codes (rows, K) of ``w`` on this grid (binary: 0/1, ternary: -1/0/1)."""
        rows = w.detach().float().reshape(self.rows, self.cols)
        if self.levels == "binary":
            return (rows >= 0).to(torch.int32)
        if self.levels in ("ternary", "ttq"):
            return FQ.ternary_codes(rows).to(torch.int32)
        grouped = rows.reshape(self.rows, -1, self.group_size)
        scale = self.scale.abs().clamp_min(1e-8)[..., None]
        z = self.zero_point[..., None]
        q = torch.round(torch.clamp(grouped / scale, self.qmin - z, self.qmax - z)) + z
        return q.reshape(self.rows, self.cols).to(torch.int32)

    @torch.no_grad()
    def row_scale(self, w: torch.Tensor) -> torch.Tensor:
        """(rows, groups) scales as the forward pass uses them (binary / TWN: computed from ``w``)."""
        rows = w.detach().float().reshape(self.rows, self.cols)
        if self.levels == "binary":
            return rows.abs().mean(1, keepdim=True)
        if self.levels == "ternary":
            keep = FQ.ternary_codes(rows) != 0
            return ((rows.abs() * keep).sum(1) / keep.sum(1).clamp_min(1)).reshape(-1, 1)
        return self.scale.detach().abs().clamp_min(1e-8)

    def extra_repr(self) -> str:
        return f"{self.rows}x{self.cols}, bits={self.bits}, group={self.group_size}, levels={self.levels}"


class ActFakeQuant(nn.Module):
    """Activation fake quantization on ``[0, qmax]`` codes with zero point ``z`` (uint8 convention).

    ``mode="lsq"``: learned step ``scale``; ``"pact"``: learned clipping level ``alpha`` with
    ``scale = alpha / (qmax - z)``; ``"per_token"``: dynamic symmetric codes per row (nothing learned).
    Until :meth:`initialize` runs, an observer may watch the inputs (``observer`` attribute).
    """

    def __init__(self, bits: int = 8, mode: str = "lsq") -> None:
        super().__init__()
        if mode not in ("lsq", "pact", "per_token"):
            raise ValueError(f"activation mode must be lsq, pact or per_token, got {mode!r}")
        self.bits, self.mode, self.qmax = bits, mode, (1 << bits) - 1
        self.scale = nn.Parameter(torch.ones(()), requires_grad=mode == "lsq")
        self.alpha = nn.Parameter(torch.ones(()), requires_grad=mode == "pact")
        self.register_buffer("zero_point", torch.zeros(()))
        self.observer: Observer | None = None
        self.enabled = True

    @torch.no_grad()
    def initialize(self, scale: float, zero_point: float) -> None:
        """Start from a post-training range (an observer's scale and zero point on ``[0, qmax]``)."""
        self.scale.fill_(scale)
        self.zero_point.fill_(zero_point)
        self.alpha.fill_(scale * (self.qmax - zero_point))
        self.observer = None

    def qparams(self) -> tuple[float, float]:
        """(scale, zero point) of the grid, as the integer modules store them."""
        return float(self.current_scale().detach()), float(self.zero_point)

    def current_scale(self) -> torch.Tensor:
        if self.mode == "pact":
            return self.alpha.abs().clamp_min(1e-8) / (self.qmax - self.zero_point)
        return self.scale.abs().clamp_min(1e-8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observer is not None:
            self.observer.update(x)
            return x
        if not self.enabled:
            return x
        if self.mode == "per_token":
            return FQ.dynamic_per_token_fake_quantize(x, self.bits)
        z = float(self.zero_point)
        if self.mode == "pact":
            return FQ.pact_fake_quantize(x, self.alpha.abs().clamp_min(1e-8), self.qmax, z)
        g = FQ.lsq_grad_scale(x[0].numel() if x.dim() > 1 else x.numel(), self.qmax)
        return FQ.lsq_fake_quantize(x, self.current_scale(), 0, self.qmax, self.zero_point, g)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, mode={self.mode}"


class FakeQuantLinear(nn.Module):
    """``F.linear(act(x), wq(weight), bias)``: a Linear during QAT (``input_quant`` None: weight-only)."""

    def __init__(self, linear: nn.Linear, weight_quant: WeightFakeQuant, input_quant: ActFakeQuant | None) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self.weight_quant = weight_quant
        self.input_quant = input_quant

    def folded(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.weight, self.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_quant is not None:
            x = self.input_quant(x)
        return F.linear(x, self.weight_quant(self.weight), self.bias)


class FakeQuantConv2d(nn.Module):
    """A Conv2d during QAT, with the BatchNorm that followed it folded in (``bn``) and the ReLU fused (``relu``).

    ``output_quant`` fake-quantizes the output as the integer conv requantizes it (static activations);
    ``bn_frozen`` switches from batch statistics to the folded running statistics for good.
    """

    def __init__(self, conv: nn.Conv2d, weight_quant: WeightFakeQuant, input_quant: ActFakeQuant | None,
                 bn: nn.BatchNorm2d | None = None, relu: bool = False, output_quant: ActFakeQuant | None = None
                 ) -> None:
        super().__init__()
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.kernel_size, self.stride = tuple(conv.kernel_size), tuple(conv.stride)
        self.padding, self.dilation, self.groups = conv.padding, tuple(conv.dilation), conv.groups
        self.weight = conv.weight
        self.bias = conv.bias
        self.bn = bn
        self.relu = relu
        self.bn_frozen = False
        self.weight_quant = weight_quant
        self.input_quant = input_quant
        self.output_quant = output_quant

    def _bn_factor(self) -> torch.Tensor:
        bn = self.bn
        assert bn is not None and bn.running_var is not None
        gamma = bn.weight if bn.affine else torch.ones_like(bn.running_var)
        return gamma / torch.sqrt(bn.running_var + bn.eps)

    def folded(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Weight and bias with the BatchNorm's running statistics folded in (what the integer conv holds)."""
        if self.bn is None:
            return self.weight, self.bias
        bn = self.bn
        assert bn.running_mean is not None
        factor = self._bn_factor()
        bias = self.bias if self.bias is not None else torch.zeros_like(bn.running_mean)
        shift = bn.bias if bn.affine else torch.zeros_like(bn.running_mean)
        return self.weight * factor.reshape(-1, 1, 1, 1), (bias - bn.running_mean) * factor + shift

    def _conv(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        return F.conv2d(x, w, b, self.stride, self.padding, self.dilation, self.groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_quant is not None:
            x = self.input_quant(x)
        if self.bn is not None and self.training and not self.bn_frozen:
            # a channel whose BatchNorm scale is 0 outputs its shift whatever the conv: fold 1 there, not 0,
            # so the division that recovers the conv output for the batch statistics stays finite
            factor = self._bn_factor()
            factor = torch.where(factor.abs() < 1e-12, torch.ones_like(factor), factor).reshape(1, -1, 1, 1)
            y = self._conv(x, self.weight_quant(self.weight * factor.reshape(-1, 1, 1, 1)), None) / factor
            if self.bias is not None:
                y = y + self.bias.reshape(1, -1, 1, 1)
            y = self.bn(y)  # batch statistics; updates the running ones
        else:
            w, b = self.folded()
            y = self._conv(x, self.weight_quant(w), b)
        if self.relu:
            y = torch.relu(y)
        if self.output_quant is not None:
            y = self.output_quant(y)
        return y

    def freeze_bn(self) -> None:
        """Use the running statistics from now on (Krishnamoorthi 2018: freeze after a few epochs)."""
        self.bn_frozen = True
        if self.bn is not None:
            self.bn.eval()

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"bn={'folded' if self.bn is not None else 'none'}, relu={self.relu}")


def fake_quant_modules(module: nn.Module) -> list[tuple[str, Any]]:
    """(name, module) of every FakeQuantLinear / FakeQuantConv2d in ``module``."""
    return [(n, m) for n, m in module.named_modules() if isinstance(m, (FakeQuantLinear, FakeQuantConv2d))]
