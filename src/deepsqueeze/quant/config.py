"""The ``quantize`` stage config and its named presets.

One recipe stage, ``{type: quantize, method: ..., ...}``, covers every post-training quantizer; the
``method`` picks the algorithm from the registry in :mod:`deepsqueeze.quant.api` (``METHODS``), so a new
algorithm (GPTQ, mixed precision) is one registered function, not a new config class.

Presets with their own defaults (all are ``QuantizeConfig`` and serialize to the same recipe form)::

    Int8DynamicConfig()            # W8A8: int8 weights per channel, per-token dynamic int8 activations
    Int8StaticConfig(observer="percentile")   # calibrated activation ranges (Linear and Conv2d)
    WeightOnlyConfig(bits=4, group_size=64)   # packed 4-bit weights, round-to-nearest (or method="gptq")
    AWQConfig(bits=4, group_size=128)         # activation-aware scales + clipping, same packed codes
    SmoothQuantConfig(alpha=0.5)   # activation outliers migrated into the weights, then W8A8
"""

from __future__ import annotations

import fnmatch
from enum import StrEnum
from typing import Any, ClassVar

from pydantic import Field, model_validator

from deepsqueeze.core.config import Bits, ByteSize, Count, Flag, Fraction, MeanBits, Percent, StageConfig
from deepsqueeze.errors import UnsupportedLayerError
from deepsqueeze.primitives.quantize import SUPPORTED_BITS
from deepsqueeze.quant.qat_config import QATOptions

__all__ = [
    "AWQConfig",
    "ActScheme",
    "GGUFType",
    "Int8DynamicConfig",
    "Int8StaticConfig",
    "Method",
    "ObserverName",
    "QuantizeConfig",
    "SmoothQuantConfig",
    "WeightOnlyConfig",
]


class Method(StrEnum):
    RTN = "rtn"  # weight-only round-to-nearest, packed codes
    DYNAMIC = "dynamic"  # int8 weights, dynamic int8 activations
    STATIC = "static"  # int8 weights, calibrated int8 activations (Linear, Conv2d)
    SMOOTHQUANT = "smoothquant"  # SmoothQuant migration, then dynamic int8
    GPTQ = "gptq"  # weight-only, error-compensating (deepsqueeze.quant.gptq)
    AWQ = "awq"  # weight-only, activation-aware scales and clipping, then RTN codes (deepsqueeze.quant.awq)
    MIXED = "mixed"  # per-layer bit widths under a size budget
    BINARY = "binary"  # XNOR-Net weights: sign x per-channel mean |w|
    TERNARY = "ternary"  # TWN weights: {-1, 0, +1} x per-channel scale
    QAT = "qat"  # quantization-aware training (deepsqueeze.quant.qat; options in ``qat``)


class ActScheme(StrEnum):
    PER_TOKEN = "per_token"  # one symmetric int8 scale per row (token): highest fidelity
    PER_TENSOR = "per_tensor"  # one asymmetric uint8 range per call (ONNX DynamicQuantizeLinear)


class ObserverName(StrEnum):
    MINMAX = "minmax"
    MOVING_AVERAGE = "moving_average"
    PERCENTILE = "percentile"
    MSE = "mse"
    ENTROPY = "entropy"


class ZeroPoint(StrEnum):
    INTEGER = "integer"  # uint8 code: 0.0 is exact (pruned weights stay zero); the range is widened to include it
    FLOAT = "float"      # float32 offset: codes span each group's exact min..max (llama.cpp Q4_1/Q5_1, HQQ)


class GGUFType(StrEnum):
    """llama.cpp's file types (``llama-quantize`` names, lower case): :mod:`deepsqueeze.quant.gguf_types`."""

    Q4_0 = "q4_0"
    Q4_1 = "q4_1"
    Q5_0 = "q5_0"
    Q5_1 = "q5_1"
    Q8_0 = "q8_0"
    Q4_K_S = "q4_k_s"
    Q4_K_M = "q4_k_m"
    Q5_K_S = "q5_k_s"
    Q5_K_M = "q5_k_m"
    Q6_K = "q6_k"


PER_LAYER_BITS = (Method.RTN, Method.GPTQ, Method.QAT)
WEIGHT_ONLY = (Method.RTN, Method.GPTQ, Method.AWQ, Method.MIXED, Method.BINARY, Method.TERNARY)


