"""Score any model the same way: quality, size and latency under stable key names."""

from deepsqueeze.eval.evaluate import EVALUATION_KEYS, evaluate
from deepsqueeze.eval.latency import measure_latency, measure_latency_interleaved, pinned_threads
from deepsqueeze.eval.metrics import accuracy, embedding_fidelity, encoder_inputs

__all__ = [
    "EVALUATION_KEYS",
    "accuracy",
    "embedding_fidelity",
    "encoder_inputs",
    "evaluate",
    "measure_latency",
    "measure_latency_interleaved",
    "pinned_threads",
]
