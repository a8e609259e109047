"""Quantized module representations, named by what they hold (not by the algorithm that made them).

* :class:`Int8Linear`: int8 weights (one scale per output channel) times int8 activations, int32
  accumulation with the fastest kernel measured on the running device (:func:`int8_kernel`):
  ``torch._int_mm`` (CUDA, VNNI/AMX CPUs) or fbgemm's ``quantized::linear_dynamic`` on weights packed
  from our codes at first use after loading (AVX2, where ``_int_mm`` is ~20x slower than fp32; per-token
  codes are 7-bit there to avoid the u8 x s8 int16 saturation). Packed kernels are never stored.
  Activations are quantized per token (dynamic, symmetric int8), per tensor (dynamic, asymmetric
  uint8: what ONNX Runtime's ``DynamicQuantizeLinear`` does) or with a fixed calibrated scale and zero
  point (static, fbgemm's static kernel on CPU). An optional per-input-channel ``smooth`` vector
  divides the input first (SmoothQuant; the weight was multiplied by it before quantization).
* :class:`Int8Conv2d`: static int8 convolution (per-channel int8 weights, uint8 activations with
  calibrated input and output ranges) on PyTorch's fbgemm/x86 integer kernels, optionally with the
  following ReLU fused.
* :class:`PackedIntLinear` / :class:`PackedIntConv2d` (and :class:`PackedInt4Linear`): weight-only
  codes of 1..8 bits packed into uint8 rows, with one scale and zero point per output channel or per
  group of input elements; binary codes (XNOR-Net) are stored as 1-bit codes ``(2q - 1) * scale``.
  They never keep a float weight: Linear runs PyTorch's int4/int8 weight-only CPU kernels on layouts
  built from the codes at first use, or decodes one layer into a transient buffer per call, whichever
  measured faster for the shape and batch kind (:meth:`PackedIntLinear.kernel`); Conv2d decodes per call.
* :class:`Int8Embedding` (int8 rows, one scale per row) and :class:`PackedIntEmbedding` (2..8-bit
  rows with group scales): MiniLM's word-embedding table is half of its parameters.

Buffers hold the integers themselves, so the artifact's ``raw`` encoding already stores packed bits.
Every class has an ``empty`` constructor used by the artifact loader's replay (shapes only).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from deepsqueeze.core.timing import choose, forced_choice
from deepsqueeze.errors import ModelError, UnsupportedLayerError
from deepsqueeze.primitives import packing
from deepsqueeze.primitives import quantize as Q

__all__ = [
    "ActScheme",
    "Int8Conv2d",
    "Int8Embedding",
    "Int8Linear",
    "PackedInt4Linear",
    "PackedIntConv2d",
    "PackedIntEmbedding",
    "PackedIntLinear",
    "forced_int8_kernel",
    "int8_kernel",
    "quantize_activation_per_token",
    "set_int8_kernel",
    "set_packed_kernel",
]

ACT_SCHEMES = ("per_token", "per_tensor", "static")
CONV_INPUT_BITS = 7
ActScheme = str  # one of ACT_SCHEMES


class _Cached(nn.Module):
    """Keeps derived tensors (transposed weights, prepacked kernels) that are rebuilt after loading."""

    def __init__(self) -> None:
        super().__init__()
        self._cache: dict[str, Any] = {}

    def _cached(self, key: str, make: Any) -> Any:
        value = self._cache.get(key)
        if value is None:
            value = self._cache[key] = make()
        return value

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:  # type: ignore[override]
        self._cache.clear()
        super()._load_from_state_dict(*args, **kwargs)

    def _apply(self, fn: Any, recurse: bool = True) -> Any:  # device / dtype moves
        self._cache.clear()
        return super()._apply(fn, recurse)


def quantize_activation_per_token(x: torch.Tensor, bits: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric ``bits``-bit codes (int8 storage) of each row of ``x`` (2-D) and the row scales.

    The scale is ``max|row| / (2**(bits-1) - 1)`` (1 for all-zero rows), so codes lie in
    ``[-(2**(bits-1) - 1), 2**(bits-1) - 1]``: 8 bits for ``torch._int_mm``, 7 for the fbgemm kernel.
    """
    qmax = float((1 << (bits - 1)) - 1)
    amax = x.abs().amax(dim=1, keepdim=True)
    scale = torch.where(amax > 0, amax / qmax, torch.ones_like(amax))
    return torch.round(x / scale).clamp_(-qmax, qmax).to(torch.int8), scale


