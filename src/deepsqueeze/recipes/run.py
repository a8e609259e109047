"""The compress driver: resolve model and data, run the stages, write the artifact."""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from deepsqueeze.artifact import save
from deepsqueeze.codec.format import check_writable, is_artifact
from deepsqueeze.core.config import StageConfig, config_to_dict, stage_entry
from deepsqueeze.core.context import StageContext
from deepsqueeze.core.coverage import check_unsupported, coverage_totals, planner_for
from deepsqueeze.core.files import check_output
from deepsqueeze.core.model import Model, Task
from deepsqueeze.core.outputs import output_tensors
from deepsqueeze.core.progress import log
from deepsqueeze.core.progress import stage as progress_stage
from deepsqueeze.core.record import get_record
from deepsqueeze.data.datasets import ClassificationData, TextData
from deepsqueeze.data.resolve import resolve_data
from deepsqueeze.errors import (
    ArtifactError,
    DataError,
    DeepsqueezeError,
    ModelError,
    RecipeError,
    UnsupportedLayerError,
    one_line,
)
from deepsqueeze.recipes.budget import BudgetCheck, check_budget
from deepsqueeze.recipes.schema import Recipe
from deepsqueeze.resolve import resolve_model
from deepsqueeze.runtime import reference_kernels
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
    budget: BudgetCheck | None = None  # the quality budget, measured on held-out data (None: not measured)
    adapted: str | None = None  # what compress changed in the recipe to meet the budget, if it did
    budget_note: str | None = None  # why the budget was not measured, when it was not
    attempts: list[dict[str, Any]] = field(default_factory=list)  # each run of the recipe and its measured drop

    @property
    def within_budget(self) -> bool:
        return self.budget is None or self.budget.within


def shape_from_data(model: Model, data: ClassificationData | TextData | None) -> None:
    """A classifier without a known input shape (a ``py:`` module with no ``input_shape`` attribute) takes
    ``(C, H, W)`` / ``(features,)`` and the class count from its image data, in place; the artifact keeps them."""
    if model.task is Task.CLASSIFIER and isinstance(data, ClassificationData):
        if model.input_shape is None:
            model.input_shape = tuple(data.input_shape)
        if model.num_classes is None:
            model.num_classes = data.num_classes


def training_data(model: Model, data_ref: str | None) -> ClassificationData | TextData | None:
    """The data stages train and calibrate on: never the evaluation split of a text corpus."""
    if data_ref is None:
        data_ref = model.base.get("data")
        if data_ref is None and model.task.is_text:
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
            raise DataError(f"{model.ref} is a {model.task.value}: {data.name} (images) does not fit it; pass "
                            "sentences (pydoc-sentences, text:FILE)")
        if model.input_shape and tuple(model.input_shape) != tuple(data.input_shape):
            raise DataError(f"{model.ref} takes inputs of shape {tuple(model.input_shape)} but {data.name} has "
                            f"{tuple(data.input_shape)}: compress it with the data it was trained for")
    was_training = model.module.training
    try:
        with torch.no_grad():
            if isinstance(data, ClassificationData):
                model.module.eval()(data.train_x[:2].to(device))
            elif hasattr(model.module, "tokenize"):  # every text task: encoders, classifiers, causal LMs
                model.module.eval()(**model.module.tokenize(list(data.sentences[:2])))  # type: ignore[operator]
    except (Exception, SystemExit) as exc:  # the model's own code: anything can happen in it
        raise ModelError(f"{model.ref} does not run on {data.name}: {type(exc).__name__}: {one_line(exc, 300)}"
                         ) from None
    finally:
        model.module.train(was_training)


def fit_to_data(model: Model, data: ClassificationData | TextData | None,
                device: str | torch.device = "cpu") -> None:
    """Where a command's data meets the model: :func:`shape_from_data`, then :func:`check_model_runs_on`
    (data the model cannot take is one ``DataError``/``ModelError`` before any work)."""
    shape_from_data(model, data)
    check_model_runs_on(model, data, device)


SMOKE_SENTENCES = ["A short sentence to check that the compressed model runs.", "And a second, longer one, so "
                   "that the batch holds padding as every real batch does."]


