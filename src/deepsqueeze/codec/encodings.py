"""Built-in tensor encodings. ``raw``: the tensor's bytes as they are in memory (little-endian);
``narrow-float``: a float32 tensor every value of which a 2-byte float holds exactly, stored in that type
(``meta["as"]``: ``float16`` or ``bfloat16``) and read back as float32, bit for bit. The writer picks it by
itself (:func:`narrow_float`): it loses nothing.
"""

from __future__ import annotations

from typing import Any

import torch

from deepsqueeze.core.encoding import register_encoding
from deepsqueeze.errors import ArtifactError


def tensor_to_bytes(tensor: torch.Tensor) -> bytes:
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    if flat.numel() == 0:
        return b""
    return flat.view(torch.uint8).numpy().tobytes()


def bytes_to_tensor(data: bytes, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    numel = 1
    for s in shape:
        numel *= s
    itemsize = torch.empty((), dtype=dtype).element_size()
    if len(data) != numel * itemsize:
        raise ValueError(f"expected {numel * itemsize} bytes for shape {shape} {dtype}, got {len(data)}")
    if numel == 0:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).view(dtype).reshape(shape).clone()


#: The 2-byte float types a float32 tensor may be stored in, tried in this order.
NARROW_FLOATS = {"float16": torch.float16, "bfloat16": torch.bfloat16}


def narrow_float(tensor: torch.Tensor) -> str | None:
    """The name of the first 2-byte float type (:data:`NARROW_FLOATS`) holding every value of the float32
    ``tensor`` exactly, or None (another dtype, an empty tensor, or no such type)."""
    if tensor.dtype != torch.float32 or tensor.numel() == 0:
        return None
    flat = tensor.detach().cpu()
    for name, dtype in NARROW_FLOATS.items():
        if torch.equal(flat.to(dtype).to(torch.float32), flat):
            return name
    return None


def stored_encoding(encoding: str, tensor: torch.Tensor) -> str:
    """The encoding the writer uses for ``tensor`` recorded as ``encoding``: ``narrow-float`` for a ``raw``
    float32 tensor a 2-byte float holds exactly, else ``encoding``."""
    return "narrow-float" if encoding == "raw" and narrow_float(tensor) else encoding


def half_precision(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` rounded to float16 (bfloat16 where a value is past float16's range), in its own dtype: what a
    stage that stores floats in 2 bytes writes into the model before it is measured."""
    peak = float(tensor.detach().abs().max()) if tensor.numel() else 0.0
    dtype = torch.float16 if peak <= torch.finfo(torch.float16).max else torch.bfloat16
    return tensor.detach().to(dtype).to(tensor.dtype)


def _encode_narrow(tensor: torch.Tensor, **_: Any) -> tuple[dict[str, Any], list[bytes]]:
    name = narrow_float(tensor)
    if name is None:
        raise ArtifactError("narrow-float stores float32 tensors a 2-byte float holds exactly")
    return {"as": name}, [tensor_to_bytes(tensor.to(NARROW_FLOATS[name]))]


def _decode_narrow(meta: dict[str, Any], segments: list[bytes], shape: tuple[int, ...],
                   dtype: torch.dtype) -> torch.Tensor:
    stored = NARROW_FLOATS.get(meta.get("as")) if isinstance(meta.get("as"), str) else None
    if set(meta) != {"as"} or stored is None or dtype != torch.float32 or len(segments) != 1:
        raise ArtifactError("narrow-float tensor is malformed (one segment, meta 'as' float16 or bfloat16, float32)")
    try:
        return bytes_to_tensor(segments[0], shape, stored).to(torch.float32)
    except ValueError as exc:
        raise ArtifactError(f"narrow-float tensor is corrupted ({exc})") from None


def _encode_raw(tensor: torch.Tensor, **_: Any) -> tuple[dict[str, Any], list[bytes]]:
    return {}, [tensor_to_bytes(tensor)]


def _decode_raw(meta: dict[str, Any], segments: list[bytes], shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    if meta or len(segments) != 1:
        raise ArtifactError("raw tensor is malformed (expects one segment and no meta)")
    try:
        return bytes_to_tensor(segments[0], shape, dtype)  # checks the length before allocating
    except ValueError as exc:
        raise ArtifactError(f"raw tensor is corrupted ({exc})") from None


register_encoding("raw", _encode_raw, _decode_raw)
register_encoding("narrow-float", _encode_narrow, _decode_narrow)
