"""Packed n-bit representations: weight-only codes of 1..8 bits packed into uint8 rows, with one scale and
zero point per output channel or per group of input elements; binary codes (XNOR-Net) are stored as 1-bit
codes ``(2q - 1) * scale``.

* :class:`PackedIntLinear` (and :class:`PackedInt4Linear`): never keeps a float weight; runs PyTorch's
  int4/int8 weight-only CPU kernels on layouts built from the codes at first use, or decodes one layer
  into a transient buffer per call, whichever measured faster for the shape and batch kind
  (:func:`deepsqueeze.runtime.kernels.packed_linear_kernel`).
* :class:`PackedIntConv2d`: each output channel's ``in/groups * kh * kw`` weights are one packed row,
  decoded per call.
* :class:`PackedIntEmbedding` (2..8-bit rows with group scales): a lookup unpacks only the rows it needs.
* :class:`PackedWeights`: any float module whose weight tensors are held as packed codes. For layer kinds
  without a dedicated integer kernel (``Conv1d``, ``ConvTranspose2d``, ``LSTM``, ``GRU``, the projections
  of ``nn.MultiheadAttention``, ...), the module is kept as it is and only its weight tensors
  (:func:`deepsqueeze.core.kinds.layer_kind` names them) are replaced: each is stored as 2..8-bit codes
  (:class:`PackedTensor`), one row per first-dimension index (an output channel; a ``ConvTranspose``
  weight's rows are its input channels), with one scale and zero point per row or per group of
  ``group_size`` elements of a row. At run time the codes are dequantized once (cached) and handed to the
  wrapped module as plain attributes, so its own forward runs unchanged: weight-only quantization (storage
  and memory shrink; arithmetic stays float), like the weight-only modes of torchao and HQQ.

Buffers hold the packed integers themselves, so the artifact's ``raw`` encoding already stores packed
bits. Every class can be built empty from its shapes (``replay_params``) for the artifact loader's replay.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from deepsqueeze.core.kinds import layer_kind
from deepsqueeze.errors import UnsupportedLayerError
from deepsqueeze.primitives import packing
from deepsqueeze.primitives import quantize as Q
from deepsqueeze.runtime.kernels import (
    Cached,
    packed_kernel_support,
    packed_linear_kernel,
    preferred,
    run_packed_linear,
)

__all__ = ["PackedInt4Linear", "PackedIntConv2d", "PackedIntEmbedding", "PackedIntLinear", "PackedTensor",
           "PackedWeights"]


class _PackedWeight(Cached):
    """Codes of ``bits`` bits for a weight viewed as rows (out, K), packed along K into uint8.

    ``scale``/``zero_point`` have shape (out, K // group_size) (per channel: group_size = K). Codes are
    unsigned: ``w = (q - zero_point) * scale``; binary weights store ``w = (2q - 1) * scale``. Zero points
    are uint8 codes, or float32 with ``float_zero`` (the codes then span each group's exact min..max, as
    llama.cpp's Q4_1 and HQQ do; 0 is not exactly representable).
    """

    def _init_codes(self, rows: int, cols: int, bits: int, group_size: int | None, binary: bool,
                    float_zero: bool = False) -> None:
        if not isinstance(float_zero, bool) or (float_zero and binary):
            raise ValueError("float_zero is true or false, and binary codes have no zero point")
        self.float_zero = float_zero
        if binary:
            bits = 1
        elif not 2 <= bits <= 8:
            raise ValueError(f"packed weights take 2..8 bits (or binary), got {bits}")
        group = cols if group_size is None else int(group_size)
        if group < 1 or cols % group:
            raise ValueError(f"group size {group} does not divide the {cols} inputs of each row: choose a divisor")
        self.bits, self.group_size, self.binary, self._rows, self._cols = bits, group, binary, rows, cols
        groups = cols // group
        self.register_buffer("codes", torch.zeros(rows, packing.packed_length(cols, bits), dtype=torch.uint8))
        self.register_buffer("scale", torch.ones(rows, groups))
        self.register_buffer("zero_point", None if binary else torch.zeros(
            rows, groups, dtype=torch.float32 if float_zero else torch.uint8))

    def set_codes(self, codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None) -> None:
        """Store unsigned codes (rows, K) with their (rows, groups) scales and zero points (e.g. from GPTQ)."""
        codes = codes.reshape(self._rows, self._cols)
        self.codes.copy_(packing.pack(codes, self.bits))
        self.scale.copy_(scale.reshape(self.scale.shape).float())
        if self.zero_point is not None:
            if zero_point is None:
                raise ValueError("affine codes need zero points")
            self.zero_point.copy_(zero_point.reshape(self.zero_point.shape).to(self.zero_point.dtype))
        self._cache.clear()

    def quantize_weight(self, w: torch.Tensor, symmetric: bool = False,
                        rounding: Q.Rounding | str = Q.Rounding.NEAREST) -> None:
        """Round-to-nearest codes of ``w`` (rows x K) at this module's bits and groups."""
        w = w.detach().float().reshape(self._rows, self._cols)
        Q.check_finite(w, "the weight")
        if self.binary:
            signs, scale = Q.binarize(w, axis=0)
            self.set_codes((signs > 0).to(torch.uint8), scale[:, None].expand_as(self.scale), None)
            return
        gran = Q.PerGroup(self.group_size)
        qp = Q.choose_qparams(w, self.bits, symmetric=symmetric, signed=False, granularity=gran,
                              float_zero=self.float_zero)
        self.set_codes(Q.quantize(w, qp, rounding), qp.scale, qp.zero_point)

    def int_codes(self) -> torch.Tensor:
        """Unpacked unsigned codes (rows, K)."""
        return packing.unpack(self.codes, self.bits, self._cols)

    def dequantized_rows(self) -> torch.Tensor:
        """The float weight rows (rows, K), computed afresh (nothing is kept): ``(q - z) * s`` per group."""
        groups = self.scale.shape[1]
        q = self.int_codes().float().reshape(self._rows, groups, self.group_size)
        scale = self.scale[:, :, None]
        if self.binary:
            return q.mul_(2).sub_(1).mul_(scale).reshape(self._rows, self._cols)
        return q.sub_(self.zero_point.float()[:, :, None]).mul_(scale).reshape(self._rows, self._cols)

    @property
    def affine_codes(self) -> bool:
        """Whether every weight is ``(q - zero_point) * scale`` (binary: ``(2q - 1) * scale``): the form kernels
        and exporters read from the codes, scales and zero points. False for a subclass that decodes its codes
        otherwise in its own :meth:`dequantized_rows` (two-level ternary scales): only that method computes it."""
        return type(self).dequantized_rows is _PackedWeight.dequantized_rows

    def deepsqueeze_param_count(self) -> int:
        bias = getattr(self, "bias", None)
        return self._rows * self._cols + (bias.numel() if bias is not None else 0)

    def deepsqueeze_nonzero_count(self) -> int:
        bias = getattr(self, "bias", None)
        nz = int((self.dequantized_rows() != 0).sum())
        return nz + (int((bias != 0).sum()) if bias is not None else 0)

    def ideal_bits(self) -> int:
        """Bits of codes plus fp32 scales and 8-bit (float: 32-bit) zero points (this layout's lower bound)."""
        return self.codes.numel() * 8 + self.scale.numel() * 32 + (
            self.zero_point.numel() * self.zero_point.element_size() * 8 if self.zero_point is not None else 0)


class PackedIntLinear(_PackedWeight):
    """Weight-only Linear: packed 1..8-bit codes computed on without a float copy of the weight.

    Each call runs one of these kernels (chosen per weight shape, bits, groups and batch kind, see
    :meth:`kernel`), whose operands are built from the codes at first use after loading (the file
    keeps our packing; kernel layouts are never stored):

    * ``gemv``: deepsqueeze's own kernel on the stored 4- and 8-bit codes, for up to 32 rows
      (:mod:`deepsqueeze.runtime.gemv`).
    * ``int4pack``: PyTorch's ``aten._weight_int4pack_mm_for_cpu`` on a layout made by
      ``_convert_weight_to_int4pack_for_cpu`` (4 bits per weight; 2/3-bit and binary codes are exact
      in it: ``w = (q - 8) * s + z`` with ``z = (8 - zero_point) * s``). Needs codes of at most 4 bits
      and a group of 32/64/128/256 inputs dividing ours (per-channel scales are repeated per group) and a
      multiple of 16 outputs.
    * ``int8pack``: ``aten._weight_int8pack_mm`` on int8 codes ``q - zero_point`` (<= 7 bits), or
      ``q - 128`` plus a rank-one correction ``sum(x) * (128 - zero_point) * s`` (8 bits). Needs one
      scale per output channel (no groups).
    * ``dequant``: decodes this layer's codes into a transient float weight on each call and runs
      ``F.linear`` (memory bounded by the largest layer, not the model; the fast choice for large
      batches, where the two kernels above run 10-100x slower than fp32 on CPUs).
    * ``float``: ``F.linear`` on the decoded weight kept after the first call: the dense float form,
      raced only where speed is preferred over memory (:func:`~deepsqueeze.runtime.kernels.set_prefer`).

    On a non-CPU device, or when the input needs gradients (LoRA on a quantized base), ``dequant``
    runs. ``bias`` (out,) stays float.
    """

    def __init__(self, in_features: int, out_features: int, bits: int = 4, group_size: int | None = None,
                 bias: bool = True, binary: bool = False, float_zero: bool = False) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self._init_codes(out_features, in_features, bits, group_size, binary, float_zero)
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)
        self._kernels: dict[str, str] = {}  # batch kind -> kernel chosen in this process

    @classmethod
    def from_float(cls, linear: nn.Linear, bits: int = 4, group_size: int | None = None, symmetric: bool = False,
                   binary: bool = False, float_zero: bool = False) -> PackedIntLinear:
        module = cls(linear.in_features, linear.out_features, bits, group_size, linear.bias is not None, binary,
                     float_zero and not symmetric)
        module.quantize_weight(linear.weight, symmetric)
        if linear.bias is not None:
            module.bias.copy_(linear.bias.detach().float())
        return module

    @classmethod
    def sharing_codes(cls, table: PackedIntEmbedding, bias: torch.Tensor | None = None) -> PackedIntLinear:
        """The Linear ``x @ table^T (+ bias)`` whose codes, scales and zero points are ``table``'s very tensors
        (a language-model head tied to the token embedding: (vocab, hidden) codes, stored once)."""
        module = cls(table.embedding_dim, table.num_embeddings, table.bits, table.group_size, bias is not None,
                     float_zero=table.float_zero)
        module.codes, module.scale, module.zero_point = table.codes, table.scale, table.zero_point
        if bias is not None:
            module.bias.copy_(bias.detach().float())
        return module

    def dequantized_weight(self) -> torch.Tensor:
        """The float weight (out, in) the kernels compute with; built on each call, never kept."""
        return self.dequantized_rows()

    # -- kernels (deepsqueeze.runtime.kernels)

    def kernel_support(self) -> dict[str, str | None]:
        """Each kernel of :data:`~deepsqueeze.runtime.kernels.PACKED_KERNELS` -> None where it can run this
        layer, else why not."""
        return packed_kernel_support(self)

    def _run(self, kernel: str, x2: torch.Tensor) -> torch.Tensor:
        """``x2 @ W^T + b`` for 2-D float32 ``x2`` with ``kernel``."""
        return run_packed_linear(self, kernel, x2)

    def kernel(self, x2: torch.Tensor) -> str:
        """The kernel for a 2-D float32 batch like ``x2``: forced, else raced once per shape and batch kind
        (:func:`~deepsqueeze.runtime.kernels.packed_linear_kernel`)."""
        return packed_linear_kernel(self, x2)

    def kernels(self) -> dict[str, str]:
        """Batch kind (``few`` rows <= 32, ``many`` <= 512, ``large``) -> kernel chosen so far in this process."""
        return dict(self._kernels)

    kernel_choices = kernels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.dim() == 2 and x.dtype == torch.float32
        x2 = x if flat else x.reshape(-1, self.in_features).float()
        if x2.shape[0] == 0 or (x2.requires_grad and torch.is_grad_enabled()):
            kernel = "dequant"
        else:
            kernel = packed_linear_kernel(self, x2)
        y = run_packed_linear(self, kernel, x2)
        return y if flat else y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)

    def _apply(self, fn: Any, recurse: bool = True) -> Any:
        self._kernels.clear()
        return super()._apply(fn, recurse)

    def replay_params(self) -> dict[str, Any]:
        return {"in_features": self.in_features, "out_features": self.out_features, "bits": self.bits,
                "group_size": self.group_size, "bias": self.bias is not None, "binary": self.binary,
                **({"float_zero": True} if self.float_zero else {})}

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}{', binary' if self.binary else ''}"
                f"{', float zero point' if self.float_zero else ''}")


