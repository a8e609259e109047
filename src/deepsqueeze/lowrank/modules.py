"""Deprecated: the factored layers moved to :mod:`deepsqueeze.runtime` (``runtime/factored.py``); this path
works, with a DeprecationWarning, for one release."""

from deepsqueeze import runtime
from deepsqueeze.core.deprecation import moved_to

__getattr__ = moved_to(__name__, {runtime: ["CPConv2d", "LowRankLinear", "Tucker2Conv2d", "conv_geometry"]})
