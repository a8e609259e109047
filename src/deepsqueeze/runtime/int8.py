"""int8 representations: weights as int8 codes with float scales, and for Linear / Conv2d int8 activations.

* :class:`Int8Linear`: int8 weights (one scale per output channel) times int8 activations, int32
  accumulation with the fastest kernel measured on the running device
  (:func:`deepsqueeze.runtime.kernels.int8_kernel`): ``torch._int_mm`` (CUDA, VNNI/AMX CPUs) or fbgemm's
  ``quantized::linear_dynamic`` on weights packed from our codes at first use after loading (AVX2, where
  ``_int_mm`` is ~20x slower than fp32; per-token codes are 7-bit there to avoid the u8 x s8 int16
  saturation). Packed kernels are never stored.
  Activations are quantized per token (dynamic, symmetric int8), per tensor (dynamic, asymmetric
  uint8: what ONNX Runtime's ``DynamicQuantizeLinear`` does) or with a fixed calibrated scale and zero
  point (static, fbgemm's static kernel on CPU). An optional per-input-channel ``smooth`` vector
  divides the input first (SmoothQuant; the weight was multiplied by it before quantization).
* :class:`Int8Conv2d`: static int8 convolution (per-channel int8 weights, uint8 activations with
  calibrated input and output ranges) on PyTorch's fbgemm/x86 integer kernels, optionally with the
  following ReLU fused.
* :class:`Int8Embedding` (int8 rows, one scale per row): MiniLM's word-embedding table is half of its
  parameters.

Buffers hold the integers themselves, so the artifact's ``raw`` encoding already stores them. Every class
can be built empty from its shapes (``replay_params``), which is how the artifact loader's replay rebuilds it.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

from deepsqueeze.errors import ModelError, UnsupportedLayerError
from deepsqueeze.primitives import quantize as Q
from deepsqueeze.runtime.kernels import (
    Cached,
    fbgemm_available,
    fbgemm_pack,
    fbgemm_per_token,
    forced_int8_choice,
    int8_kernel,
    per_channel_qweight,
)

__all__ = ["ACT_SCHEMES", "CONV_INPUT_BITS", "ActScheme", "Int8Conv2d", "Int8Embedding", "Int8Linear",
           "quantize_activation_per_token"]

ACT_SCHEMES = ("per_token", "per_tensor", "static")
CONV_INPUT_BITS = 7
ActScheme = str  # one of ACT_SCHEMES


def quantize_activation_per_token(x: torch.Tensor, bits: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric ``bits``-bit codes (int8 storage) of each row of ``x`` (2-D) and the row scales.

    The scale is ``max|row| / (2**(bits-1) - 1)`` (1 for all-zero rows), so codes lie in
    ``[-(2**(bits-1) - 1), 2**(bits-1) - 1]``: 8 bits for ``torch._int_mm``, 7 for the fbgemm kernel.
    """
    qmax = float((1 << (bits - 1)) - 1)
    amax = x.abs().amax(dim=1, keepdim=True)
    scale = torch.where(amax > 0, amax / qmax, torch.ones_like(amax))
    return torch.round(x / scale).clamp_(-qmax, qmax).to(torch.int8), scale


