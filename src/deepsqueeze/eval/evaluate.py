"""``evaluate()``: the one scoring entry the CLI, recipes and benchmarks share."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from deepsqueeze.core.counting import count_nonzero_params, count_params
from deepsqueeze.core.model import Model, Task
from deepsqueeze.core.progress import track
from deepsqueeze.data.datasets import ClassificationData, TextData
from deepsqueeze.errors import DataError
from deepsqueeze.eval.latency import busy_note, last_times, measure_latency_spread, ratio_stats
from deepsqueeze.eval.metrics import accuracy, embedding_fidelity, encoder_inputs, label_agreement
from deepsqueeze.runtime import kernel_summary, preferred

# Public contract: these keys are always present (None where a value does not apply).
EVALUATION_KEYS = (
    "params", "nonzero_params", "fp32_bytes", "artifact_bytes", "compression_ratio",
    "latency_ms_median", "latency_batch", "threads", "samples",
    "latency_ms_p10", "latency_ms_p90", "latency_repeats", "latency_reliable", "latency_note",
    "baseline_latency_ms_median", "speedup", "speedup_p10", "speedup_p90", "prefer", "kernels",
)


def evaluate(model: Model, data: ClassificationData | TextData, reference: Model | None = None, *,
             batch_size: int = 64, threads: int = 2, latency: bool = True,
             device: str | torch.device = "cpu", baseline: Model | None = None,
             repeat: int = 15, min_seconds: float = 1.0, window: int | None = None,
             stride: int | None = None) -> dict[str, Any]:
    """Quality on ``data`` plus size and latency.

    Classifiers: ``accuracy`` on the full test split. Sentence encoders: ``cosine_mean``,
    ``cosine_min`` and ``neighbor_agreement_at_10`` against ``reference`` (default: the base model).
    Sequence classifiers: ``cosine_mean`` and ``cosine_min`` on the label logits plus ``label_agreement``
    (top label equal to the reference's). Causal LMs: ``perplexity`` on the sentences joined into one token
    stream, scored in ``window``-token windows every ``stride`` tokens (default 512 / 256, see
    :func:`deepsqueeze.eval.lm.lm_scores`), ``samples`` = ``tokens`` = tokens scored; with ``reference``
    (default for an artifact: its base model) also ``base_perplexity``, ``perplexity_delta_pct``,
    ``top1_agreement`` (next-token) and ``greedy_agreement`` (:func:`deepsqueeze.eval.lm.greedy_agreement`).
    Causal LMs with latency also get generation speed at batch 1 with a KV cache (prompt and decode tokens/s,
    :func:`deepsqueeze.eval.lm.generation_speed`, interleaved with ``baseline``).
    Latency (ms per batch of ``batch_size``): median, p10 and p90 of at least ``repeat`` timed calls
    (more until ``min_seconds``), ``latency_reliable`` False with ``latency_note`` when the spread is wide
    or the machine busy. With ``baseline`` (e.g. the fp32 model) both are timed interleaved, round by
    round, and ``speedup`` (median of per-round ratios, with p10/p90) compares them. ``kernels``: which kernel
    each compressed layer ran, by representation and batch kind
    (:func:`deepsqueeze.runtime.kernels.kernel_summary`), under ``prefer`` (memory or speed,
    :func:`deepsqueeze.runtime.kernels.set_prefer`).
    """
    # off a terminal the tracker's heartbeat prints a line after each 15 s without one (a quick evaluation: none)
    with track("evaluating: quality, then latency" if latency else "evaluating quality", 1, "parts"):
        return _evaluate(model, data, reference, batch_size, threads, latency, device, baseline, repeat, min_seconds,
                         window, stride)


def _evaluate(model: Model, data: ClassificationData | TextData, reference: Model | None, batch_size: int,
              threads: int, latency: bool, device: str | torch.device, baseline: Model | None, repeat: int,
              min_seconds: float, window: int | None, stride: int | None) -> dict[str, Any]:
    module = model.module.to(device).eval()
    baseline_module = baseline.module.to(device).eval() if baseline is not None and latency else None
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

        def run_baseline() -> object:
            return baseline_module(batch)  # type: ignore[misc]
    else:
        if not isinstance(data, TextData):
            raise DataError(f"{model.ref} is a {model.task.value}: evaluate it on sentences "
                            f"(pydoc-sentences:eval, text:FILE), not {data.name}")
        if model.task is Task.CAUSAL_LM:
            result.update(_causal_lm_quality(model, data, reference, window, stride, device))
        else:
            if reference is None:
                from deepsqueeze.zoo.resolve import base_reference

                reference = base_reference(model)
            with torch.no_grad():
                emb = module.encode(data.sentences)  # type: ignore[operator]
                ref_emb = emb if reference.module is module else reference.module.encode(data.sentences)  # type: ignore[operator]
            fidelity = embedding_fidelity(emb, ref_emb)
            if model.task is Task.SEQUENCE_CLASSIFIER:  # neighbours among a few label logits mean nothing
                fidelity.pop("neighbor_agreement_at_10")
                fidelity["label_agreement"] = label_agreement(emb, ref_emb)
            result.update(fidelity)
            result["samples"] = len(data.sentences)
        inputs = encoder_inputs(module, data.sentences[:batch_size], device)
        if baseline_module is not None:
            baseline_inputs = encoder_inputs(baseline_module, data.sentences[:batch_size], device)

        def run() -> object:
            return module(**inputs)

        def run_baseline() -> object:
            return baseline_module(**baseline_inputs)  # type: ignore[misc]

    params = count_params(module)
    artifact_bytes = model.meta.get("artifact_bytes")
    fp32_bytes = 4 * model.base_params
    result.update(
        params=params,
        nonzero_params=count_nonzero_params(module),
        fp32_bytes=fp32_bytes,
        artifact_bytes=artifact_bytes,
        compression_ratio=fp32_bytes / artifact_bytes if artifact_bytes else None,
        latency_batch=batch_size,
        threads=threads,
    )
    result.update(_latency(run, run_baseline if baseline_module is not None else None, latency, threads, repeat,
                           min_seconds))
    if latency and model.task is Task.CAUSAL_LM:
        from deepsqueeze.eval.latency import pinned_threads
        from deepsqueeze.eval.lm import generation_speed

        with pinned_threads(threads), torch.inference_mode():
            result.update(generation_speed(module, data.sentences, baseline_module))  # type: ignore[union-attr]
    result["prefer"], result["kernels"] = preferred(), kernel_summary(module)
    return result


def _causal_lm_quality(model: Model, data: TextData, reference: Model | None, window: int | None,
                       stride: int | None, device: str | torch.device) -> dict[str, Any]:
    from deepsqueeze.eval.lm import greedy_agreement, lm_scores

    if reference is None and model.artifact_path:
        from deepsqueeze.errors import DeepsqueezeError
        from deepsqueeze.zoo.resolve import base_reference

        try:
            reference = base_reference(model)
        except DeepsqueezeError:
            reference = None  # a py: base without --reference: the artifact's figure alone
    base = reference.module.to(device) if reference is not None and reference.module is not model.module else None
    scores = lm_scores(model.module, data.sentences, window, stride, reference=base, device=device)
    out = {**scores.to_dict(), "samples": scores.tokens}
    if base is not None:
        out["greedy_agreement"] = greedy_agreement(model.module, base, data.sentences, device=device)
    return out


def _latency(run: Callable[[], object], run_baseline: Callable[[], object] | None, enabled: bool, threads: int,
             repeat: int, min_seconds: float) -> dict[str, Any]:
    keys = ("latency_ms_median", "latency_ms_p10", "latency_ms_p90", "latency_repeats", "latency_reliable",
            "latency_note", "baseline_latency_ms_median", "speedup", "speedup_p10", "speedup_p90")
    out: dict[str, Any] = dict.fromkeys(keys)
    if not enabled:
        return out
    fns = {"model": run} if run_baseline is None else {"model": run, "baseline": run_baseline}
    stats = measure_latency_spread(fns, threads=threads, repeat=repeat, min_seconds=min_seconds)
    ours = stats["model"]
    out.update(latency_ms_median=ours.median, latency_ms_p10=ours.p10, latency_ms_p90=ours.p90,
               latency_repeats=ours.samples, latency_reliable=ours.reliable, latency_note=ours.note)
    if run_baseline is not None:
        times = last_times()
        speed = ratio_stats(times["baseline"], times["model"], busy_note())
        notes = [part for n in (ours.note, speed.note) if n for part in n.split("; ")]
        out.update(baseline_latency_ms_median=stats["baseline"].median, speedup=speed.median,
                   speedup_p10=speed.p10, speedup_p90=speed.p90,
                   latency_reliable=ours.reliable and stats["baseline"].reliable and speed.reliable,
                   latency_note="; ".join(dict.fromkeys(notes)) or None)
    return out
