"""One trial of a study: a point of the space compressed, loaded and measured, and the Optuna objective
around it.

:func:`measure_point` compresses the model with the point's recipe through the same
:func:`deepsqueeze.recipes.compress` a user calls (training and calibration on the data minus the validation
split), loads the written .dsq the way a user would, and measures quality on the validation split, the
file's bytes and its latency (interleaved with the uncompressed model). The ``compare`` recipes are
measured the same way, once per study (:func:`measure_references`).
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deepsqueeze.core.files import discard
from deepsqueeze.core.model import Model, Task
from deepsqueeze.data.datasets import ClassificationData, TextData
from deepsqueeze.errors import DataError, DeepsqueezeError
from deepsqueeze.recipes.schema import Recipe, load_recipe
from deepsqueeze.search.space import SearchSpace


@dataclass
class SearchContext:
    """What every trial of one process shares (resolved once): model, data splits, baseline inputs."""

    space: SearchSpace
    model_ref: str
    fit_ref: str | None
    val: ClassificationData | TextData
    base: Model
    out: Path
    quality_key: str
    weights: str | None = None  # --weights of a py: model, given to every trial's compress
    model_code: str | None = None  # --model-code: the architecture of a py: model's artifacts
    device: str = "cpu"  # --device: where each trial compresses (quality and latency are measured on the CPU)

    @property
    def fp32_bytes(self) -> int:
        return 4 * self.base.base_params


def validation_refs(model: Model, data_ref: str | None) -> tuple[str | None, str]:
    """``(fit_ref, val_ref)``: the data recipes train/calibrate on and the validation split search scores on.

    Images: ``D:val`` for both (its train rows exclude the held-out validation rows, which are its test
    split). Sentences: ``pydoc-sentences:fit`` and ``pydoc-sentences:val``.
    """
    if data_ref is None:
        data_ref = model.base.get("data")
        if data_ref is None and model.task is Task.SENTENCE_ENCODER:
            data_ref = "pydoc-sentences"
    if data_ref is None:
        raise DataError(f"search needs data to validate {model.ref} on: pass --data (e.g. digits, fashion-mnist)")
    if model.task is Task.SENTENCE_ENCODER:
        if not data_ref.startswith("pydoc-sentences"):
            raise DataError(f"search validates sentence encoders on pydoc-sentences:val, not {data_ref}: "
                            "pass --data pydoc-sentences")
        return "pydoc-sentences:fit", "pydoc-sentences:val"
    view = data_ref if data_ref.endswith(":val") else f"{data_ref}:val"
    return view, view


# The quality a study maximises, per task: for causal LMs the uncompressed model's perplexity over the
# trial's (1.0 for the baseline; 0.9 is a perplexity about 11% higher).
QUALITY_KEYS = {Task.CLASSIFIER: "accuracy", Task.SENTENCE_ENCODER: "cosine_mean",
                Task.SEQUENCE_CLASSIFIER: "label_agreement", Task.CAUSAL_LM: "perplexity_ratio"}


def _quality(model: Model, ctx: SearchContext) -> float:
    from deepsqueeze.eval import evaluate

    training = model.module.training
    try:
        result = evaluate(model, ctx.val, ctx.base, latency=False)
    finally:
        model.module.train(training)
    if ctx.quality_key == "perplexity_ratio":
        return float(result.get("base_perplexity", result["perplexity"]) / result["perplexity"])
    return float(result[ctx.quality_key])


def _latency_runner(model: Model, ctx: SearchContext) -> Callable[[], object]:
    batch = ctx.space.latency_batch
    if isinstance(ctx.val, ClassificationData):
        x = ctx.val.test_x[:batch]
        return lambda: model.module(x)
    from deepsqueeze.eval.metrics import encoder_inputs

    sentences = (ctx.val.sentences * (batch // max(len(ctx.val.sentences), 1) + 1))[:batch]
    inputs = encoder_inputs(model.module, sentences)
    return lambda: model.module(**inputs)


def measure_baseline(study: Any, ctx: SearchContext) -> dict[str, Any]:
    """The uncompressed model's quality and latency on this study's split and batch (computed once, cached)."""
    cached = study.user_attrs.get("baseline")
    if cached:
        return cached
    from deepsqueeze.eval.latency import measure_latency

    baseline = {
        "quality": _quality(ctx.base, ctx),
        "quality_key": ctx.quality_key,
        "bytes": ctx.fp32_bytes,
        "latency_ms": measure_latency(_latency_runner(ctx.base, ctx), repeat=9, threads=ctx.space.latency_threads),
        "latency_batch": ctx.space.latency_batch,
        "threads": ctx.space.latency_threads,
        "validation": ctx.val.name,
        "validation_samples": len(ctx.val.test_y) if isinstance(ctx.val, ClassificationData)
        else len(ctx.val.sentences),
    }
    study.set_user_attr("baseline", baseline)
    return baseline


def measure_point(recipe: Recipe, path: Path, ctx: SearchContext, baseline: dict[str, Any],
                  on_stage_end: Callable[[int, Model], None] | None = None) -> dict[str, Any]:
    """Compress with ``recipe`` into ``path`` and measure quality, bytes and latency of the written file."""
    from deepsqueeze.eval.latency import measure_latency_interleaved
    from deepsqueeze.recipes import compress
    from deepsqueeze.resolve import resolve_model

    path.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    compress(ctx.model_ref, recipe, path, ctx.fit_ref, progress=False, evaluate_result=False,
             on_stage_end=on_stage_end, weights=ctx.weights, model_code=ctx.model_code, device=ctx.device)
    compress_s = time.perf_counter() - start
    raw = path.read_bytes()
    loaded = resolve_model(str(path), progress=False, model_code=ctx.model_code)
    quality = _quality(loaded, ctx)
    times = measure_latency_interleaved({"baseline": _latency_runner(ctx.base, ctx),
                                         "trial": _latency_runner(loaded, ctx)},
                                        repeat=7, threads=ctx.space.latency_threads)
    speedup = times["baseline"] / times["trial"]
    return {
        "quality": quality,
        "bytes": len(raw),
        "latency_ms": baseline["latency_ms"] / speedup,
        "speedup": speedup,
        "latency_ms_measured": times["trial"],
        "baseline_ms_measured": times["baseline"],
        "drop_pp": (baseline["quality"] - quality) * 100,
        "artifact": str(path),
        "artifact_sha256": hashlib.sha256(raw).hexdigest(),
        "compress_s": round(compress_s, 3),
    }


def violations(measured: dict[str, Any], constraints: dict[str, float]) -> dict[str, float]:
    """Constraint -> amount over the limit (<= 0: met), in the constraint's own unit."""
    value = {"max_bytes": measured["bytes"], "max_latency_ms": measured["latency_ms"],
             "max_drop": measured["drop_pp"]}
    return {name: float(value[name] - limit) for name, limit in constraints.items()}


