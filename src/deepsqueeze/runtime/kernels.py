"""The kernels the representations run on, and how one is chosen per CPU: forced, or raced once and kept.

* int8 x int8 Linear (:class:`~deepsqueeze.runtime.int8.Int8Linear`): ``torch._int_mm`` or fbgemm's
  ``quantized::linear_dynamic`` on weights prepacked from our codes (:func:`int8_kernel`).
* Weight-only packed Linear (:class:`~deepsqueeze.runtime.packed.PackedIntLinear`): deepsqueeze's ``gemv``
  (:mod:`deepsqueeze.runtime.gemv`, on the stored codes, up to 32 rows), PyTorch's ``int4pack`` / ``int8pack``
  CPU kernels on layouts built from the codes, or ``dequant`` (decode, then ``F.linear``), raced per shape,
  bits, groups and batch kind (:func:`packed_linear_kernel`).
* CSR sparse Linear (:class:`~deepsqueeze.runtime.sparse.SparseCSRLinear`): ``torch.sparse.mm`` or the
  dense product, raced per shape, non-zeros and batch kind (:func:`sparse_kernel`).

* Factored layers (:mod:`deepsqueeze.runtime.factored`): the product of the factors, or the one dense layer
  they equal, raced per shape, rank and batch kind (:func:`factored_kernel`).

What a representation may keep beside its codes is the process's preference (:func:`set_prefer`,
``DEEPSQUEEZE_PREFER``, the commands' ``--prefer``): ``memory`` (the default) holds no float copy of a
compressed weight, so a kernel racing the dense float form decodes it on each call (bounded by the largest
layer); ``speed`` lets a layer keep its decoded float weight when that races faster (``float`` for packed
Linear, ``dense`` for CSR and factored layers) and packed convolutions keep theirs (decoding once instead
of per call). Either way no layer runs a kernel that measured slower than the other candidates on this CPU.

Every race goes through :func:`deepsqueeze.core.timing.choose` (interleaved repetitions, the first
candidate kept unless another is 15% faster, decisions stored per CPU in the kernel cache); an environment
variable (``DEEPSQUEEZE_INT8_KERNEL``, ``DEEPSQUEEZE_PACKED_KERNEL``, ``DEEPSQUEEZE_SPARSE_KERNEL``) or a
``set_*_kernel`` call forces the choice. Kernel layouts are derived at first use after loading and never
stored (:class:`Cached`).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from deepsqueeze.core.timing import choose, forced_choice
from deepsqueeze.errors import ModelError, UnsupportedLayerError
from deepsqueeze.runtime.gemv import GEMV_MAX_ROWS, gemv_unavailable, run_gemv

__all__ = ["FACTORED_KERNELS", "PREFERENCES", "factored_kernel", "kernel_summary", "preferred", "preferring",
           "set_prefer",
           "FBGEMM_ACT_BITS", "INT4PACK_GROUPS", "INT8_KERNELS", "PACKED_KERNELS", "PACKED_RACE_ROWS", "Cached",
           "forced_int8_kernel", "int8_kernel", "packed_kernel_support", "packed_linear_kernel", "run_packed_linear",
           "REFERENCE_KERNELS", "SPARSE_KERNELS", "reference_kernels", "set_int8_kernel", "set_packed_kernel",
           "sparse_kernel"]


class Cached(nn.Module):
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


# ------------------------------------------------------------------------------------------ memory or speed

PREFERENCES = ("memory", "speed")
_prefer: str | None = None


def set_prefer(preference: str | None) -> None:
    """``"memory"`` (no float copy of a compressed weight is ever kept) or ``"speed"`` (a layer may keep its
    decoded float weight where that runs faster); ``None``: ``DEEPSQUEEZE_PREFER``, else memory. Layers
    choose their kernels at their first call after this: set it before running a model.

    Raises:
        ModelError: ``preference`` is not one of :data:`PREFERENCES`.
    """
    global _prefer
    if preference is not None and preference not in PREFERENCES:
        raise ModelError(f"unknown preference {preference!r}: choose one of {PREFERENCES}")
    _prefer = preference


@contextlib.contextmanager
def preferring(preference: str) -> Iterator[None]:
    """:func:`set_prefer` for the ``with`` block only (e.g. to time one model under each preference)."""
    global _prefer
    previous = _prefer
    set_prefer(preference)
    try:
        yield
    finally:
        _prefer = previous


def preferred() -> str:
    """The preference in force: :func:`set_prefer`'s, else ``DEEPSQUEEZE_PREFER``'s, else ``"memory"``."""
    return _prefer or forced_choice("DEEPSQUEEZE_PREFER", PREFERENCES) or "memory"


def _keeps_float() -> bool:
    return preferred() == "speed"


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


def fbgemm_available() -> bool:
    return any(e in torch.backends.quantized.supported_engines for e in ("x86", "fbgemm"))


def forced_int8_choice() -> str | None:
    """The int8 kernel forced by :func:`set_int8_kernel` or ``DEEPSQUEEZE_INT8_KERNEL``, else None."""
    return _kernel_override or forced_choice("DEEPSQUEEZE_INT8_KERNEL", INT8_KERNELS)


def int8_kernel(device: torch.device) -> str:
    """The kernel for dynamic int8 Linear on ``device``: forced, or measured once per machine.

    CUDA uses ``_int_mm``. On a CPU both kernels run a MiniLM-sized product (512 x 384 x 384),
    interleaved with repetitions (:func:`deepsqueeze.core.timing.choose`); fbgemm is kept unless
    ``_int_mm`` is 15% faster, and the decision is stored per CPU model and flags in the cache, so
    a race timed under load cannot pick ``_int_mm`` where it is ~20x slower than fp32 (AVX2 without
    VNNI; fbgemm is ~2x faster than fp32 there).
    """
    forced = forced_int8_choice()
    if forced is not None:
        return forced
    if device.type != "cpu" or not fbgemm_available():
        return "int_mm"
    if "cpu" not in _measured_kernel:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(512, 384, generator=g)
        w = torch.randint(-127, 128, (384, 384), generator=g, dtype=torch.int8)
        xq = torch.randint(-127, 128, (512, 384), generator=g, dtype=torch.int8)
        packed = fbgemm_pack(w, torch.ones(384))
        _measured_kernel["cpu"] = choose("int8-linear-per-token 512x384x384",
                                         {"fbgemm": lambda: fbgemm_per_token(x, packed),
                                          "int_mm": lambda: torch._int_mm(xq, w.t())})
    return _measured_kernel["cpu"]


def quantized_engine() -> str:
    """The PyTorch quantized CPU engine the int8 prepacks use (x86, fbgemm, onednn or qnnpack)."""
    engines = torch.backends.quantized.supported_engines
    for engine in ("x86", "fbgemm", "onednn", "qnnpack"):
        if engine in engines:
            return engine
    raise UnsupportedLayerError("this PyTorch build has no quantized CPU engine (x86/fbgemm/qnnpack) for Int8Conv2d")


def per_channel_qweight(weight: torch.Tensor, weight_scale: torch.Tensor) -> torch.Tensor:
    """Our int8 codes and per-output-channel scales as a PyTorch qint8 tensor (no copy of the values),
    with the quantized engine selected for the prepack that follows."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.backends.quantized.engine = quantized_engine()
        return torch._make_per_channel_quantized_tensor(
            weight.contiguous(), weight_scale.double(), torch.zeros(weight.shape[0], dtype=torch.long), 0)