class QuantizeConfig(StageConfig):
    """Every option of the ``quantize`` stage.

    ``bits``/``group_size``/``symmetric`` describe the weights (group_size None: one scale per output
    channel). ``activations`` is the dynamic scheme; ``observer``/``percentile``/``calibration_samples``
    drive static calibration. ``alpha`` is SmoothQuant's migration strength. ``embeddings`` also
    quantizes ``nn.Embedding`` tables (int8 rows for int8 methods, ``embedding_bits`` for weight-only).
    ``include``/``exclude`` are fnmatch patterns on module names. ``damp``/``act_order``/``max_bytes``/
    ``avg_bits`` belong to GPTQ and mixed precision (and to QAT, which then trains per-layer widths).
    ``qat`` holds the options of ``method: qat`` (:class:`~deepsqueeze.quant.qat_config.QATOptions`).
    ``gguf_type`` (``rtn``, ``gptq``) lays every Linear and embedding out as llama.cpp's ``llama-quantize`` does
    for that file type (``q4_k_m``: ``Q4_K`` / ``Q6_K`` super-blocks, ``Q5_0`` / ``Q8_0`` where a row is not
    whole super-blocks), replacing ``bits``, ``group_size``, ``symmetric``, ``zero_point``, ``overrides`` and
    ``embedding_bits`` (:mod:`deepsqueeze.quant.gguf_types`). ``awq_grid`` is AWQ's number of search points
    (alpha in ``{0, 1/n, ..., (n-1)/n}``, clip ratios down to 0.5). ``overrides`` maps fnmatch patterns on layer names to their own weight bits (2..8) for
    ``rtn``, ``gptq`` and ``qat``: explicit mixed precision in one stage (one GPTQ pass calibrates every
    width); the first matching pattern wins, the others take ``bits``.
    """

    def needs_data(self) -> bool:  # noqa: D102 - methods that calibrate or train
        return Method(self.method) in (Method.STATIC, Method.SMOOTHQUANT, Method.GPTQ, Method.AWQ, Method.MIXED,
                                       Method.QAT)

    def preflight(self, model: Any) -> None:
        """QAT trains image classifiers and sentence encoders only."""
        from deepsqueeze.core.model import Task

        if Method(self.method) is Method.QAT and model.task not in (Task.CLASSIFIER, Task.SENTENCE_ENCODER):
            raise UnsupportedLayerError(f"QAT trains image classifiers and sentence encoders; {model.ref} is a "
                                        f"{model.task.value}: quantize it after training (w4-gptq, w4-rtn, "
                                        "int8-dynamic)")

    stage_type: ClassVar[str] = "quantize"
    omitted_at_default: ClassVar[tuple[str, ...]] = ("zero_point", "gguf_type")

    method: Method = Method.DYNAMIC
    bits: Bits = 8
    group_size: Count | None = None
    symmetric: Flag = True
    activations: ActScheme = ActScheme.PER_TOKEN
    observer: ObserverName = ObserverName.MINMAX
    percentile: Percent = 99.99
    calibration_samples: Count = 256
    alpha: Fraction = 0.5
    embeddings: Flag = True
    embedding_bits: Bits | None = None
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    damp: Fraction = 0.01
    act_order: Flag = False
    max_bytes: ByteSize | None = None
    avg_bits: MeanBits | None = None
    qat: QATOptions | None = None
    awq_grid: Count = 20
    zero_point: ZeroPoint = Field(ZeroPoint.INTEGER, description="weight-only asymmetric codes: integer (0 exact, "
                                  "pruned weights stay zero) or float (codes span each group's min..max)")
    overrides: dict[str, Bits] = Field(default_factory=dict, max_length=100_000)
    gguf_type: GGUFType | None = Field(None, description="lay tensors out as llama.cpp's llama-quantize does for "
                                       "this file type (q4_k_m, q5_k_s, q6_k, q4_0 ...)")

    def override(self, name: str) -> int | None:
        """The bits of the first ``overrides`` pattern matching layer ``name``, or None."""
        return next((b for p, b in self.overrides.items() if fnmatch.fnmatchcase(name, p)), None)

    def bits_for(self, name: str, default: int | None = None) -> int:
        """The weight bits of layer ``name``: its override, else ``default``, else ``bits``."""
        return self.override(name) or default or self.bits

    @property
    def float_zero(self) -> bool:
        """Packed weights with float zero points (``zero_point: float``)."""
        return self.zero_point is ZeroPoint.FLOAT

    @model_validator(mode="after")
    def _check(self) -> QuantizeConfig:
        if self.gguf_type is not None:
            if self.method not in (Method.RTN, Method.GPTQ):
                raise ValueError("gguf_type lays out the codes of method rtn or gptq: choose one of them")
            fields = QuantizeConfig.model_fields
            clash = [k for k in ("bits", "embedding_bits", "group_size", "overrides", "symmetric", "zero_point")
                     if getattr(self, k) != fields[k].get_default(call_default_factory=True)]
            if clash:
                raise ValueError(f"gguf_type {self.gguf_type.value} sets each tensor's bits, group and zero point: "
                                 f"remove {', '.join(clash)}")
        if self.zero_point is ZeroPoint.FLOAT and (self.symmetric or self.method not in
                                                   (Method.RTN, Method.GPTQ, Method.AWQ, Method.MIXED)):
            raise ValueError("zero_point: float is for asymmetric weight-only codes (rtn, gptq, awq, mixed with "
                             "symmetric: false)")
        if self.overrides:
            if self.method not in PER_LAYER_BITS:
                raise ValueError(f"overrides (per-layer bits) apply to methods {', '.join(PER_LAYER_BITS)}; "
                                 f"method {self.method.value} takes one width")
            bad = {p: b for p, b in self.overrides.items() if not 2 <= b <= 8}
            if bad:
                raise ValueError(f"overrides pack 2..8-bit weights, got {bad}")
        if self.bits not in SUPPORTED_BITS:
            raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {self.bits}")
        if self.method in (Method.DYNAMIC, Method.STATIC, Method.SMOOTHQUANT) and self.bits != 8:
            raise ValueError(f"method {self.method.value} executes int8: bits must be 8 (use method rtn or gptq "
                             f"for {self.bits}-bit weights)")
        if self.method in (Method.RTN, Method.GPTQ, Method.AWQ) and self.bits > 8:
            raise ValueError("weight-only methods pack 2..8-bit codes: choose bits <= 8")
        if self.qat is not None and self.method is not Method.QAT:
            raise ValueError("the qat options apply to method qat: remove them or set method: qat")
        if self.method is Method.QAT:
            self._check_qat()
        elif self.group_size is not None and self.method not in WEIGHT_ONLY:
            raise ValueError("group_size applies to weight-only methods (rtn, gptq, mixed): remove it")
        if self.embedding_bits is not None and not 2 <= self.embedding_bits <= 8:
            raise ValueError(f"embedding_bits must be in 2..8, got {self.embedding_bits}")
        if not 50.0 < self.percentile <= 100.0:
            raise ValueError(f"percentile must be in (50, 100], got {self.percentile}")
        if self.awq_grid < 2:
            raise ValueError(f"awq_grid must be >= 2, got {self.awq_grid}")
        return self

    def _check_qat(self) -> None:
        qat = self.qat or QATOptions()
        if self.bits > 8:
            raise ValueError("method qat trains 2..8-bit weights: choose bits <= 8")
        if self.group_size is not None and qat.act_bits is not None:
            raise ValueError("group_size applies to weight-only QAT: set qat.act_bits to null, or remove group_size "
                             "(int8 execution has one scale per output channel)")


class Int8DynamicConfig(QuantizeConfig):
    """W8A8 with dynamic activations (per token by default)."""

    method: Method = Method.DYNAMIC


class Int8StaticConfig(QuantizeConfig):
    """W8A8 with activation ranges calibrated on data (Linear and Conv2d)."""

    method: Method = Method.STATIC


class WeightOnlyConfig(QuantizeConfig):
    """Packed low-bit weights (round-to-nearest by default; ``method="gptq"`` for error compensation)."""

    method: Method = Method.RTN
    bits: Bits = 4
    group_size: Count | None = 64
    symmetric: Flag = False


class AWQConfig(QuantizeConfig):
    """AWQ (Lin et al., 2023): activation-aware scales and clipping, then packed round-to-nearest codes."""

    method: Method = Method.AWQ
    bits: int = 4
    group_size: int | None = 128
    symmetric: bool = False


class SmoothQuantConfig(QuantizeConfig):
    """SmoothQuant (alpha = migration strength) followed by dynamic int8."""

    method: Method = Method.SMOOTHQUANT