class PackedInt4Linear(PackedIntLinear):
    """:class:`PackedIntLinear` at 4 bits: two codes per byte."""

    def __init__(self, in_features: int, out_features: int, bits: int = 4, group_size: int | None = None,
                 bias: bool = True, binary: bool = False) -> None:
        if bits != 4 or binary:
            raise ValueError("PackedInt4Linear holds 4-bit codes; use PackedIntLinear for other widths")
        super().__init__(in_features, out_features, 4, group_size, bias)


class PackedIntConv2d(_PackedWeight):
    """Weight-only Conv2d: each output channel's ``in/groups * kh * kw`` weights are one packed row."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: tuple[int, int],
                 stride: tuple[int, int] = (1, 1), padding: tuple[int, int] = (0, 0),
                 dilation: tuple[int, int] = (1, 1), groups: int = 1, bias: bool = True, bits: int = 4,
                 group_size: int | None = None, binary: bool = False) -> None:
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride, self.padding = tuple(kernel_size), tuple(stride), tuple(padding)
        self.dilation, self.groups = tuple(dilation), groups
        self._init_codes(out_channels, in_channels // groups * kernel_size[0] * kernel_size[1], bits, group_size, binary)
        self.register_buffer("bias", torch.zeros(out_channels) if bias else None)

    @classmethod
    def from_float(cls, conv: nn.Conv2d, bits: int = 4, group_size: int | None = None, symmetric: bool = False,
                   binary: bool = False) -> PackedIntConv2d:
        if not isinstance(conv.padding, tuple) or conv.padding_mode != "zeros":
            raise UnsupportedLayerError(f"PackedIntConv2d needs numeric zero padding, got {conv.padding!r}")
        module = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,  # type: ignore[arg-type]
                     conv.dilation, conv.groups, conv.bias is not None, bits, group_size, binary)  # type: ignore[arg-type]
        module.quantize_weight(conv.weight, symmetric)
        if conv.bias is not None:
            module.bias.copy_(conv.bias.detach().float())
        return module

    def dequantized_weight(self) -> torch.Tensor:
        """The float weight (out, in/groups, kh, kw), decoded on each call (transient; never kept)."""
        shape = (self.out_channels, self.in_channels // self.groups, *self.kernel_size)
        return self.dequantized_rows().reshape(shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The convolution on the weight decoded for this call, or (speed preferred) on the decoded weight kept
        after the first call: the same arithmetic, without decoding again."""
        weight = self._cache.get("float")
        if weight is None:
            weight = self.dequantized_weight()  # no gradient reaches integer codes: keeping it is always safe
            if preferred() == "speed":
                self._cache["float"] = weight
        return F.conv2d(x, weight if weight.dtype == x.dtype else weight.to(x.dtype), self.bias, self.stride,
                        self.padding, self.dilation, self.groups)

    def kernel_choices(self) -> dict[str, str]:
        """``{"all": "float"}`` once the decoded weight is kept (speed preferred), else ``{"all": "dequant"}``."""
        return {"all": "float" if "float" in self._cache else "dequant"}

    def replay_params(self) -> dict[str, Any]:
        return {"in_channels": self.in_channels, "out_channels": self.out_channels,
                "kernel_size": list(self.kernel_size), "stride": list(self.stride), "padding": list(self.padding),
                "dilation": list(self.dilation), "groups": self.groups, "bias": self.bias is not None,
                "bits": self.bits, "group_size": self.group_size, "binary": self.binary}


