"""Quantization algorithms: the ``quantize`` stage, the verb ``quantize_`` and its methods. What they install
(Int8Linear, the packed and ternary layers, PackedWeights) are representations of :mod:`deepsqueeze.runtime`,
re-exported here; the tensor math is in :mod:`deepsqueeze.primitives`.

    from deepsqueeze.quant import quantize_, Int8DynamicConfig
    quantize_(model.module, Int8DynamicConfig())

``api`` (the verb, the method registry, coverage), ``methods`` (dynamic, smoothquant, static, rtn, binary,
ternary), ``replay`` (what the loader rebuilds from the ``quant.*`` transforms), ``gptq``, ``awq``, ``mixed``,
``qat`` / ``fake_quant``, ``stream`` (layer by layer from shards); calibration data and layer-by-layer
statistics are :mod:`deepsqueeze.core.calibrate`. quant imports ``core``, ``primitives``, ``runtime``, ``data``
and ``train``, never another technique.
"""

from __future__ import annotations

from deepsqueeze.quant import methods as _methods  # noqa: F401  (registers the built-in methods)
from deepsqueeze.quant import replay as _replay  # noqa: F401  (registers the quant.* replays and model check)
from deepsqueeze.quant import stage as _stage  # noqa: F401  (registers the quantize stage)
from deepsqueeze.quant.api import METHODS, install, quantize_, register_method, run_batch, select_layers
from deepsqueeze.quant.config import (
    ActScheme,
    AWQConfig,
    Int8DynamicConfig,
    Int8StaticConfig,
    Method,
    ObserverName,
    QuantizeConfig,
    SmoothQuantConfig,
    WeightOnlyConfig,
)
from deepsqueeze.runtime import (
    Int8Conv2d,
    Int8Embedding,
    Int8Linear,
    PackedInt4Linear,
    PackedIntConv2d,
    PackedIntEmbedding,
    PackedIntLinear,
    forced_int8_kernel,
    int8_kernel,
    set_int8_kernel,
)

__all__ = [
    "METHODS",
    "AWQConfig",
    "ActScheme",
    "Int8Conv2d",
    "Int8DynamicConfig",
    "Int8Embedding",
    "Int8Linear",
    "Int8StaticConfig",
    "Method",
    "ObserverName",
    "PackedInt4Linear",
    "PackedIntConv2d",
    "PackedIntEmbedding",
    "PackedIntLinear",
    "QATOptions",
    "QuantizeConfig",
    "SmoothQuantConfig",
    "WeightOnlyConfig",
    "convert_qat_",
    "forced_int8_kernel",
    "install",
    "int8_kernel",
    "prepare_qat_",
    "quantize_",
    "register_method",
    "run_batch",
    "select_layers",
    "set_int8_kernel",
    "train_qat",
]


# Methods registered by sibling modules of this package (GPTQ, mixed; imported last: they build on api/config).
from deepsqueeze.quant import awq as _awq  # noqa: E402, F401
from deepsqueeze.quant import gptq as _gptq  # noqa: E402, F401
from deepsqueeze.quant import mixed as _mixed  # noqa: E402, F401
from deepsqueeze.quant.qat import convert_qat_, prepare_qat_, train_qat  # noqa: E402
from deepsqueeze.quant.qat_config import QATOptions  # noqa: E402
