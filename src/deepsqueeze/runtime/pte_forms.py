"""What each runtime representation becomes in an ExecuTorch program: :func:`pte_form` (the exporter,
:mod:`deepsqueeze.export.pte`, asks it for every module and knows no representation itself).

Every form is a module ``torch.export`` traces into the quantized patterns that ExecuTorch's XNNPACK
partitioner lowers to integer kernels, carrying the representation's own codes and scales (nothing is
re-quantized by another tool):

* :class:`Int8Linear` -> ``dequantize_per_channel`` of its int8 codes (qc8w) behind per-token dynamic int8
  activations (``choose_qparams_per_token_asymmetric`` / ``quantize_per_token`` / ``dequantize_per_token``):
  XNNPACK's qd8-f32-qc8w GEMM. Per-tensor and static activation scales become per-token dynamic ones
  (XNNPACK's dynamic GEMM takes rows' own ranges): the description says so.
* :class:`PackedIntLinear` with 1..4-bit codes -> XNNPACK's qd8-f32-qb4w GEMM (``dequantize_per_channel_group``,
  signed codes ``q - 2**(bits-1)`` in [-8, 7]) behind the same dynamic activations; binary codes are
  ``2q - 1``. XNNPACK's 4-bit weights have no zero point: ``s (q - z) = s (q - c) - s (z - c)``, and the second
  term is each group's input sum times ``s (z - c)``, one small float matrix (groups x outputs, as large
  as the scales). 5..8-bit codes with one group per row -> qc8w the same way. Where XNNPACK has no such
  weights (5..8-bit groups, 4-bit groups that are not multiples of 32, two-level ternary scales) the codes
  stay uint8 and are decoded in the program on the portable kernels; packed embeddings gather their packed
  rows and decode only those.
* :class:`PackedIntConv2d` with one group per output channel -> XNNPACK's dynamic int8 convolution (qd8, per-tensor
  dynamic activations) on its codes in int8 storage (XNNPACK's convolutions take no 4-bit weights), zero points as
  the input's receptive-field sum times ``s (z - c)``. Convolutions XNNPACK takes no integer weights for (grouped,
  depthwise, one input channel, not affine) are decoded to float32 at export and run XNNPACK's fp32 kernel: 4
  bytes a weight instead of a naive portable convolution. :class:`PackedWeights` (recurrent, attention
  and transposed-convolution layers) have no form yet: refused, naming the layer.
* :class:`Int8Conv2d` -> a static QDQ group XNNPACK lowers to its qs8 convolution: the input quantized with
  the calibrated scale and zero point (its 7-bit range as a clamp), int8 weights per channel, the float
  bias, the fused ReLU and the output's calibrated quantize / dequantize.
* :class:`Int8Embedding` is traced as it is (an int8 gather and a per-row scale on the portable kernels).
* :class:`SparseCSRLinear` -> a dense float Linear (XNNPACK has no sparse GEMM; the zeros are stored).

Each ``*_form`` returns ``(module, description)``; :func:`pte_form` raises :class:`UnsupportedLayerError`
for a representation that has none.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from deepsqueeze.errors import UnsupportedLayerError
from deepsqueeze.runtime.int8 import CONV_INPUT_BITS, Int8Conv2d, Int8Embedding, Int8Linear
from deepsqueeze.runtime.onnx_forms import DecodedEmbeddingForm, DecodedLinearForm
from deepsqueeze.runtime.packed import PackedIntConv2d, PackedIntEmbedding, PackedIntLinear, PackedWeights
from deepsqueeze.runtime.sparse import SparseCSRLinear

__all__ = ["PTE_FORMS", "pte_form", "register_quantized_ops"]


def register_quantized_ops() -> Any:
    """``torch.ops.quantized_decomposed``: the quantize / dequantize operators ExecuTorch's partitioners match."""
    import torch.ao.quantization.fx._decomposed  # noqa: F401

    return torch.ops.quantized_decomposed


def _dynamic_rows(x: torch.Tensor) -> torch.Tensor:
    """``x`` through per-token asymmetric int8 quantize / dequantize (the pattern XNNPACK's qd8 GEMMs take)."""
    qd = register_quantized_ops()
    scale, zero = qd.choose_qparams_per_token_asymmetric(x, torch.int8)
    q = qd.quantize_per_token(x, scale, zero, -128, 127, torch.int8)
    return qd.dequantize_per_token(q, scale, zero, -128, 127, torch.int8, torch.float32)


