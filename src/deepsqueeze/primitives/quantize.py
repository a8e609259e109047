"""Uniform affine quantization and its non-uniform cousins, as pure functions on tensors.

The model: ``x ~= (q - zero_point) * scale`` with integer codes ``q`` in ``[qmin, qmax]``.

* ``bits``: 2..8 or 16. ``signed=True`` gives codes in ``[-2^(b-1), 2^(b-1)-1]``, else ``[0, 2^b-1]``.
* ``symmetric=True``: ``scale = max|x| / (2^(b-1)-1)`` and the zero point is the middle of the range
  (0 for signed codes, ``2^(b-1)`` for unsigned ones), so ``-max|x|`` and ``+max|x|`` are both exact.
* ``symmetric=False``: the range ``[min(x, 0), max(x, 0)]`` maps onto ``[qmin, qmax]`` with an integer
  zero point, so 0.0 is always exactly representable (zero padding, ReLU outputs, pruned weights).
* Granularity (where one scale applies): ``PerTensor()``, ``PerChannel(axis)`` (one scale per index
  of ``axis``; ``axis=0`` is per output channel of ``Linear.weight``/``Conv2d.weight``),
  ``PerGroup(size)`` (one scale per ``size`` consecutive elements of the last dimension, e.g. per 64
  input features of a weight row).

Scales have the shape ``()`` (per tensor), ``(C,)`` (per channel) or ``x.shape[:-1] + (G,)`` (per group);
zero points have the same shape and an integer dtype. Degenerate ranges (an all-zero slice) get
``scale = 1`` so nothing divides by zero and the slice round-trips exactly; NaN or Inf raise
:class:`~deepsqueeze.errors.ModelError`.

Non-uniform: :func:`quantize_pow2` (power-of-two levels), :func:`binarize` (XNOR-Net: sign times the
per-channel mean of ``|w|``) and :func:`ternarize` (Ternary Weight Networks: threshold ``0.7 mean|w|``).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

import torch

from deepsqueeze.errors import ModelError

__all__ = [
    "fitting_group",
    "Granularity",
    "PerChannel",
    "PerGroup",
    "PerTensor",
    "QParams",
    "Rounding",
    "binarize",
    "check_finite",
    "choose_qparams",
    "code_dtype",
    "dequantize",
    "dequantize_per_channel",
    "dequantize_pow2",
    "fake_quantize",
    "qparams_from_range",
    "qrange",
    "quantize",
    "quantize_pow2",
    "sqnr_db",
    "ternarize",
]

SUPPORTED_BITS = (2, 3, 4, 5, 6, 7, 8, 16)


@dataclass(frozen=True)
class PerTensor:
    """One scale for the whole tensor."""


@dataclass(frozen=True)
class PerChannel:
    """One scale per index along ``axis`` (``axis=0``: per output channel of a Linear/Conv weight)."""

    axis: int = 0


@dataclass(frozen=True)
class PerGroup:
    """One scale per ``size`` consecutive elements of the last dimension (weight rows: input features)."""

    size: int

    def __post_init__(self) -> None:
        if self.size < 1:
            raise ValueError(f"PerGroup size must be >= 1, got {self.size}")


Granularity = PerTensor | PerChannel | PerGroup


class Rounding(StrEnum):
    NEAREST = "nearest"  # round half to even (torch.round)
    FLOOR = "floor"
    STOCHASTIC = "stochastic"  # floor(v + u), u ~ U[0, 1): unbiased in expectation


@dataclass(frozen=True)
class QParams:
    """Scale and zero point plus the integer format they were chosen for."""

    scale: torch.Tensor
    zero_point: torch.Tensor
    bits: int
    signed: bool
    granularity: Granularity

    @property
    def qmin(self) -> int:
        return qrange(self.bits, self.signed)[0]

    @property
    def qmax(self) -> int:
        return qrange(self.bits, self.signed)[1]


def fitting_group(row: int, group: int | None) -> int | None:
    """The group size a weight row of ``row`` elements is quantized with when ``group`` is asked for:
    ``group`` where it divides the row, else the largest divisor of the row between ``group / 2`` and
    ``group`` (multiples of 32 first: the packed kernels' block), else ``None`` (one scale per row). SmolLM2's
    576-wide rows asked for group 128 get 96, not a single scale per row."""
    if group is None or row <= 0:
        return None
    if row % group == 0:
        return group
    fits = [d for d in range(group, (group + 1) // 2 - 1, -1) if d > 0 and row % d == 0]
    aligned = [d for d in fits if d % 32 == 0]
    return (aligned or fits or [None])[0]


def _check_bits(bits: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits}")


def qrange(bits: int, signed: bool) -> tuple[int, int]:
    """The integer code range of a ``bits``-wide signed or unsigned format."""
    _check_bits(bits)
    if signed:
        return -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    return 0, (1 << bits) - 1


def code_dtype(bits: int, signed: bool) -> torch.dtype:
    """The smallest torch integer dtype that holds the codes."""
    _check_bits(bits)
    if bits <= 8:
        return torch.int8 if signed else torch.uint8
    return torch.int16 if signed else torch.int32


def check_finite(x: torch.Tensor, what: str = "tensor") -> None:
    """Raise ModelError if ``x`` holds NaN or Inf (quantizing them would silently corrupt the model)."""
    if x.is_floating_point() and not bool(torch.isfinite(x).all()):
        raise ModelError(f"cannot quantize {what}: it holds NaN or Inf values; fix the weights or inputs first")


def _normalize_axis(axis: int, ndim: int) -> int:
    if not -ndim <= axis < ndim:
        raise ValueError(f"PerChannel axis {axis} is out of range for a {ndim}-D tensor")
    return axis % ndim


def _reduce_minmax(x: torch.Tensor, granularity: Granularity) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-slice min and max in the canonical parameter shape of ``granularity``."""
    if x.numel() == 0:
        raise ValueError("cannot choose quantization parameters for an empty tensor")
    if isinstance(granularity, PerTensor):
        return x.min(), x.max()
    if isinstance(granularity, PerChannel):
        axis = _normalize_axis(granularity.axis, x.dim())
        flat = x.movedim(axis, 0).reshape(x.shape[axis], -1)
        return flat.amin(1), flat.amax(1)
    if isinstance(granularity, PerGroup):
        grouped = _grouped(x, granularity.size)
        return grouped.amin(-1), grouped.amax(-1)
    raise TypeError(f"unknown granularity {granularity!r}")


def _grouped(x: torch.Tensor, size: int) -> torch.Tensor:
    if x.dim() == 0 or x.shape[-1] % size:
        raise ValueError(
            f"PerGroup({size}) needs the last dimension to be a multiple of {size}, got shape {tuple(x.shape)}: "
            "choose a group size that divides it"
        )
    return x.reshape(*x.shape[:-1], x.shape[-1] // size, size)


def _expand(param: torch.Tensor, shape: torch.Size, granularity: Granularity) -> torch.Tensor:
    """Broadcast a canonical-shape parameter against a tensor of ``shape``."""
    if isinstance(granularity, PerTensor):
        return param
    if isinstance(granularity, PerChannel):
        axis = _normalize_axis(granularity.axis, len(shape))
        view = [1] * len(shape)
        view[axis] = shape[axis]
        return param.reshape(view)
    return param.repeat_interleave(granularity.size, dim=-1)


def qparams_from_range(min_val: torch.Tensor, max_val: torch.Tensor, bits: int = 8, symmetric: bool = True,
                       signed: bool = True, granularity: Granularity = PerTensor(),
                       float_zero: bool = False) -> QParams:
    """Scale and zero point that map ``[min_val, max_val]`` (widened to include 0) onto the code range.

    ``min_val``/``max_val`` are in the canonical shape of ``granularity`` (observers produce them).
    ``float_zero`` (asymmetric only): the zero point is a float32 ``qmin - min / scale`` and the range is
    not widened to 0, so the codes span exactly ``[min, max]`` (llama.cpp's Q4_1 / Q5_1 "scale and min",
    HQQ's float zero); 0 is then not exactly representable (a pruned weight is not kept at zero).
    """
    qmin, qmax = qrange(bits, signed)
    min_val = torch.as_tensor(min_val, dtype=torch.float32)
    max_val = torch.as_tensor(max_val, dtype=torch.float32)
    check_finite(min_val, "a range"), check_finite(max_val, "a range")
    one = torch.ones((), dtype=torch.float32)
    zp_dtype = torch.int32
    if symmetric:
        half = (qmax - qmin) // 2  # 127 for 8 bits: codes -127..127 around the middle
        amax = torch.maximum(min_val.abs(), max_val.abs())
        scale = torch.where(amax > 0, amax / half, one)
        mid = (qmin + qmax + 1) // 2  # 0 signed, 2^(b-1) unsigned
        zero_point = torch.full_like(scale, mid, dtype=zp_dtype)
    elif float_zero:
        span = max_val - min_val
        scale = torch.where(span > 0, span / (qmax - qmin), torch.where(min_val.abs() > 0, min_val.abs(), one))
        zero_point = qmin - min_val / scale
    else:
        lo = torch.clamp(min_val, max=0.0)
        hi = torch.clamp(max_val, min=0.0)
        span = hi - lo
        scale = torch.where(span > 0, span / (qmax - qmin), one)
        zero_point = torch.clamp(torch.round(qmin - lo / scale), qmin, qmax).to(zp_dtype)
    return QParams(scale, zero_point, bits, signed, granularity)


def choose_qparams(x: torch.Tensor, bits: int = 8, symmetric: bool = True, signed: bool = True,
                   granularity: Granularity = PerTensor(), float_zero: bool = False) -> QParams:
    """Min-max quantization parameters for ``x`` at the given format and granularity (``float_zero``: see
    :func:`qparams_from_range`)."""
    check_finite(x)
    lo, hi = _reduce_minmax(x.detach().float(), granularity)
    return qparams_from_range(lo, hi, bits, symmetric, signed, granularity, float_zero and not symmetric)


def _round(v: torch.Tensor, rounding: Rounding | str, generator: torch.Generator | None) -> torch.Tensor:
    rounding = Rounding(rounding)
    if rounding is Rounding.NEAREST:
        return torch.round(v)
    if rounding is Rounding.FLOOR:
        return torch.floor(v)
    noise = torch.rand(v.shape, generator=generator, dtype=v.dtype, device=v.device)
    return torch.floor(v + noise)


def quantize(x: torch.Tensor, qparams: QParams, rounding: Rounding | str = Rounding.NEAREST,
             generator: torch.Generator | None = None) -> torch.Tensor:
    """Integer codes of ``x`` (dtype from :func:`code_dtype`), clamped to the code range."""
    check_finite(x)
    scale = _expand(qparams.scale, x.shape, qparams.granularity)
    zero_point = _expand(qparams.zero_point, x.shape, qparams.granularity)
    if zero_point.is_floating_point():
        v = _round(x.float() / scale + zero_point, rounding, generator)
    else:
        v = _round(x.float() / scale, rounding, generator) + zero_point
    return v.clamp_(qparams.qmin, qparams.qmax).to(code_dtype(qparams.bits, qparams.signed))


def dequantize(q: torch.Tensor, qparams: QParams) -> torch.Tensor:
    """Float32 values ``(q - zero_point) * scale``."""
    scale = _expand(qparams.scale, q.shape, qparams.granularity)
    zero_point = _expand(qparams.zero_point, q.shape, qparams.granularity)
    if zero_point.is_floating_point():
        return (q.float() - zero_point.float()) * scale
    return (q.to(torch.int32) - zero_point).float() * scale


def fake_quantize(x: torch.Tensor, bits: int = 8, symmetric: bool = True, signed: bool = True,
                  granularity: Granularity = PerTensor(), rounding: Rounding | str = Rounding.NEAREST,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """``dequantize(quantize(x))`` with min-max parameters: the simulation reference for integer kernels."""
    qp = choose_qparams(x, bits, symmetric, signed, granularity)
    return dequantize(quantize(x, qp, rounding, generator), qp).to(x.dtype)


def sqnr_db(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB (inf when equal)."""
    ref = reference.detach().double()
    noise = (ref - approx.detach().double()).pow(2).sum()
    if noise == 0:
        return float("inf")
    return float(10 * torch.log10(ref.pow(2).sum() / noise))


# ---------------------------------------------------------------- non-uniform levels


def quantize_pow2(x: torch.Tensor, bits: int = 4, granularity: Granularity = PerTensor()
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Logarithmic quantization: levels ``0, +-scale * 2^-k`` for ``k = 0 .. 2^(b-1) - 2``.

    Returns int8 codes (0 is zero; ``+-(k+1)`` is ``+-scale * 2^-k``) and the scale (``max|x|`` per slice).
    Rounding is to the nearest level in the log domain; magnitudes below half the smallest level become 0.
    """
    if not 2 <= bits <= 8:
        raise ValueError(f"power-of-two quantization takes 2..8 bits, got {bits}")
    check_finite(x)
    x = x.float()
    _, amax = _reduce_minmax(x.abs(), granularity)
    scale = torch.where(amax > 0, amax, torch.ones_like(amax))
    rel = x.abs() / _expand(scale, x.shape, granularity)
    n = (1 << (bits - 1)) - 1  # magnitudes per sign
    exponent = torch.round(-torch.log2(rel.clamp_min(1e-38))).clamp(0, n - 1)
    smallest = 2.0 ** -(n - 1)
    magnitude = torch.where(rel >= smallest / 2, exponent + 1, torch.zeros_like(exponent))
    codes = (torch.sign(x) * magnitude).to(torch.int8)
    return codes, scale


def dequantize_pow2(codes: torch.Tensor, scale: torch.Tensor, granularity: Granularity = PerTensor()) -> torch.Tensor:
    """Float values of power-of-two codes from :func:`quantize_pow2`."""
    mag = codes.abs().float()
    value = torch.where(mag > 0, torch.exp2(1 - mag), torch.zeros_like(mag))
    return torch.sign(codes.float()) * value * _expand(scale, codes.shape, granularity)


def _per_channel_abs_mean(w: torch.Tensor, axis: int, mask: torch.Tensor | None = None) -> torch.Tensor:
    axis = _normalize_axis(axis, w.dim())
    flat = w.abs().movedim(axis, 0).reshape(w.shape[axis], -1)
    if mask is None:
        return flat.mean(1)
    m = mask.movedim(axis, 0).reshape(w.shape[axis], -1).float()
    count = m.sum(1)
    return torch.where(count > 0, (flat * m).sum(1) / count.clamp_min(1), torch.zeros_like(count))


def binarize(w: torch.Tensor, axis: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """XNOR-Net weights: int8 signs in {-1, +1} (0 maps to +1) and the per-channel scale ``mean|w|``."""
    check_finite(w)
    w = w.float()
    signs = torch.where(w >= 0, 1, -1).to(torch.int8)
    return signs, _per_channel_abs_mean(w, axis)


def ternarize(w: torch.Tensor, axis: int = 0, threshold: float = 0.7) -> tuple[torch.Tensor, torch.Tensor]:
    """Ternary Weight Networks: int8 codes in {-1, 0, +1} and a per-channel scale.

    Per channel, weights with ``|w| > threshold * mean|w|`` keep their sign and the scale is the mean
    ``|w|`` of those; a channel with no such weight (all zero) gets scale 0 and all-zero codes.
    """
    check_finite(w)
    w = w.float()
    axis = _normalize_axis(axis, w.dim())
    delta = threshold * _per_channel_abs_mean(w, axis)
    view = [1] * w.dim()
    view[axis] = w.shape[axis]
    keep = w.abs() > delta.reshape(view)
    codes = (torch.sign(w) * keep).to(torch.int8)
    return codes, _per_channel_abs_mean(w, axis, keep)


def dequantize_per_channel(codes: torch.Tensor, scale: torch.Tensor, axis: int = 0) -> torch.Tensor:
    """``codes * scale`` with one scale per index of ``axis`` (binary and ternary weights)."""
    return codes.float() * _expand(scale, codes.shape, PerChannel(axis))

