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
    if layer.group_size % BLOCK or cols % BLOCK:
        return decoded(f"group of {layer.group_size} is not whole blocks of {BLOCK}: decoded to F16")
    q, scale, zero = layer.int_codes(), layer.scale, layer.zero_point
    if rows is not None:
        q, scale, zero = q[rows], scale[rows], zero[rows]
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
