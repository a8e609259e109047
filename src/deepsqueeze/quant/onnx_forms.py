"""Deprecated: the ONNX forms moved to :mod:`deepsqueeze.runtime.onnx_forms` (this path works, with a
DeprecationWarning, for one release)."""

from deepsqueeze.core.deprecation import moved_to
from deepsqueeze.runtime import onnx_forms

__getattr__ = moved_to(__name__, {onnx_forms: ["int8_conv_form", "int8_linear_form", "packed_conv_form",
                                               "packed_embedding_form", "packed_linear_form", "packed_weights_form"]})
