"""Canonical Huffman coding of integer symbol streams (vectorised encode, table-driven decode).

Code lengths are limited to ``MAX_CODE_LENGTH`` bits (frequencies are flattened until the tree fits),
so the decoder can use one lookup table indexed by the next ``max_length`` bits. The stored form is
the code length of every symbol of the alphabet (5 bits each) followed by the MSB-first bitstream;
canonical codes are rebuilt from the lengths alone.
"""

from __future__ import annotations

import heapq

import numpy as np

from deepsqueeze.codec.bits import pack_fixed, unpack_fixed
from deepsqueeze.errors import ArtifactError

MAX_CODE_LENGTH = 20
_LENGTH_BITS = 5


def code_lengths(counts: np.ndarray, limit: int = MAX_CODE_LENGTH) -> np.ndarray:
    """Huffman code lengths for symbol ``counts`` (0 for absent symbols), longest code <= ``limit``.

    A single present symbol gets length 1. Ties break by symbol, so the result is deterministic.
    """
    counts = np.asarray(counts, dtype=np.int64)
    present = np.flatnonzero(counts)
    lengths = np.zeros(counts.size, dtype=np.int64)
    if present.size == 0:
        return lengths
    if present.size == 1:
        lengths[present[0]] = 1
        return lengths
    if present.size > 1 << limit:
        raise ValueError(f"{present.size} distinct symbols cannot have codes of at most {limit} bits")
    freq = counts[present].copy()
    while True:
        got = _tree_depths(freq)
        if got.max() <= limit:
            lengths[present] = got
            return lengths
        freq = (freq + 1) >> 1  # flatten the distribution and retry: rare symbols get shorter codes


def _tree_depths(freq: np.ndarray) -> np.ndarray:
    n = len(freq)
    heap = [(int(f), i) for i, f in enumerate(freq)]
    heapq.heapify(heap)
    parent = [0] * (2 * n - 1)
    node = n
    while len(heap) > 1:
        f1, a = heapq.heappop(heap)
        f2, b = heapq.heappop(heap)
        parent[a] = parent[b] = node
        heapq.heappush(heap, (f1 + f2, node))
        node += 1
    depth = [0] * (2 * n - 1)
    for i in range(2 * n - 3, -1, -1):  # the root (2n-2) has depth 0; parents come after children
        depth[i] = depth[parent[i]] + 1
    return np.asarray(depth[:n], dtype=np.int64)


def canonical_codes(lengths: np.ndarray) -> np.ndarray:
    """Canonical code words for ``lengths``: shorter codes first, then by symbol."""
    lengths = np.asarray(lengths, dtype=np.int64)
    codes = np.zeros(lengths.size, dtype=np.int64)
    order = np.lexsort((np.arange(lengths.size), lengths))
    order = order[lengths[order] > 0]
    code, prev_len = 0, 0
    for sym in order.tolist():
        length = int(lengths[sym])
        code <<= length - prev_len
        codes[sym] = code
        code += 1
        prev_len = length
    return codes


def encode(symbols: np.ndarray, alphabet: int) -> bytes:
    """Huffman-code ``symbols`` (integers in ``[0, alphabet)``): lengths table + bitstream."""
    symbols = np.asarray(symbols, dtype=np.int64).ravel()
    counts = np.bincount(symbols, minlength=alphabet) if symbols.size else np.zeros(alphabet, np.int64)
    if counts.size != alphabet:
        raise ValueError(f"symbols must lie in [0, {alphabet})")
    lengths = code_lengths(counts)
    codes = canonical_codes(lengths)
    return pack_fixed(lengths, _LENGTH_BITS) + _pack_codes(codes[symbols], lengths[symbols])


def _pack_codes(codes: np.ndarray, lengths: np.ndarray) -> bytes:
    total = int(lengths.sum())
    if total == 0:
        return b""
    starts = np.cumsum(lengths) - lengths
    owner = np.repeat(np.arange(lengths.size), lengths)
    offset = np.arange(total) - starts[owner]
    bits = (codes[owner] >> (lengths[owner] - 1 - offset)) & 1
    return np.packbits(bits.astype(np.uint8)).tobytes()


def encoded_bits(counts: np.ndarray) -> int:
    """Size in bits of the Huffman payload for these symbol counts (without the lengths table)."""
    lengths = code_lengths(counts)
    return int((lengths * np.asarray(counts, dtype=np.int64)).sum())


def decode(data: bytes, count: int, alphabet: int) -> np.ndarray:
    """Inverse of ``encode``; ArtifactError on any inconsistency (bad lengths, invalid code, wrong size)."""
    table_bytes = -(-alphabet * _LENGTH_BITS // 8)
    if len(data) < table_bytes:
        raise ArtifactError("huffman stream is truncated (code length table)")
    lengths = unpack_fixed(data[:table_bytes], _LENGTH_BITS, alphabet, "huffman code length table")
    payload = np.frombuffer(data[table_bytes:], dtype=np.uint8)
    if count == 0:
        if payload.size:
            raise ArtifactError("huffman stream is corrupted (payload for an empty stream)")
        return np.zeros(0, dtype=np.int64)
    if count > 8 * payload.size:  # every symbol takes at least one bit: refuse before allocating
        raise ArtifactError(f"huffman stream is corrupted ({count} symbols declared in {payload.size} bytes)")
    present = np.flatnonzero(lengths)
    if present.size == 0 or lengths.max() > MAX_CODE_LENGTH:
        raise ArtifactError("huffman stream is corrupted (invalid code lengths)")
    max_len = int(lengths.max())
    kraft = int(np.sum(1 << (max_len - lengths[present])))
    if kraft > 1 << max_len:
        raise ArtifactError("huffman stream is corrupted (code lengths violate the Kraft inequality)")
    codes = canonical_codes(lengths)
    # Lookup table over every max_len-bit window: symbol and code length (0 = no code starts here).
    table_sym = np.zeros(1 << max_len, dtype=np.int64)
    table_len = np.zeros(1 << max_len, dtype=np.int64)
    spans = 1 << (max_len - lengths[present])
    starts = codes[present] << (max_len - lengths[present])
    owner = np.repeat(np.arange(present.size), spans)
    slots = np.repeat(starts, spans) + (np.arange(int(spans.sum())) - np.repeat(np.cumsum(spans) - spans, spans))
    table_sym[slots] = present[owner]
    table_len[slots] = lengths[present][owner]
    bits = np.unpackbits(payload).astype(np.int64)
    total = bits.size
    padded = np.concatenate([bits, np.zeros(max_len, dtype=np.int64)])
    window = np.zeros(total, dtype=np.int64)
    for j in range(max_len):
        window = (window << 1) | padded[j : j + total]
    sym_at = table_sym[window].tolist()
    len_at = table_len[window].tolist()
    out = [0] * count
    pos = 0
    for i in range(count):
        if pos >= total:
            raise ArtifactError("huffman stream is truncated (fewer symbols than declared)")
        step = len_at[pos]
        if step == 0:
            raise ArtifactError("huffman stream is corrupted (bits match no code)")
        out[i] = sym_at[pos]
        pos += step
    if pos > total or total - pos >= 8:
        raise ArtifactError("huffman stream is corrupted (payload length does not match the symbol count)")
    return np.asarray(out, dtype=np.int64)
