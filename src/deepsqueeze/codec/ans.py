"""Asymmetric numeral systems coding through ``constriction`` (static categorical and Bernoulli models).

The symbol model is the stream's own empirical distribution, stored as exact counts (varints) so the
decoder rebuilds the same float probabilities and hence the same fixed-point model. Payload: the
coder's compressed 32-bit words, little-endian.
"""

from __future__ import annotations

import numpy as np

from deepsqueeze.codec.bits import Reader, write_varint
from deepsqueeze.errors import ArtifactError


def _constriction():  # imported lazily: the native module costs import time
    import constriction

    return constriction


def _model(counts: np.ndarray):
    c = _constriction()
    probs = counts.astype(np.float64) / float(counts.sum())
    return c.stream.model.Categorical(probs, perfect=False)


def encode(symbols: np.ndarray, alphabet: int) -> bytes:
    """ANS-code ``symbols`` in ``[0, alphabet)`` with their empirical distribution: counts + words."""
    symbols = np.asarray(symbols, dtype=np.int64).ravel()
    counts = np.bincount(symbols, minlength=alphabet) if symbols.size else np.zeros(alphabet, np.int64)
    if counts.size != alphabet:
        raise ValueError(f"symbols must lie in [0, {alphabet})")
    out = bytearray()
    hi = int(np.flatnonzero(counts).max()) + 1 if symbols.size else 0
    write_varint(out, hi)  # counts stored up to the largest present symbol only
    for value in counts[:hi].tolist():
        write_varint(out, value)
    if symbols.size == 0 or np.count_nonzero(counts) == 1:
        return bytes(out)  # the counts alone determine the stream
    coder = _constriction().stream.stack.AnsCoder()
    coder.encode_reverse(symbols.astype(np.int32), _model(counts[:hi]))
    out += coder.get_compressed().astype("<u4").tobytes()
    return bytes(out)


def decode(data: bytes, count: int, alphabet: int) -> np.ndarray:
    """Inverse of ``encode``; ArtifactError when counts, length or coder state are inconsistent."""
    reader = Reader(data, "ans stream")
    hi = reader.varint(limit=alphabet)
    counts = np.asarray([reader.varint(limit=count) for _ in range(hi)], dtype=np.int64)
    if int(counts.sum()) != count:
        raise ArtifactError("ans stream is corrupted (symbol counts do not add up to the stream length)")
    if count == 0:
        reader.finish()
        return np.zeros(0, dtype=np.int64)
    present = np.flatnonzero(counts)
    if present.size == 1:
        reader.finish()
        return np.full(count, int(present[0]), dtype=np.int64)
    words = reader.rest()
    if len(words) % 4 or not words:
        raise ArtifactError("ans stream is corrupted (payload is not a whole number of 32-bit words)")
    compressed = np.frombuffer(words, dtype="<u4").astype(np.uint32)
    try:
        coder = _constriction().stream.stack.AnsCoder(compressed)
        out = np.asarray(coder.decode(_model(counts), count), dtype=np.int64)
        clean = coder.is_empty()
    except Exception as exc:  # constriction rejects some invalid states itself
        raise ArtifactError(f"ans stream is corrupted ({exc})") from None
    if not clean or np.any(np.bincount(out, minlength=hi)[:hi] != counts):
        raise ArtifactError("ans stream is corrupted (decoded symbols do not match the stored counts)")
    return out


def encode_bits(bits: np.ndarray, p_one: np.ndarray) -> np.ndarray:
    """ANS-code a 0/1 array with a per-bit probability of 1; returns the compressed words."""
    c = _constriction()
    coder = c.stream.stack.AnsCoder()
    if bits.size:
        coder.encode_reverse(bits.astype(np.int32), c.stream.model.Bernoulli(perfect=False), p_one.astype(np.float64))
    return coder.get_compressed()


class BitDecoder:
    """Decodes bits written by ``encode_bits`` in order, a chunk at a time (for adaptive models)."""

    def __init__(self, words: bytes) -> None:
        if len(words) % 4:
            raise ArtifactError("ans bit stream is corrupted (not a whole number of 32-bit words)")
        c = _constriction()
        self._model = c.stream.model.Bernoulli(perfect=False)
        try:
            self._coder = c.stream.stack.AnsCoder(np.frombuffer(words, dtype="<u4").astype(np.uint32))
        except Exception as exc:
            raise ArtifactError(f"ans bit stream is corrupted ({exc})") from None

    def decode(self, p_one: np.ndarray) -> np.ndarray:
        try:
            return np.asarray(self._coder.decode(self._model, p_one.astype(np.float64)), dtype=np.int64)
        except Exception as exc:
            raise ArtifactError(f"ans bit stream is corrupted ({exc})") from None

    def finish(self) -> None:
        if not self._coder.is_empty():
            raise ArtifactError("ans bit stream is corrupted (data left after the last bit)")
