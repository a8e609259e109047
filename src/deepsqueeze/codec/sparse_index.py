"""Coding the positions of a sparse tensor's non-zero entries.

Schemes (the first byte of a position stream names the one used):

- ``gaps-fixed``: Deep Compression's form: the zeros before each non-zero as a ``k``-bit number; a gap
  of ``2**k - 1`` or more is split with filler symbols (``2**k - 1`` = "skip that many, no entry").
- ``gaps``: the same gap symbols, entropy-coded (Huffman or ANS, whichever is smaller); ``k`` is
  chosen per tensor by trying every width and keeping the smallest stream.
- ``bitmap``: the 0/1 mask of a 2-D view (rows = output units), coded bit by bit with ANS under an
  adaptive model: the probability of a non-zero in column ``j`` is the column's frequency in the rows
  already coded, shrunk towards the overall frequency so far. Pruned inputs (a dead pixel, a dead
  channel) then cost almost nothing after a few rows; nothing is stored besides the coded bits. Both
  orientations are tried and the smaller kept.
- ``all`` / ``none``: every entry is non-zero / every entry is zero (no payload).

``encode_positions(scheme="auto")`` keeps the smallest of ``gaps`` and ``bitmap``.
"""

from __future__ import annotations

from enum import StrEnum

import numpy as np

from deepsqueeze.codec import ans
from deepsqueeze.codec.bits import Reader, pack_fixed, unpack_fixed, write_varint
from deepsqueeze.codec.entropy import decode_stream, encode_stream
from deepsqueeze.errors import ArtifactError

PRIOR_STRENGTH = 4.0  # pseudo-rows pulling a column's estimate towards the overall density


class PositionScheme(StrEnum):
    AUTO = "auto"
    GAPS = "gaps"
    GAPS_FIXED = "gaps-fixed"
    BITMAP = "bitmap"


_ALL, _NONE, _GAPS, _GAPS_FIXED, _BITMAP = 0, 1, 2, 3, 4
_NAMES = {_ALL: "all", _NONE: "none", _GAPS: "gaps", _GAPS_FIXED: "gaps-fixed", _BITMAP: "bitmap"}


def gap_symbols(positions: np.ndarray, width: int) -> np.ndarray:
    """Relative-gap symbols with fillers for sorted ``positions``: gap ``g`` becomes ``g // F`` fillers
    (symbol ``F = 2**width - 1``) followed by ``g % F``."""
    filler = (1 << width) - 1
    positions = np.asarray(positions, dtype=np.int64)
    gaps = np.diff(positions, prepend=-1) - 1
    n_fill = gaps // filler
    out = np.full(int(n_fill.sum()) + gaps.size, filler, dtype=np.int64)
    ends = np.cumsum(n_fill + 1) - 1
    out[ends] = gaps % filler
    return out


def positions_from_gaps(symbols: np.ndarray, width: int, numel: int) -> np.ndarray:
    """Inverse of ``gap_symbols``; ArtifactError when a position falls outside ``[0, numel)``."""
    filler = (1 << width) - 1
    symbols = np.asarray(symbols, dtype=np.int64)
    if symbols.size and (symbols.min() < 0 or symbols.max() > filler):
        raise ArtifactError("sparse index stream is corrupted (gap symbol out of range)")
    steps = np.where(symbols == filler, filler, symbols + 1)
    ends = np.cumsum(steps) - 1
    positions = ends[symbols != filler]
    if symbols.size and symbols[-1] == filler:
        raise ArtifactError("sparse index stream is corrupted (ends with a filler)")
    if positions.size and positions[-1] >= numel:
        raise ArtifactError("sparse index stream is corrupted (position past the end of the tensor)")
    return positions


def _bitmap_probs(mask2d: np.ndarray) -> np.ndarray:
    """Probability of a 1 for every bit of ``mask2d`` given the rows above it (vectorised; the decoder
    computes the same numbers one row at a time, see ``_row_probs``)."""
    rows, cols = mask2d.shape
    col_ones = np.cumsum(mask2d, axis=0) - mask2d
    row_ones = mask2d.sum(axis=1)
    seen_ones = (np.cumsum(row_ones) - row_ones).astype(np.float64)
    return np.stack([_row_probs(col_ones[i], float(seen_ones[i]), i, cols) for i in range(rows)]) if rows else \
        np.zeros((0, cols))