def fbgemm_pack(weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None = None) -> Any:
    """fbgemm-packed per-channel weights from our int8 codes and scales (and the float bias, if given)."""
    return torch.ops.quantized.linear_prepack(per_channel_qweight(weight, weight_scale), bias)


def fbgemm_per_token(x: torch.Tensor, packed: Any) -> torch.Tensor:
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


# ------------------------------------------------------------------------------------------ packed kernels

#: Weight-only Linear kernels, in order of preference: see :class:`PackedIntLinear`.
PACKED_KERNELS = ("gemv", "int4pack", "int8pack", "dequant", "float")
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


def packed_kernel_support(layer: nn.Module) -> dict[str, str | None]:
    """Each kernel of :data:`PACKED_KERNELS` -> None where it can run the packed Linear ``layer``, else why not."""
    if not layer.affine_codes:
        why = f"{type(layer).__name__} decodes its codes otherwise than (q - zero point) * scale"
        return {k: None if k in ("dequant", "float") else why for k in PACKED_KERNELS}
    support: dict[str, str | None] = {"gemv": _gemv_support(layer), "int4pack": None, "int8pack": None,
                                      "dequant": None, "float": None}
    if not hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"):
        support["int4pack"] = "this PyTorch has no _weight_int4pack_mm_for_cpu"
    elif layer.bits > 4 and not layer.binary:
        support["int4pack"] = f"{layer.bits}-bit codes do not fit the 4-bit kernel"
    elif _int4pack_group(layer.bits, layer.binary, layer.group_size, layer.in_features) is None:
        support["int4pack"] = (f"group size {layer.group_size} over {layer.in_features} inputs has no "
                               f"divisor among the kernel's groups {INT4PACK_GROUPS}")
    elif layer.out_features % 16:
        support["int4pack"] = f"the 4-bit kernel packs outputs in blocks of 16, not {layer.out_features}"
    if not hasattr(torch.ops.aten, "_weight_int8pack_mm"):
        support["int8pack"] = "this PyTorch has no _weight_int8pack_mm"
    elif layer.group_size != layer.in_features:
        support["int8pack"] = "the int8 kernel takes one scale per output channel, not groups"
    return support


