"""Deprecated: ``PackedTernaryLinear`` and ``PackedTernaryConv2d`` moved to :mod:`deepsqueeze.runtime` (this
path works, with a DeprecationWarning, for one release)."""

from deepsqueeze import runtime
from deepsqueeze.core.deprecation import moved_to

__getattr__ = moved_to(__name__, {runtime: ["PackedTernaryConv2d", "PackedTernaryLinear"]})
