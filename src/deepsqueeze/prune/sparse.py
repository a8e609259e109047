"""Sparse execution (``SparseCSRLinear``) and sparse storage (the ``sparse`` tensor encoding).

Break-even, measured with ``torch.sparse.mm`` (CSR) against ``F.linear`` on this project's 2-core CPU
(torch 2.13.0, 1 thread to keep the shared machine's scheduling noise out, 10th-percentile of 60 calls,
see the prune engineer's report): at batch 256 CSR wins from about 80% sparsity (0.99x at 80%,
3.6x at 90%, 7.0x at 95% on a 1536x384 weight; 0.57x / 1.86x / 3.30x on 300x784); at batch 1 only
from about 93% (0.75x at 90%, 1.23x at 95% on 1536x384). ``CSR_BREAK_EVEN_SPARSITY`` sits between and
decides which layers are stored and loaded as ``SparseCSRLinear``. At 2 threads the same 300x784 layer
ran 0.8x of dense, so the break-even moves with shapes, threads and CPUs: each ``SparseCSRLinear``
therefore races CSR against a dense product on its first call (:func:`sparse_kernel`), once per
process for each (shape, non-zeros, batch kind), and runs the faster one.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
from torch import nn

from deepsqueeze.codec.encodings import bytes_to_tensor, tensor_to_bytes
from deepsqueeze.core.encoding import register_encoding
from deepsqueeze.core.kinds import weight_bearing_modules
from deepsqueeze.core.record import record_encoding, record_transform, register_transform
from deepsqueeze.core.timing import choose, forced_choice
from deepsqueeze.core.walker import get_submodule, iter_modules, set_submodule
from deepsqueeze.errors import ArtifactError

CSR_BREAK_EVEN_SPARSITY = 0.85

_CSR_BETA = "Sparse CSR tensor support is in beta state"


SPARSE_KERNELS = ("csr", "dense")
_measured_sparse_kernel: dict[tuple[int, ...], str] = {}


def sparse_kernel(layer: SparseCSRLinear, x: torch.Tensor) -> str:
    """``"csr"`` or ``"dense"`` for ``layer`` on the 2-D batch ``x``: forced by ``DEEPSQUEEZE_SPARSE_KERNEL``, else raced.

    The race runs both of the layer's forward paths on ``x`` (:func:`deepsqueeze.core.timing.choose`:
    interleaved repetitions, dense kept unless CSR is 15% faster) and the decision is kept per weight
    shape, non-zero count and batch kind (one row or many), in the process and in the machine's kernel
    cache, so every layer of that kind, in every copy of the model, runs the same kernel and gives the same bits.
    """
    forced = forced_choice("DEEPSQUEEZE_SPARSE_KERNEL", SPARSE_KERNELS)
    if forced is not None:
        return forced
    if layer.weight_csr.device.type != "cpu":
        return "csr"
    key = (*layer.weight_csr.shape, int(layer.weight_csr.values().numel()), min(x.shape[0], 2))
    if key not in _measured_sparse_kernel:
        name = f"sparse-csr-linear {key[0]}x{key[1]} nnz={key[2]} rows={'1' if key[3] == 1 else 'many'}"
        _measured_sparse_kernel[key] = choose(name, {"dense": lambda: layer._dense_product(x),
                                                     "csr": lambda: layer._csr_product(x)})
    return _measured_sparse_kernel[key]


def _to_csr(dense: torch.Tensor) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_CSR_BETA)
        return dense.to_sparse_csr()


class SparseCSRLinear(nn.Module):
    """A Linear layer whose weight is held as a CSR sparse matrix (inference only).

    It multiplies with ``torch.sparse.mm``, or with a dense copy where :func:`sparse_kernel` measured
    the dense product faster for this shape and batch on the running machine.

    The state dict still carries the dense ``weight`` (rebuilt from CSR on save, turned back into
    CSR on load) so the artifact's ``sparse`` encoding and strict loading see the usual keys.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight_csr = _to_csr(torch.zeros(out_features, in_features))
        self.bias = nn.Parameter(torch.zeros(out_features), requires_grad=False) if bias else None
        self._dense: torch.Tensor | None = None  # a dense copy, kept only if the dense kernel wins
        self._kernels: dict[int, str] = {}  # batch kind (1 row / many) -> "csr" or "dense"

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> SparseCSRLinear:
        new = cls(linear.in_features, linear.out_features, linear.bias is not None)
        new.weight_csr = _to_csr(linear.weight.detach().clone())
        if linear.bias is not None:
            new.bias.data.copy_(linear.bias.detach())
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        kind = min(flat.shape[0], 2)
        kernel = self._kernels.get(kind)
        if kernel is None:
            kernel = self._kernels[kind] = sparse_kernel(self, flat)
            if "dense" not in self._kernels.values():
                self._dense = None  # the race built it: keep it only while some batch kind runs dense
        product = self._dense_product if kernel == "dense" else self._csr_product
        return product(flat).reshape(*x.shape[:-1], self.out_features)

    def _csr_product(self, flat: torch.Tensor) -> torch.Tensor:
        out = torch.sparse.mm(self.weight_csr, flat.T.contiguous()).T
        return out + self.bias if self.bias is not None else out

    def _dense_product(self, flat: torch.Tensor) -> torch.Tensor:
        if self._dense is None:
            self._dense = self.weight_csr.to_dense()
        return torch.nn.functional.linear(flat, self._dense, self.bias)

    def dense_weight(self) -> torch.Tensor:
        return self.weight_csr.to_dense()

    def onnx_form(self) -> tuple[nn.Module, str]:
        """A dense Linear: ONNX Runtime has no sparse matrix kernel on CPU (the zeros are stored)."""
        dense = nn.Linear(self.in_features, self.out_features, self.bias is not None)
        dense.weight.data = self.dense_weight()
        if self.bias is not None:
            dense.bias.data = self.bias.detach().clone()
        return dense, "dense float MatMul (ONNX Runtime has no sparse CPU kernel)"

    def deepsqueeze_param_count(self) -> int:
        return self.in_features * self.out_features + (self.out_features if self.bias is not None else 0)

    def deepsqueeze_nonzero_count(self) -> int:
        nonzero = int((self.weight_csr.values() != 0).sum())
        return nonzero + (int((self.bias != 0).sum()) if self.bias is not None else 0)

    def _save_to_state_dict(self, destination: dict[str, Any], prefix: str, keep_vars: bool) -> None:
        destination[prefix + "weight"] = self.dense_weight()
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, local_metadata: Any, strict: bool,
                              missing_keys: list[str], unexpected_keys: list[str], error_msgs: list[str]) -> None:
        key = prefix + "weight"
        if key in state_dict:
            weight = state_dict[key]
            if tuple(weight.shape) != (self.out_features, self.in_features):
                error_msgs.append(f"{key}: shape {tuple(weight.shape)} does not fit "
                                  f"({self.out_features}, {self.in_features})")
            else:
                self.weight_csr = _to_csr(weight.detach().float().clone())
                self._dense, self._kernels = None, {}
        elif strict:
            missing_keys.append(key)
        rest = {k: v for k, v in state_dict.items() if k != key}
        super()._load_from_state_dict(rest, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)

    def _apply(self, fn: Any, recurse: bool = True) -> SparseCSRLinear:
        super()._apply(fn, recurse)
        self.weight_csr = fn(self.weight_csr)
        self._dense, self._kernels = None, {}
        return self

    def extra_repr(self) -> str:
        nnz = int(self.weight_csr.values().numel())
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"nnz={nnz} ({1 - nnz / max(self.in_features * self.out_features, 1):.1%} sparse)")


@register_transform("sparse_csr_linear")
def _replay_sparse_linear(root: nn.Module, target: str, params: dict[str, Any]) -> None:
    linear = get_submodule(root, target)
    set_submodule(root, target, SparseCSRLinear(linear.in_features, linear.out_features, linear.bias is not None))


def to_sparse_execution(root: nn.Module, min_sparsity: float = CSR_BREAK_EVEN_SPARSITY,
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
        set_submodule(root, name, SparseCSRLinear.from_linear(linear))
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