def smoke_batch(model: Model, data: ClassificationData | TextData | None) -> Any | None:
    """One small batch of real model inputs (None when neither the task nor the data says what they are)."""
    if model.task.is_text and hasattr(model.module, "tokenize"):
        return dict(model.module.tokenize(SMOKE_SENTENCES))  # type: ignore[operator]
    if isinstance(data, ClassificationData) and (model.input_shape is None or
                                                 tuple(model.input_shape) == data.input_shape):
        return data.test_x[:2]
    if model.input_shape is not None:
        return torch.zeros((2, *model.input_shape))
    return None


def check_runs(model: Model, data: ClassificationData | TextData | None) -> None:
    """Run the compressed model on one batch; raise ``ModelError`` (nothing written) if it fails.

    ``compress`` calls this before writing, so it never writes an artifact that cannot run: a forward
    that breaks on a replaced layer, an output that is not finite, a tokenizer that cannot batch.
    """
    batch = smoke_batch(model, data)
    if batch is None:
        return
    try:
        with torch.no_grad():
            out = model.module(**batch) if isinstance(batch, dict) else model.module(batch)
    except DeepsqueezeError:
        raise
    except Exception as exc:  # noqa: BLE001 - any failure of the user's forward is reported in one line
        raise ModelError(f"the compressed {model.ref} fails on one batch ({type(exc).__name__}: {one_line(exc, 200)}); nothing "
                         "was written: exclude the layer the forward reads directly, or choose another recipe") from None
    for t in output_tensors(out):
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise ModelError(f"the compressed {model.ref} outputs NaN or Inf on one batch; nothing was written: "
                             "choose a milder recipe (more bits, less pruning) or exclude the failing layers")


def _example(model: Model) -> torch.Tensor | None:
    """One fixed random input batch for planners that trace (None when the input shape is unknown)."""
    if model.input_shape is None:
        return None
    return torch.randn((1, *model.input_shape), generator=torch.Generator().manual_seed(0))


def stage_measurement(model: Model, data: ClassificationData | TextData | None,
                      reference: Model | None) -> dict[str, Any]:
    """What the model is worth right now: ``bytes`` of its artifact (written to a temporary folder),
    ``ratio`` against fp32, and quality (``accuracy`` on the test split, ``perplexity`` of a causal LM on up
    to 64 of the stage data's sentences, or ``cosine_mean`` to the reference on them: label logits of a
    sequence classifier, embeddings of an encoder). Values that cannot be measured are None.
    """
    import tempfile

    from deepsqueeze.errors import DeepsqueezeError
    from deepsqueeze.eval.metrics import accuracy

    out: dict[str, Any] = {"bytes": None, "ratio": None}
    was_training = model.module.training
    model.module.eval()
    try:
        with tempfile.TemporaryDirectory(prefix="deepsqueeze-report-") as folder:
            size = save(Model(model.module, model.base, model.task, model.ref, model.base_params, model.input_shape,
                              model.num_classes), Path(folder) / "stage.dsq")
        out.update(bytes=size, ratio=4 * model.base_params / size)
    except DeepsqueezeError:
        pass
    device = next((p.device for p in model.module.parameters()), torch.device("cpu"))
    with torch.no_grad():
        if isinstance(data, ClassificationData):
            out["accuracy"] = accuracy(model.module, data, device=device)
        elif isinstance(data, TextData) and model.task is Task.CAUSAL_LM:
            from deepsqueeze.eval.metrics import perplexity

            window = min(256, int(getattr(model.module, "context_length", 256)))
            out["perplexity"] = perplexity(model.module, data.sentences[:64], window=window, stride=window // 2,
                                           device=device)[0]
        elif isinstance(data, TextData) and reference is not None and callable(getattr(model.module, "encode", None)):
            sentences = data.sentences[:64]
            emb = model.module.encode(sentences)  # type: ignore[operator]
            ref = reference.module.encode(sentences)  # type: ignore[operator]
            out["cosine_mean"] = float(torch.nn.functional.cosine_similarity(emb.float(), ref.float(), dim=-1).mean())
    model.module.train(was_training)
    return out


StageCallback = Callable[[int, Model], None]


