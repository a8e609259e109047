"""The compress driver: resolve model and data, run the stages, write the artifact."""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from deepsqueeze.artifact import save
from deepsqueeze.codec.format import check_writable
from deepsqueeze.core.config import config_to_dict, stage_entry
from deepsqueeze.core.context import StageContext
from deepsqueeze.core.coverage import check_unsupported, coverage_totals, planner_for
from deepsqueeze.core.model import Model, Task
from deepsqueeze.core.record import get_record
from deepsqueeze.data.datasets import ClassificationData, TextData
from deepsqueeze.data.resolve import resolve_data
from deepsqueeze.errors import ArtifactError, DataError, ModelError, RecipeError, one_line
from deepsqueeze.recipes.schema import Recipe
from deepsqueeze.resolve import resolve_model
from deepsqueeze.train import distributed
from deepsqueeze.train.loop import seed_everything


@dataclass
class CompressResult:
    model: Model
    artifact_path: str
    artifact_bytes: int
    compression_ratio: float
    stage_reports: list[dict[str, Any]] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)
    compress_s: float = 0.0
    coverage: list[dict[str, Any]] = field(default_factory=list)  # per stage: modules and weights covered


def training_data(model: Model, data_ref: str | None) -> ClassificationData | TextData | None:
    """The data stages train and calibrate on: never the evaluation split of a text corpus."""
    if data_ref is None:
        data_ref = model.base.get("data")
        if data_ref is None and model.task is Task.SENTENCE_ENCODER:
            data_ref = "pydoc-sentences:calib"
    if data_ref is None:
        return None
    if data_ref.rstrip() == "pydoc-sentences:eval":
        raise DataError("pydoc-sentences:eval is kept for evaluation only: calibrate on pydoc-sentences:calib")
    return resolve_data(data_ref, split="calib")


def check_model_runs_on(model: Model, data: ClassificationData | TextData | None,
                        device: str | torch.device = "cpu") -> None:
    """Run ``model`` once on two samples of ``data`` before any stage does, so a model that does not fit
    its data (or whose own ``forward`` fails) is one ``DataError``/``ModelError`` now, not a traceback
    from deep inside a training loop."""
    if data is None:
        return
    if isinstance(data, ClassificationData):
        if model.task is not Task.CLASSIFIER:
            raise DataError(f"{model.ref} is a sentence encoder: it trains on sentences, not on {data.name}")
        if model.input_shape and tuple(model.input_shape) != tuple(data.input_shape):
            raise DataError(f"{model.ref} takes inputs of shape {tuple(model.input_shape)} but {data.name} has "
                            f"{tuple(data.input_shape)}: compress it with the data it was trained for")
    was_training = model.module.training
    try:
        with torch.no_grad():
            if isinstance(data, ClassificationData):
                model.module.eval()(data.train_x[:2].to(device))
            elif hasattr(model.module, "encode"):
                model.module.encode(list(data.sentences[:2]))
    except (Exception, SystemExit) as exc:  # the model's own code: anything can happen in it
        raise ModelError(f"{model.ref} does not run on {data.name}: {type(exc).__name__}: {one_line(exc, 300)}"
                         ) from None
    finally:
        model.module.train(was_training)


def run_stages(model: Model, recipe: Recipe, data: ClassificationData | TextData | None, *,
               device: str | torch.device = "cpu", progress: bool = True,
               model_code: str | None = None) -> StageContext:
    """Apply the recipe's stages to ``model`` in place, in order."""
    seed_everything(recipe.seed)
    reference = Model(copy.deepcopy(model.module).eval(), model.base, model.task, model.ref, model.base_params,
                      model.input_shape, model.num_classes)
    for p in reference.module.parameters():
        p.requires_grad_(False)
    ctx = StageContext(model=model, data=data, reference=reference, device=torch.device(device),
                       seed=recipe.seed, progress=progress, on_unsupported=recipe.on_unsupported,
                       model_code=model_code)
    if recipe.on_unsupported == "error":  # refuse before any stage does work
        for config in recipe.stages:
            planner = planner_for(config.stage_type)
            if planner is not None:
                check_unsupported(planner(model.module, config), "error")
    for index, config in enumerate(recipe.stages):
        _, handler = stage_entry(config.stage_type)
        start, reported = time.perf_counter(), len(ctx.report)
        handler(model, config, ctx)
        get_record(model.module).stages.append(config_to_dict(config))
        if len(ctx.report) == reported:
            ctx.report.append({"stage": config.stage_type})
        ctx.report[-1].update(stage_index=index, stage=config.stage_type, seconds=round(time.perf_counter() - start, 2))
        totals = [t for t in coverage_totals(get_record(model.module).coverage) if t["stage"] == index]
        if totals:
            ctx.report[-1]["covered_pct"] = totals[0]["covered_pct"]
    return ctx


def compress(model_ref: str | None, recipe: Recipe, out: str | Path, data_ref: str | None = None, *,
             weights: str | None = None, device: str | torch.device = "cpu", progress: bool = True,
             evaluate_result: bool = True, model_code: str | None = None) -> CompressResult:
    """Resolve ``model_ref`` (or the recipe's model), run the recipe, write ``out``; return what happened.

    Started by ``torchrun --nproc-per-node N``, every process runs the recipe, training stages split each
    batch across the processes (``deepsqueeze.train.distributed``), and only rank 0 writes ``out``.
    ``model_code`` supplies the architecture when ``model_ref`` is the .dsq of a ``py:`` model.
    """
    model_ref = model_ref or recipe.model
    if model_ref is None:
        raise RecipeError("no model given: pass --model REF or set 'model:' in the recipe")
    out_path = Path(out)
    check_writable(out_path)  # before any work: a read-only --out is found now, not after the stages ran
    if out_path.suffix != ".dsq":
        raise ArtifactError(f"--out must name a .dsq file, got {out_path.name}")
    if out_path.exists() and Path(model_ref).exists() and out_path.resolve() == Path(model_ref).resolve():
        raise ArtifactError(f"refusing to overwrite the input model {out_path}: choose another --out path")
    distributed.init_from_env(device)
    progress = progress and distributed.is_main_process()
    model = resolve_model(model_ref, weights=weights, progress=progress, device=device, model_code=model_code)
    data = training_data(model, data_ref or recipe.data)
    check_model_runs_on(model, data, device)
    start = time.perf_counter()
    ctx = run_stages(model, recipe, data, device=device, progress=progress, model_code=model_code)
    compress_s = time.perf_counter() - start
    model.module.cpu().eval()
    if distributed.is_main_process():
        save(model, out_path)
    distributed.barrier()
    size = out_path.stat().st_size
    metrics: dict[str, Any] = {}
    if evaluate_result and isinstance(data, ClassificationData):
        from deepsqueeze.eval.metrics import accuracy

        metrics["accuracy"] = accuracy(model.module, data)
    return CompressResult(model, str(out_path), size, 4 * model.base_params / size, ctx.report, metrics, compress_s,
                          coverage_totals(get_record(model.module).coverage))
