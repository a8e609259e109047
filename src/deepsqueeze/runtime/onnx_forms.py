"""What each runtime representation becomes in an ONNX graph: :func:`onnx_form` (the exporter,
:mod:`deepsqueeze.export.onnx`, asks it for every module and knows no representation itself).

One file per export format: a new representation adds its entry to :data:`ONNX_FORMS` here (and to the
other formats' files), a new format adds one ``<format>_forms.py`` beside this one.

Every form is a traceable module (TorchScript ONNX exporter) holding the representation's integers as
integer initializers, so the ONNX file is about the size of the .dsq and ONNX Runtime computes with them:

* :class:`Int8Linear` -> ``MatMulInteger`` on its int8 codes, stored as ``q + 128`` uint8 with zero point
  128: ONNX Runtime's uint8 x uint8 kernel is exact (its uint8 x int8 kernel adds pairs of products in
  int16 and saturates on AVX2).
  Per-token activations are quantized per row in the graph (``QuantizeLinear`` with per-row scales
  ``max|row| / 127`` and zero point 128): an input row's output never depends on the other rows of
  the batch, as in torch. Per-tensor activations use ``DynamicQuantizeLinear`` and static ones
  ``QuantizeLinear`` with the calibrated scale and zero point.
* :class:`Int8Conv2d` -> QDQ: ``QuantizeLinear``/``DequantizeLinear`` around the input (7-bit range, as
  the torch kernel), int8 weights and int32 bias behind ``DequantizeLinear`` (per channel), the
  convolution, the fused ReLU, and the output's calibrated ``QuantizeLinear``/``DequantizeLinear``:
  ONNX Runtime fuses the pattern into ``QLinearConv``.
* :class:`PackedIntLinear` with 1..8-bit codes and a power-of-two block -> ONNX Runtime's
  ``com.microsoft.MatMulNBits`` (2, 4 or 8 bits; 3-bit codes ride in 4 bits and 5..7-bit in 8, binary
  codes as 2-bit ``2q`` with zero point 1). Other groupings and the packed convolutions / embeddings
  hold unpacked uint8 codes and decode them in the graph (``(q - z) * s`` per group); packed embeddings
  keep their bits and unpack only the rows looked up.
* :class:`Int8Embedding` is traceable as it is (int8 ``Gather`` then a per-row scale).
* :class:`SparseCSRLinear` -> a dense float ``MatMul`` (ONNX Runtime has no sparse CPU kernel).
* A float Linear / Conv / Embedding whose weight is shared (:func:`~deepsqueeze.runtime.codebook.shared_values`)
  -> uint8 indices into its codebook, looked up (``Gather``) when the graph runs.
* A module of another package with an ``onnx_form()`` method -> what that method returns.

Each ``*_form`` returns ``(module, description)``; the description is what the export report lists.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from deepsqueeze.primitives.packing import _layout
from deepsqueeze.runtime.codebook import shared_values
from deepsqueeze.runtime.int8 import CONV_INPUT_BITS, Int8Conv2d, Int8Embedding, Int8Linear
from deepsqueeze.runtime.packed import (
    PackedIntConv2d,
    PackedIntEmbedding,
    PackedIntLinear,
    PackedWeights,
    _key,
    _owner,
)
from deepsqueeze.runtime.sparse import SparseCSRLinear

__all__ = ["ONNX_FORMS", "codebook_form", "int8_conv_form", "int8_embedding_form", "int8_linear_form", "onnx_form",
           "packed_conv_form", "packed_embedding_form", "packed_linear_form", "packed_weights_form",
           "sparse_linear_form"]

_INT8, _UINT8, _INT32, _FLOAT = 3, 2, 6, 1  # onnx.TensorProto element types


def _const(g: Any, value: Any, dtype: torch.dtype = torch.float32) -> Any:
    return g.op("Constant", value_t=torch.as_tensor(value, dtype=dtype))


class _PerTokenMatMul(torch.autograd.Function):
    """``x (R, K) @ W^T`` with per-row symmetric 8-bit activations; ``w_u8`` (K, N) is ``q + 128``.

    In the graph each row's codes are ``QuantizeLinear(x, max|row| / 127, 128)`` (per-axis scales,
    round half to even as torch), i.e. the symmetric int8 codes shifted by 128: ONNX Runtime's
    uint8 x uint8 ``MatMulInteger`` with zero points 128 computes exactly the int8 x int8 sums.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, w_u8: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:  # noqa: ARG004
        amax = x.abs().amax(dim=-1, keepdim=True)
        xs = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
        q = torch.round(x / xs).clamp(-127, 127)
        return (q @ (w_u8.float() - 128)) * xs * scale

    @staticmethod
    def symbolic(g: Any, x: Any, w_u8: Any, scale: Any) -> Any:
        amax = g.op("ReduceMax", g.op("Abs", x), axes_i=[1], keepdims_i=0)
        positive = g.op("Greater", amax, _const(g, 0.0))
        xs = g.op("Where", positive, g.op("Div", amax, _const(g, 127.0)), _const(g, 1.0))
        zero = g.op("ConstantOfShape", g.op("Shape", xs), value_t=torch.tensor([128], dtype=torch.uint8))
        q = g.op("QuantizeLinear", x, xs, zero, axis_i=0)
        acc = g.op("MatMulInteger", q, w_u8, _const(g, 128, torch.uint8), _const(g, 128, torch.uint8))
        row_scale = g.op("Unsqueeze", xs, _const(g, [1], torch.int64))
        return g.op("Mul", g.op("Mul", g.op("Cast", acc, to_i=_FLOAT), row_scale), scale)