def run_stages(model: Model, recipe: Recipe, data: ClassificationData | TextData | None, *,
               device: str | torch.device = "cpu", progress: bool = True, measure: bool = False,
               evaluate: bool = True, on_stage_end: StageCallback | None = None,
               model_code: str | None = None, named_refs: tuple[str | None, ...] = ()) -> StageContext:
    """Apply the recipe's stages to ``model`` in place, in order.

    ``on_stage_end(index, model)`` runs after each stage (search scores intermediate models with it and
    may raise to stop the run); it must leave the model as it found it.

    ``measure``: after every stage add ``bytes``, ``ratio`` and a quality column to its report row
    (see :func:`stage_measurement`; costs one artifact encoding and one evaluation per stage).
    ``evaluate=False``: stages leave quality out of their own report rows (the caller scores the result).
    Stages compute through compressed layers on their reference kernels
    (:func:`deepsqueeze.runtime.kernels.reference_kernels`): the bytes written never depend on which kernel
    this machine races fastest.
    """
    with reference_kernels():
        return _run_stages(model, recipe, data, device=device, progress=progress, measure=measure,
                           evaluate=evaluate, on_stage_end=on_stage_end, model_code=model_code, named_refs=named_refs)


def _run_stages(model: Model, recipe: Recipe, data: ClassificationData | TextData | None, *,
                device: str | torch.device, progress: bool, measure: bool, evaluate: bool,
                on_stage_end: StageCallback | None, model_code: str | None,
                named_refs: tuple[str | None, ...]) -> StageContext:
    seed_everything(recipe.seed)
    reference = Model(copy.deepcopy(model.module).eval(), model.base, model.task, model.ref, model.base_params,
                      model.input_shape, model.num_classes)
    for p in reference.module.parameters():
        p.requires_grad_(False)
    ctx = StageContext(model=model, data=data, reference=reference, device=torch.device(device),
                       seed=recipe.seed, progress=progress, on_unsupported=recipe.on_unsupported,
                       model_code=model_code, evaluate=evaluate, named_refs=named_refs)
    if recipe.on_unsupported == "error":  # refuse before any stage does work
        for config in recipe.stages:
            planner = planner_for(config.stage_type)
            if planner is not None:
                check_unsupported(planner(model.module, config, _example(model)), "error")
    for index, config in enumerate(recipe.stages):
        _, handler = stage_entry(config.stage_type)
        config = at_least_steps(config, recipe.min_steps, data, progress)
        start, reported = time.perf_counter(), len(ctx.report)
        with progress_stage(index, len(recipe.stages), config.stage_type,
                            enabled=progress and distributed.is_main_process()):
            handler(model, config, ctx)
        get_record(model.module).stages.append(config_to_dict(config))
        if len(ctx.report) == reported:
            ctx.report.append({"stage": config.stage_type})
        ctx.report[-1].update(stage_index=index, stage=config.stage_type, seconds=round(time.perf_counter() - start, 2))
        totals = [t for t in coverage_totals(get_record(model.module).coverage) if t["stage"] == index]
        if totals:
            ctx.report[-1]["covered_pct"] = totals[0]["covered_pct"]
        if measure:
            ctx.report[-1].update(stage_measurement(model, data, reference))
        if on_stage_end is not None:
            on_stage_end(index, model)
    return ctx


