"""What each runtime representation becomes in a GGUF file (llama.cpp's tensor types): :func:`gguf_form` (the
exporter, :mod:`deepsqueeze.export.gguf`, asks it for every weight and knows no representation itself).

llama.cpp's legacy block types hold 32 weights per block, each block one fp16 scale ``d`` (and an fp16 offset
``m`` for the ``_1`` types): ``Q4_0`` ``w = d (q - 8)``, ``Q4_1`` ``w = d q + m`` (q 0..15), ``Q5_0`` /
``Q5_1`` the same with q 0..31, ``Q8_0`` ``w = d q`` (q int8). A packed layer's codes fit one of them exactly
whenever its group is a multiple of 32 inputs (a group of 96 is three blocks with the group's scale and offset):

* packed 2..4-bit codes: symmetric (every zero point the middle code) ``Q4_0``, else ``Q4_1`` with
  ``d = scale``, ``m = -zero_point * scale`` (integer or float zero points);
* packed 5-bit codes: ``Q5_0`` / ``Q5_1`` likewise;
* packed 6..8-bit codes with integer zero points whose ``q - zero_point`` fits int8, and :class:`Int8Linear` /
  :class:`Int8Embedding` (per-row scales): ``Q8_0`` with ``q - zero_point``;
* packed codes on a k-quant grid (:mod:`deepsqueeze.primitives.kquant`: scales, and minimums, that are
  6-bit / int8 integers times one fp16 number per super-block of 256 inputs): ``Q4_K`` (2..4-bit, groups of
  32, float zero points), ``Q5_K`` (5-bit), ``Q6_K`` (6-bit symmetric, groups of 16), ahead of the block
  types above;
* float weights (plain, sparse, 1-D norms): ``F32``, exactly;
* anything else (binary codes, groups that are not whole blocks, 6..8-bit float zero points): the decoded
  weight as ``F16``, marked not exact, with the reason.

The codes are carried over unchanged; only the scales and offsets round to fp16 (llama.cpp's format), which
is the one difference from the torch model the exporter's check measures.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from deepsqueeze.primitives.kquant import K_GRIDS, SUPER_BLOCK, super_block_grid
from deepsqueeze.runtime.int8 import Int8Embedding, Int8Linear
from deepsqueeze.runtime.packed import PackedIntEmbedding, PackedIntLinear

__all__ = ["BLOCK", "GGUFForm", "gguf_form"]

BLOCK = 32


@dataclass(frozen=True)
class GGUFForm:
    """One tensor as written: ``type`` (a ``gguf.GGMLQuantizationType`` name), ``data`` as ``GGUFWriter.add_tensor``
    takes it (block types: uint8 ``(rows, bytes per row)``; float types: the values), the logical ``shape``
    (rows, cols), whether the model's values are carried ``exact`` (up to fp16 scales), and a ``note``."""

    type: str
    data: np.ndarray
    shape: tuple[int, ...]
    exact: bool
    note: str


def _f16_bytes(x: torch.Tensor) -> torch.Tensor:
    """(rows, blocks) float -> (rows, blocks, 2) uint8 of its fp16 values."""
    return x.to(torch.float16).contiguous().view(torch.uint8).reshape(*x.shape, 2)


def _nibbles(q: torch.Tensor) -> torch.Tensor:
    """(rows, blocks, 32) codes -> (rows, blocks, 16): element j low nibble, element j + 16 high nibble."""
    q = q.to(torch.uint8) & 0xF
    return q[..., :16] | (q[..., 16:] << 4)


def _high_bits(q: torch.Tensor) -> torch.Tensor:
    """(rows, blocks, 32) 5-bit codes -> (rows, blocks, 4): bit j of a little-endian uint32 is bit 4 of code j."""
    bits = ((q.to(torch.int64) >> 4) & 1) << torch.arange(32)
    word = bits.sum(-1)
    return torch.stack([(word >> (8 * i)) & 0xFF for i in range(4)], -1).to(torch.uint8)


