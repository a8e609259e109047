"""``evaluate()``: the one scoring entry the CLI, recipes and benchmarks share."""

from __future__ import annotations

from typing import Any

import torch

from deepsqueeze.core.counting import count_nonzero_params, count_params
from deepsqueeze.core.model import Model, Task
from deepsqueeze.data.datasets import ClassificationData, TextData
from deepsqueeze.errors import DataError
from deepsqueeze.eval.latency import measure_latency
from deepsqueeze.eval.metrics import accuracy, embedding_fidelity, encoder_inputs

# Public contract: these keys are always present (None where a value does not apply).
EVALUATION_KEYS = (
    "params", "nonzero_params", "fp32_bytes", "artifact_bytes", "compression_ratio",
    "latency_ms_median", "latency_batch", "threads", "samples",
)


def evaluate(model: Model, data: ClassificationData | TextData, reference: Model | None = None, *,
             batch_size: int = 64, threads: int = 2, latency: bool = True,
             device: str | torch.device = "cpu") -> dict[str, Any]:
    """Quality on ``data`` plus size and latency.

    Classifiers: ``accuracy`` on the full test split. Sentence encoders: ``cosine_mean``,
    ``cosine_min`` and ``neighbor_agreement_at_10`` against ``reference`` (default: the base model).
    """
    module = model.module.to(device).eval()
    result: dict[str, Any] = {"model": model.ref, "task": model.task.value, "data": data.name}
    if model.task is Task.CLASSIFIER:
        if not isinstance(data, ClassificationData):
            raise DataError(f"{model.ref} is a classifier: evaluate it on image data (fashion-mnist, digits), not {data.name}")
        if model.input_shape and tuple(model.input_shape) != data.input_shape:
            raise DataError(f"{model.ref} takes inputs of shape {tuple(model.input_shape)} but {data.name} "
                            f"has {data.input_shape}: evaluate it on the data it was trained for")
        result["accuracy"] = accuracy(module, data, device=device)
        result["samples"] = len(data.test_y)
        batch = data.test_x[:batch_size].to(device)

        def run() -> object:
            return module(batch)
    else:
        if not isinstance(data, TextData):
            raise DataError(f"{model.ref} is a sentence encoder: evaluate it on sentences "
                            f"(pydoc-sentences:eval, text:FILE), not {data.name}")
        if reference is None:
            from deepsqueeze.zoo.resolve import base_reference

            reference = base_reference(model)
        with torch.no_grad():
            emb = module.encode(data.sentences)  # type: ignore[operator]
            ref_emb = reference.module.encode(data.sentences)  # type: ignore[operator]
        result.update(embedding_fidelity(emb, ref_emb))
        result["samples"] = len(data.sentences)
        inputs = encoder_inputs(module, data.sentences[:batch_size], device)

        def run() -> object:
            return module(**inputs)

    params = count_params(module)
    artifact_bytes = model.meta.get("artifact_bytes")
    fp32_bytes = 4 * model.base_params
    result.update(
        params=params,
        nonzero_params=count_nonzero_params(module),
        fp32_bytes=fp32_bytes,
        artifact_bytes=artifact_bytes,
        compression_ratio=fp32_bytes / artifact_bytes if artifact_bytes else None,
        latency_ms_median=measure_latency(run, threads=threads) if latency else None,
        latency_batch=batch_size,
        threads=threads,
    )
    return result