def at_least_steps(config: StageConfig, min_steps: int | None, data: ClassificationData | TextData | None,
                   progress: bool = False) -> StageConfig:
    """``config`` with its ``epochs`` raised so that it takes at least ``min_steps`` optimizer steps, counted as
    ceil(training samples / ``batch_size``) per epoch (images, or sentences; at most ``limit`` of them);
    unchanged when it does not train (``epochs`` 0 or absent) or already trains that long."""
    epochs = float(getattr(config, "epochs", 0) or 0)
    if min_steps is None or epochs <= 0 or data is None:
        return config
    samples = len(data.train_x) if isinstance(data, ClassificationData) else len(data.sentences)
    if getattr(config, "limit", None):
        samples = min(samples, config.limit)
    steps_per_epoch = -(-max(samples, 1) // int(getattr(config, "batch_size", 128)))
    if epochs * steps_per_epoch >= min_steps:
        return config
    raised = float(-(-min_steps // steps_per_epoch))
    if progress:
        log(f"{config.stage_type}: epochs raised from {epochs:g} to {raised:g} to take the recipe's min_steps "
            f"{min_steps} on {samples} training samples ({steps_per_epoch} steps per epoch)")
    return type(config).model_validate({**config.model_dump(), "epochs": raised})


def with_teacher(recipe: Recipe, teacher: str | None) -> Recipe:
    """``recipe`` with ``teacher`` (the user's ``--teacher``) in every distill stage."""
    if teacher is None:
        return recipe
    stages = tuple(s.model_copy(update={"teacher": teacher}) if s.stage_type == "distill" else s
                   for s in recipe.stages)
    return recipe.model_copy(update={"stages": stages})


def check_recipe_references(recipe: Recipe, named: tuple[str | None, ...], own_model: bool) -> None:
    """Refuse, before any work, a model or teacher the recipe file names that the user did not (see
    :func:`deepsqueeze.resolve.check_file_reference`)."""
    from deepsqueeze.resolve import check_file_reference

    if not own_model and recipe.model is not None:
        check_file_reference(recipe.model, "the recipe's model", named)
    for index, stage in enumerate(recipe.stages):
        teacher = getattr(stage, "teacher", None)
        if isinstance(teacher, str):
            check_file_reference(teacher, f"the recipe's stage {index + 1} teacher", named, option="--teacher")


def _trains_on_logits(config: Any) -> bool:
    """Stages whose training loss reads class logits (QAT, distillation, LoRA recovery)."""
    if config.stage_type in ("distill", "lora"):
        return getattr(config, "epochs", 1) > 0
    return config.stage_type == "quantize" and getattr(config.method, "value", config.method) == "qat"


def check_trainable(model: Model, recipe: Recipe, example: torch.Tensor | None) -> None:
    """Refuse, before any work, a recipe whose training stages need class logits for a classifier whose output
    holds none (a detector's boxes and scores, a decoder's image): one ``UnsupportedLayerError`` naming the
    stage. Fine-tuning (``finetune``, pruning with ``epochs``) matches the uncompressed model's outputs instead."""
    from deepsqueeze.core.outputs import class_logits

    needs = [(i, c) for i, c in enumerate(recipe.stages) if _trains_on_logits(c)]
    if model.task is not Task.CLASSIFIER or example is None or not needs:
        return
    was_training = model.module.training
    try:
        with torch.no_grad():
            out = model.module.eval()(example)
    except Exception:  # noqa: BLE001 - a model that does not run is reported by check_model_runs_on
        return
    finally:
        model.module.train(was_training)
    if class_logits(out, model.num_classes) is None:
        index, config = needs[0]
        shape = ", ".join(str(tuple(t.shape)) for t in output_tensors(out)) or "no tensor"
        raise UnsupportedLayerError(
            f"stage {index + 1} ({config.stage_type}) trains on class logits, but {model.ref} returns "
            f"{type(out).__name__} ({shape}): use finetune or pruning with epochs (they match the uncompressed "
            "model's outputs), or a model that returns (N, classes) logits")


def preflight(model: Model, recipe: Recipe, data: ClassificationData | TextData | None) -> None:
    """Every stage's own checks against the model, and data for the stages that train or calibrate: what
    plan and compress refuse before any work."""
    for index, config in enumerate(recipe.stages):
        if data is None and config.needs_data():
            raise DataError(f"stage {index + 1} ({config.stage_type}) trains or calibrates on data: pass --data "
                            "(or set 'data:' in the recipe)")
        config.preflight(model)


def check_out_path(out: str | Path, model_ref: str) -> Path:
    """``out`` as a Path once it is known to be a writable ``.dsq`` path that is not the input model
    (ArtifactError otherwise), checked before any work."""
    out_path = Path(out)
    if not out_path.is_symlink():
        check_writable(out_path)  # before any work: a read-only --out is found now, not after the stages ran
    if out_path.suffix != ".dsq":
        raise ArtifactError(f"--out must name a .dsq file, got {out_path.name}")
    if out_path.exists() and Path(model_ref).exists() and out_path.resolve() == Path(model_ref).resolve():
        raise ArtifactError(f"refusing to overwrite the input model {out_path}: choose another --out path")
    check_output(out_path, is_artifact, "deepsqueeze artifact")
    return out_path


def compress(model_ref: str | None, recipe: Recipe, out: str | Path, data_ref: str | None = None, *,
             weights: str | None = None, device: str | torch.device = "cpu", progress: bool = True,
             evaluate_result: bool = True, report: bool = False,
             on_stage_end: StageCallback | None = None, model_code: str | None = None,
             teacher: str | None = None, max_drop: float | None = None) -> CompressResult:
    """Resolve ``model_ref`` (or the recipe's model), run the recipe, write ``out``; return what happened.

    Started by ``torchrun --nproc-per-node N``, every process runs the recipe, training stages split each
    batch across the processes (``deepsqueeze.train.distributed``), and only rank 0 writes ``out``.
    ``report``: measure bytes, ratio and quality after every stage (``CompressResult.stage_reports``).
    ``evaluate_result=False``: no quality is measured, neither of the result nor in the stages' report rows
    (search scores the written file on its own validation split).
    ``model_code`` supplies the architecture when ``model_ref`` is the .dsq of a ``py:`` model; ``teacher``
    replaces the teacher of every distill stage. The recipe's own model and teachers are data read from a
    file: they pass :func:`deepsqueeze.resolve.check_file_reference` before any work.

    Quality budget (``evaluate_result``): the result is measured against the uncompressed model on held-out
    data (``deepsqueeze.recipes.budget``; ``max_drop`` overrides the recipe's). Over budget, a recipe whose
    pruning stages rank weights by one rule (or cut one channel ratio everywhere) is run again with per-layer
    sparsities (per-group ratios) from a sensitivity scan
    (:func:`adapt_recipe`), and the better of the two is written; ``CompressResult.budget`` says whether it
    meets the budget (the CLI then exits with ``EXIT_OVER_BUDGET``).
    """
    own_model = model_ref is not None
    recipe, named = with_teacher(recipe, teacher), (model_ref, model_code, teacher)
    model_ref = model_ref or recipe.model
    if model_ref is None:
        raise RecipeError("no model given: pass --model REF or set 'model:' in the recipe")
    check_recipe_references(recipe, named, own_model)
    out_path = check_out_path(out, model_ref)
    distributed.init_from_env(device)
    progress = progress and distributed.is_main_process()
    model = resolve_model(model_ref, weights=weights, progress=progress, device=device, model_code=model_code)
    # a recipe's data goes with its model: a model given by the caller keeps the data it was trained on
    recipe_data = recipe.data if not own_model or model.base.get("data") is None else None
    data = training_data(model, data_ref or recipe_data)
    shape_from_data(model, data)
    check_model_runs_on(model, data, device)
    check_trainable(model, recipe, data.test_x[:2] if isinstance(data, ClassificationData) else _example(model))
    preflight(model, recipe, data)
    start = time.perf_counter()
    adapted = adapt_recipe(recipe) if evaluate_result else None
    # the model as given, for a rerun over the quality budget (each rerun starts from a copy of it)
    original = copy.deepcopy(model) if adapted is not None or (evaluate_result and recipe.min_ratio is not None) \
        else None

    def attempt(model: Model, recipe: Recipe) -> tuple[StageContext, BudgetCheck | None]:
        ctx = run_stages(model, recipe, data, device=device, progress=progress, measure=report,
                         evaluate=evaluate_result or report, on_stage_end=on_stage_end, model_code=model_code,
                         named_refs=named)
        model.module.cpu().eval()
        check_runs(model, data)
        limit = recipe.max_drop if max_drop is None else max_drop
        if not evaluate_result or ctx.reference is None:
            return ctx, None
        try:
            return ctx, check_budget(model, ctx.reference, data, limit)
        except Exception as exc:  # noqa: BLE001 - a model the held-out data does not fit: said, never hidden
            notes.append(f"the quality budget could not be measured ({type(exc).__name__}: {one_line(exc, 200)})")
            return ctx, None

    notes: list[str] = []

    ctx, budget = attempt(model, recipe)
    attempts = [{"recipe": "as written", "drop": budget.drop}] if budget is not None else []
    adaptation = None
    if budget is not None and not budget.within and adapted is not None and original is not None:
        if progress:
            log(f"over the quality budget ({budget.message()}): running the recipe again with per-layer "
                "sparsities (channel ratios) from a sensitivity scan")
        spare = copy.deepcopy(original)
        ctx2, budget2 = attempt(spare, adapted)
        attempts.append({"recipe": "pruning scope: sensitivity", "drop": budget2.drop if budget2 else None})
        if budget2 is not None and budget2.drop < budget.drop:
            model, ctx, budget, adaptation = spare, ctx2, budget2, "pruning scope: sensitivity"
    if budget is not None and not budget.within and recipe.min_ratio is not None:
        model, ctx, budget, adaptation = _trade_size_for_quality(
            original, model, ctx, budget, adaptation, adapted if adaptation else recipe, recipe.min_ratio, attempt,
            attempts, progress)
    compress_s = time.perf_counter() - start
    if distributed.is_main_process():
        save(model, out_path)
    distributed.barrier()
    size = out_path.stat().st_size
    metrics: dict[str, Any] = {budget.metric: budget.value} if budget is not None else {}
    return CompressResult(model, str(out_path), size, 4 * model.base_params / size, ctx.report, metrics, compress_s,
                          coverage_totals(get_record(model.module).coverage), budget, adaptation,
                          notes[-1] if notes and budget is None else None, attempts)


SPARSITY_SCALES = (0.9, 0.8, 0.7, 0.6, 0.5)  # of each pruning stage's sparsity, tried in turn


def _trade_size_for_quality(original: Model | None, model: Model, ctx: StageContext, budget: BudgetCheck,
                            adaptation: str | None, recipe: Recipe, min_ratio: float,
                            attempt: Callable[[Model, Recipe], tuple[StageContext, BudgetCheck | None]],
                            attempts: list[dict[str, Any]], progress: bool
                            ) -> tuple[Model, StageContext, BudgetCheck, str | None]:
    """Over the budget with a recipe that states ``min_ratio``: run it again with every pruning stage's sparsity
    (and per-layer overrides) scaled by :data:`SPARSITY_SCALES` in turn, from a fresh copy of ``original``, until
    one is within the budget or the file would be less than ``min_ratio`` times smaller than fp32. Returns the
    best run whose file keeps ``min_ratio`` (the one given when none improves on it)."""
    best = (model, ctx, budget, adaptation)
    for scale in SPARSITY_SCALES:
        lowered = scale_sparsity(recipe, scale)
        if lowered is None or original is None:
            break
        if progress:
            log(f"over the quality budget ({best[2].message()}): running the recipe again at {scale:g}x its "
                f"pruning sparsity (the file must stay {min_ratio:g}x smaller than fp32)")
        candidate = copy.deepcopy(original)
        ctx2, budget2 = attempt(candidate, lowered)
        ratio = stage_measurement(candidate, None, None)["ratio"]
        label = f"sparsity x{scale:g}"
        attempts.append({"recipe": label, "drop": budget2.drop if budget2 else None, "ratio": ratio})
        if budget2 is None or ratio is None or ratio < min_ratio:
            break  # lower sparsity only makes the file larger
        if budget2.drop < best[2].drop:
            best = (candidate, ctx2, budget2, ", ".join(filter(None, (adaptation, label))))
        if budget2.within:
            break
    return best


def scale_sparsity(recipe: Recipe, scale: float) -> Recipe | None:
    """``recipe`` with the sparsity of every unstructured ``prune`` stage, and of its per-layer overrides,
    multiplied by ``scale``; None when it has no such stage."""
    stages, changed = [], False
    for stage in recipe.stages:
        if stage.stage_type == "prune" and getattr(stage, "pattern", None) == "unstructured" \
                and getattr(stage, "threshold", None) is None:
            fields = stage.model_dump()
            fields["sparsity"] = stage.sparsity * scale
            fields["overrides"] = {k: v * scale for k, v in stage.overrides.items()}
            stage, changed = type(stage).model_validate(fields), True
        stages.append(stage)
    return recipe.model_copy(update={"stages": tuple(stages)}) if changed else None


def adapt_recipe(recipe: Recipe) -> Recipe | None:
    """``recipe`` with every unstructured ``prune`` stage that ranks by one rule (``scope: layer | global``)
    allocating per-layer sparsities, and every ``prune_channels`` stage with one ratio for all groups
    (``scope: uniform``) per-group ratios, from a sensitivity scan instead; None when no stage can adapt."""
    stages, changed = [], False
    for stage in recipe.stages:
        scope = getattr(stage, "scope", None)
        if (stage.stage_type == "prune" and scope in ("layer", "global") and getattr(stage, "threshold", 1) is None
                and getattr(stage, "pattern", None) == "unstructured") or \
                (stage.stage_type == "prune_channels" and scope == "uniform"):
            stage, changed = type(stage).model_validate({**stage.model_dump(), "scope": "sensitivity"}), True
        stages.append(stage)
    return recipe.model_copy(update={"stages": tuple(stages)}) if changed else None