def encode_blocks(kind: str, q: torch.Tensor, d: torch.Tensor, m: torch.Tensor | None = None) -> np.ndarray:
    """Bytes of ``kind`` blocks from codes ``q`` (rows, cols: ``Q4_0`` 0..15, ``Q5_0`` 0..31, ``Q4_1`` / ``Q5_1``
    unsigned, ``Q8_0`` -128..127) and per-block ``d`` (and ``m``) of shape (rows, cols / 32)."""
    rows, cols = q.shape
    qb = q.reshape(rows, cols // BLOCK, BLOCK)
    parts = [_f16_bytes(d)]
    if kind in ("Q4_1", "Q5_1"):
        assert m is not None
        parts.append(_f16_bytes(m))
    if kind in ("Q5_0", "Q5_1"):
        parts.append(_high_bits(qb))
    parts.append(qb.to(torch.int8).view(torch.uint8) if kind == "Q8_0" else _nibbles(qb))
    return torch.cat(parts, -1).reshape(rows, -1).numpy()


def _scales_and_mins(sc: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """(rows, supers, 8) 6-bit scales and minimums -> (rows, supers, 12): llama.cpp's ``get_scale_min_k4``
    packing (low 6 bits of groups 0..3 in bytes 0..7, groups 4..7 split over the low nibbles of bytes 8..11
    and the top 2 bits of bytes 0..7)."""
    sc, m = sc.to(torch.uint8), m.to(torch.uint8)
    first = torch.cat([sc[..., :4] | ((sc[..., 4:] >> 4) << 6), m[..., :4] | ((m[..., 4:] >> 4) << 6)], -1)
    return torch.cat([first, (sc[..., 4:] & 0xF) | ((m[..., 4:] & 0xF) << 4)], -1)


def encode_k_blocks(kind: str, q: torch.Tensor, d: torch.Tensor, sc: torch.Tensor, dmin: torch.Tensor | None = None,
                    m: torch.Tensor | None = None) -> np.ndarray:
    """Bytes of ``kind`` (``Q4_K``, ``Q5_K``, ``Q6_K``) super-blocks from unsigned codes ``q`` (rows, cols;
    ``Q6_K``: 0..63 around 32), per-super-block ``d`` (and ``dmin``) (rows, cols / 256) and per-group integer
    ``sc`` (and ``m``) (rows, supers, groups per super-block), in llama.cpp's ``block_q4_K`` / ``block_q5_K``
    / ``block_q6_K`` layouts."""
    rows, cols = q.shape
    qs = q.to(torch.int64).reshape(rows, cols // SUPER_BLOCK, SUPER_BLOCK)
    if kind == "Q6_K":
        half = qs.reshape(rows, -1, 2, 4, 32)  # (.., 128-halves, quarter k, l): element 128n + 32k + l
        ql = torch.cat([half[..., 0, :] & 0xF | (half[..., 2, :] & 0xF) << 4,
                        half[..., 1, :] & 0xF | (half[..., 3, :] & 0xF) << 4], -1)
        qh = sum(((half[..., k, :] >> 4) & 3) << (2 * k) for k in range(4))
        parts = [ql.reshape(rows, -1, 128), qh.reshape(rows, -1, 64), sc.to(torch.int8).view(torch.uint8)]
        return torch.cat([p.to(torch.uint8) for p in parts] + [_f16_bytes(d)], -1).reshape(rows, -1).numpy()
    assert dmin is not None and m is not None
    chunks = qs.reshape(rows, -1, 4, 2, 32)  # 64-chunks: low nibble element l, high nibble element 32 + l
    low = (chunks[..., 0, :] & 0xF) | ((chunks[..., 1, :] & 0xF) << 4)
    parts = [_f16_bytes(d), _f16_bytes(dmin), _scales_and_mins(sc, m)]
    if kind == "Q5_K":  # bit k of qh[l]: bit 4 of element 32k + l
        eighths = qs.reshape(rows, -1, 8, 32)
        parts.append(sum(((eighths[..., k, :] >> 4) & 1) << k for k in range(8)).to(torch.uint8))
    parts.append(low.reshape(rows, -1, 128).to(torch.uint8))
    return torch.cat(parts, -1).reshape(rows, -1).numpy()


def _k_form(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, group: int, float_zero: bool
            ) -> GGUFForm | None:
    """The k-quant tensor of packed codes whose scales (and minimums) lie on a k-quant grid, else None."""
    rows, cols = q.shape
    if cols % SUPER_BLOCK:
        return None
    symmetric = not float_zero and bool((zero == (1 << (bits - 1))).all())
    for grid in K_GRIDS.values():
        fits = bits == grid.bits or (grid.bits == 4 and bits < 4)  # 2- and 3-bit codes ride in Q4_K
        if group != grid.group or grid.symmetric != symmetric or not fits:
            continue
        per = SUPER_BLOCK // group
        scales = super_block_grid(scale, per, grid.levels)
        mins = None if grid.symmetric else super_block_grid(zero.float() * scale, per, grid.levels, tolerance=1e-5)
        if scales is None or (mins is None and not grid.symmetric):
            continue
        shape = (rows, cols // SUPER_BLOCK, per)
        offsets = () if mins is None else (mins[0], mins[1].reshape(shape))
        return GGUFForm(grid.name, encode_k_blocks(grid.name, q, scales[0], scales[1].reshape(shape), *offsets),
                        (rows, cols), True, f"{bits}-bit codes on the {grid.name} grid carried over")
    return None


def _float(weight: torch.Tensor, note: str, exact: bool = True) -> GGUFForm:
    w = weight.detach().float().cpu()
    if exact:
        return GGUFForm("F32", w.numpy(), tuple(w.shape), True, note)
    return GGUFForm("F16", w.to(torch.float16).numpy(), tuple(w.shape), False, note)


def _packed(layer: PackedIntLinear | PackedIntEmbedding, rows: torch.Tensor | None) -> GGUFForm:
    cols = layer._cols
    def decoded(note: str) -> GGUFForm:  # only where no block type holds the codes: the whole layer decoded
        weight = layer.dequantized_rows()
        return _float(weight if rows is None else weight[rows], note, exact=False)

    if layer.binary:
        return decoded("binary codes: no GGUF type holds them, decoded to F16")
    if not layer.affine_codes:
        return decoded(f"{type(layer).__name__} codes are not (q - zero point) * scale: decoded to F16")
    q, scale, zero = layer.int_codes(), layer.scale, layer.zero_point
    if rows is not None:
        q, scale, zero = q[rows], scale[rows], zero[rows]
    k_form = _k_form(q, scale, zero, layer.bits, layer.group_size, layer.float_zero)
    if k_form is not None:
        return k_form
    if layer.group_size % BLOCK or cols % BLOCK:
        return decoded(f"group of {layer.group_size} is not whole blocks of {BLOCK}: decoded to F16")
    per = layer.group_size // BLOCK
    d = scale.float().repeat_interleave(per, dim=1)
    z = zero.float().repeat_interleave(per, dim=1)
    bits, middle = layer.bits, float(1 << (layer.bits - 1))
    symmetric = not layer.float_zero and bool((zero == middle).all())
    zq = z.repeat_interleave(BLOCK, dim=1)
    if bits <= 5:
        if symmetric:
            kind, offset = ("Q4_0", 8) if bits <= 4 else ("Q5_0", 16)
            return GGUFForm(kind, encode_blocks(kind, q.float() - zq + offset, d), tuple(q.shape), True,
                            f"{bits}-bit symmetric codes carried over")
        kind = "Q4_1" if bits <= 4 else "Q5_1"
        return GGUFForm(kind, encode_blocks(kind, q, d, -z * d), tuple(q.shape), True,
                        f"{bits}-bit codes and {'float' if layer.float_zero else 'integer'} zero points carried over")
    centred = q.float() - zq
    if not layer.float_zero and bool((centred >= -128).all() and (centred <= 127).all()):
        return GGUFForm("Q8_0", encode_blocks("Q8_0", centred, d), tuple(q.shape), True,
                        f"{bits}-bit codes carried over")
    return decoded(f"{bits}-bit codes with {'float ' if layer.float_zero else ''}zero points off "
                   "int8: no GGUF type holds them, decoded to F16")


def gguf_form(module: nn.Module, rows: torch.Tensor | None = None) -> GGUFForm:
    """The GGUF tensor for the weight of ``module`` (a Linear, an embedding table or a norm), its rows taken in
    the order ``rows`` when given (llama.cpp's rotary layout of query and key rows).

    Raises:
        TypeError: a module without one weight matrix or vector (a factored layer, a wrapper).
    """
    if isinstance(module, (PackedIntLinear, PackedIntEmbedding)):
        return _packed(module, rows)
    if isinstance(module, (Int8Linear, Int8Embedding)):
        q = module.weight if rows is None else module.weight[rows]
        scale = module.weight_scale if isinstance(module, Int8Linear) else module.scale
        scale = scale if rows is None else scale[rows]
        if q.shape[1] % BLOCK or getattr(module, "smooth", None) is not None:
            why = "smoothed int8 codes" if q.shape[1] % BLOCK == 0 else f"{q.shape[1]} inputs, not whole blocks"
            return _float(module.dequantized_weight() if rows is None else module.dequantized_weight()[rows],
                          f"{why}: decoded to F16", exact=False)
        d = scale.float()[:, None].expand(-1, q.shape[1] // BLOCK)
        return GGUFForm("Q8_0", encode_blocks("Q8_0", q.float(), d), tuple(q.shape), True,
                        "int8 codes carried over")
    dense = getattr(module, "dense_weight", None)
    weight = dense() if callable(dense) else getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() not in (1, 2) or list(module.children()):
        raise TypeError(f"{type(module).__name__} holds no single weight a GGUF tensor can carry")
    weight = weight if rows is None else weight[rows]
    return _float(weight, "float32")