class PackedIntEmbedding(_PackedWeight):
    """Embedding table of packed 2..8-bit rows with group scales; a lookup unpacks only the rows it needs."""

    def __init__(self, num_embeddings: int, embedding_dim: int, bits: int = 4, group_size: int | None = None,
                 padding_idx: int | None = None, float_zero: bool = False) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.padding_idx = num_embeddings, embedding_dim, padding_idx
        self._init_codes(num_embeddings, embedding_dim, bits, group_size, False, float_zero)

    @classmethod
    def from_float(cls, embedding: nn.Embedding, bits: int = 4, group_size: int | None = None,
                   symmetric: bool = False, float_zero: bool = False) -> PackedIntEmbedding:
        module = cls(embedding.num_embeddings, embedding.embedding_dim, bits, group_size, embedding.padding_idx,
                     float_zero and not symmetric)
        module.quantize_weight(embedding.weight, symmetric)
        return module

    def dequantized_weight(self) -> torch.Tensor:
        return self.dequantized_rows()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1)
        q = packing.unpack(self.codes[flat], self.bits, self.embedding_dim).float()
        scale = self.scale[flat].repeat_interleave(self.group_size, dim=1)
        zero = self.zero_point[flat].float().repeat_interleave(self.group_size, dim=1)
        return ((q - zero) * scale).reshape(*ids.shape, self.embedding_dim)

    def replay_params(self) -> dict[str, Any]:
        return {"num_embeddings": self.num_embeddings, "embedding_dim": self.embedding_dim, "bits": self.bits,
                "group_size": self.group_size, "padding_idx": self.padding_idx,
                **({"float_zero": True} if self.float_zero else {})}


# ------------------------------------------------------------------------------------------ any layer kind


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
            group = Q.fitting_group(cols, group_size)
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
