"""``PackedWeights``: any float module whose weight tensors are held as packed integer codes.

For layer kinds without a dedicated integer kernel here (``Conv1d``, ``ConvTranspose2d``, ``LSTM``,
``GRU``, the projections of ``nn.MultiheadAttention``, ...), the module is kept as it is and only its
weight tensors (:func:`deepsqueeze.core.kinds.layer_kind` names them) are replaced: each is stored as
2..8-bit codes, one row per first-dimension index (an output channel; a ``ConvTranspose`` weight's
rows are its input channels), with one scale and zero point per row or per group of ``group_size``
elements of a row. At run time the codes are dequantized once (cached) and handed to the wrapped
module as plain attributes, so its own forward runs unchanged: weight-only quantization (storage
and memory shrink; arithmetic stays float), like the weight-only modes of torchao and HQQ.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from deepsqueeze.core.kinds import layer_kind
from deepsqueeze.runtime.int8 import _PackedWeight

__all__ = ["PackedTensor", "PackedWeights"]


class PackedTensor(_PackedWeight):
    """One weight tensor of any shape as packed rows (``shape[0]`` rows of ``numel / shape[0]``)."""

    def __init__(self, shape: list[int] | tuple[int, ...], bits: int = 8, group_size: int | None = None) -> None:
        super().__init__()
        self.shape = tuple(int(s) for s in shape)
        rows = self.shape[0]
        cols = int(torch.Size(self.shape).numel()) // rows
        self._init_codes(rows, cols, bits, group_size, False)

    def dequantized(self) -> torch.Tensor:
        return self._cached("weight", lambda: self.dequantized_rows().reshape(self.shape))


def _owner(module: nn.Module, dotted: str) -> tuple[nn.Module, str]:
    path, _, attr = dotted.rpartition(".")
    return (module.get_submodule(path) if path else module), attr


def _key(name: str) -> str:
    return name.replace(".", "__")


class PackedWeights(nn.Module):
    """``inner`` (a float module) with the weight tensors named in ``specs`` held as :class:`PackedTensor`.

    ``specs``: ``{tensor name: {"shape": [...], "bits": b, "group_size": g or None}}`` (dotted names
    reach into children, e.g. ``out_proj.weight`` of ``nn.MultiheadAttention``). The float tensors are
    removed from ``inner``; everything else of it (biases, norms, hyper-parameters) stays.
    """

    def __init__(self, inner: nn.Module, specs: dict[str, dict[str, Any]]) -> None:
        super().__init__()
        self.specs = {name: dict(spec) for name, spec in specs.items()}
        self.packed = nn.ModuleDict({_key(name): PackedTensor(spec["shape"], spec["bits"], spec.get("group_size"))
                                     for name, spec in self.specs.items()})
        for name in self.specs:
            owner, attr = _owner(inner, name)
            owner._parameters.pop(attr, None)
            setattr(owner, attr, None)  # RNNs refresh their flat weight list on every set
        self.inner = inner

    @classmethod
    def from_float(cls, module: nn.Module, bits: int = 8, group_size: int | None = None,
                   symmetric: bool = False) -> PackedWeights:
        """Quantize every weight of ``module``'s layer kind round-to-nearest; a group that does not divide a
        row falls back to one scale per row."""
        kind = layer_kind(module)
        if kind is None:
            raise TypeError(f"{type(module).__name__} has no registered layer kind")
        weights = {}
        for name in kind.weights(module):
            owner, attr = _owner(module, name)
            weights[name] = getattr(owner, attr).detach().float()
        specs = {}
        for name, w in weights.items():
            cols = w.numel() // w.shape[0]
            group = group_size if group_size is not None and cols % group_size == 0 else None
            specs[name] = {"shape": list(w.shape), "bits": bits, "group_size": group}
        new = cls(module, specs)
        for name, w in weights.items():
            new.packed[_key(name)].quantize_weight(w.reshape(w.shape[0], -1), symmetric)
        return new

    def _set_weights(self) -> None:
        for name in self.specs:
            owner, attr = _owner(self.inner, name)
            w = self.packed[_key(name)].dequantized()
            if getattr(owner, attr, None) is not w:
                setattr(owner, attr, w)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        self._set_weights()
        return self.inner(*args, **kwargs)

    def onnx_form(self) -> tuple[nn.Module, str]:
        """The traceable module that emits this layer to ONNX, and what it becomes there."""
        from deepsqueeze.runtime.onnx_forms import packed_weights_form

        return packed_weights_form(self)

    def deepsqueeze_param_count(self) -> int:
        return sum(p.numel() for p in self.inner.parameters()) + sum(
            int(torch.Size(s["shape"]).numel()) for s in self.specs.values())

    def deepsqueeze_nonzero_count(self) -> int:
        return sum(int((p != 0).sum()) for p in self.inner.parameters()) + sum(
            int((t.dequantized() != 0).sum()) for t in self.packed.values())  # type: ignore[operator]

    def ideal_bits(self) -> int:
        return sum(t.ideal_bits() for t in self.packed.values())  # type: ignore[operator]

    def replay_params(self) -> dict[str, Any]:
        return {"specs": self.specs}

    def extra_repr(self) -> str:
        bits = sorted({s["bits"] for s in self.specs.values()})
        return f"{type(self.inner).__name__}, weights={list(self.specs)}, bits={bits}"
