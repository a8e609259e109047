"""Sparse storage and execution for pruned models: the ``sparse`` tensor encoding (non-zero values plus
compact indices) and :func:`to_sparse_execution`, which installs :class:`deepsqueeze.runtime.SparseCSRLinear`
(the representation, its kernel race and its break-even live in :mod:`deepsqueeze.runtime.sparse`) and
records the ``sparse_csr_linear`` transform the loader replays.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from deepsqueeze import runtime
from deepsqueeze.codec.encodings import bytes_to_tensor, tensor_to_bytes
from deepsqueeze.core.deprecation import moved_to
from deepsqueeze.core.encoding import register_encoding
from deepsqueeze.core.kinds import weight_bearing_modules
from deepsqueeze.core.record import record_encoding, record_transform, register_transform
from deepsqueeze.core.walker import get_submodule, iter_modules, set_submodule
from deepsqueeze.errors import ArtifactError


@register_transform("sparse_csr_linear")
def _replay_sparse_linear(root: nn.Module, target: str, params: dict[str, Any]) -> None:
    linear = get_submodule(root, target)
    new = runtime.SparseCSRLinear(linear.in_features, linear.out_features, linear.bias is not None)
    set_submodule(root, target, new)


def to_sparse_execution(root: nn.Module, min_sparsity: float = runtime.CSR_BREAK_EVEN_SPARSITY,
                        include: list[str] | None = None, exclude: list[str] | None = None) -> list[str]:
    """Replace every ``nn.Linear`` at least ``min_sparsity`` sparse with a ``SparseCSRLinear``; return their names."""
    replaced = []
    owners = [n + "." for n, _, kind in weight_bearing_modules(root) if kind is not None and kind.owns_children]
    for name, linear in iter_modules(root, types=nn.Linear, include=include, exclude=exclude):
        if any(name.startswith(o) for o in owners):
            continue  # run by its owner (nn.MultiheadAttention's out_proj)
        weight = linear.weight.detach()
        if 1.0 - float((weight != 0).sum()) / weight.numel() < min_sparsity:
            continue
        set_submodule(root, name, runtime.SparseCSRLinear.from_linear(linear))
        record_transform(root, "sparse_csr_linear", name)
        record_encoding(root, f"{name}.weight", "sparse")
        replaced.append(name)
    return replaced


# ---------------------------------------------------------------------------------------------------------
# The ``sparse`` encoding: non-zero values plus compact indices (a bitmap or narrow CSR column indices,
# whichever is smaller for this tensor). A tensor is viewed as rows x (all other dims).


def _index_dtype(limit: int) -> torch.dtype:
    if limit <= 2**8:
        return torch.uint8
    if limit <= 2**16:
        return torch.uint16
    return torch.int32


def sparse_layout_bytes(rows: int, cols: int, nnz: int, itemsize: int) -> dict[str, int]:
    """Payload bytes of each layout (so callers and tests can state the expected size)."""
    values = nnz * itemsize
    col_bytes = torch.empty((), dtype=_index_dtype(cols)).element_size()
    ptr_bytes = torch.empty((), dtype=_index_dtype(cols + 1)).element_size()
    return {
        "bitmap": values + math.ceil(rows * cols / 8),
        "csr": values + nnz * col_bytes + rows * ptr_bytes,
    }


def _encode_sparse(tensor: torch.Tensor, **_: Any) -> tuple[dict[str, Any], list[bytes]]:
    t = tensor.detach().cpu().contiguous()
    rows = t.shape[0] if t.dim() > 0 else 1
    cols = math.prod(t.shape[1:]) if t.dim() > 0 else 1
    flat = t.reshape(rows, cols)
    nonzero = flat != 0
    values = flat[nonzero]
    sizes = sparse_layout_bytes(rows, cols, int(values.numel()), t.element_size())
    layout = "bitmap" if sizes["bitmap"] <= sizes["csr"] else "csr"
    if layout == "bitmap":
        bits = nonzero.reshape(-1).numpy()
        import numpy as np

        index = np.packbits(bits, bitorder="little").tobytes()
        return {"layout": "bitmap", "nnz": int(values.numel())}, [tensor_to_bytes(values), index]
    col_idx = nonzero.nonzero()[:, 1].to(_index_dtype(cols))
    # per-row counts fit in the column-index dtype range + 1; store counts (not cumulative) to stay narrow
    counts = nonzero.sum(1).to(_index_dtype(cols + 1))
    meta = {"layout": "csr", "nnz": int(values.numel()), "col_dtype": str(col_idx.dtype).removeprefix("torch."),
            "count_dtype": str(counts.dtype).removeprefix("torch.")}
    return meta, [tensor_to_bytes(values), tensor_to_bytes(col_idx), tensor_to_bytes(counts)]


_INDEX_DTYPES = {"uint8": torch.uint8, "uint16": torch.uint16, "int32": torch.int32}


def _decode_sparse(meta: dict[str, Any], segments: list[bytes], shape: tuple[int, ...],
                   dtype: torch.dtype) -> torch.Tensor:
    """Every length is checked against the declared shape before anything of that size is allocated."""
    import numpy as np

    rows = shape[0] if shape else 1
    numel = math.prod(shape)
    cols = math.prod(shape[1:]) if shape else 1
    nnz, layout = meta.get("nnz"), meta.get("layout")
    if not isinstance(nnz, int) or isinstance(nnz, bool) or not 0 <= nnz <= numel:
        raise ArtifactError(f"corrupt sparse tensor: nnz {str(nnz)[:30]} does not fit {numel} entries")
    itemsize = torch.empty((), dtype=dtype).element_size()
    if not segments or len(segments[0]) != nnz * itemsize:
        raise ArtifactError("corrupt sparse tensor: the value segment does not hold nnz values")
    try:
        values = bytes_to_tensor(segments[0], (nnz,), dtype)
        if layout == "bitmap":
            if len(segments) != 2 or len(segments[1]) != -(-numel // 8):
                raise ValueError("bitmap length does not match the shape")
            bits = np.unpackbits(np.frombuffer(segments[1], dtype=np.uint8), bitorder="little")[:numel]
            mask = torch.from_numpy(bits.astype(bool))
            if int(mask.sum()) != nnz:
                raise ValueError("bitmap does not match the value count")
            out = torch.zeros(numel, dtype=dtype)
            out[mask] = values
            return out.reshape(shape)
        if layout == "csr":
            col_dtype = _INDEX_DTYPES.get(meta.get("col_dtype"))  # type: ignore[arg-type]
            count_dtype = _INDEX_DTYPES.get(meta.get("count_dtype"))  # type: ignore[arg-type]
            if col_dtype is None or count_dtype is None or len(segments) != 3:
                raise ValueError("unknown index dtype or wrong segment count")
            col = bytes_to_tensor(segments[1], (nnz,), col_dtype).long()
            counts = bytes_to_tensor(segments[2], (rows,), count_dtype).long()
            if bool((counts < 0).any()) or int(counts.sum()) != nnz:
                raise ValueError("row counts do not add up to nnz")
            row = torch.repeat_interleave(torch.arange(rows), counts)
            if nnz and (int(col.max()) >= cols or int(col.min()) < 0):
                raise ValueError("column indices out of range")
            out = torch.zeros(rows, cols, dtype=dtype)
            out[row, col] = values
            return out.reshape(shape)
    except (ValueError, IndexError, RuntimeError) as exc:
        raise ArtifactError(f"corrupt sparse tensor payload: {exc}") from None
    raise ArtifactError(f"unknown sparse layout {str(layout)[:40]!r}: upgrade deepsqueeze")


register_encoding("sparse", _encode_sparse, _decode_sparse)

# old home of the sparse representation and its kernel race (deprecated, see deepsqueeze.runtime)
__getattr__ = moved_to(__name__, {runtime: ["CSR_BREAK_EVEN_SPARSITY", "SPARSE_KERNELS", "SparseCSRLinear",
                                            "sparse_kernel"]})