class DynamicInt8LinearForm(nn.Module):
    """int8 codes per output channel (qc8w) behind per-token dynamic int8 activations."""

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                 inv_smooth: torch.Tensor | None = None, qrange: tuple[int, int] = (-127, 127),
                 offset: torch.Tensor | None = None) -> None:
        super().__init__()
        self.register_buffer("codes", codes.to(torch.int8).contiguous())
        self.register_buffer("scale", scale.float().contiguous())
        self.register_buffer("zero", torch.zeros(scale.shape[0], dtype=torch.int64))
        self.register_buffer("bias", None if bias is None else bias.float().clone())
        self.register_buffer("inv_smooth", inv_smooth)
        self.register_buffer("offset", offset)  # (N,): s (z - c) per row, times the input's sum
        self.qrange = qrange

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        qd = register_quantized_ops()
        if self.inv_smooth is not None:
            x = x * self.inv_smooth
        w = qd.dequantize_per_channel(self.codes, self.scale, self.zero, 0, *self.qrange, torch.int8)
        y = F.linear(_dynamic_rows(x), w, self.bias)
        return y if self.offset is None else y - x.sum(-1, keepdim=True) * self.offset


def int8_linear_form(layer: Int8Linear) -> tuple[nn.Module, str]:
    inv_smooth = None if layer.smooth is None else (1.0 / layer.smooth.float())
    form = DynamicInt8LinearForm(layer.weight, layer.weight_scale, layer.bias, inv_smooth)
    was = "" if layer.act == "per_token" else f" (its {layer.act.replace('_', '-')} scales become per-token)"
    return form, f"XNNPACK qd8-qc8w: int8 weights, per-token dynamic int8 activations{was}"


class Group4BitLinearForm(nn.Module):
    """Signed 4-bit codes in groups (qb4w) behind per-token dynamic int8 activations, plus the zero points'
    term ``group sums of x @ offset`` (see the module doc)."""

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | None,
                 bias: torch.Tensor | None, group: int) -> None:
        super().__init__()
        self.register_buffer("codes", codes.to(torch.int8).contiguous())
        self.register_buffer("scale", scale.float().contiguous())
        self.register_buffer("zero", torch.zeros_like(scale, dtype=torch.int64))
        self.register_buffer("offset", offset)  # (N, groups)
        self.register_buffer("bias", None if bias is None else bias.float().clone())
        self.group = group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        qd = register_quantized_ops()
        w = qd.dequantize_per_channel_group(self.codes, self.scale, self.zero, -8, 7, torch.int8, self.group,
                                            torch.float32)
        y = F.linear(_dynamic_rows(x), w, self.bias)
        if self.offset is None:
            return y
        sums = x.reshape(*x.shape[:-1], self.offset.shape[1], self.group).sum(-1)
        return y - F.linear(sums, self.offset)


def _signed_codes(layer: Any, signed: tuple[int, int] = (-8, 7)) -> tuple[torch.Tensor, torch.Tensor | None, str]:
    """(signed codes ``q - c`` within ``signed``, per-group ``s (z - c)`` or None when every zero point is ``c``,
    description): ``c`` is the layer's one zero point where it has one and the codes fit around it, else
    ``2**(bits-1)``."""
    q = layer.int_codes().to(torch.int16)
    if layer.binary:
        return (2 * q - 1), None, "binary codes as +-1"
    zero = layer.zero_point.float()
    first = float(zero.reshape(-1)[0])
    if bool((zero == first).all()) and first.is_integer() and signed[0] <= int(q.min()) - first \
            and int(q.max()) - first <= signed[1]:
        return q - int(first), None, "one zero point"
    center = 1 << (layer.bits - 1)
    return q - center, layer.scale.float() * (zero - center), "zero points as a per-group input-sum term"


DECODED = "uint8 codes decoded in the program (portable kernels)"


def packed_linear_form(layer: PackedIntLinear) -> tuple[nn.Module, str]:
    try:
        return _delegated_linear_form(layer)
    except UnsupportedLayerError as why:
        return DecodedLinearForm(layer), f"{DECODED}: {why}"


