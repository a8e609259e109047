"""Differentiable fake quantization for quantization-aware training, as pure functions on tensors.

Every function returns float values that lie exactly on the integer grid ``(q - zero_point) * scale``
of the integer kernels that execute the model after conversion, while gradients pass through the
rounding by the straight-through estimator (STE; Bengio et al. 2013):

* :func:`round_ste`: ``round(x)`` forward, identity backward.
* :func:`grad_scale`: ``x`` forward, gradient times ``g`` backward.
* :func:`lsq_fake_quantize`: Learned Step Size Quantization (Esser et al., ICLR 2020): the step
  ``scale`` is a parameter, its gradient ``-x/s + round(x/s)`` inside the range and ``qmin``/``qmax`` at
  the clipping points, scaled by :func:`lsq_grad_scale` ``= 1 / sqrt(N * Qp)``.
* :func:`pact_fake_quantize`: PACT (Choi et al. 2018): a learned clipping level ``alpha``; the range
  ``[-z s, (qmax - z) s]`` with ``s = alpha / (qmax - z)``; ``alpha`` learns from the clipped inputs only.
* :func:`dynamic_per_token_fake_quantize`: symmetric per-row codes with the row's own ``max|x|`` scale
  (what ``Int8Linear``'s per-token kernel computes at run time).
* :func:`binary_ste`: BinaryConnect / XNOR-Net ``sign(w) * mean|w|`` per output channel, with the
  clipped STE (gradient only where ``|w| <= 1``).
* :func:`ternary_ste`: TWN (Li et al. 2016) ``{-1, 0, +1} * scale`` per output channel with threshold
  ``0.7 mean|w|``, or TTQ (Zhu et al., ICLR 2017) with learned positive and negative scales.

Shapes: weights are viewed as rows ``(out, K)``; scales broadcast against ``x`` (per tensor ``()``,
per channel ``(out, 1)``, per group ``(out, G, 1)`` against ``(out, G, K/G)``).
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "binary_ste",
    "dynamic_per_token_fake_quantize",
    "grad_scale",
    "lsq_fake_quantize",
    "lsq_grad_scale",
    "pact_fake_quantize",
    "round_ste",
    "ternary_codes",
    "ternary_ste",
]


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """``round(x)`` (half to even, as ``torch.round``) with an identity gradient."""
    return x + (torch.round(x) - x).detach()


def grad_scale(x: torch.Tensor, g: float) -> torch.Tensor:
    """``x`` in the forward pass; its gradient is multiplied by ``g`` in the backward pass."""
    scaled = x * g
    return (x - scaled).detach() + scaled


def lsq_grad_scale(numel: int, qmax: int) -> float:
    """LSQ's step-size gradient scale ``1 / sqrt(N * Qp)`` (``N``: elements one step size quantizes)."""
    return 1.0 / math.sqrt(max(1, numel) * max(1, qmax))


def lsq_fake_quantize(x: torch.Tensor, scale: torch.Tensor, qmin: int, qmax: int,
                      zero_point: torch.Tensor | None = None, g: float = 1.0) -> torch.Tensor:
    """LSQ: ``(clamp(round(x / s) + z, qmin, qmax) - z) * s`` with STE rounding and a learned ``s``.

    ``scale`` (positive) and ``zero_point`` (integer-valued floats, not learned) broadcast against ``x``;
    ``g`` is the gradient scale of ``scale`` (:func:`lsq_grad_scale`). Written as LSQ's
    ``round(clip(x / s - ... ))`` so the clipped elements send ``qmin - z`` / ``qmax - z`` to ``s``.
    """
    s = grad_scale(scale, g)
    z = zero_point if zero_point is not None else 0.0
    v = torch.clamp(x / s, qmin - z, qmax - z) if zero_point is not None else torch.clamp(x / s, qmin, qmax)
    return round_ste(v) * s


