"""The ``int-grid`` tensor encoding: an int8 tensor whose values lie on ``low + step * k``, ``k < 2^bits``,
stored as ``bits``-bit codes packed into bytes (:mod:`deepsqueeze.primitives.packing`).

QAT executes 4-bit, 2-bit, ternary and binary weights with the int8 kernels (``Int8Linear``,
``Int8Conv2d`` hold them as int8 codes); this encoding stores them in the .dsq at their own width:
4-bit codes ``-7..7`` take 4 bits, ternary ``-1, 0, 1`` 2 bits, binary ``-1, 1`` (step 2) 1 bit.
"""

from __future__ import annotations

from typing import Any

import torch

from deepsqueeze.core.encoding import register_encoding
from deepsqueeze.errors import ArtifactError
from deepsqueeze.primitives import packing

__all__ = ["grid_bits"]


def grid_bits(low: int, high: int, step: int = 1) -> int:
    """Bits per code for the grid ``low, low + step, ..., high``."""
    levels = (high - low) // step + 1
    return max(1, (levels - 1).bit_length())


def _encode(tensor: torch.Tensor, low: int = -128, high: int | None = None, step: int = 1, bits: int | None = None,
            **_: Any) -> tuple[dict[str, Any], list[bytes]]:
    if high is None:
        high = low + step * ((1 << bits) - 1) if bits is not None else 127
    if tensor.dtype != torch.int8:
        raise ArtifactError(f"int-grid stores int8 tensors, got {tensor.dtype}")
    flat = tensor.detach().cpu().reshape(-1).to(torch.int32) - int(low)
    if flat.numel() and (int(flat.min()) < 0 or bool((flat % int(step)).any()) or int(flat.max()) > high - low):
        raise ArtifactError(f"int-grid: values outside the grid {low}..{high} step {step}: the weights changed "
                            "after conversion; convert again")
    bits = grid_bits(int(low), int(high), int(step))
    packed = packing.pack((flat // int(step)).reshape(1, -1), bits)
    return {"low": int(low), "step": int(step), "bits": bits}, [packed.numpy().tobytes()]


def _decode(meta: dict[str, Any], segments: list[bytes], shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    try:
        low, step, bits = int(meta["low"]), int(meta["step"]), int(meta["bits"])
        if dtype != torch.int8 or not 1 <= bits <= 8 or step < 1:
            raise ValueError(f"bad parameters bits={bits} step={step} dtype={dtype}")
        numel = 1
        for s in shape:
            numel *= int(s)
        (data,) = segments
        packed = torch.frombuffer(bytearray(data), dtype=torch.uint8).reshape(1, -1) if data else torch.zeros(
            1, 0, dtype=torch.uint8)
        codes = packing.unpack(packed, bits, numel).to(torch.int32).reshape(-1)
        values = codes * step + low
        if numel and (int(values.min()) < -128 or int(values.max()) > 127):
            raise ValueError("decoded values leave the int8 range")
        return values.to(torch.int8).reshape(shape)
    except (KeyError, ValueError, TypeError) as exc:
        raise ArtifactError(f"corrupt int-grid tensor payload: {exc}") from None


register_encoding("int-grid", _encode, _decode, {"low": (int,), "high": (int, type(None)), "step": (int,),
                                                 "bits": (int, type(None))})