def _row_probs(col_ones: np.ndarray, seen_ones: float, row: int, cols: int) -> np.ndarray:
    density = (seen_ones + 0.5) / (row * cols + 1.0)
    return (col_ones + PRIOR_STRENGTH * density) / (row + PRIOR_STRENGTH)


def _encode_bitmap(mask2d: np.ndarray) -> bytes:
    probs = _bitmap_probs(mask2d)
    return ans.encode_bits(mask2d.ravel(), probs.ravel()).astype("<u4").tobytes()


def _decode_bitmap(words: bytes, rows: int, cols: int) -> np.ndarray:
    decoder = ans.BitDecoder(words)
    mask = np.zeros((rows, cols), dtype=np.int64)
    col_ones = np.zeros(cols, dtype=np.int64)
    seen = 0
    for i in range(rows):
        row = decoder.decode(_row_probs(col_ones, float(seen), i, cols))
        mask[i] = row
        col_ones += row
        seen += int(row.sum())
    decoder.finish()
    return mask


def encode_positions(mask: np.ndarray, shape2d: tuple[int, int] | None = None,
                     scheme: PositionScheme | str = PositionScheme.AUTO, width: int | None = None) -> bytes:
    """Code the non-zero positions of boolean ``mask`` (any shape; row-major order)."""
    scheme = PositionScheme(scheme)
    flat = np.asarray(mask, dtype=bool).ravel()
    numel = flat.size
    positions = np.flatnonzero(flat)
    if positions.size == numel and scheme is not PositionScheme.GAPS_FIXED:
        return bytes([_ALL])
    if positions.size == 0:
        return bytes([_NONE])
    if scheme is PositionScheme.GAPS_FIXED:
        width = width or 4
        symbols = gap_symbols(positions, width)
        out = bytearray([_GAPS_FIXED, width])
        write_varint(out, symbols.size)
        return bytes(out) + pack_fixed(symbols, width)
    candidates = []
    if scheme in (PositionScheme.AUTO, PositionScheme.GAPS):
        widths = [width] if width else range(1, 13)
        for w in widths:
            stream, _ = encode_stream(gap_symbols(positions, w), 1 << w)
            candidates.append(bytes([_GAPS, w]) + stream)
    if scheme in (PositionScheme.AUTO, PositionScheme.BITMAP):
        rows, cols = shape2d if shape2d else (1, numel)
        if rows * cols != numel:
            raise ValueError(f"shape2d {shape2d} does not match {numel} entries")
        m2 = flat.reshape(rows, cols).astype(np.int64)
        candidates.append(bytes([_BITMAP, 0]) + _encode_bitmap(m2))
        candidates.append(bytes([_BITMAP, 1]) + _encode_bitmap(np.ascontiguousarray(m2.T)))
    return min(candidates, key=len)


def decode_positions(data: bytes, numel: int, shape2d: tuple[int, int] | None = None) -> np.ndarray:
    """Inverse of ``encode_positions``: a flat boolean mask of ``numel`` entries."""
    reader = Reader(data, "sparse index stream")
    kind = reader.byte()
    if kind == _ALL:
        reader.finish()
        return np.ones(numel, dtype=bool)
    if kind == _NONE:
        reader.finish()
        return np.zeros(numel, dtype=bool)
    if kind in (_GAPS, _GAPS_FIXED):
        width = reader.byte()
        if not 1 <= width <= 16:
            raise ArtifactError("sparse index stream is corrupted (gap width out of range)")
        if kind == _GAPS:
            symbols = decode_stream(reader.rest(), max_count=numel + numel // 1 + 1)
        else:
            count = reader.varint(limit=2 * numel + 1)
            symbols = unpack_fixed(reader.rest(), width, count, "sparse index stream")
        mask = np.zeros(numel, dtype=bool)  # after the stream was checked against its payload
        mask[positions_from_gaps(symbols, width, numel)] = True
        return mask
    if kind == _BITMAP:
        transposed = reader.byte()
        rows, cols = shape2d if shape2d else (1, numel)
        if rows * cols != numel or transposed > 1:
            raise ArtifactError("sparse index stream is corrupted (bitmap shape)")
        if transposed:
            return _decode_bitmap(reader.rest(), cols, rows).T.astype(bool).ravel()
        return _decode_bitmap(reader.rest(), rows, cols).astype(bool).ravel()
    raise ArtifactError(f"sparse index stream is corrupted (unknown scheme id {kind})")


def scheme_name(data: bytes) -> str:
    """The scheme a coded position stream uses (for reports)."""
    return _NAMES.get(data[0], "unknown") if data else "unknown"
