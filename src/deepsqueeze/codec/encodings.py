"""Built-in tensor encodings. ``raw``: the tensor's bytes as they are in memory (little-endian)."""

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