class _Uint8MatMul(torch.autograd.Function):
    """``x @ W^T`` with uint8 activations (dynamic per tensor when ``static`` is None, else the calibrated
    ``(scale, zero point)``); ``w_u8`` (K, N) is ``q + 128`` with zero point 128, ``scale`` (N,)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, w_u8: torch.Tensor, scale: torch.Tensor,  # noqa: ARG004
                static: tuple[float, int] | None) -> torch.Tensor:
        if static is None:
            lo, hi = torch.clamp(x.min(), max=0.0), torch.clamp(x.max(), min=0.0)
            xs = torch.where(hi > lo, (hi - lo) / 255.0, torch.ones_like(hi))
            zp = torch.clamp(torch.round(-lo / xs), 0, 255)
        else:
            xs, zp = torch.tensor(static[0]), torch.tensor(float(static[1]))
        q = (torch.round(x / xs) + zp).clamp(0, 255) - zp
        return (q @ (w_u8.float() - 128)) * xs * scale

    @staticmethod
    def symbolic(g: Any, x: Any, w_u8: Any, scale: Any, static: tuple[float, int] | None) -> Any:
        if static is None:
            q, xs, zp = g.op("DynamicQuantizeLinear", x, outputs=3)
        else:
            xs, zp = _const(g, static[0]), _const(g, static[1], torch.uint8)
            q = g.op("QuantizeLinear", x, xs, zp)
        acc = g.op("MatMulInteger", q, w_u8, zp, _const(g, 128, torch.uint8))
        return g.op("Mul", g.op("Cast", acc, to_i=_FLOAT), g.op("Mul", xs, scale))


class Int8LinearForm(nn.Module):
    """:class:`Int8Linear` as ONNX integer operators (see the module doc)."""

    def __init__(self, layer: Int8Linear) -> None:
        super().__init__()
        self.act, self.out_features = layer.act, layer.out_features
        self.register_buffer("w", (layer.weight.t().to(torch.int16) + 128).to(torch.uint8).contiguous())
        self.register_buffer("scale", layer.weight_scale.float().clone())
        self.register_buffer("bias", None if layer.bias is None else layer.bias.float().clone())
        self.register_buffer("inv_smooth", None if layer.smooth is None else (1.0 / layer.smooth.float()))
        self.static: tuple[float, int] | None = None
        self.clip: tuple[float, float] | None = None
        if layer.act == "static":
            s, z = float(layer.input_scale), int(layer.input_zero_point)
            self.static = (s, z)
            self.clip = ((0 - z) * s, ((1 << CONV_INPUT_BITS) - 1 - z) * s)  # the torch kernels' 7-bit range

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.inv_smooth is not None:
            x = x * self.inv_smooth
        if self.act == "per_token":
            rows = _PerTokenMatMul.apply(x.reshape(-1, x.shape[-1]), self.w, self.scale)
            y = rows.reshape(*x.shape[:-1], self.out_features)
        else:
            if self.clip is not None:
                x = x.clamp(*self.clip)
            y = _Uint8MatMul.apply(x, self.w, self.scale, self.static)
        return y if self.bias is None else y + self.bias


def int8_linear_form(layer: Int8Linear) -> tuple[nn.Module, str]:
    return Int8LinearForm(layer), f"MatMulInteger int8, {layer.act.replace('_', '-')} activations"


# ------------------------------------------------------------------------------------------ weight-only


class _MatMulNBits(torch.autograd.Function):
    """ONNX Runtime's ``com.microsoft.MatMulNBits``: ``x (.., K) @ W^T`` with ``W`` from ``bits``-bit codes
    in blocks of ``block`` inputs, ``w = (q - zero_point) * scale`` per block."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, packed: torch.Tensor,  # noqa: ARG004
                scales: torch.Tensor, zeros: torch.Tensor, k: int, n: int, bits: int, block: int,
                level: int) -> torch.Tensor:
        return x @ weight.t()

    @staticmethod
    def symbolic(g: Any, x: Any, weight: Any, packed: Any, scales: Any, zeros: Any, k: int, n: int,  # noqa: ARG004
                 bits: int, block: int, level: int) -> Any:
        y = g.op("com.microsoft::MatMulNBits", x, packed, scales, zeros, K_i=k, N_i=n, bits_i=bits,
                 block_size_i=block, accuracy_level_i=level)
        sizes = x.type().varyingSizes() if x.isCompleteTensor() or hasattr(x.type(), "varyingSizes") else None
        if sizes:  # the contrib op has no shape inference in the exporter: state the output's (.., N)
            y.setType(x.type().with_sizes(list(sizes[:-1]) + [n]))
        return y


