"""Codebook tensor encodings: a tensor whose values come from a small set of shared values.

A weight-shared tensor is stored as its distinct values (the codebook, in the tensor's own dtype, or in a
2-byte float where that holds every value exactly, meta ``cb``: decoding is bit-exact either way) plus one
index per entry. Three forms, registered as .dsq encodings:

- ``codebook``: every entry gets an index (zero included when present), packed at a fixed width;
  ``codebook-entropy``: the same indices entropy-coded (for dense tensors such as shared biases).
- ``sparse-codebook``: Deep Compression's stored form before Huffman: positions of the non-zero
  entries as fixed-width relative gaps with filler entries, indices of the non-zeros at a fixed width.
- ``sparse-codebook-entropy``: positions coded by the smallest of the entropy-coded gap forms, the
  adaptive bitmap (``codec.sparse_index``) and the fixed gaps; indices entropy-coded (Huffman or ANS,
  whichever is smaller, or fixed width when the code tables would cost more than they save).

Segments: ``[codebook, positions, indices]`` (``codebook`` has no positions segment). The manifest meta
records the codebook size and which position scheme and index coder won. ``analyze`` reports every
stream's Shannon bound and achieved bytes without writing anything.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from deepsqueeze.codec.bits import pack_fixed, unpack_fixed
from deepsqueeze.codec.encodings import NARROW_FLOATS, bytes_to_tensor, narrow_float, tensor_to_bytes
from deepsqueeze.codec.entropy import Coder, StreamStats, decode_stream, encode_stream, shannon_bits
from deepsqueeze.codec.sparse_index import PositionScheme, decode_positions, encode_positions, scheme_name
from deepsqueeze.core.encoding import register_encoding
from deepsqueeze.errors import ArtifactError

MAX_CODEBOOK = 1 << 16
FIXED = "fixed"  # index coder name for fixed-width packing


def _width(k: int) -> int:
    return max(1, math.ceil(math.log2(k))) if k > 1 else 0


def split_codebook(tensor: torch.Tensor, sparse: bool) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    """``(codebook, mask, indices)``: the sorted distinct values (of the non-zeros when ``sparse``), the
    flat mask of the entries that carry an index, and each such entry's index into the codebook."""
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    if not flat.is_floating_point():
        raise ArtifactError(f"codebook encodings store floating-point tensors, not {flat.dtype}")
    mask = (flat != 0) if sparse else torch.ones(flat.numel(), dtype=torch.bool)
    values = flat[mask]
    codebook = torch.unique(values)  # sorted; -0.0 and 0.0 compare equal and share one entry
    if codebook.numel() > MAX_CODEBOOK:
        raise ArtifactError(
            f"a tensor with {codebook.numel()} distinct values cannot use a codebook encoding (at most "
            f"{MAX_CODEBOOK}): run the share stage on it first, or store it raw"
        )
    indices = torch.searchsorted(codebook, values).numpy().astype(np.int64)
    return codebook, mask.numpy(), indices