# ------------------------------------------------------------------------------------------ int8 kernels

INT8_KERNELS = ("int_mm", "fbgemm")
FBGEMM_ACT_BITS = 7
_kernel_override: str | None = None
_measured_kernel: dict[str, str] = {}


def set_int8_kernel(kernel: str | None) -> None:
    """Force the kernel :class:`Int8Linear` uses for dynamic activations (``None``: measure, the default).

    ``"int_mm"``: ``torch._int_mm`` with 8-bit per-token codes (fast on CUDA and CPUs with VNNI/AMX).
    ``"fbgemm"``: PyTorch's fbgemm ``quantized::linear_dynamic`` with 7-bit per-token codes (fast on
    AVX2; 7 bits because AVX2's u8 x s8 pair products saturate int16 with full-range uint8 inputs).
    The environment variable ``DEEPSQUEEZE_INT8_KERNEL`` sets the same thing.
    """
    global _kernel_override
    if kernel is not None and kernel not in INT8_KERNELS:
        raise ModelError(f"unknown int8 kernel {kernel!r}: choose one of {INT8_KERNELS} (or None to measure)")
    _kernel_override = kernel


@contextlib.contextmanager
def forced_int8_kernel(kernel: str) -> Iterator[None]:
    """:func:`set_int8_kernel` for the ``with`` block only (the previous setting is restored).

    ``forced_int8_kernel("int_mm")`` runs the reference arithmetic of per-token layers (8-bit codes), which
    the ONNX export encodes whatever kernel this machine measured to be faster."""
    previous = _kernel_override
    set_int8_kernel(kernel)
    try:
        yield
    finally:
        set_int8_kernel(previous)


def _fbgemm_available() -> bool:
    return any(e in torch.backends.quantized.supported_engines for e in ("x86", "fbgemm"))


def _forced_kernel() -> str | None:
    return _kernel_override or forced_choice("DEEPSQUEEZE_INT8_KERNEL", INT8_KERNELS)


def int8_kernel(device: torch.device) -> str:
    """The kernel for dynamic int8 Linear on ``device``: forced, or measured once per machine.

    CUDA uses ``_int_mm``. On a CPU both kernels run a MiniLM-sized product (512 x 384 x 384),
    interleaved with repetitions (:func:`deepsqueeze.core.timing.choose`); fbgemm is kept unless
    ``_int_mm`` is 15% faster, and the decision is stored per CPU model and flags in the cache, so
    a race timed under load cannot pick ``_int_mm`` where it is ~20x slower than fp32 (AVX2 without
    VNNI; fbgemm is ~2x faster than fp32 there).
    """
    forced = _forced_kernel()
    if forced is not None:
        return forced
    if device.type != "cpu" or not _fbgemm_available():
        return "int_mm"
    if "cpu" not in _measured_kernel:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(512, 384, generator=g)
        w = torch.randint(-127, 128, (384, 384), generator=g, dtype=torch.int8)
        xq = torch.randint(-127, 128, (512, 384), generator=g, dtype=torch.int8)
        packed = _fbgemm_pack(w, torch.ones(384))
        _measured_kernel["cpu"] = choose("int8-linear-per-token 512x384x384",
                                         {"fbgemm": lambda: _fbgemm_per_token(x, packed),
                                          "int_mm": lambda: torch._int_mm(xq, w.t())})
    return _measured_kernel["cpu"]


