"""Entropy-coded symbol streams: each stream is coded with Huffman and with ANS and the smaller is kept.

Stream layout: ``method byte | varint count | varint alphabet | coder payload``. The method byte records
which coder won (0 = empty or constant-free raw, 1 = Huffman, 2 = ANS), so the manifest-level choice
is visible in ``StreamStats`` and in the bytes themselves. Every stream reports its Shannon bound.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import StrEnum

import numpy as np

from deepsqueeze.codec import ans, huffman
from deepsqueeze.codec.bits import Reader, write_varint
from deepsqueeze.errors import ArtifactError

MAX_ALPHABET = 1 << 16


class Coder(StrEnum):
    AUTO = "auto"
    HUFFMAN = "huffman"
    ANS = "ans"


_METHOD_IDS = {Coder.HUFFMAN: 1, Coder.ANS: 2}
_METHODS = {1: Coder.HUFFMAN, 2: Coder.ANS}


@dataclass(frozen=True)
class StreamStats:
    """What one coded stream cost: symbols, Shannon bound (order-0, in bits) and the bytes of each coder."""

    name: str
    count: int
    alphabet: int
    entropy_bits: float
    coder: str
    coded_bytes: int
    huffman_bytes: int | None = None
    ans_bytes: int | None = None

    @property
    def bits_per_symbol(self) -> float:
        return 8 * self.coded_bytes / self.count if self.count else 0.0

    def as_dict(self) -> dict[str, object]:
        return {"stream": self.name, "symbols": self.count, "alphabet": self.alphabet,
                "shannon_bytes": round(self.entropy_bits / 8, 1), "coder": self.coder,
                "bytes": self.coded_bytes, "huffman_bytes": self.huffman_bytes, "ans_bytes": self.ans_bytes}


def shannon_bits(symbols: np.ndarray) -> float:
    """Order-0 Shannon bound of ``symbols`` in bits: count x empirical entropy."""
    symbols = np.asarray(symbols).ravel()
    if symbols.size == 0:
        return 0.0
    counts = np.unique(symbols, return_counts=True)[1].astype(np.float64)
    p = counts / symbols.size
    return float(-(counts * np.log2(p)).sum())


def encode_stream(symbols: np.ndarray, alphabet: int | None = None, coder: Coder | str = Coder.AUTO,
                  name: str = "stream") -> tuple[bytes, StreamStats]:
    """Code non-negative integer ``symbols``; with ``coder="auto"`` keep the smaller of Huffman and ANS."""
    symbols = np.asarray(symbols, dtype=np.int64).ravel()
    coder = Coder(coder)
    if symbols.size and symbols.min() < 0:
        raise ValueError("symbols must be non-negative")
    if alphabet is None:
        alphabet = int(symbols.max()) + 1 if symbols.size else 1
    if not 1 <= alphabet <= MAX_ALPHABET:
        raise ValueError(f"alphabet size must be in 1..{MAX_ALPHABET}, got {alphabet}")
    if symbols.size and symbols.max() >= alphabet:
        raise ValueError(f"symbols must lie in [0, {alphabet})")
    header = bytearray()
    write_varint(header, symbols.size)
    write_varint(header, alphabet)
    candidates: dict[Coder, bytes] = {}
    if coder in (Coder.AUTO, Coder.HUFFMAN):
        candidates[Coder.HUFFMAN] = huffman.encode(symbols, alphabet)
    if coder in (Coder.AUTO, Coder.ANS):
        candidates[Coder.ANS] = ans.encode(symbols, alphabet)
    best = min(candidates, key=lambda c: (len(candidates[c]), _METHOD_IDS[c]))
    data = bytes([_METHOD_IDS[best]]) + bytes(header) + candidates[best]
    extra = len(data) - len(candidates[best])
    stats = StreamStats(
        name, int(symbols.size), alphabet, shannon_bits(symbols), best.value, len(data),
        len(candidates[Coder.HUFFMAN]) + extra if Coder.HUFFMAN in candidates else None,
        len(candidates[Coder.ANS]) + extra if Coder.ANS in candidates else None,
    )
    return data, stats


def decode_stream(data: bytes, max_count: int = 1 << 40) -> np.ndarray:
    """Inverse of ``encode_stream``; ArtifactError on unknown method or inconsistent payload."""
    reader = Reader(data, "entropy-coded stream")
    method = _METHODS.get(reader.byte())
    if method is None:
        raise ArtifactError("entropy-coded stream is corrupted (unknown coder id): re-create the artifact")
    count = reader.varint(limit=max_count)
    alphabet = reader.varint(limit=MAX_ALPHABET)
    if alphabet < 1:
        raise ArtifactError("entropy-coded stream is corrupted (empty alphabet)")
    payload = reader.rest()
    if method is Coder.HUFFMAN:
        return huffman.decode(payload, count, alphabet)
    return ans.decode(payload, count, alphabet)


def ideal_bits(count: int, alphabet: int) -> int:
    """Bits of a fixed-width code for ``count`` symbols of ``alphabet``: the no-entropy-coding baseline."""
    return count * max(0, math.ceil(math.log2(alphabet))) if alphabet > 1 else 0
