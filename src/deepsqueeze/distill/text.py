"""Deprecated: sentence batching moved to :mod:`deepsqueeze.train.text`; ``deepsqueeze.distill`` still exports
``sentence_batches`` and ``augment_sentences``. This path works, with a DeprecationWarning, for one release."""

from deepsqueeze.core.deprecation import moved_to
from deepsqueeze.train import text

__getattr__ = moved_to(__name__, {text: ["augment_sentences", "sentence_batches"]})
