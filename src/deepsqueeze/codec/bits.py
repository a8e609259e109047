"""Byte-level helpers for coded streams: LEB128 varints, a bounds-checked reader, fixed-width bit packing.

Decoders read through ``Reader``, which raises ``ArtifactError`` on any overrun, so corrupt or truncated
input never becomes an IndexError deep inside a decoder.
"""

from __future__ import annotations

import numpy as np

from deepsqueeze.errors import ArtifactError


def write_varint(out: bytearray, value: int) -> None:
    """Append ``value`` (>= 0) as an unsigned LEB128 varint."""
    if value < 0:
        raise ValueError(f"varints are unsigned, got {value}")
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return


class Reader:
    """Sequential reader over bytes; every overrun or malformed value is an ArtifactError."""

    def __init__(self, data: bytes | bytearray | memoryview, what: str = "stream") -> None:
        self.data = bytes(data)
        self.pos = 0
        self.what = what

    def varint(self, limit: int = 1 << 62) -> int:
        value, shift = 0, 0
        while True:
            if self.pos >= len(self.data):
                raise ArtifactError(f"{self.what} is truncated (varint runs past the end)")
            byte = self.data[self.pos]
            self.pos += 1
            value |= (byte & 0x7F) << shift
            if not byte & 0x80:
                break
            shift += 7
            if shift > 63:
                raise ArtifactError(f"{self.what} is corrupted (varint too long)")
        if value > limit:
            raise ArtifactError(f"{self.what} is corrupted (value {value} exceeds {limit})")
        return value

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise ArtifactError(f"{self.what} is truncated (needs {n} bytes at offset {self.pos}, has {len(self.data)})")
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def byte(self) -> int:
        return self.take(1)[0]

    def rest(self) -> bytes:
        chunk = self.data[self.pos :]
        self.pos = len(self.data)
        return chunk

    def finish(self) -> None:
        if self.pos != len(self.data):
            raise ArtifactError(f"{self.what} is corrupted ({len(self.data) - self.pos} unexpected trailing bytes)")


def pack_fixed(values: np.ndarray, width: int) -> bytes:
    """Pack non-negative integers below ``2**width`` at ``width`` bits each, MSB first."""
    values = np.asarray(values, dtype=np.int64).ravel()
    if width < 0 or width > 32:
        raise ValueError(f"bit width must be in 0..32, got {width}")
    if values.size and (values.min() < 0 or values.max() >> width):
        raise ValueError(f"values do not fit in {width} bits")
    if width == 0 or values.size == 0:
        return b""
    shifts = np.arange(width - 1, -1, -1, dtype=np.int64)
    bits = ((values[:, None] >> shifts[None, :]) & 1).astype(np.uint8).ravel()
    return np.packbits(bits).tobytes()


def unpack_fixed(data: bytes, width: int, count: int, what: str = "stream") -> np.ndarray:
    """Inverse of ``pack_fixed``; ArtifactError when ``data`` has the wrong length."""
    if count == 0 or width == 0:
        if data:
            raise ArtifactError(f"{what} is corrupted (unexpected packed bytes)")
        return np.zeros(count, dtype=np.int64)
    if len(data) != -(-count * width // 8):
        raise ArtifactError(f"{what} is corrupted (expected {-(-count * width // 8)} packed bytes, got {len(data)})")
    bits = np.unpackbits(np.frombuffer(data, dtype=np.uint8))[: count * width].reshape(count, width)
    weights = (1 << np.arange(width - 1, -1, -1, dtype=np.int64))
    return bits.astype(np.int64) @ weights
