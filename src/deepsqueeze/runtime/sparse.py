"""The sparse representation: :class:`SparseCSRLinear`, a Linear whose weight is held as a CSR matrix.

Break-even, measured with ``torch.sparse.mm`` (CSR) against ``F.linear`` on this project's 2-core CPU
(torch 2.13.0, 1 thread to keep the shared machine's scheduling noise out, 10th-percentile of 60 calls,
see the prune engineer's report): at batch 256 CSR wins from about 80% sparsity (0.99x at 80%,
3.6x at 90%, 7.0x at 95% on a 1536x384 weight; 0.57x / 1.86x / 3.30x on 300x784); at batch 1 only
from about 93% (0.75x at 90%, 1.23x at 95% on 1536x384). ``CSR_BREAK_EVEN_SPARSITY`` sits between and
decides which layers are stored and loaded as ``SparseCSRLinear``. At 2 threads the same 300x784 layer
ran 0.8x of dense, so the break-even moves with shapes, threads and CPUs: each ``SparseCSRLinear``
therefore races CSR against a dense product on its first call
(:func:`deepsqueeze.runtime.kernels.sparse_kernel`), once per process for each (shape, non-zeros, batch
kind), and runs the faster one.

The file stores its weight with the ``sparse`` tensor encoding (:mod:`deepsqueeze.prune.sparse`).
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

from deepsqueeze.runtime.kernels import preferred, sparse_kernel

__all__ = ["CSR_BREAK_EVEN_SPARSITY", "SparseCSRLinear"]

CSR_BREAK_EVEN_SPARSITY = 0.85

_CSR_BETA = "Sparse CSR tensor support is in beta state"


def _to_csr(dense: torch.Tensor) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_CSR_BETA)
        return dense.to_sparse_csr()


class SparseCSRLinear(nn.Module):
    """A Linear layer whose weight is held as a CSR sparse matrix (inference only).

    It multiplies with ``torch.sparse.mm``, or densely where :func:`sparse_kernel` measured the dense
    product faster for this shape and batch on the running machine: on a dense weight rebuilt on each call,
    or (:func:`~deepsqueeze.runtime.kernels.set_prefer` ``"speed"``) on a dense copy kept.

    The state dict still carries the dense ``weight`` (rebuilt from CSR on save, turned back into
    CSR on load) so the artifact's ``sparse`` encoding and strict loading see the usual keys.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight_csr = _to_csr(torch.zeros(out_features, in_features))
        self.bias = nn.Parameter(torch.zeros(out_features), requires_grad=False) if bias else None
        self._dense: torch.Tensor | None = None  # a dense copy, kept only if the dense kernel wins and speed is preferred
        self._kernels: dict[int, str] = {}  # batch kind (1 row / many) -> "csr" or "dense"

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> SparseCSRLinear:
        new = cls(linear.in_features, linear.out_features, linear.bias is not None)
        new.weight_csr = _to_csr(linear.weight.detach().clone())
        if linear.bias is not None:
            new.bias.data.copy_(linear.bias.detach())
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x if x.dim() == 2 else x.reshape(-1, self.in_features)
        kind = 1 if flat.shape[0] == 1 else 2
        kernel = self._kernels.get(kind)
        if kernel is None:
            kernel = self._kernels[kind] = sparse_kernel(self, flat)
            if "dense" not in self._kernels.values():
                self._dense = None  # the race built it: keep it only while some batch kind runs dense
        y = self._dense_product(flat) if kernel == "dense" else self._csr_product(flat)
        return y if x.dim() == 2 else y.reshape(*x.shape[:-1], self.out_features)

    def _csr_product(self, flat: torch.Tensor) -> torch.Tensor:
        out = torch.sparse.mm(self.weight_csr, flat.T.contiguous()).T
        return out + self.bias if self.bias is not None else out

    def _dense_product(self, flat: torch.Tensor) -> torch.Tensor:
        dense = self._dense
        if dense is None:
            dense = self.weight_csr.to_dense()
            if preferred() == "speed":
                self._dense = dense
        return torch.nn.functional.linear(flat, dense, self.bias)

    def kernel_choices(self) -> dict[str, str]:
        """Batch kind (``one`` row, ``many``) -> ``csr`` or ``dense``, as chosen so far in this process."""
        return {"one" if kind == 1 else "many": kernel for kind, kernel in self._kernels.items()}

    def dense_weight(self) -> torch.Tensor:
        return self.weight_csr.to_dense()

    def dense_linear(self) -> nn.Linear:
        """The same layer as a dense float ``nn.Linear`` (the zeros stored): what runtimes without a sparse
        kernel run."""
        dense = nn.Linear(self.in_features, self.out_features, self.bias is not None)
        dense.weight.data = self.dense_weight()
        if self.bias is not None:
            dense.bias.data = self.bias.detach().clone()
        return dense

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