def objective_values(measured: dict[str, Any], objectives: tuple[str, ...]) -> list[float]:
    key = {"quality": "quality", "bytes": "bytes", "latency": "latency_ms"}
    return [float(measured[key[o]]) for o in objectives]


def is_repeat(trial: Any) -> bool:
    return "repeat_of" in trial.user_attrs


def make_objective(ctx: SearchContext, baseline: dict[str, Any]) -> Callable[[Any], Any]:
    import optuna

    def objective(trial: Any) -> Any:
        recipe = ctx.space.point(trial, ctx.model_ref, ctx.fit_ref)
        form = plain(recipe.to_dict())
        trial.set_user_attr("recipe", form)
        # Same recipe, same artifact: a point already measured, or being measured by an earlier trial of any
        # worker, is not a new trial (NSGA-II's crossover of a small population repeats parents; workers
        # sharing a study propose alike); pruned and not counted, so the sampler proposes another.
        states = optuna.trial.TrialState
        twin = next((t.number for t in trial.study.get_trials(deepcopy=False, states=(states.COMPLETE, states.RUNNING))
                     if t.user_attrs.get("recipe") == form and t.number < trial.number), None)
        if twin is not None:
            trial.set_user_attr("repeat_of", twin)
            raise optuna.TrialPruned(f"the recipe of trial {twin}")
        trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
        path = ctx.out / "trials" / f"trial-{trial.number:04d}.dsq"
        last = len(recipe.stages) - 1
        single = len(ctx.space.objectives) == 1

        def on_stage_end(index: int, model: Model) -> None:
            if not single or index == last:
                return
            trial.report(_quality(model, ctx), step=index)
            if trial.should_prune():
                raise optuna.TrialPruned(f"validation {ctx.quality_key} after stage {index + 1} fell behind")

        try:
            measured = measure_point(recipe, path, ctx, baseline, on_stage_end)
        except DeepsqueezeError as exc:
            trial.set_user_attr("error", str(exc)[:500])
            discard(path)
            raise
        over = violations(measured, ctx.space.constraints)
        for key, value in measured.items():
            trial.set_user_attr(key, value)
        trial.set_user_attr("violations", over)
        trial.set_user_attr("constraint_values", [over[k] for k in ctx.space.constraints])
        if hasattr(trial, "set_constraint"):
            for key, value in over.items():
                trial.set_constraint(key, value)
        values = objective_values(measured, ctx.space.objectives)
        return values[0] if single else values

    return objective


def measure_references(ctx: SearchContext, baseline: dict[str, Any]) -> list[dict[str, Any]]:
    """The ``compare`` recipes measured once per study the same way as trials (reference points)."""
    rows = []
    for name in ctx.space.compare:
        recipe = load_recipe(name)
        recipe = recipe.model_copy(update={"model": ctx.model_ref, "data": ctx.fit_ref})
        path = ctx.out / "references" / f"{Path(name).stem}.dsq"
        try:
            measured = measure_point(recipe, path, ctx, baseline)
        except DeepsqueezeError as exc:
            rows.append({"recipe": name, "error": str(exc)[:300]})
            continue
        rows.append({"recipe": name, **measured, "violations": violations(measured, ctx.space.constraints)})
    return rows


def plain(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))