def _pack_lsb(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes (..., m) of ``bits`` in (2, 4, 8) packed little-end first into bytes (..., m * bits / 8)."""
    per = 8 // bits
    c = codes.to(torch.int32).reshape(*codes.shape[:-1], -1, per)
    shifts = torch.arange(per, dtype=torch.int32) * bits
    return (c << shifts).sum(-1).to(torch.uint8)


def _nbits_block(group: int, cols: int) -> int | None:
    """The largest power-of-two block (16..256) that divides ``group`` (and so the row); per-channel scales
    (``group == cols``) take blocks of 128 whatever the row length (the last block is partial)."""
    if group == cols:
        return min(128, max(16, 1 << max(cols - 1, 1).bit_length()))
    block = 1 << (group & -group).bit_length() - 1
    while block > 256:
        block //= 2
    return block if block >= 16 and cols % block == 0 else None


#: ``accuracy_level`` of every ``MatMulNBits`` written: 4 computes with int8 activations quantized per block
#: inside ONNX Runtime's kernel (as llama.cpp's Q4_0 x Q8_0 dot product does), 0 with float activations. On
#: SmolLM2-135M w4 (2 threads, AVX2) decode ran at 70.6 tokens/s with 4 against 10.4 with 0: level 0 decodes
#: the whole weight for every call, ruinous at one token per call. The export check holds such layers to the
#: quantized-activation tolerance.
MATMUL_NBITS_ACCURACY_LEVEL = 4


class MatMulNBitsForm(nn.Module):
    """A :class:`PackedIntLinear` as ``MatMulNBits`` (codes repacked into ONNX Runtime's layout), computing at
    :data:`MATMUL_NBITS_ACCURACY_LEVEL`."""

    def __init__(self, layer: PackedIntLinear, bits: int, block: int) -> None:
        super().__init__()
        n, k = layer.out_features, layer.in_features
        q = layer.int_codes().to(torch.int32)
        scale, zero = layer.scale.float(), layer.zero_point
        if layer.binary:  # (2q - 1) s = (2q - 1) * s: codes 0/2, zero point 1
            q, zero = 2 * q, torch.ones_like(scale, dtype=torch.uint8)
        blocks = -(-k // block)
        if layer.group_size == k:  # per channel: one scale for every block; the last block may be partial
            scale, zero = scale.expand(n, blocks), zero.to(torch.int32).expand(n, blocks)
            q = torch.cat([q, q.new_zeros(n, blocks * block - k)], 1)
        else:
            rep = layer.group_size // block
            scale, zero = scale.repeat_interleave(rep, 1), zero.to(torch.int32).repeat_interleave(rep, 1)
        self.register_buffer("packed", _pack_lsb(q, bits).reshape(n, blocks, block * bits // 8))
        self.register_buffer("scales", scale.reshape(-1).contiguous())
        pad = (-blocks * bits) % 8 // bits
        zeros = torch.cat([zero, zero.new_zeros(n, pad)], 1) if pad else zero
        self.register_buffer("zeros", _pack_lsb(zeros, bits).reshape(-1))
        self.register_buffer("bias", None if layer.bias is None else layer.bias.float().clone())
        self.k, self.n, self.bits, self.block = k, n, bits, block
        self.level = MATMUL_NBITS_ACCURACY_LEVEL
        self._traced_weight = layer.dequantized_weight()  # a plain attribute: traced as a constant, then unused

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _MatMulNBits.apply(x, self._traced_weight, self.packed, self.scales, self.zeros,
                               self.k, self.n, self.bits, self.block, self.level)
        return y if self.bias is None else y + self.bias


class _CodesRows(nn.Module):
    """Unpacked uint8 codes (rows, K) with per-group scales and zero points, decoded in the graph."""

    def __init__(self, layer: Any) -> None:
        super().__init__()
        self.rows, self.groups, self.group = layer.scale.shape[0], layer.scale.shape[1], layer.group_size
        self.register_buffer("codes", layer.int_codes().to(torch.uint8).contiguous())
        self.register_buffer("scale", layer.scale.float().clone())
        neg = getattr(layer, "neg_scale", None)
        self.register_buffer("neg_scale", None if neg is None else neg.float().clone())
        self.binary = bool(getattr(layer, "binary", False))
        zero = getattr(layer, "zero_point", None)
        self.register_buffer("zero", None if zero is None else zero.clone() if zero.is_floating_point()
                             else zero.to(torch.uint8).clone())

    def rows_float(self) -> torch.Tensor:
        q = self.codes.float().reshape(self.rows, self.groups, self.group)
        s = self.scale[:, :, None]
        if self.neg_scale is not None:  # ternary with two levels: codes 0 / 1 / 2
            w = torch.where(q == 2, s, torch.where(q == 0, -self.neg_scale[:, :, None], torch.zeros_like(s)))
        elif self.binary:
            w = (2 * q - 1) * s
        else:
            w = (q - self.zero.float()[:, :, None]) * s
        return w.reshape(self.rows, self.groups * self.group)


class DecodedLinearForm(_CodesRows):
    def __init__(self, layer: PackedIntLinear) -> None:
        super().__init__(layer)
        self.register_buffer("bias", None if layer.bias is None else layer.bias.float().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.rows_float(), self.bias)


def packed_linear_form(layer: PackedIntLinear) -> tuple[nn.Module, str]:
    bits = 8 if layer.bits > 4 else (4 if layer.bits > 2 else 2)
    block = _nbits_block(layer.group_size, layer.in_features)
    float_zero = bool(getattr(layer, "float_zero", False))
    if layer.affine_codes and block is not None and not float_zero:
        form = MatMulNBitsForm(layer, bits, block)
        acts = ", int8 activations per block" if form.level == 4 else ""
        return form, f"MatMulNBits {bits}-bit, block {block}{acts}"
    why = ("two-level ternary scales" if getattr(layer, "neg_scale", None) is not None else
           f"{type(layer).__name__} codes are not affine" if not layer.affine_codes else "float zero points"
           if float_zero else f"group {layer.group_size} has no power-of-two block")
    return DecodedLinearForm(layer), f"uint8 codes decoded in the graph ({why})"


class DecodedConvForm(_CodesRows):
    def __init__(self, layer: PackedIntConv2d) -> None:
        super().__init__(layer)
        self.register_buffer("bias", None if layer.bias is None else layer.bias.float().clone())
        self.shape = (layer.out_channels, layer.in_channels // layer.groups, *layer.kernel_size)
        self.stride, self.padding, self.dilation, self.conv_groups = (layer.stride, layer.padding,
                                                                     layer.dilation, layer.groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.rows_float().reshape(self.shape), self.bias, self.stride, self.padding,
                        self.dilation, self.conv_groups)


def packed_conv_form(layer: PackedIntConv2d) -> tuple[nn.Module, str]:
    return DecodedConvForm(layer), "uint8 codes decoded in the graph"


class PackedWeightsForm(nn.Module):
    """A :class:`PackedWeights` layer (LSTM, GRU, ConvTranspose, attention
    ...): its weight tensors decoded from uint8 codes in the graph, then the wrapped module's own forward."""

    def __init__(self, layer: PackedWeights) -> None:
        super().__init__()
        self.specs = {name: tuple(spec["shape"]) for name, spec in layer.specs.items()}
        self.keys = {name: _key(name) for name in layer.specs}
        self.codes = nn.ModuleDict({self.keys[name]: _CodesRows(layer.packed[self.keys[name]]) for name in self.specs})
        self.inner = copy.deepcopy(layer.inner)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        for name, shape in self.specs.items():
            owner, attr = _owner(self.inner, name)
            setattr(owner, attr, self.codes[self.keys[name]].rows_float().reshape(shape))
        return self.inner(*args, **kwargs)


def packed_weights_form(layer: PackedWeights) -> tuple[nn.Module, str]:
    return PackedWeightsForm(layer), f"uint8 codes decoded in the graph, then {type(layer.inner).__name__}"


class DecodedEmbeddingForm(nn.Module):
    """Looks up packed code rows (the table keeps its bits), then unpacks and decodes only those rows.

    Unpacking follows :mod:`deepsqueeze.primitives.packing` with integer arithmetic ONNX Runtime runs
    (a block's bytes as one int64, then floor division and modulo by powers of two).
    """

    def __init__(self, layer: PackedIntEmbedding) -> None:
        super().__init__()
        per_block, block_bytes, _ = _layout(layer.bits)
        self.register_buffer("codes", layer.codes.clone())
        self.register_buffer("scale", layer.scale.float().clone())
        zero = layer.zero_point
        self.register_buffer("zero", zero.clone() if zero.is_floating_point() else zero.to(torch.uint8).clone())
        self.register_buffer("byte_weight", torch.tensor([256 ** j for j in range(block_bytes)], dtype=torch.int64))
        self.register_buffer("divisor", torch.tensor([1 << (i * layer.bits) for i in range(per_block)],
                                                     dtype=torch.int64))
        self.levels = 1 << layer.bits
        self.blocks = -(-layer.embedding_dim // per_block)
        self.block_bytes, self.per_block = block_bytes, per_block
        self.groups, self.group, self.dim = layer.scale.shape[1], layer.group_size, layer.embedding_dim

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = self.codes[ids].to(torch.int64)
        pad = self.blocks * self.block_bytes - rows.shape[-1]
        if pad:
            rows = F.pad(rows, (0, pad))
        value = (rows.reshape(*ids.shape, self.blocks, self.block_bytes) * self.byte_weight).sum(-1, keepdim=True)
        q = torch.remainder(torch.div(value, self.divisor, rounding_mode="floor"), self.levels)
        q = q.reshape(*ids.shape, self.blocks * self.per_block)[..., : self.dim].float()
        q = q.reshape(*ids.shape, self.groups, self.group)
        w = (q - self.zero[ids].float().unsqueeze(-1)) * self.scale[ids].unsqueeze(-1)
        return w.reshape(*ids.shape, self.dim)


def packed_embedding_form(layer: PackedIntEmbedding) -> tuple[nn.Module, str]:
    return DecodedEmbeddingForm(layer), f"packed {layer.bits}-bit Gather, rows decoded after the lookup"


# ------------------------------------------------------------------------------------------ static conv


class _QDQConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, reference: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor,  # noqa: ARG004
                bias: torch.Tensor, attrs: dict[str, Any]) -> torch.Tensor:
        return reference

    @staticmethod
    def symbolic(g: Any, x: Any, reference: Any, w: Any, w_scale: Any, bias: Any, attrs: dict[str, Any]) -> Any:  # noqa: ARG004
        s_in, z_in = _const(g, attrs["s_in"]), _const(g, attrs["z_in"], torch.uint8)
        x = g.op("Clip", x, _const(g, attrs["clip"][0]), _const(g, attrs["clip"][1]))
        xd = g.op("DequantizeLinear", g.op("QuantizeLinear", x, s_in, z_in), s_in, z_in)
        wd = g.op("DequantizeLinear", w, w_scale, _const(g, [0] * attrs["out"], torch.int8), axis_i=0)
        inputs = [xd, wd]
        if attrs["bias"]:
            bias_scale = g.op("Mul", w_scale, s_in)
            inputs.append(g.op("DequantizeLinear", bias, bias_scale, _const(g, [0] * attrs["out"], torch.int32),
                               axis_i=0))
        y = g.op("Conv", *inputs, strides_i=attrs["stride"], pads_i=attrs["pads"], dilations_i=attrs["dilation"],
                 group_i=attrs["groups"], kernel_shape_i=attrs["kernel"])
        if attrs["relu"]:
            y = g.op("Relu", y)
        s_out, z_out = _const(g, attrs["s_out"]), _const(g, attrs["z_out"], torch.uint8)
        return g.op("DequantizeLinear", g.op("QuantizeLinear", y, s_out, z_out), s_out, z_out)


class QDQConvForm(nn.Module):
    """:class:`Int8Conv2d` as a QDQ group ONNX Runtime fuses into ``QLinearConv`` (see the module doc)."""

    def __init__(self, layer: Int8Conv2d) -> None:
        super().__init__()
        s_in, z_in = float(layer.input_scale), int(layer.input_zero_point)
        self.register_buffer("w", layer.weight.clone())
        self.register_buffer("w_scale", layer.weight_scale.float().clone())
        bias = layer.bias if layer.bias is not None else torch.zeros(layer.out_channels)
        self.register_buffer("bias_q", torch.round(bias.float() / (layer.weight_scale.float() * s_in)).to(torch.int32))
        self.attrs = {"s_in": s_in, "z_in": z_in, "s_out": float(layer.output_scale),
                      "z_out": int(layer.output_zero_point), "clip": ((0 - z_in) * s_in, (127 - z_in) * s_in),
                      "out": layer.out_channels, "bias": layer.bias is not None, "relu": layer.relu,
                      "stride": list(layer.stride), "pads": list(layer.padding) * 2,
                      "dilation": list(layer.dilation), "groups": layer.groups, "kernel": list(layer.kernel_size)}
        self._traced_weight = layer.dequantized_weight()  # a plain attribute: traced as a constant, then unused

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.attrs
        reference = F.conv2d(x, self._traced_weight, None, a["stride"], a["pads"][:2], a["dilation"], a["groups"])
        return _QDQConv.apply(x, reference, self.w, self.w_scale, self.bias_q, self.attrs)


def int8_conv_form(layer: Int8Conv2d) -> tuple[nn.Module, str]:
    return QDQConvForm(layer), "QDQ int8 (QLinearConv in ONNX Runtime)"


# ------------------------------------------------------------------------------------------ int8 embedding, sparse


def int8_embedding_form(layer: Int8Embedding) -> tuple[nn.Module, str]:
    """Traced as it is: an int8 ``Gather`` and a per-row scale."""
    return layer, "int8 Gather, per-row scale"


def sparse_linear_form(layer: SparseCSRLinear) -> tuple[nn.Module, str]:
    """A dense Linear: ONNX Runtime has no sparse matrix kernel on CPU (the zeros are stored)."""
    return layer.dense_linear(), "dense float MatMul (ONNX Runtime has no sparse CPU kernel)"


# ------------------------------------------------------------------------------------------ codebook


class CodebookGatherForm(nn.Module):
    """A float layer whose weight takes at most 256 distinct values (weight sharing, Deep Compression):
    uint8 indices into a float codebook, looked up (``Gather``) when the graph runs."""

    def __init__(self, layer: nn.Module, values: torch.Tensor, index: torch.Tensor) -> None:
        super().__init__()
        self.layer = copy.deepcopy(layer)
        self.shape = tuple(layer.weight.shape)
        del self.layer.weight
        self.register_buffer("codebook", values.float())
        self.register_buffer("index", index.to(torch.uint8).reshape(self.shape))

    def forward(self, *args: Any) -> Any:
        self.layer.weight = self.codebook[self.index.long()]
        return self.layer(*args)


def codebook_form(layer: nn.Module) -> tuple[nn.Module, str] | None:
    """The codebook form of a float Linear / Conv / Embedding whose weight has at most 256 distinct values."""
    shared = shared_values(layer)
    if shared is None:
        return None
    values, index = shared
    return CodebookGatherForm(layer, values, index), f"uint8 codebook indices ({len(values)} values), Gather"


# ------------------------------------------------------------------------------------------ the table

FormFn = Callable[[Any], tuple[nn.Module, str]]

#: Representation class -> its ONNX form (subclasses take their closest base's, e.g. the ternary layers).
ONNX_FORMS: dict[type[nn.Module], FormFn] = {
    Int8Linear: int8_linear_form,
    Int8Conv2d: int8_conv_form,
    Int8Embedding: int8_embedding_form,
    PackedIntLinear: packed_linear_form,
    PackedIntConv2d: packed_conv_form,
    PackedIntEmbedding: packed_embedding_form,
    PackedWeights: packed_weights_form,
    SparseCSRLinear: sparse_linear_form,
}


def onnx_form(layer: nn.Module) -> tuple[nn.Module, str] | None:
    """``(traceable module, description)`` that emits ``layer`` to ONNX, or None when it is traced as it is.

    A module's own ``onnx_form()`` method comes first (representations of other packages), then
    :data:`ONNX_FORMS` along the class's bases, then the codebook form of shared float weights.
    """
    own = getattr(layer, "onnx_form", None)
    if own is not None:
        return own()
    for cls in type(layer).__mro__:
        form = ONNX_FORMS.get(cls)
        if form is not None:
            return form(layer)
    return codebook_form(layer)