def _gemv_support(layer: nn.Module) -> str | None:
    if layer.binary or layer.bits not in (4, 8):
        return f"the gemv kernel reads 4- and 8-bit codes, not {'binary' if layer.binary else layer.bits}-bit ones"
    if layer.group_size % 32 or layer.in_features % 32:
        return f"the gemv kernel takes groups of whole blocks of 32 inputs, not {layer.group_size}"
    return gemv_unavailable()


def _gemv_layout(layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    scale = layer.scale.float().contiguous()
    return scale, (layer.zero_point.float() * scale).contiguous()


def _int4pack_layout(layer: nn.Module) -> tuple[torch.Tensor, int, torch.Tensor]:
    g = _int4pack_group(layer.bits, layer.binary, layer.group_size, layer.in_features)
    assert g is not None  # packed_kernel_support said so
    codes = layer.int_codes().to(torch.int32)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
    del codes
    scale = layer.scale.float()
    if layer.binary:  # (2q - 1) s = (q - 8) 2s + 15s
        s, z = 2 * scale, 15 * scale
    else:
        s, z = scale, (8 - layer.zero_point.float()) * scale
    rep = layer.group_size // g
    s, z = s.repeat_interleave(rep, dim=1), z.repeat_interleave(rep, dim=1)
    return packed, g, torch.stack([s.t(), z.t()], dim=-1).contiguous()


def _int8pack_layout(layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    q = layer.int_codes().to(torch.int16)
    scale = layer.scale[:, 0].float().contiguous()
    if layer.binary:
        return (2 * q - 1).to(torch.int8), scale, None
    if layer.bits <= 7 and not layer.zero_point.is_floating_point():
        return (q - layer.zero_point[:, :1].to(torch.int16)).to(torch.int8), scale, None
    correction = (128 - layer.zero_point[:, 0].float()) * scale  # (q - z) s = (q - 128) s + (128 - z) s
    return (q - 128).to(torch.int8), scale, correction if bool(correction.any()) else None


_PACKED_LAYOUTS: dict[str, Callable[[nn.Module], Any]] = {"gemv": _gemv_layout, "int4pack": _int4pack_layout,
                                                         "int8pack": _int8pack_layout}


def _packed_layout(layer: Cached, kernel: str) -> Any:
    return layer._cached(kernel, lambda: _PACKED_LAYOUTS[kernel](layer))


def run_packed_linear(layer: Cached, kernel: str, x2: torch.Tensor) -> torch.Tensor:
    """``x2 @ W^T + b`` of the packed Linear ``layer`` for 2-D float32 ``x2`` with ``kernel``."""
    bias = layer.bias
    if kernel == "gemv" and x2.shape[0] <= GEMV_MAX_ROWS:
        scale, zero_scale = _packed_layout(layer, "gemv")
        y = run_gemv(x2, layer.codes, scale, zero_scale, layer.bits, layer.group_size)
    elif kernel == "gemv":  # more rows than the kernel shares a block among: in chunks
        return torch.cat([run_packed_linear(layer, kernel, part) for part in x2.split(GEMV_MAX_ROWS)])
    elif kernel == "int4pack":
        packed, g, scale_zeros = _packed_layout(layer, "int4pack")
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2.contiguous(), packed, g, scale_zeros)
    elif kernel == "int8pack":
        w8, scale, correction = _packed_layout(layer, "int8pack")
        y = torch.ops.aten._weight_int8pack_mm(x2.contiguous(), w8, scale)
        if correction is not None:
            y = torch.addmm(y, x2.sum(dim=1, keepdim=True), correction[None, :])
    elif kernel == "float":  # the decoded weight kept (prefer speed): dequant's arithmetic without the decode
        return F.linear(x2, layer._cached("float", layer.dequantized_rows), bias)
    else:
        return F.linear(x2, layer.dequantized_rows(), bias)
    return y if bias is None else y.add_(bias)


def packed_linear_kernel(layer: Cached, x2: torch.Tensor) -> str:
    """The kernel for the packed Linear ``layer`` on a 2-D float32 batch like ``x2``: forced
    (:func:`set_packed_kernel`, ``DEEPSQUEEZE_PACKED_KERNEL``; ``dequant`` where the forced one cannot run
    this layer), else chosen by :func:`deepsqueeze.core.timing.choose` per (out, in, bits, group, batch
    kind) and kept for the machine (in ``layer._kernels`` for this process); ``float`` (the decoded weight
    kept) races only where speed is preferred (:func:`set_prefer`); layouts of kernels not chosen are
    dropped after the choice."""
    if _packed_override is not None:
        return _packed_override if packed_kernel_support(layer)[_packed_override] is None else "dequant"
    kind = _batch_kind(x2.shape[0])
    chosen = layer._kernels.get(kind)  # a measured choice (cleared when the layer moves)
    if chosen is not None:
        return chosen
    forced = _forced_packed_kernel()
    if forced is not None:
        return forced if packed_kernel_support(layer)[forced] is None else "dequant"
    if x2.device.type != "cpu":
        return "dequant"
    support = packed_kernel_support(layer)
    sample = x2[:PACKED_RACE_ROWS[kind]]
    # the first is kept unless another is 15% faster; gemv shares a block among at most 32 rows
    order = PACKED_KERNELS[:4] if kind == "few" else ("dequant", "int4pack", "int8pack")
    order += ("float",) if _keeps_float() else ()
    usable = [k for k in order if support[k] is None]
    key = (f"packed-linear {layer.out_features}x{layer.in_features} bits={layer.bits}"
           f"{'b' if layer.binary else ''} group={layer.group_size} rows={kind}"
           f"{' prefer=speed' if _keeps_float() else ''}")
    with torch.no_grad():
        chosen = choose(key, {k: (lambda k=k: run_packed_linear(layer, k, sample)) for k in usable})
    layer._kernels[kind] = chosen
    for k in ("gemv", "int4pack", "int8pack", "float"):
        if k not in layer._kernels.values():
            layer._cache.pop(k, None)  # the race built it: keep only the layouts in use
    return chosen


# ------------------------------------------------------------------------------------------ sparse kernels

SPARSE_KERNELS = ("csr", "dense")
_measured_sparse_kernel: dict[tuple[int, ...], str] = {}  # (out, in, nnz, batch kind, keeps float) -> kernel
_sparse_override: str | None = None


def sparse_kernel(layer: nn.Module, x: torch.Tensor) -> str:
    """``"csr"`` or ``"dense"`` for ``layer`` on the 2-D batch ``x``: forced by ``DEEPSQUEEZE_SPARSE_KERNEL``, else raced.

    The race runs both of the layer's forward paths on ``x`` (:func:`deepsqueeze.core.timing.choose`:
    interleaved repetitions, dense kept unless CSR is 15% faster) and the decision is kept per weight
    shape, non-zero count and batch kind (one row or many), in the process and in the machine's kernel
    cache, so every layer of that kind, in every copy of the model, runs the same kernel and gives the same bits.
    """
    forced = _sparse_override or forced_choice("DEEPSQUEEZE_SPARSE_KERNEL", SPARSE_KERNELS)
    if forced is not None:
        return forced
    if layer.weight_csr.device.type != "cpu":
        return "csr"
    key = (*layer.weight_csr.shape, int(layer.weight_csr.values().numel()), min(x.shape[0], 2), _keeps_float())
    if key not in _measured_sparse_kernel:
        name = (f"sparse-csr-linear {key[0]}x{key[1]} nnz={key[2]} rows={'1' if key[3] == 1 else 'many'}"
                f"{' prefer=speed' if key[4] else ''}")
        _measured_sparse_kernel[key] = choose(name, {"dense": lambda: layer._dense_product(x),
                                                     "csr": lambda: layer._csr_product(x)})
    return _measured_sparse_kernel[key]


# ------------------------------------------------------------------------------------------ factored kernels

FACTORED_KERNELS = ("factors", "dense")
_factored_override: str | None = None


def factored_kernel(layer: Any, x: torch.Tensor) -> str:
    """``"factors"`` (the chain of thin layers) or ``"dense"`` (one layer on the weight they equal: rebuilt on
    each call, or kept where speed is preferred) for the factored ``layer`` on the batch ``x`` (2-D rows for
    a Linear, ``(N, C, H, W)`` for a convolution): forced by
    ``DEEPSQUEEZE_FACTORED_KERNEL``, else raced once per shape, ranks, input size and batch kind
    (:func:`deepsqueeze.core.timing.choose`: the factors kept unless the dense form is 15% faster). The
    factors run where gradients flow, off the CPU, and where a factor is not a plain float layer (a
    quantized or pruned factor: its own representation races its kernels)."""
    if _factored_override is not None:
        return _factored_override
    if _tracing() or (torch.is_grad_enabled() and any(p.requires_grad for p in layer.parameters())):
        return "factors"
    kind = (_batch_kind(x.shape[0]), *x.shape[1:]) if x.dim() == 4 else (_batch_kind(x.shape[0]),)
    chosen = layer._kernels.get(kind)  # cleared when the layer moves or a factor is replaced
    if chosen is not None:
        return chosen
    forced = forced_choice("DEEPSQUEEZE_FACTORED_KERNEL", FACTORED_KERNELS)
    if not layer.has_dense_form() or x.device.type != "cpu":
        chosen = "factors"
    elif forced is not None:
        chosen = forced
    else:
        geometry = f" stride={layer.stride} padding={layer.padding} dilation={layer.dilation}" if x.dim() == 4 else ""
        key = (f"factored {type(layer).__name__} {layer.extra_repr()}{geometry} input={list(kind[1:])} "
               f"rows={kind[0]}{' prefer=speed' if _keeps_float() else ''}")
        sample = x[:PACKED_RACE_ROWS[kind[0]]]
        with torch.no_grad():
            chosen = choose(key, {"factors": lambda: layer.factored_forward(sample),
                                  "dense": lambda: layer.dense_forward(sample)})
    layer._kernels[kind] = chosen
    if "dense" not in layer._kernels.values():
        layer._cache.pop("dense", None)
    return chosen


def _tracing() -> bool:
    """Whether the call is being traced or exported (the graph records the factors; nothing is raced)."""
    return torch.jit.is_tracing() or torch.compiler.is_compiling() or torch.onnx.is_in_onnx_export()


# ------------------------------------------------------------------------------------------ what runs

def kernel_summary(module: nn.Module) -> dict[str, dict[str, int]]:
    """Representation class -> ``"<batch kind>: <kernel>"`` -> how many of its layers in ``module`` run that
    kernel, from the choices made so far in this process (run the model first); a layer with one kernel for
    every batch kind is counted under ``"all: <kernel>"``. Every representation that chooses among kernels
    has a ``kernel_choices()`` method (batch kind -> kernel)."""
    summary: dict[str, dict[str, int]] = {}
    for layer in module.modules():
        choices = getattr(layer, "kernel_choices", None)
        if not callable(choices):
            continue
        counts = summary.setdefault(type(layer).__name__, {})
        for kind, kernel in sorted(choices().items()):
            counts[f"{kind}: {kernel}"] = counts.get(f"{kind}: {kernel}", 0) + 1
    return {name: dict(sorted(c.items())) for name, c in sorted(summary.items()) if c}


# ------------------------------------------------------------------------------------------ reference arithmetic

REFERENCE_KERNELS = {"int8": "int_mm", "packed": "dequant", "sparse": "dense", "factored": "factors"}


@contextlib.contextmanager
def reference_kernels() -> Iterator[None]:
    """Every representation on the kernel whose arithmetic is the layer's definition, for the ``with`` block:
    int8 Linear on ``_int_mm`` (8-bit per-token codes, not fbgemm's 7-bit), packed Linear decoded then
    ``F.linear``, CSR Linear as the dense product, factored layers as their factors. Races pick kernels by speed on each machine, and the
    kernels differ in their arithmetic (activation bits, summation order): work whose result is stored
    (the stages of a recipe) runs here, so the same inputs give the same bytes on every machine. Forced
    kernels (``set_*_kernel``, ``DEEPSQUEEZE_*_KERNEL``) are set aside inside the block."""
    global _kernel_override, _packed_override, _sparse_override, _factored_override
    previous = (_kernel_override, _packed_override, _sparse_override, _factored_override)
    _kernel_override, _packed_override, _sparse_override, _factored_override = (
        REFERENCE_KERNELS["int8"], REFERENCE_KERNELS["packed"], REFERENCE_KERNELS["sparse"],
        REFERENCE_KERNELS["factored"])
    try:
        yield
    finally:
        _kernel_override, _packed_override, _sparse_override, _factored_override = previous
