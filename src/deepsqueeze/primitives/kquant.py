"""llama.cpp's k-quant grids as quantization parameters: super-blocks of 256 weights whose per-group scales
(and minimums) are small integers times one fp16 number per super-block.

* ``Q4_K`` / ``Q5_K``: 8 groups of 32 weights, unsigned 4- / 5-bit codes, ``w = d * sc_j * q - dmin * m_j``
  with ``sc_j, m_j`` 6-bit (0..63) and ``d, dmin`` fp16 (4.5 / 5.5 bits per weight);
* ``Q6_K``: 16 groups of 16 weights, 6-bit codes around 32, ``w = d * sc_j * (q - 32)`` with ``sc_j`` int8
  (6.5625 bits per weight).

In deepsqueeze's packed representation (``w = (q - zero_point) * scale`` per group) that is a scale
``d * sc_j`` and, for the asymmetric types, a float zero point ``dmin * m_j / (d * sc_j)``.
:func:`kquant_qparams` chooses them from weights (min-max per group, then every group's scale and minimum
rounded onto its super-block's grid, as llama.cpp's ``quantize_row_q4_K_ref`` rounds them), so GPTQ or
round-to-nearest then choose codes on exactly llama.cpp's grid; :func:`super_block_grid` recovers ``d`` and
the integers from such scales, which is how the GGUF exporter proves a layer is on the grid.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from deepsqueeze.errors import ModelError

__all__ = ["K_GRIDS", "SUPER_BLOCK", "KGrid", "kquant_qparams", "super_block_grid"]

SUPER_BLOCK = 256


@dataclass(frozen=True)
class KGrid:
    """One k-quant type: ``bits`` per code, ``group`` weights per scale, ``symmetric`` codes (zero point the
    middle code) or a minimum per group, and ``levels``, the largest integer multiplier of ``d``."""

    name: str
    bits: int
    group: int
    symmetric: bool
    levels: int


K_GRIDS = {"Q4_K": KGrid("Q4_K", 4, 32, False, 63), "Q5_K": KGrid("Q5_K", 5, 32, False, 63),
           "Q6_K": KGrid("Q6_K", 6, 16, True, 127)}

_FP16_TINY = 2.0 ** -24  # the smallest positive fp16 value


def _round_onto_grid(values: torch.Tensor, per: int, levels: int, least: int) -> torch.Tensor:
    """``values`` (rows, groups) >= 0 rounded to ``d * k`` per super-block of ``per`` groups, ``d`` fp16 (the
    super-block's largest value over ``levels``) and ``k`` an integer in ``least..levels``."""
    rows, groups = values.shape
    v = values.reshape(rows, groups // per, per)
    top = v.amax(-1, keepdim=True)
    d = (top / levels).to(torch.float16).float()
    if not bool(torch.isfinite(d).all()):
        raise ModelError("a weight is too large for a GGUF k-quant's fp16 super-block scale")
    d = torch.where(top > 0, d.clamp_min(_FP16_TINY), (_FP16_TINY if least else 0.0))
    k = torch.where(d > 0, torch.round(v / torch.where(d > 0, d, 1.0)), 0.0).clamp_(least, levels)
    return (d * k).reshape(rows, groups)


def kquant_qparams(w: torch.Tensor, grid: KGrid) -> tuple[torch.Tensor, torch.Tensor]:
    """Scales and zero points (each (rows, cols / grid.group)) on ``grid`` for the weight rows ``w`` (rows,
    cols), ``cols`` a multiple of :data:`SUPER_BLOCK`: unsigned codes, ``w ~ (q - zero_point) * scale``.

    Symmetric types: integer zero points (the middle code), scales ``max|w| / (2^(bits-1) - 1)`` per group on
    the grid. Asymmetric: float zero points, the range ``[min(w, 0), max(w)]`` per group (llama.cpp keeps the
    minimum at or below 0), scales and minimums each on the grid.

    Raises:
        ModelError: ``cols`` is not whole super-blocks, or a weight is not finite / beyond fp16's range.
    """
    rows, cols = w.shape
    if cols % SUPER_BLOCK:
        raise ModelError(f"{grid.name} holds rows of whole {SUPER_BLOCK}-weight super-blocks, not {cols}")
    if not bool(torch.isfinite(w).all()):
        raise ModelError("the weight holds NaN or Inf: no quantization grid fits it")
    per = SUPER_BLOCK // grid.group
    g = w.detach().float().reshape(rows, cols // grid.group, grid.group)
    if grid.symmetric:
        half = (1 << (grid.bits - 1)) - 1
        scale = _round_onto_grid(g.abs().amax(-1) / half, per, grid.levels, 1)
        return scale, torch.full_like(scale, 1 << (grid.bits - 1), dtype=torch.int32)
    low = g.amin(-1).clamp(max=0.0)
    scale = _round_onto_grid((g.amax(-1) - low) / ((1 << grid.bits) - 1), per, grid.levels, 1)
    minimum = _round_onto_grid(-low, per, grid.levels, 0)
    return scale, minimum / scale


def super_block_grid(values: torch.Tensor, per: int, levels: int, tolerance: float = 0.0
                     ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(d, k)`` with ``values`` (rows, groups) == ``d * k`` per super-block of ``per`` groups, ``d`` (rows,
    groups / per) fp16-exact and ``k`` integers in ``0..levels``, ``d`` the super-block's largest value over
    ``levels`` (as :func:`kquant_qparams` chooses it); None when the values are not on such a grid (within
    ``tolerance`` of the super-block's largest value)."""
    rows, groups = values.shape
    if groups % per:
        return None
    v = values.float().reshape(rows, groups // per, per)
    top = v.amax(-1)
    d = (top / levels).to(torch.float16).float()
    d = torch.where((d == 0) & (top > 0), top, d)  # a super-block of the tiniest scale: k = 1
    if not bool(torch.isfinite(d).all()) or bool((v < 0).any()) or bool((d.to(torch.float16).float() != d).any()):
        return None
    safe = torch.where(d > 0, d, 1.0)[..., None]
    k = torch.round(v / safe)
    off = (k * safe - v).abs()
    if bool((k > levels).any()) or bool((off > tolerance * top[..., None] + 1e-30).any()):
        return None
    return d, k.reshape(rows, groups)