def pact_fake_quantize(x: torch.Tensor, alpha: torch.Tensor, qmax: int, zero_point: float = 0.0) -> torch.Tensor:
    """PACT: clip ``x`` to ``[-z s, (qmax - z) s]`` with ``s = alpha / (qmax - z)``, then round (STE).

    ``alpha`` (the learned upper clipping level, > 0) receives the gradient of the clipped elements
    only (1 at the top, ``-z / (qmax - z)`` at the bottom), as in Choi et al. (2018); rounding is a
    straight-through identity. ``zero_point = 0`` is the original unsigned PACT after a ReLU.
    """
    s = alpha / (qmax - zero_point)
    y = torch.minimum(torch.maximum(x, -zero_point * s), alpha)
    return y + (torch.round(y / s.detach()) * s.detach() - y).detach()


def dynamic_per_token_fake_quantize(x: torch.Tensor, bits: int = 8) -> torch.Tensor:
    """Symmetric ``bits``-bit codes per row of the last dimension (scale ``max|row| / (2^(b-1) - 1)``), STE."""
    qmax = float((1 << (bits - 1)) - 1)
    amax = x.detach().abs().amax(dim=-1, keepdim=True)
    scale = torch.where(amax > 0, amax / qmax, torch.ones_like(amax))
    return round_ste(torch.clamp(x / scale, -qmax, qmax)) * scale


def binary_ste(w: torch.Tensor, clip: float = 1.0) -> torch.Tensor:
    """XNOR-Net binary weights of rows ``w`` (out, K): ``sign(w) * mean|w|`` per row (0 maps to +1).

    Backward: BinaryConnect's straight-through estimator through the sign (the gradient passes where
    ``|w| <= clip``, the hard-tanh window of Courbariaux et al. 2015), times the scale, plus the
    gradient through the scale ``mean|w|`` itself.
    """
    scale = w.abs().mean(dim=1, keepdim=True)
    signs = torch.where(w.detach() >= 0, 1.0, -1.0).to(w.dtype)
    window = (w.detach().abs() <= clip).to(w.dtype)
    through = w * window
    return (signs + (through - through.detach())) * scale


def ternary_codes(w: torch.Tensor, threshold: float = 0.7) -> torch.Tensor:
    """TWN codes {-1, 0, +1} of rows ``w`` (out, K): keep the sign where ``|w| > threshold * mean|w|``."""
    delta = threshold * w.detach().abs().mean(dim=1, keepdim=True)
    return torch.sign(w.detach()) * (w.detach().abs() > delta)


def ternary_ste(w: torch.Tensor, pos_scale: torch.Tensor | None = None, neg_scale: torch.Tensor | None = None,
                threshold: float = 0.7) -> torch.Tensor:
    """Ternary weights of rows ``w`` (out, K).

    Without scales: TWN, ``codes * scale`` with the per-row scale the mean ``|w|`` of the kept weights
    (gradients to ``w`` straight through). With ``pos_scale``/``neg_scale`` (out, 1) parameters: TTQ,
    ``+W_p`` / ``0`` / ``-W_n``; the scales receive the summed gradients of their positions and ``w``
    receives its gradient times ``W_p``, 1 or ``W_n`` (Zhu et al. 2017, eq. 7-8).
    """
    codes = ternary_codes(w, threshold)
    if pos_scale is None or neg_scale is None:
        keep = codes != 0
        count = keep.sum(dim=1, keepdim=True)
        scale = torch.where(count > 0, (w.abs() * keep).sum(dim=1, keepdim=True) / count.clamp_min(1),
                            torch.zeros_like(count, dtype=w.dtype))
        return w + (codes * scale - w).detach() + (codes * (scale - scale.detach()))
    pos, neg = (codes > 0).to(w.dtype), (codes < 0).to(w.dtype)
    zero = 1.0 - pos - neg
    values = pos * pos_scale - neg * neg_scale
    # gradient to w: W_p, 1 or W_n times the incoming gradient (straight through the codes)
    factor = (pos * pos_scale + zero + neg * neg_scale).detach()
    return values + (w * factor - (w * factor).detach())
