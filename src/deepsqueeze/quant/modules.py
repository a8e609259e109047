"""Deprecated: the quantized representations and their kernels moved to :mod:`deepsqueeze.runtime`.

``from deepsqueeze.quant.modules import Int8Linear`` keeps working, with a DeprecationWarning, for one
release; import from ``deepsqueeze.runtime`` (or ``deepsqueeze.quant``) instead.
"""

from deepsqueeze import runtime
from deepsqueeze.core.deprecation import moved_to

__getattr__ = moved_to(__name__, {runtime: [
    "ACT_SCHEMES", "CONV_INPUT_BITS", "FBGEMM_ACT_BITS", "INT8_KERNELS", "PACKED_KERNELS", "ActScheme",
    "Int8Conv2d", "Int8Embedding", "Int8Linear", "PackedInt4Linear", "PackedIntConv2d", "PackedIntEmbedding",
    "PackedIntLinear", "forced_int8_kernel", "int8_kernel", "quantize_activation_per_token", "set_int8_kernel",
    "set_packed_kernel",
]})