def _per_channel_qweight(weight: torch.Tensor, weight_scale: torch.Tensor) -> torch.Tensor:
    """Our int8 codes and per-output-channel scales as a PyTorch qint8 tensor (no copy of the values),
    with the quantized engine selected for the prepack that follows."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.backends.quantized.engine = _quantized_engine()
        return torch._make_per_channel_quantized_tensor(
            weight.contiguous(), weight_scale.double(), torch.zeros(weight.shape[0], dtype=torch.long), 0)


def _fbgemm_pack(weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None = None) -> Any:
    """fbgemm-packed per-channel weights from our int8 codes and scales (and the float bias, if given)."""
    return torch.ops.quantized.linear_prepack(_per_channel_qweight(weight, weight_scale), bias)


def _fbgemm_per_token(x: torch.Tensor, packed: Any) -> torch.Tensor:
    """``codes(x) @ (W_q * w_scale)^T`` for 7-bit per-token codes, then times the row scales.

    ``linear_dynamic`` quantizes its input per tensor; feeding it the integer codes (as floats) plus
    one extra row holding -64 and 63 makes its chosen scale exactly 1 and zero point 64 (reduce_range:
    uint8 codes 1..127), so its uint8 operands are exactly our codes + 64 and nothing saturates.
    """
    qmax = float((1 << (FBGEMM_ACT_BITS - 1)) - 1)
    rows = x.shape[0]
    # max |x| per row; two plain reductions are ~9x faster than vector_norm(inf) or aminmax on CPU
    amax = torch.maximum(x.amax(dim=1, keepdim=True), x.amin(dim=1, keepdim=True).neg_())
    scale = torch.where(amax > 0, amax / qmax, torch.ones_like(amax))
    buf = torch.empty(rows + 1, x.shape[1], dtype=torch.float32)
    torch.div(x, scale, out=buf[:rows])  # linear_dynamic rounds (half to even, as torch.round) with scale 1
    buf[rows].zero_()
    buf[rows, 0], buf[rows, -1] = -qmax - 1, qmax
    return torch.ops.quantized.linear_dynamic(buf, packed, True)[:rows], scale


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


class Int8Linear(_Cached):
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
        if self.act == "static" and device.type == "cpu" and _fbgemm_available() and _forced_kernel() != "int_mm":
            return "fbgemm"
        return "int_mm"

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
            packed = self._cached("fbgemm", lambda: _fbgemm_pack(self.weight, self.weight_scale))
            acc, xs = _fbgemm_per_token(x2, packed)  # already times the weight scales
            y = acc.mul_(xs) if self.bias is None else torch.addcmul(self.bias, acc, xs)
            return y.reshape(*shape[:-1], self.out_features).to(x.dtype)
        elif self.act == "static" and self.kernel(x2.device) == "fbgemm":
            packed = self._cached("fbgemm", lambda: _fbgemm_pack(self.weight, self.weight_scale, self.bias))
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

    def onnx_form(self) -> tuple[nn.Module, str]:
        """The traceable module that emits this layer to ONNX, and what it becomes there."""
        from deepsqueeze.runtime.onnx_forms import int8_linear_form

        return int8_linear_form(self)


# ------------------------------------------------------------------------------------------ Int8Conv2d


def _quantized_engine() -> str:
    engines = torch.backends.quantized.supported_engines
    for engine in ("x86", "fbgemm", "onednn", "qnnpack"):
        if engine in engines:
            return engine
    raise UnsupportedLayerError("this PyTorch build has no quantized CPU engine (x86/fbgemm/qnnpack) for Int8Conv2d")


class Int8Conv2d(_Cached):
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
            return torch.ops.quantized.conv2d_prepack(_per_channel_qweight(self.weight, self.weight_scale), self.bias,
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

    def onnx_form(self) -> tuple[nn.Module, str]:
        """The traceable module that emits this layer to ONNX, and what it becomes there."""
        from deepsqueeze.runtime.onnx_forms import int8_conv_form

        return int8_conv_form(self)


# ------------------------------------------------------------------------------------------ packed weight-only


class _PackedWeight(_Cached):
    """Codes of ``bits`` bits for a weight viewed as rows (out, K), packed along K into uint8.

    ``scale``/``zero_point`` have shape (out, K // group_size) (per channel: group_size = K). Codes are
    unsigned: ``w = (q - zero_point) * scale``; binary weights store ``w = (2q - 1) * scale``.
    """

    def _init_codes(self, rows: int, cols: int, bits: int, group_size: int | None, binary: bool) -> None:
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
        self.register_buffer("zero_point", None if binary else torch.zeros(rows, groups, dtype=torch.uint8))

    def set_codes(self, codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None) -> None:
        """Store unsigned codes (rows, K) with their (rows, groups) scales and zero points (e.g. from GPTQ)."""
        codes = codes.reshape(self._rows, self._cols)
        self.codes.copy_(packing.pack(codes, self.bits))
        self.scale.copy_(scale.reshape(self.scale.shape).float())
        if self.zero_point is not None:
            if zero_point is None:
                raise ValueError("affine codes need zero points")
            self.zero_point.copy_(zero_point.reshape(self.zero_point.shape).to(torch.uint8))
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
        qp = Q.choose_qparams(w, self.bits, symmetric=symmetric, signed=False, granularity=gran)
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

    def deepsqueeze_param_count(self) -> int:
        bias = getattr(self, "bias", None)
        return self._rows * self._cols + (bias.numel() if bias is not None else 0)

    def deepsqueeze_nonzero_count(self) -> int:
        bias = getattr(self, "bias", None)
        nz = int((self.dequantized_rows() != 0).sum())
        return nz + (int((bias != 0).sum()) if bias is not None else 0)

    def ideal_bits(self) -> int:
        """Bits of codes plus fp32 scales and 8-bit zero points (the physical lower bound of this layout)."""
        return self.codes.numel() * 8 + self.scale.numel() * 32 + (
            self.zero_point.numel() * 8 if self.zero_point is not None else 0)


# ------------------------------------------------------------------------------------------ packed kernels

#: Weight-only Linear kernels, in order of preference: see :class:`PackedIntLinear`.
PACKED_KERNELS = ("int4pack", "int8pack", "dequant")
INT4PACK_GROUPS = (256, 128, 64, 32)  # the group sizes _weight_int4pack_mm_for_cpu accepts
PACKED_RACE_ROWS = {"few": 32, "many": 256, "large": 2048}  # rows of the first batch each kind's race runs on
_packed_override: str | None = None


def set_packed_kernel(kernel: str | None) -> None:
    """Force the kernel :class:`PackedIntLinear` uses (``None``: measure, the default); the environment
    variable ``DEEPSQUEEZE_PACKED_KERNEL`` does the same. A layer the forced kernel cannot run (see
    :meth:`PackedIntLinear.kernel_support`) falls back to ``"dequant"``."""
    global _packed_override
    if kernel is not None and kernel not in PACKED_KERNELS:
        raise ModelError(f"unknown packed kernel {kernel!r}: choose one of {PACKED_KERNELS} (or None to measure)")
    _packed_override = kernel


def _forced_packed_kernel() -> str | None:
    return _packed_override or forced_choice("DEEPSQUEEZE_PACKED_KERNEL", PACKED_KERNELS)


def _batch_kind(rows: int) -> str:
    """Rows of one call, as the kernel choice sees them: a sentence or a few (``few``, <= 32), a batch
    (``many``, <= 512) or a large batch (``large``: the weight-only kernels' cost grows with the rows far
    faster than decoding once, so a race on a few hundred rows does not speak for thousands)."""
    return "few" if rows <= 32 else ("many" if rows <= 512 else "large")


def _int4pack_group(bits: int, binary: bool, group_size: int, cols: int) -> int | None:
    if bits > 4 and not binary:
        return None
    for g in INT4PACK_GROUPS:
        if group_size % g == 0 and cols % g == 0:
            return g
    return None


class PackedIntLinear(_PackedWeight):
    """Weight-only Linear: packed 1..8-bit codes computed on without a float copy of the weight.

    Each call runs one of three kernels (chosen per weight shape, bits, groups and batch kind, see
    :meth:`kernel`), whose operands are built from the codes at first use after loading (the file
    keeps our packing; kernel layouts are never stored):

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

    On a non-CPU device, or when the input needs gradients (LoRA on a quantized base), ``dequant``
    runs. ``bias`` (out,) stays float.
    """

    def __init__(self, in_features: int, out_features: int, bits: int = 4, group_size: int | None = None,
                 bias: bool = True, binary: bool = False) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self._init_codes(out_features, in_features, bits, group_size, binary)
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)
        self._kernels: dict[str, str] = {}  # batch kind -> kernel chosen in this process

    @classmethod
    def from_float(cls, linear: nn.Linear, bits: int = 4, group_size: int | None = None, symmetric: bool = False,
                   binary: bool = False) -> PackedIntLinear:
        module = cls(linear.in_features, linear.out_features, bits, group_size, linear.bias is not None, binary)
        module.quantize_weight(linear.weight, symmetric)
        if linear.bias is not None:
            module.bias.copy_(linear.bias.detach().float())
        return module

    def dequantized_weight(self) -> torch.Tensor:
        """The float weight (out, in) the kernels compute with; built on each call, never kept."""
        return self.dequantized_rows()

    # -- kernels

    def kernel_support(self) -> dict[str, str | None]:
        """Each kernel of :data:`PACKED_KERNELS` -> None where it can run this layer, else why not."""
        support: dict[str, str | None] = {"int4pack": None, "int8pack": None, "dequant": None}
        if not hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"):
            support["int4pack"] = "this PyTorch has no _weight_int4pack_mm_for_cpu"
        elif self.bits > 4 and not self.binary:
            support["int4pack"] = f"{self.bits}-bit codes do not fit the 4-bit kernel"
        elif _int4pack_group(self.bits, self.binary, self.group_size, self.in_features) is None:
            support["int4pack"] = (f"group size {self.group_size} over {self.in_features} inputs has no "
                                   f"divisor among the kernel's groups {INT4PACK_GROUPS}")
        elif self.out_features % 16:
            support["int4pack"] = f"the 4-bit kernel packs outputs in blocks of 16, not {self.out_features}"
        if not hasattr(torch.ops.aten, "_weight_int8pack_mm"):
            support["int8pack"] = "this PyTorch has no _weight_int8pack_mm"
        elif self.group_size != self.in_features:
            support["int8pack"] = "the int8 kernel takes one scale per output channel, not groups"
        return support

    def _layout(self, kernel: str) -> Any:
        return self._cached(kernel, lambda: getattr(self, f"_make_{kernel}")())

    def _make_int4pack(self) -> tuple[torch.Tensor, int, torch.Tensor]:
        g = _int4pack_group(self.bits, self.binary, self.group_size, self.in_features)
        assert g is not None  # kernel_support said so
        codes = self.int_codes().to(torch.int32)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
        del codes
        scale = self.scale.float()
        if self.binary:  # (2q - 1) s = (q - 8) 2s + 15s
            s, z = 2 * scale, 15 * scale
        else:
            s, z = scale, (8 - self.zero_point.float()) * scale
        rep = self.group_size // g
        s, z = s.repeat_interleave(rep, dim=1), z.repeat_interleave(rep, dim=1)
        return packed, g, torch.stack([s.t(), z.t()], dim=-1).contiguous()

    def _make_int8pack(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        q = self.int_codes().to(torch.int16)
        scale = self.scale[:, 0].float().contiguous()
        if self.binary:
            return (2 * q - 1).to(torch.int8), scale, None
        zero = self.zero_point[:, :1].to(torch.int16)
        if self.bits <= 7:
            return (q - zero).to(torch.int8), scale, None
        correction = (128 - zero[:, 0]).float() * scale  # (q - z) s = (q - 128) s + (128 - z) s
        return (q - 128).to(torch.int8), scale, correction if bool(correction.any()) else None

    def _run(self, kernel: str, x2: torch.Tensor) -> torch.Tensor:
        """``x2 @ W^T + b`` for 2-D float32 ``x2`` with ``kernel``."""
        bias = self.bias
        if kernel == "int4pack":
            packed, g, scale_zeros = self._layout("int4pack")
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2.contiguous(), packed, g, scale_zeros)
        elif kernel == "int8pack":
            w8, scale, correction = self._layout("int8pack")
            y = torch.ops.aten._weight_int8pack_mm(x2.contiguous(), w8, scale)
            if correction is not None:
                y = torch.addmm(y, x2.sum(dim=1, keepdim=True), correction[None, :])
        else:
            return F.linear(x2, self.dequantized_rows(), bias)
        return y if bias is None else y.add_(bias)

    def kernel(self, x2: torch.Tensor) -> str:
        """The kernel for a 2-D float32 batch like ``x2``: forced (:func:`set_packed_kernel`,
        ``DEEPSQUEEZE_PACKED_KERNEL``; ``dequant`` where the forced one cannot run this layer), else
        chosen by :func:`deepsqueeze.core.timing.choose` per (out, in, bits, group, batch kind) and kept
        for the machine; layouts of kernels not chosen are dropped after the choice."""
        support = self.kernel_support()
        forced = _forced_packed_kernel()
        if forced is not None:
            return forced if support[forced] is None else "dequant"
        if x2.device.type != "cpu":
            return "dequant"
        kind = _batch_kind(x2.shape[0])
        chosen = self._kernels.get(kind)
        if chosen is None:
            sample = x2[:PACKED_RACE_ROWS[kind]]
            order = PACKED_KERNELS if kind == "few" else ("dequant", *PACKED_KERNELS[:2])  # first: kept unless beaten
            usable = [k for k in order if support[k] is None]
            key = (f"packed-linear {self.out_features}x{self.in_features} bits={self.bits}"
                   f"{'b' if self.binary else ''} group={self.group_size} rows={kind}")
            with torch.no_grad():
                chosen = choose(key, {k: (lambda k=k: self._run(k, sample)) for k in usable})
            self._kernels[kind] = chosen
            for k in ("int4pack", "int8pack"):
                if k not in self._kernels.values():
                    self._cache.pop(k, None)  # the race built it: keep only the layouts in use
        return chosen

    def kernels(self) -> dict[str, str]:
        """Batch kind (``few`` rows <= 32, ``many`` <= 512, ``large``) -> kernel chosen so far in this process."""
        return dict(self._kernels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features).float()
        if x2.shape[0] == 0 or (x2.requires_grad and torch.is_grad_enabled()):
            kernel = "dequant"
        else:
            kernel = self.kernel(x2)
        return self._run(kernel, x2).reshape(*shape[:-1], self.out_features).to(x.dtype)

    def _apply(self, fn: Any, recurse: bool = True) -> Any:
        self._kernels.clear()
        return super()._apply(fn, recurse)

    def replay_params(self) -> dict[str, Any]:
        return {"in_features": self.in_features, "out_features": self.out_features, "bits": self.bits,
                "group_size": self.group_size, "bias": self.bias is not None, "binary": self.binary}

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}{', binary' if self.binary else ''}")

    def onnx_form(self) -> tuple[nn.Module, str]:
        """The traceable module that emits this layer to ONNX, and what it becomes there."""
        from deepsqueeze.runtime.onnx_forms import packed_linear_form

        return packed_linear_form(self)


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
        return F.conv2d(x, self.dequantized_weight().to(x.dtype), self.bias, self.stride, self.padding,
                        self.dilation, self.groups)

    def onnx_form(self) -> tuple[nn.Module, str]:
        """The traceable module that emits this layer to ONNX, and what it becomes there."""
        from deepsqueeze.runtime.onnx_forms import packed_conv_form

        return packed_conv_form(self)

    def replay_params(self) -> dict[str, Any]:
        return {"in_channels": self.in_channels, "out_channels": self.out_channels,
                "kernel_size": list(self.kernel_size), "stride": list(self.stride), "padding": list(self.padding),
                "dilation": list(self.dilation), "groups": self.groups, "bias": self.bias is not None,
                "bits": self.bits, "group_size": self.group_size, "binary": self.binary}


# ------------------------------------------------------------------------------------------ embeddings


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

    def onnx_form(self) -> tuple[nn.Module, str]:
        """Traced as it is: an int8 ``Gather`` and a per-row scale."""
        return self, "int8 Gather, per-row scale"

    def deepsqueeze_param_count(self) -> int:
        return self.weight.numel()

    def deepsqueeze_nonzero_count(self) -> int:
        return int((self.weight != 0).sum())

    def replay_params(self) -> dict[str, Any]:
        return {"num_embeddings": self.num_embeddings, "embedding_dim": self.embedding_dim,
                "padding_idx": self.padding_idx}


class PackedIntEmbedding(_PackedWeight):
    """Embedding table of packed 2..8-bit rows with group scales; a lookup unpacks only the rows it needs."""

    def __init__(self, num_embeddings: int, embedding_dim: int, bits: int = 4, group_size: int | None = None,
                 padding_idx: int | None = None) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.padding_idx = num_embeddings, embedding_dim, padding_idx
        self._init_codes(num_embeddings, embedding_dim, bits, group_size, False)

    @classmethod
    def from_float(cls, embedding: nn.Embedding, bits: int = 4, group_size: int | None = None,
                   symmetric: bool = False) -> PackedIntEmbedding:
        module = cls(embedding.num_embeddings, embedding.embedding_dim, bits, group_size, embedding.padding_idx)
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

    def onnx_form(self) -> tuple[nn.Module, str]:
        """The traceable module that emits this layer to ONNX, and what it becomes there."""
        from deepsqueeze.runtime.onnx_forms import packed_embedding_form

        return packed_embedding_form(self)

    def replay_params(self) -> dict[str, Any]:
        return {"num_embeddings": self.num_embeddings, "embedding_dim": self.embedding_dim, "bits": self.bits,
                "group_size": self.group_size, "padding_idx": self.padding_idx}