def _delegated_linear_form(layer: PackedIntLinear) -> tuple[nn.Module, str]:
    if not layer.affine_codes:
        raise UnsupportedLayerError(f"{type(layer).__name__} codes are not (q - zero point) * scale, as XNNPACK's are")
    qrange = (-8, 7) if layer.bits <= 4 else (-128, 127)
    codes, offset, how = _signed_codes(layer, qrange)
    k, group = layer.in_features, layer.group_size
    if group == k:  # one group per row: per-channel codes (qc4w or qc8w)
        return (DynamicInt8LinearForm(codes, layer.scale[:, 0], layer.bias, qrange=qrange,
                                      offset=None if offset is None else offset[:, 0]),
                f"XNNPACK qd8-qc{4 if layer.bits <= 4 else 8}w: {layer.bits}-bit codes per channel ({how}), "
                "per-token dynamic int8 activations")
    if layer.bits <= 4:
        if group % 32 or k % group:
            raise UnsupportedLayerError(f"XNNPACK's 4-bit groups are multiples of 32 (this layer's group is {group})")
        return (Group4BitLinearForm(codes, layer.scale, offset, layer.bias, group),
                f"XNNPACK qd8-qb4w: {layer.bits}-bit codes in groups of {group} ({how}), per-token dynamic "
                "int8 activations")
    raise UnsupportedLayerError(f"XNNPACK has no grouped {layer.bits}-bit weights (group {group}; one group per "
                                "row exports)")