def _clamp_7bit(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:
    """``x`` clipped to what uint8 codes 0..127 represent (x86 kernels saturate full-range uint8 inputs)."""
    s, z = float(scale), int(zero_point)
    return x.float().clamp((0 - z) * s, ((1 << CONV_INPUT_BITS) - 1 - z) * s).contiguous()


def _per_tensor_uint8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """ONNX ``DynamicQuantizeLinear``: the range ``[min(x,0), max(x,0)]`` onto uint8 (scale, zero point)."""
    lo = torch.clamp(x.min(), max=0.0)
    hi = torch.clamp(x.max(), min=0.0)
    scale = torch.where(hi > lo, (hi - lo) / 255.0, torch.ones_like(hi))
    zero_point = torch.clamp(torch.round(-lo / scale), 0, 255)
    return scale, zero_point


# ------------------------------------------------------------------------------------------ Int8Linear


class Int8Linear(Cached):
    """``y = x W^T + b`` computed as int8 x int8 -> int32 (see :meth:`kernel`), then rescaled to float.

    Buffers: ``weight`` (out, in) int8 codes, ``weight_scale`` (out,) float32, ``bias`` (out,) or None,
    ``smooth`` (in,) float32 or None (SmoothQuant: the input is divided by it), and for static
    activations ``input_scale`` / ``input_zero_point`` (uint8 convention; calibrated onto 7-bit codes
    0..127, which both kernels accept).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, act: ActScheme = "per_token",
                 smooth: bool = False) -> None:
        super().__init__()
        if act not in ACT_SCHEMES:
            raise ValueError(f"act must be one of {ACT_SCHEMES}, got {act!r}")
        self.in_features, self.out_features, self.act = in_features, out_features, act
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(out_features))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)
        self.register_buffer("smooth", torch.ones(in_features) if smooth else None)
        if act == "static":
            self.register_buffer("input_scale", torch.ones(()))
            self.register_buffer("input_zero_point", torch.full((), 128.0))

    @classmethod
    def from_float(cls, linear: nn.Linear, act: ActScheme = "per_token", smooth: torch.Tensor | None = None,
                   input_qparams: tuple[float, float] | None = None) -> Int8Linear:
        """Quantize ``linear``'s weight symmetrically per output channel (after multiplying by ``smooth``).

        ``input_qparams`` (scale, uint8 zero point) is required for ``act="static"``.
        """
        w = linear.weight.detach().float()
        Q.check_finite(w, "the weight")
        module = cls(linear.in_features, linear.out_features, linear.bias is not None, act, smooth is not None)
        if smooth is not None:
            module.smooth.copy_(smooth.float())
            w = w * smooth.float()
        qp = Q.choose_qparams(w, 8, symmetric=True, signed=True, granularity=Q.PerChannel(0))
        module.weight.copy_(Q.quantize(w, qp))
        module.weight_scale.copy_(qp.scale)
        if linear.bias is not None:
            module.bias.copy_(linear.bias.detach().float())
        if act == "static":
            if input_qparams is None:
                raise ModelError("static int8 activations need calibrated input parameters: run calibration first")
            module.input_scale.fill_(float(input_qparams[0]))
            module.input_zero_point.fill_(float(input_qparams[1]))
        return module

    def dequantized_weight(self) -> torch.Tensor:
        """The float weight the integer kernel computes with (divided back by ``smooth``)."""
        w = self.weight.float() * self.weight_scale[:, None]
        return w / self.smooth if self.smooth is not None else w

    def kernel(self, device: torch.device) -> str:
        """``"fbgemm"`` or ``"int_mm"``: see :func:`int8_kernel`.

        Per-token activations race the two kernels; static activations use fbgemm's static kernel on
        any CPU that has it (unless ``int_mm`` is forced); per-tensor activations use ``_int_mm``.
        """
        if self.act == "per_token" and self.in_features > 1:
            return int8_kernel(device)
        if self.act == "static" and device.type == "cpu" and fbgemm_available() and forced_int8_choice() != "int_mm":
            return "fbgemm"
        return "int_mm"

    def kernel_choices(self) -> dict[str, str]:
        """``{"all": kernel}``: the one integer kernel this layer runs on its device (:meth:`kernel`)."""
        return {"all": self.kernel(self.weight.device)}

    def _colsum(self) -> torch.Tensor:
        return self._cached("colsum", lambda: self.weight.sum(1, dtype=torch.int32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_quantized:  # from an Int8Conv2d chain
            x = x.dequantize()
        shape = x.shape
        x2 = x.reshape(-1, self.in_features).float()
        if self.smooth is not None:
            x2 = x2 * self._cached("inv_smooth", lambda: 1.0 / self.smooth)
        w_t = self.weight.t()
        if x2.shape[0] == 0:
            y = x2.new_zeros(0, self.out_features)
        elif self.act == "per_token" and self.kernel(x2.device) == "fbgemm":
            packed = self._cached("fbgemm", lambda: fbgemm_pack(self.weight, self.weight_scale))
            acc, xs = fbgemm_per_token(x2, packed)  # already times the weight scales
            y = acc.mul_(xs) if self.bias is None else torch.addcmul(self.bias, acc, xs)
            return y.reshape(*shape[:-1], self.out_features).to(x.dtype)
        elif self.act == "static" and self.kernel(x2.device) == "fbgemm":
            packed = self._cached("fbgemm", lambda: fbgemm_pack(self.weight, self.weight_scale, self.bias))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                y = torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32(
                    _clamp_7bit(x2, self.input_scale, self.input_zero_point), float(self.input_scale),
                    int(self.input_zero_point), packed)
            return y.reshape(*shape[:-1], self.out_features).to(x.dtype)
        elif self.act == "per_token":
            xq, xs = quantize_activation_per_token(x2)
            y = torch._int_mm(xq, w_t).float() * (xs * self.weight_scale)
        else:
            if self.act == "per_tensor":
                xs, zp = _per_tensor_uint8(x2)
            else:
                xs, zp = self.input_scale, self.input_zero_point
            # uint8 codes shifted to int8: (q - zp) = (q - 128) + (128 - zp)
            xq = (torch.round(x2 / xs) + zp).clamp_(0, 255).sub_(128).to(torch.int8)
            acc = torch._int_mm(xq, w_t) + (128 - zp).to(torch.int32) * self._colsum()
            y = acc.float() * (xs * self.weight_scale)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features).to(x.dtype)

    def deepsqueeze_param_count(self) -> int:
        return self.weight.numel() + (self.bias.numel() if self.bias is not None else 0)

    def deepsqueeze_nonzero_count(self) -> int:
        return int((self.weight != 0).sum()) + (int((self.bias != 0).sum()) if self.bias is not None else 0)

    def replay_params(self) -> dict[str, Any]:
        return {"in_features": self.in_features, "out_features": self.out_features,
                "bias": self.bias is not None, "act": self.act, "smooth": self.smooth is not None}

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, act={self.act}"


# ------------------------------------------------------------------------------------------ Int8Conv2d


class Int8Conv2d(Cached):
    """Static int8 convolution: uint8 input codes x per-channel int8 weights, int32 accumulation.

    Runs on PyTorch's quantized CPU kernels (x86/fbgemm): the input is quantized with the calibrated
    ``input_scale``/``input_zero_point``, the kernel requantizes its int32 sums to the calibrated
    output range (``output_scale``/``output_zero_point``), and the result is returned as float.
    ``relu=True`` fuses the ReLU that followed the convolution. With ``quantized_output=True`` the result
    stays a quantized tensor (7-bit codes with the output parameters) for the next integer layer: the
    quantize step sets this where every consumer takes quantized input, so chains of convolutions,
    poolings and flattens run in integers end to end. A quantized input is used as it is.

    Input codes must lie in 0..127 (7 bits, :data:`CONV_INPUT_BITS`): the x86/fbgemm kernels multiply
    uint8 by int8 pairwise into int16 and saturate with full-range inputs (PyTorch's own x86
    configuration uses the same ``reduce_range``).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: tuple[int, int],
                 stride: tuple[int, int] = (1, 1), padding: tuple[int, int] = (0, 0),
                 dilation: tuple[int, int] = (1, 1), groups: int = 1, bias: bool = True, relu: bool = False,
                 quantized_output: bool = False) -> None:
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride, self.padding = tuple(kernel_size), tuple(stride), tuple(padding)
        self.dilation, self.groups, self.relu = tuple(dilation), groups, relu
        self.quantized_output = quantized_output
        self.register_buffer("weight", torch.zeros(out_channels, in_channels // groups, *kernel_size, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(out_channels))
        self.register_buffer("bias", torch.zeros(out_channels) if bias else None)
        self.register_buffer("input_scale", torch.ones(()))
        self.register_buffer("input_zero_point", torch.full((), 128.0))
        self.register_buffer("output_scale", torch.ones(()))
        self.register_buffer("output_zero_point", torch.full((), 128.0))

    @classmethod
    def from_float(cls, conv: nn.Conv2d, input_qparams: tuple[float, float], output_qparams: tuple[float, float],
                   relu: bool = False, quantized_output: bool = False) -> Int8Conv2d:
        """Quantize ``conv``'s weight per output channel; activation parameters come from calibration.

        With ``quantized_output`` the output parameters must map onto 7-bit codes (they feed another kernel).
        """
        if not isinstance(conv.padding, tuple) or conv.padding_mode != "zeros":
            raise UnsupportedLayerError(f"Int8Conv2d needs numeric zero padding, got padding={conv.padding!r} "
                                        f"mode={conv.padding_mode}: exclude this layer")
        w = conv.weight.detach().float()
        Q.check_finite(w, "the weight")
        module = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,  # type: ignore[arg-type]
                     conv.dilation, conv.groups, conv.bias is not None, relu, quantized_output)  # type: ignore[arg-type]
        qp = Q.choose_qparams(w, 8, symmetric=True, signed=True, granularity=Q.PerChannel(0))
        module.weight.copy_(Q.quantize(w, qp))
        module.weight_scale.copy_(qp.scale)
        if conv.bias is not None:
            module.bias.copy_(conv.bias.detach().float())
        module.input_scale.fill_(float(input_qparams[0]))
        module.input_zero_point.fill_(float(input_qparams[1]))
        module.output_scale.fill_(float(output_qparams[0]))
        module.output_zero_point.fill_(float(output_qparams[1]))
        return module

    def dequantized_weight(self) -> torch.Tensor:
        return self.weight.float() * self.weight_scale.reshape(-1, 1, 1, 1)

    def _packed(self) -> Any:
        def make() -> Any:
            return torch.ops.quantized.conv2d_prepack(per_channel_qweight(self.weight, self.weight_scale), self.bias,
                                                      list(self.stride), list(self.padding), list(self.dilation),
                                                      self.groups)

        return self._cached("packed", make)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        packed = self._packed()
        op = torch.ops.quantized.conv2d_relu if self.relu else torch.ops.quantized.conv2d
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            qx = x if x.is_quantized else torch.quantize_per_tensor(
                _clamp_7bit(x, self.input_scale, self.input_zero_point), float(self.input_scale),
                int(self.input_zero_point), torch.quint8)
            y = op(qx, packed, float(self.output_scale), int(self.output_zero_point))
            if self.quantized_output:
                return y
            return y.dequantize() if x.is_quantized else y.dequantize().to(x.dtype)

    def deepsqueeze_param_count(self) -> int:
        return self.weight.numel() + (self.bias.numel() if self.bias is not None else 0)

    def deepsqueeze_nonzero_count(self) -> int:
        return int((self.weight != 0).sum()) + (int((self.bias != 0).sum()) if self.bias is not None else 0)

    def replay_params(self) -> dict[str, Any]:
        return {"in_channels": self.in_channels, "out_channels": self.out_channels,
                "kernel_size": list(self.kernel_size), "stride": list(self.stride), "padding": list(self.padding),
                "dilation": list(self.dilation), "groups": self.groups, "bias": self.bias is not None,
                "relu": self.relu, "quantized_output": self.quantized_output}

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, relu={self.relu}, quantized_output={self.quantized_output}")


# ------------------------------------------------------------------------------------------ Int8Embedding


class Int8Embedding(nn.Module):
    """Embedding table as int8 rows with one float32 scale per row (symmetric): lookups gather int8."""

    def __init__(self, num_embeddings: int, embedding_dim: int, padding_idx: int | None = None) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.padding_idx = num_embeddings, embedding_dim, padding_idx
        self.register_buffer("weight", torch.zeros(num_embeddings, embedding_dim, dtype=torch.int8))
        self.register_buffer("scale", torch.ones(num_embeddings))

    @classmethod
    def from_float(cls, embedding: nn.Embedding) -> Int8Embedding:
        w = embedding.weight.detach().float()
        Q.check_finite(w, "the embedding table")
        module = cls(embedding.num_embeddings, embedding.embedding_dim, embedding.padding_idx)
        qp = Q.choose_qparams(w, 8, symmetric=True, signed=True, granularity=Q.PerChannel(0))
        module.weight.copy_(Q.quantize(w, qp))
        module.scale.copy_(qp.scale)
        return module

    def dequantized_weight(self) -> torch.Tensor:
        return self.weight.float() * self.scale[:, None]

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.weight[ids].float() * self.scale[ids].unsqueeze(-1)

    def deepsqueeze_param_count(self) -> int:
        return self.weight.numel()

    def deepsqueeze_nonzero_count(self) -> int:
        return int((self.weight != 0).sum())

    def replay_params(self) -> dict[str, Any]:
        return {"num_embeddings": self.num_embeddings, "embedding_dim": self.embedding_dim,
                "padding_idx": self.padding_idx}