def _shape2d(shape: tuple[int, ...]) -> tuple[int, int]:
    numel = math.prod(shape)
    rows = shape[0] if len(shape) >= 2 else 1
    return rows, (numel // rows if rows else 0)


def _encode_positions_fixed(mask: np.ndarray, width: int | None) -> bytes:
    """Fixed-width gaps with fillers; the width is the one giving the fewest bytes unless given."""
    widths = [width] if width else range(1, 13)
    return min((encode_positions(mask, scheme=PositionScheme.GAPS_FIXED, width=w) for w in widths), key=len)


def _encode(tensor: torch.Tensor, *, sparse: bool, positions: str, coder: str,
            gap_width: int | None = None) -> tuple[dict[str, Any], list[bytes]]:
    codebook, mask, indices = split_codebook(tensor, sparse)
    k = codebook.numel()
    meta: dict[str, Any] = {"k": k}
    narrow = narrow_float(codebook)  # centroids a 2-byte float holds exactly are stored in it
    if narrow is not None:
        meta["cb"] = narrow
    segments = [tensor_to_bytes(codebook.to(NARROW_FLOATS[narrow]) if narrow else codebook)]
    if sparse:
        if positions == PositionScheme.GAPS_FIXED.value:
            pos = _encode_positions_fixed(mask, gap_width)
        else:
            pos = encode_positions(mask, _shape2d(tuple(tensor.shape)), scheme=positions)
            if positions == PositionScheme.AUTO.value:  # the paper's fixed form can win on tiny tensors
                pos = min(pos, _encode_positions_fixed(mask, None), key=len)
        meta["pos"] = scheme_name(pos)
        segments.append(pos)
    fixed = pack_fixed(indices, _width(k))
    if coder == FIXED:
        segments.append(fixed)
        meta["idx"] = FIXED
    else:
        stream, stats = encode_stream(indices, max(k, 1), coder)
        if coder == Coder.AUTO.value and len(fixed) < len(stream):  # code tables cost more than they save
            segments.append(fixed)
            meta["idx"] = FIXED
        else:
            segments.append(stream)
            meta["idx"] = stats.coder
    return meta, segments


def _decode(meta: dict[str, Any], segments: list[bytes], shape: tuple[int, ...], dtype: torch.dtype, *,
            sparse: bool) -> torch.Tensor:
    if not dtype.is_floating_point:
        raise ArtifactError(f"codebook tensor declared with non-float dtype {dtype}")
    if len(segments) != (3 if sparse else 2):
        raise ArtifactError("codebook tensor is corrupted (wrong number of segments)")
    k = meta.get("k")
    if not isinstance(k, int) or not 0 <= k <= MAX_CODEBOOK:
        raise ArtifactError("codebook tensor is corrupted (bad codebook size in the manifest)")
    stored = dtype
    if "cb" in meta:
        stored = NARROW_FLOATS.get(meta["cb"]) if isinstance(meta["cb"], str) else None
        if stored is None or dtype != torch.float32:
            raise ArtifactError("codebook tensor is corrupted (bad codebook type in the manifest)")
    try:
        codebook = bytes_to_tensor(segments[0], (k,), stored).to(dtype)
    except ValueError as exc:
        raise ArtifactError(f"codebook tensor is corrupted ({exc})") from None
    numel = math.prod(shape)
    idx = meta.get("idx")
    if not sparse and idx == FIXED and k > 1 and len(segments[-1]) != -(-numel * _width(k) // 8):
        # checked before anything of the declared size is allocated
        raise ArtifactError(f"codebook tensor is corrupted ({len(segments[-1])} index bytes cannot hold {numel} "
                            f"indices of {_width(k)} bits)")
    mask = decode_positions(segments[1], numel, _shape2d(shape)) if sparse else None
    count = int(mask.sum()) if mask is not None else numel
    if idx == FIXED:
        indices = unpack_fixed(segments[-1], _width(k), count, "codebook index stream")
    else:
        indices = decode_stream(segments[-1], max_count=numel)
        if indices.size != count:
            raise ArtifactError("codebook tensor is corrupted (index count does not match the positions)")
    if count and (k == 0 or int(indices.max()) >= k):
        raise ArtifactError("codebook tensor is corrupted (index past the end of the codebook)")
    if mask is None:
        return codebook[torch.from_numpy(indices)].reshape(shape) if count else torch.zeros(shape, dtype=dtype)
    out = torch.zeros(numel, dtype=dtype)
    if count:
        out[torch.from_numpy(np.flatnonzero(mask))] = codebook[torch.from_numpy(indices)]
    return out.reshape(shape)


def _register(name: str, *, sparse: bool, positions: str, coder: str) -> None:
    def encode(tensor: torch.Tensor, positions: str = positions, coder: str = coder,
               gap_width: int | None = None, **_: Any) -> tuple[dict[str, Any], list[bytes]]:
        return _encode(tensor, sparse=sparse, positions=positions, coder=coder, gap_width=gap_width)

    def decode(meta: dict[str, Any], segments: list[bytes], shape: tuple[int, ...],
               dtype: torch.dtype) -> torch.Tensor:
        return _decode(meta, segments, shape, dtype, sparse=sparse)

    register_encoding(name, encode, decode, {"positions": (str,), "coder": (str,), "gap_width": (int, type(None))})


_register("codebook", sparse=False, positions="", coder=FIXED)
_register("codebook-entropy", sparse=False, positions="", coder=Coder.AUTO.value)
_register("sparse-codebook", sparse=True, positions=PositionScheme.GAPS_FIXED.value, coder=FIXED)
_register("sparse-codebook-entropy", sparse=True, positions=PositionScheme.AUTO.value, coder=Coder.AUTO.value)


@dataclass(frozen=True)
class TensorCodingStats:
    """The streams of one codebook-coded tensor: codebook, positions, indices (bytes and Shannon bounds)."""

    name: str
    encoding: str
    numel: int
    nonzero: int
    codebook_bytes: int
    position_scheme: str
    position_bytes: int
    position_shannon_bytes: float
    index: StreamStats

    @property
    def total_bytes(self) -> int:
        return self.codebook_bytes + self.position_bytes + self.index.coded_bytes

    def as_dict(self) -> dict[str, Any]:
        return {"tensor": self.name, "encoding": self.encoding, "numel": self.numel, "nonzero": self.nonzero,
                "codebook_bytes": self.codebook_bytes, "position_scheme": self.position_scheme,
                "position_bytes": self.position_bytes,
                "position_bits_per_nonzero": round(8 * self.position_bytes / max(self.nonzero, 1), 3),
                "gap_shannon_bytes": round(self.position_shannon_bytes, 1),
                "index_coder": self.index.coder, "index_bytes": self.index.coded_bytes,
                "index_shannon_bytes": round(self.index.entropy_bits / 8, 1),
                "index_bits_per_nonzero": round(8 * self.index.coded_bytes / max(self.nonzero, 1), 3),
                "total_bytes": self.total_bytes}


def analyze(name: str, tensor: torch.Tensor, encoding: str = "sparse-codebook-entropy",
            **params: Any) -> TensorCodingStats:
    """Encode ``tensor`` with ``encoding`` and report each stream (what the .dsq will hold for it).

    The gap bound is the order-0 Shannon bound of the 4-bit-filler gap stream (the paper's form), a
    reference for how much the chosen position scheme saves.
    """
    from deepsqueeze.codec.sparse_index import gap_symbols
    from deepsqueeze.core.encoding import get_encoding

    meta, segments = get_encoding(encoding).encode(tensor.detach().cpu(), **params)
    sparse = encoding.startswith("sparse-")
    _, mask, indices = split_codebook(tensor, sparse)
    k = int(meta["k"])
    if meta["idx"] == FIXED:
        index = StreamStats("indices", indices.size, k, shannon_bits(indices), FIXED, len(segments[-1]))
    else:
        index = StreamStats("indices", indices.size, k, shannon_bits(indices), str(meta["idx"]), len(segments[-1]))
    gap_bound = shannon_bits(gap_symbols(np.flatnonzero(mask), 4)) / 8 if sparse else 0.0
    return TensorCodingStats(name, encoding, int(mask.size), int(mask.sum()), len(segments[0]),
                             str(meta.get("pos", "dense")), len(segments[1]) if sparse else 0, gap_bound, index)