class StaticInt8ConvForm(nn.Module):
    """:class:`Int8Conv2d` as a static QDQ group (calibrated input / output scales, int8 weights per channel)."""

    def __init__(self, layer: Int8Conv2d) -> None:
        super().__init__()
        s_in, z_in = float(layer.input_scale), int(layer.input_zero_point)
        self.register_buffer("w", layer.weight.clone())
        self.register_buffer("w_scale", layer.weight_scale.float().clone())
        self.register_buffer("w_zero", torch.zeros(layer.out_channels, dtype=torch.int64))
        self.register_buffer("bias", None if layer.bias is None else layer.bias.float().clone())
        # uint8 codes u with zero point z are int8 codes u - 128 with zero point z - 128
        self.q_in = (s_in, z_in - 128)
        self.clip = ((0 - z_in) * s_in, ((1 << CONV_INPUT_BITS) - 1 - z_in) * s_in)
        self.q_out = (float(layer.output_scale), int(layer.output_zero_point) - 128)
        self.relu = layer.relu
        self.conv = dict(stride=layer.stride, padding=layer.padding, dilation=layer.dilation, groups=layer.groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        qd = register_quantized_ops()
        x = x.clamp(*self.clip)
        x = qd.dequantize_per_tensor(qd.quantize_per_tensor(x, *self.q_in, -128, 127, torch.int8),
                                     *self.q_in, -128, 127, torch.int8)
        w = qd.dequantize_per_channel(self.w, self.w_scale, self.w_zero, 0, -127, 127, torch.int8)
        y = F.conv2d(x, w, self.bias, **self.conv)
        if self.relu:
            y = F.relu(y)
        return qd.dequantize_per_tensor(qd.quantize_per_tensor(y, *self.q_out, -128, 127, torch.int8),
                                        *self.q_out, -128, 127, torch.int8)


def int8_conv_form(layer: Int8Conv2d) -> tuple[nn.Module, str]:
    return StaticInt8ConvForm(layer), "XNNPACK qs8 convolution: static int8 (calibrated scales)"


def int8_embedding_form(layer: Int8Embedding) -> tuple[nn.Module, str]:
    return layer, "int8 rows gathered, per-row scale (portable kernels)"


def sparse_linear_form(layer: SparseCSRLinear) -> tuple[nn.Module, str]:
    return layer.dense_linear(), "dense float Linear (XNNPACK has no sparse GEMM)"


class DynamicInt8ConvForm(nn.Module):
    """Signed codes per output channel (qc8w storage) in a convolution behind per-tensor dynamic int8 activations
    (XNNPACK's qd8 convolution), plus the zero points' term: each output channel's ``s (z - c)`` times the input's
    sum over the receptive field (a one-channel convolution with a ones kernel)."""

    def __init__(self, layer: PackedIntConv2d, codes: torch.Tensor, offset: torch.Tensor | None) -> None:
        super().__init__()
        shape = (layer.out_channels, layer.in_channels // layer.groups, *layer.kernel_size)
        self.register_buffer("codes", codes.to(torch.int8).reshape(shape).contiguous())
        self.register_buffer("scale", layer.scale.float()[:, 0].contiguous())
        self.register_buffer("zero", torch.zeros(layer.out_channels, dtype=torch.int64))
        self.register_buffer("bias", None if layer.bias is None else layer.bias.float().clone())
        self.register_buffer("offset", None if offset is None else offset[:, 0].reshape(1, -1, 1, 1).contiguous())
        self.register_buffer("ones", None if offset is None else torch.ones(1, 1, *layer.kernel_size))
        self.conv = dict(stride=layer.stride, padding=layer.padding, dilation=layer.dilation)
        self.qrange = (-128, 127)  # XNNPACK's convolutions take 8-bit weights (no qc4w): the codes ride in int8

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        qd = register_quantized_ops()
        scale, zero = qd.choose_qparams.tensor(x, -128, 127, torch.finfo(torch.float32).eps, torch.int8)
        xq = qd.quantize_per_tensor.tensor(x, scale, zero, -128, 127, torch.int8)
        xd = qd.dequantize_per_tensor.tensor(xq, scale, zero, -128, 127, torch.int8)
        w = qd.dequantize_per_channel(self.codes, self.scale, self.zero, 0, *self.qrange, torch.int8)
        y = F.conv2d(xd, w, self.bias, **self.conv)
        if self.offset is None:
            return y
        return y - F.conv2d(x.sum(1, keepdim=True), self.ones, None, **self.conv) * self.offset


def packed_conv_form(layer: PackedIntConv2d) -> tuple[nn.Module, str]:
    why = ("codes are not (q - zero point) * scale" if not layer.affine_codes else
           "XNNPACK's dynamic int8 convolutions are not grouped or depthwise" if layer.groups != 1 else
           "XNNPACK takes a one-input-channel kernel as depthwise" if layer.in_channels == 1 else
           f"groups of {layer.group_size} codes, not one per output channel" if layer.scale.shape[1] != 1 else None)
    if why is not None:  # a naive portable convolution would take seconds a batch: XNNPACK's fp32 one instead
        conv = nn.Conv2d(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride, layer.padding,
                         layer.dilation, layer.groups, layer.bias is not None)
        conv.weight.data = layer.dequantized_weight()
        if layer.bias is not None:
            conv.bias.data = layer.bias.detach().float().clone()
        return conv.eval(), f"codes decoded to float32 at export: XNNPACK fp32 convolution ({why})"
    codes, offset, how = _signed_codes(layer, (-128, 127))
    return (DynamicInt8ConvForm(layer, codes, offset),
            f"XNNPACK qd8 convolution: {layer.bits}-bit codes per channel as int8 ({how}), per-tensor dynamic int8 "
            "activations")


def packed_embedding_form(layer: PackedIntEmbedding) -> tuple[nn.Module, str]:
    return DecodedEmbeddingForm(layer), f"packed {layer.bits}-bit rows gathered, then decoded (portable kernels)"


def _none(what: str) -> Callable[[Any], tuple[nn.Module, str]]:
    def refuse(layer: Any) -> tuple[nn.Module, str]:  # noqa: ARG001
        raise UnsupportedLayerError(f"{what} have no XNNPACK form yet")

    return refuse


FormFn = Callable[[Any], tuple[nn.Module, str]]

#: Representation class -> its ExecuTorch form (subclasses take their closest base's).
PTE_FORMS: dict[type[nn.Module], FormFn] = {
    Int8Linear: int8_linear_form,
    Int8Conv2d: int8_conv_form,
    Int8Embedding: int8_embedding_form,
    PackedIntLinear: packed_linear_form,
    PackedIntConv2d: packed_conv_form,
    PackedIntEmbedding: packed_embedding_form,
    PackedWeights: _none("packed weights of recurrent, attention and transposed-convolution layers"),
    SparseCSRLinear: sparse_linear_form,
}


def pte_form(layer: nn.Module) -> tuple[nn.Module, str] | None:
    """``(traceable module, description)`` that emits ``layer`` into an ExecuTorch program, or None when it is
    traced as it is (float layers, pruned and factored ones at their smaller shapes).

    Raises :class:`UnsupportedLayerError` (the reason) for a representation with no XNNPACK form.
    """
    for cls in type(layer).__mro__:
        form = PTE_FORMS.get(cls)
        if form is not None:
            return form(layer)
    return None
