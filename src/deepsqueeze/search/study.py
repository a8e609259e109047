"""The search driver: an Optuna study whose trials are recipes run through ``compress`` and scored.

Each trial samples a point of the space (an ordinary recipe), compresses the model with it through the
same :func:`deepsqueeze.recipes.compress` a user calls (training and calibration on the data minus the
validation split), loads the written .dsq the way a user would, and measures:

* ``quality``: accuracy (classifiers) or mean cosine to the uncompressed model (sentence encoders) on the
  validation split, which is neither the calibration/training split nor the final test split;
* ``bytes``: the size of the written .dsq file on disk;
* ``latency``: median ms per batch (batch and threads fixed by the space), timed interleaved with the
  uncompressed model; the figure is the measured ratio times the study's baseline latency (measured once),
  so machine drift between trials cancels.

Constraints (``max_bytes``, ``max_latency_ms``, ``max_drop`` in percentage points of quality) go to the
samplers that use them (TPE, NSGA-II, GP) as Optuna constraint values. The study lives in SQLite under
``out`` by default (Ctrl-C, then the same command resumes it) or in any Optuna storage URL
(``postgresql://...``) that several workers share.

Samplers: grid, random, TPE (Bergstra et al. 2011), CMA-ES (Hansen 2016; one objective), GP
(Gaussian-process Bayesian optimization), NSGA-II (Deb et al. 2002; several objectives). Pruners (median,
successive halving: Jamieson & Talwalkar 2016) stop single-objective trials whose validation score after a
stage falls behind; Optuna does not prune multi-objective studies.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import socket
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from deepsqueeze.core.files import check_writable, write_text_atomic
from deepsqueeze.core.model import Model, Task
from deepsqueeze.data.datasets import ClassificationData, TextData
from deepsqueeze.data.resolve import resolve_data
from deepsqueeze.errors import ArtifactError, DataError, DeepsqueezeError, RecipeError, redact
from deepsqueeze.recipes.schema import Recipe, load_recipe
from deepsqueeze.search.space import SearchSpace, parse_space, read_space_file

SAMPLERS = ("grid", "random", "tpe", "cmaes", "gp", "nsga2")
PRUNERS = ("median", "halving", "none")
DIRECTIONS = {"quality": "maximize", "bytes": "minimize", "latency": "minimize"}
UNITS = {"max_bytes": "B", "max_latency_ms": "ms", "max_drop": "pp"}


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

    @property
    def fp32_bytes(self) -> int:
        return 4 * self.base.base_params


@dataclass
class SearchResult:
    """The answer: the Pareto front so far, the best point (or the closest), and where they were written."""

    study_name: str
    storage: str
    trials: int
    complete: int
    pruned: int
    failed: int
    repeats: int = 0
    front: list[dict[str, Any]] = field(default_factory=list)
    best: dict[str, Any] | None = None
    feasible: bool = False
    message: str = ""
    baseline: dict[str, Any] = field(default_factory=dict)
    references: list[dict[str, Any]] = field(default_factory=list)


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


def layer_lister(model: Model) -> Callable[[str, list[str] | None], list[str]]:
    """Names of the layers a per-layer hole opens on, for each stage type."""
    from torch import nn

    from deepsqueeze.core.walker import iter_modules

    def layers(stage_type: str, patterns: list[str] | None) -> list[str]:
        if stage_type == "prune_channels":
            import torch

            from deepsqueeze.prune import analyze

            if model.input_shape is None:
                raise RecipeError("per-layer channel ratios need an image model with a known input shape")
            graph = analyze(model.module, torch.zeros(1, *model.input_shape))
            names = [g.producers[0] for g in graph.prunable_groups()]
            if patterns:
                from fnmatch import fnmatchcase

                names = [n for n in names if any(fnmatchcase(n, p) for p in patterns)]
            return names
        types = (nn.Linear, nn.Conv2d, nn.Embedding) if stage_type == "quantize" else (nn.Linear, nn.Conv2d)
        return [name for name, _ in iter_modules(model.module, types=types, include=patterns)]

    return layers


def load_space(path: str | Path, model_ref: str | None = None) -> tuple[SearchSpace, Model]:
    """Read the space file and resolve its model (``model_ref`` overrides the file's ``model``)."""
    from deepsqueeze.resolve import resolve_file_reference, resolve_model

    data = read_space_file(path)
    ref = model_ref or (data.get("model") if isinstance(data, dict) else None)
    if not ref or not isinstance(ref, str):
        raise RecipeError("no model given: pass --model REF or set 'model:' in the space file")
    if model_ref:
        model = resolve_model(ref, progress=False)
    else:
        model = resolve_file_reference(ref, f"the search space's model ({path})", progress=False)
    space = parse_space(data, layer_lister(model), source=str(path))
    space.model = ref
    return space, model


def _quality(model: Model, ctx: SearchContext) -> float:
    from deepsqueeze.eval import evaluate

    training = model.module.training
    try:
        result = evaluate(model, ctx.val, ctx.base, latency=False)
    finally:
        model.module.train(training)
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


def _baseline(study: Any, ctx: SearchContext) -> dict[str, Any]:
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
             on_stage_end=on_stage_end)
    compress_s = time.perf_counter() - start
    raw = path.read_bytes()
    loaded = resolve_model(str(path), progress=False)
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


def make_sampler(name: str, space: SearchSpace, trials: int, seed: int, seeded: int = 0) -> Any:
    """The Optuna sampler named ``name``, with this project's defaults for small budgets.

    ``seeded``: points already enqueued (priors). They come on top of the sampled exploration, not instead
    of it: NSGA-II's first generation holds them and ``trials // 4`` (at least 4) sampled individuals, and
    the model-based samplers' random start-up counts them on top of their own. Seeded points alone would make
    the whole first generation, or the whole history the first model is fitted on, and the proposals never
    left the priors' neighbourhood (search-cnn: no point under 212 KB in 24 NSGA-II trials, where random
    reached 112 KB)."""
    import optuna

    n_constraints = len(space.constraints)
    constraints_func = None
    # Optuna >= 5 reads the constraints each trial sets (Trial.set_constraint); older ones ask a function.
    if n_constraints and not hasattr(optuna.trial.Trial, "set_constraint"):
        def constraints_func(trial: Any) -> list[float]:
            return list(trial.user_attrs.get("constraint_values", [1.0] * n_constraints))

    multi = len(space.objectives) > 1
    startup = max(3, min(10, trials // 4)) + seeded
    if name == "grid":
        return optuna.samplers.GridSampler(space.grid(), seed=seed)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup, multivariate=True,
                                          constraints_func=constraints_func)
    if name == "cmaes":
        if multi:
            raise RecipeError("cmaes optimizes one objective: use objectives: [quality] with constraints, "
                              "or --sampler tpe / nsga2")
        return optuna.samplers.CmaEsSampler(seed=seed, n_startup_trials=startup,
                                            warn_independent_sampling=False)
    if name == "gp":
        return optuna.samplers.GPSampler(seed=seed, n_startup_trials=startup, constraints_func=constraints_func,
                                         warn_independent_sampling=False)
    if name == "nsga2":
        population = max(4, min(50, trials // 4)) + seeded
        return optuna.samplers.NSGAIISampler(seed=seed, population_size=population,
                                             constraints_func=constraints_func)
    raise RecipeError(f"unknown sampler {name!r}: use one of {', '.join(SAMPLERS)}")


def make_pruner(name: str) -> Any:
    import optuna

    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0)
    if name == "halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=2)
    if name == "none":
        return optuna.pruners.NopPruner()
    raise RecipeError(f"unknown pruner {name!r}: use one of {', '.join(PRUNERS)}")


STUDY_FILES = ("study.db", "summary.json", "best.yaml", "front", "trials")


def prepare_out(out: Path) -> None:
    """Make ``out`` the study folder, before any work: not a link, and if it exists, a folder that is empty
    or holds a study deepsqueeze wrote (``RecipeError`` / ``ArtifactError`` otherwise, one line)."""
    if out.is_symlink():
        raise ArtifactError(f"--out {out} is a symbolic link: deepsqueeze never writes through one; name a folder")
    if out.exists() and not out.is_dir():
        raise RecipeError(f"--out {out} is a file: give a folder for the study")
    if out.is_dir() and any(out.iterdir()) and not any((out / name).exists() for name in STUDY_FILES):
        raise ArtifactError(f"--out {out} holds files deepsqueeze did not write: name a new or empty folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ArtifactError(f"cannot create the study folder {out}: {exc.strerror or exc}; choose another --out"
                            ) from None
    check_writable(out / "summary.json")


def default_storage(out: Path) -> str:
    return f"sqlite:///{(out / 'study.db').resolve()}"


def run_search(space: SearchSpace, model: Model, out: str | Path, data_ref: str | None = None, *,
               sampler: str = "tpe", trials: int = 20, storage: str | None = None, study_name: str = "search",
               pruner: str = "median", progress: bool = True, log: Callable[[str], None] | None = None
               ) -> SearchResult:
    """Run (or resume, or join) the study until it holds ``trials`` finished trials; return the answer.

    ``out`` receives ``study.db`` (default storage), ``trials/trial-NNNN.dsq``, ``front/trial-NNNN.yaml``
    (one recipe per Pareto point), ``best.yaml`` and ``summary.json``. Raises ``RecipeError``/``DataError``
    for a bad space or data; Ctrl-C (``KeyboardInterrupt``) writes the answer so far, then propagates.
    """
    import optuna

    if trials < 1:
        raise RecipeError(f"--trials must be >= 1, got {trials}")
    if sampler not in SAMPLERS:
        raise RecipeError(f"unknown sampler {sampler!r}: use one of {', '.join(SAMPLERS)}")
    if storage is not None and not storage.startswith(("sqlite:///", "postgresql://", "postgresql+psycopg://")):
        raise RecipeError(f"--storage takes sqlite:///FILE or postgresql://USER@HOST:PORT/DB, got {storage!r}")
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    fit_ref, val_ref = validation_refs(model, data_ref or space.data)
    val = resolve_data(val_ref, split="val")
    quality_key = "accuracy" if model.task is Task.CLASSIFIER else "cosine_mean"
    ctx = SearchContext(space, space.model or model.ref, fit_ref, val, model, out_dir, quality_key)
    url = storage or default_storage(out_dir)
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg://" + url.removeprefix("postgresql://")
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    directions = [DIRECTIONS[o] for o in space.objectives]
    try:
        study = _open_study(url, study_name, directions)
    except ImportError as exc:
        raise RecipeError(f"storage {_redact(storage or url)} needs a driver: pip install 'psycopg[binary]' ({exc})") from None
    except Exception as exc:  # sqlalchemy / optuna errors: connection refused, auth failure, ...
        if isinstance(exc, DeepsqueezeError):
            raise
        raise RecipeError(f"cannot open the study storage {_redact(storage or url)}: {type(exc).__name__}: "
                          f"{str(exc).splitlines()[0][:200]}") from None
    if [d.name.lower() for d in study.directions] != directions:
        raise RecipeError(f"study {study_name!r} in {_redact(url)} optimizes other objectives: use another --out or --study")
    fingerprint = space.fingerprint()
    stored = study.user_attrs.get("space_fingerprint")
    if stored is None:
        study.set_user_attr("space_fingerprint", fingerprint)
        study.set_user_attr("space", _plain(space.source))
        study.set_user_attr("model", ctx.model_ref)
        study.set_user_attr("objectives", list(space.objectives))
        study.set_user_attr("constraints", space.constraints)
    elif stored != fingerprint:
        raise RecipeError(f"study {study_name!r} in {_redact(url)} was started from another space: use another --out or "
                          "--study to start a new one")
    baseline = _baseline(study, ctx)
    if space.compare and "references" not in study.user_attrs:
        study.set_user_attr("references", _measure_references(ctx, baseline))
    if space.priors == "sensitivity" and not study.user_attrs.get("priors_enqueued"):
        _enqueue_sensitivity_priors(study, ctx)

    done = _finished(study)
    seed = space.seed + len(study.trials) + (os.getpid() if storage else 0)
    # fixed at the study's start, so a resumed study or a second worker keeps the same generations
    seeded = study.user_attrs.get("seeded_points")
    if seeded is None:
        seeded = len(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.WAITING,)))
        study.set_user_attr("seeded_points", seeded)
    study.sampler = make_sampler(sampler, space, trials, seed, seeded)
    study.pruner = make_pruner(pruner) if len(space.objectives) == 1 else optuna.pruners.NopPruner()
    objective = _objective(ctx, baseline)
    say = log or (lambda _msg: None)
    note = ""
    try:
        if done < trials:
            say(f"study {study_name}: {done} of {trials} trials done, running {trials - done} more ({sampler})")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                # twice the trials left: room for the repeats a sampler proposes, which are not measured
                study.optimize(objective, n_trials=2 * (trials - done), catch=(DeepsqueezeError,),
                               callbacks=[_correct_prior(ctx), _stop_after(trials, trials - done),
                                          _progress_callback(say, trials)])
            counted = _finished(study)
            if counted < trials:  # the proposals ran out: say what they were spent on
                repeats = sum(_is_repeat(t) for t in study.trials)
                failed = sum(t.state == optuna.trial.TrialState.FAIL for t in study.trials)
                note = (f" The study stopped at {counted} of {trials} trials: {repeats} proposals repeated a "
                        f"measured recipe (the space may hold fewer distinct points) and {failed} trials failed.")
    finally:
        result = write_answer(study, space, out_dir, url, study_name, note)
    return result


def _open_study(url: str, study_name: str, directions: list[str], attempts: int = 6) -> Any:
    """Create or load the study; workers starting together race to create the storage's tables, so a
    failure to open is retried a few times (the loser finds the tables and the study made by the winner)."""
    import optuna

    for attempt in range(attempts):
        try:
            return optuna.create_study(storage=url, study_name=study_name, directions=directions,
                                       load_if_exists=True)
        except ImportError:
            raise
        except Exception:
            if attempt == attempts - 1:
                raise
            time.sleep(0.5 * (attempt + 1))
    raise AssertionError("unreachable")


def _is_repeat(trial: Any) -> bool:
    return "repeat_of" in trial.user_attrs


def _finished(study: Any) -> int:
    """Trials that count toward the budget: complete, or pruned after measuring (not repeats of a measured
    recipe)."""
    import optuna

    states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    return sum(not _is_repeat(t) for t in study.get_trials(deepcopy=False, states=states))


def _stop_after(total: int, here: int) -> Callable[[Any, Any], None]:
    """Stop when the study holds ``total`` counted trials (any worker's) or this call has run ``here``
    trials that were not repeats."""
    ran = 0

    def callback(study: Any, trial: Any) -> None:
        nonlocal ran
        ran += not _is_repeat(trial)
        if ran >= here or _finished(study) >= total:
            study.stop()

    return callback


def _progress_callback(say: Callable[[str], None], trials: int) -> Callable[[Any, Any], None]:
    def callback(study: Any, trial: Any) -> None:
        attrs = trial.user_attrs
        if _is_repeat(trial):
            say(f"trial {trial.number}: the recipe of trial {attrs['repeat_of']}, not measured again")
        elif trial.state.name == "COMPLETE":
            say(f"trial {trial.number}: quality {attrs.get('quality', float('nan')):.4f}, "
                f"{attrs.get('bytes', 0):,} B, {attrs.get('latency_ms', float('nan')):.3f} ms")
        else:
            say(f"trial {trial.number}: {trial.state.name.lower()} {attrs.get('error', '')}".rstrip())

    return callback


def _objective(ctx: SearchContext, baseline: dict[str, Any]) -> Callable[[Any], Any]:
    import optuna

    def objective(trial: Any) -> Any:
        recipe = ctx.space.point(trial, ctx.model_ref, ctx.fit_ref)
        form = _plain(recipe.to_dict())
        trial.set_user_attr("recipe", form)
        # Same recipe, same artifact: a point already measured is not a new trial (NSGA-II's crossover of a
        # small population repeats parents); pruned and not counted, so the sampler proposes another.
        twin = next((t.number for t in trial.study.get_trials(deepcopy=False, states=(
            optuna.trial.TrialState.COMPLETE,)) if t.user_attrs.get("recipe") == form), None)
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
            path.unlink(missing_ok=True)
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


def _enqueue_sensitivity_priors(study: Any, ctx: SearchContext) -> None:
    """Seed the study with points allocated from sensitivity scans: per-layer sparsities (pruning scan on
    validation data) and per-layer quantization bits (mixed-precision scan on calibration data)."""
    study.set_user_attr("priors_enqueued", True)
    _enqueue_bit_priors(study, ctx)
    _enqueue_sparsity_priors(study, ctx)


def _bit_templates(space: SearchSpace) -> list[Any]:
    return [t for t in space.stages if t.type in ("quantize", "share") and "bits" in t.per_layer]


def _enqueue_bit_priors(study: Any, ctx: SearchContext) -> None:
    """Per-layer bits of ``quantize`` and ``share`` holes allocated by the mixed-precision sensitivity scan
    (relative output error of each layer alone rounded to each width, on 32 calibration inputs of the fit
    split; for a shared codebook, uniform rounding is the conservative stand-in), at three mean widths spread
    over the hole's choices and at the size of each ``compare`` recipe, so the front has a point where each
    reference sits: under the weight bytes its measured file spends on the hole layers (its nominal width's
    bytes when it was not measured), then, once such a prior is measured larger than the reference's file,
    again under a budget smaller by the excess (:func:`_correct_prior`). The other optional stages are left
    out of those points."""
    from deepsqueeze.quant.calibrate import calibration_batches
    from deepsqueeze.quant.mixed import layer_costs, layer_sensitivity

    templates = _bit_templates(ctx.space)
    if not templates or ctx.fit_ref is None:
        return
    measured = {Path(r["recipe"]).stem: r for r in study.user_attrs.get("references", []) if "error" not in r}
    batches = calibration_batches(ctx.base, resolve_data(ctx.fit_ref, split="fit"), samples=32)
    for template in templates:
        layers, hole = template.per_layer["bits"]
        widths = _prior_widths(template)
        if len(widths) < 2:
            continue
        group_hole = template.holes.get("group_size")
        group = template.fixed.get("group_size", group_hole.grid()[0] if group_hole is not None else None)
        symmetric = bool(template.fixed.get("symmetric", template.type == "quantize"))
        module = copy.deepcopy(ctx.base.module)
        sensitivity = layer_sensitivity(module, batches, layers, widths, group, symmetric)
        study.set_user_attr(f"bit_sensitivity[{template.prefix}]", sensitivity)
        low, high = widths[0], widths[-1]
        budgets: dict[tuple[str, float, int | None], tuple[list[str], int | None]] = {}
        for avg in (low + (high - low) * f for f in (0.25, 0.5, 0.75)):
            budgets.setdefault(("avg_bits", avg, group), ([], None))[0].append(f"{avg:.2f} bits per weight")
        for name, width, ref_group in _reference_widths(ctx.space.compare):
            if not low <= width <= high:
                continue
            at = ref_group if group_hole is not None and ref_group in group_hole.grid() else group
            ref = measured.get(name)
            spent = _hole_weight_bytes(ref["artifact"], layers) if ref else None
            if spent is None:
                spent = sum(c.bytes_by_bits[width] for c in layer_costs(module, layers, [width], ref_group))
            labels, target = budgets.get(("budget_bytes", spent, at), ([], None))
            if ref:
                target = ref["bytes"] if target is None else min(target, ref["bytes"])
            budgets[("budget_bytes", spent, at)] = ([*labels, f"the weight bytes of {name}"], target)
        points: list[tuple[dict[str, Any], list[str], dict[str, Any]]] = []
        for (kind, amount, at), (labels, target) in budgets.items():
            params = _bit_prior_params(template, ctx, sensitivity, kind, amount, at)
            if params is None:
                continue  # a reference smaller than the narrowest widths allow
            same = next((p for p in points if p[0] == params), None)  # two budgets, one allocation
            if same is None:
                same = (params, [], {})
                points.append(same)
            same[1].extend(labels)
            if target is not None and target < same[2].get("prior_target_bytes", math.inf):
                same[2].update(prior_template=template.prefix, prior_budget_bytes=amount, prior_group=at,
                               prior_target_bytes=target, prior_round=0)
        for params, labels, attrs in points:
            study.enqueue_trial(params, user_attrs={"prior": f"bit sensitivity, {', '.join(labels)}", **attrs})


def _prior_widths(template: Any) -> list[int]:
    _layers, hole = template.per_layer["bits"]
    return sorted({int(b) for b in hole.grid() if isinstance(b, int) and 2 <= b <= 8})


def _bit_prior_params(template: Any, ctx: SearchContext, sensitivity: dict[str, dict[int, float]], kind: str,
                      amount: float, group: int | None) -> dict[str, Any] | None:
    """The trial parameters of one bit allocation (``kind``: avg_bits or budget_bytes); None when it does
    not fit."""
    from deepsqueeze.quant.mixed import allocate_bits, layer_costs

    layers, _hole = template.per_layer["bits"]
    costs = layer_costs(ctx.base.module, layers, _prior_widths(template), group)
    try:
        plan = allocate_bits(costs, sensitivity, **{kind: amount})
    except RecipeError:
        return None
    params: dict[str, Any] = {template.layer_hole("bits", layer).name: plan[layer] for layer in layers}
    group_hole = template.holes.get("group_size")
    if group_hole is not None:
        params[group_hole.name] = group
    if template.run is not None:
        params[template.run.name] = True
    for other in ctx.space.stages:
        if other is not template and other.run is not None:
            params[other.run.name] = False
    return params


def _hole_weight_bytes(artifact: str, layers: list[str]) -> int | None:
    """Payload bytes the .dsq at ``artifact`` spends on the weights of ``layers`` (every tensor of those
    modules but the bias: codes, scales, zero-points, codebooks); None when a layer is missing from it."""
    from deepsqueeze.codec.format import read_manifest, tensor_payload_bytes

    try:
        manifest, _raw, _size = read_manifest(artifact)
    except (OSError, DeepsqueezeError):
        return None
    spent = dict.fromkeys(layers, 0)
    for name, size in tensor_payload_bytes(manifest).items():
        module, _, tensor = name.rpartition(".")
        if module in spent and tensor != "bias":
            spent[module] += size
    return sum(spent.values()) if all(spent.values()) else None


PRIOR_CORRECTIONS = 2


def _correct_prior(ctx: SearchContext) -> Callable[[Any, Any], None]:
    """A study callback: a reference prior whose file came out larger than the reference's is enqueued again
    under a weight budget smaller by the measured excess (the manifest and the layers outside the holes are
    not in the allocation's byte model), at most :data:`PRIOR_CORRECTIONS` times per prior."""
    def callback(study: Any, trial: Any) -> None:
        attrs = trial.user_attrs
        target = attrs.get("prior_target_bytes")
        if trial.state.name != "COMPLETE" or target is None or attrs.get("bytes", 0) <= target:
            return
        if attrs["prior_round"] >= PRIOR_CORRECTIONS:
            return
        template = next((t for t in _bit_templates(ctx.space) if t.prefix == attrs["prior_template"]), None)
        stored = study.user_attrs.get(f"bit_sensitivity[{attrs['prior_template']}]")
        if template is None or stored is None:
            return
        sensitivity = {layer: {int(b): float(e) for b, e in row.items()} for layer, row in stored.items()}
        excess = int(attrs["bytes"]) - int(target)
        budget = float(attrs["prior_budget_bytes"]) - excess
        params = _bit_prior_params(template, ctx, sensitivity, "budget_bytes", budget, attrs["prior_group"])
        if params is None:
            return
        label = attrs["prior"].split("; ")[0]
        study.enqueue_trial(params, user_attrs={
            **{k: v for k, v in attrs.items() if k.startswith("prior_")},
            "prior": f"{label}; trial {trial.number} was {excess:,} B over its file, budget lowered by that",
            "prior_budget_bytes": budget, "prior_round": attrs["prior_round"] + 1})

    return callback


def _reference_widths(names: list[str]) -> list[tuple[str, int, int | None]]:
    """(recipe, code width, group size) of each ``compare`` recipe that quantizes or shares weights at one
    integer width (its ``bits``, or the ``avg_bits`` of a mixed-precision budget)."""
    out = []
    for name in names:
        try:
            recipe = load_recipe(name)
        except DeepsqueezeError:
            continue  # reported when the references are measured
        for stage in recipe.to_dict()["stages"]:
            if stage["type"] not in ("quantize", "share"):
                continue
            width = stage.get("avg_bits") or stage.get("bits")
            if isinstance(width, int | float) and float(width) == int(width):
                out.append((Path(name).stem, int(width), stage.get("group_size")))
            break
    return out


def _enqueue_sparsity_priors(study: Any, ctx: SearchContext) -> None:
    from deepsqueeze.prune.sensitivity import allocate_sparsity, sensitivity_scan
    from deepsqueeze.prune.unstructured import prunable_weights

    templates = [t for t in ctx.space.stages if t.type == "prune" and "sparsity" in t.per_layer]
    if not templates:
        return
    module = copy.deepcopy(ctx.base.module)
    if isinstance(ctx.val, ClassificationData):
        from deepsqueeze.eval.metrics import accuracy

        subset = ClassificationData(ctx.val.name, ctx.val.train_x[:1], ctx.val.train_y[:1], ctx.val.test_x[:1000],
                                    ctx.val.test_y[:1000], ctx.val.num_classes)

        def metric(m: Any) -> float:
            return accuracy(m, subset)
    else:
        return  # a scan per layer of a sentence encoder is not cheap: no prior
    curves = sensitivity_scan(module, metric)
    study.set_user_attr("sensitivity", {k: [list(p) for p in v] for k, v in curves.items()})
    sizes = {name.removesuffix(".weight"): p.numel() for name, p in prunable_weights(module).items()}
    for template in templates:
        layers, hole = template.per_layer["sparsity"]
        for target in (float(hole.low if hole.low is not None else 0.5), 0.5 * (float(hole.low or 0.5) +
                                                                               float(hole.high or 0.9))):
            plan = allocate_sparsity({k: v for k, v in curves.items() if k in layers},
                                     {k: v for k, v in sizes.items() if k in layers}, target)
            params = {template.layer_hole("sparsity", layer).name: template.layer_hole("sparsity", layer).snap(s)
                      for layer, s in plan.items()}
            if template.run is not None:
                params[template.run.name] = True
            study.enqueue_trial(params, user_attrs={"prior": f"sensitivity, target sparsity {target:.2f}"})


def _measure_references(ctx: SearchContext, baseline: dict[str, Any]) -> list[dict[str, Any]]:
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


# ----------------------------------------------------------------------------------------------- answer


def _dominates(a: list[float], b: list[float], directions: list[str]) -> bool:
    better = False
    for x, y, d in zip(a, b, directions, strict=True):
        if d == "maximize":
            x, y = -x, -y
        if x > y:
            return False
        better |= x < y
    return better


def pareto_front(points: list[tuple[int, list[float]]], directions: list[str]) -> list[int]:
    """Indices (first item of each point) that no other point dominates; ties of equal values all kept."""
    return [i for i, v in points if not any(_dominates(w, v, directions) for _, w in points)]


def hypervolume(values: list[list[float]], reference: list[float], directions: list[str]) -> float:
    """Volume dominated by ``values`` and bounded by ``reference`` (objectives as given, any count).

    Exact, by summing the cells of the grid the points' coordinates span (fine for the few hundred
    points a study holds in 2-3 objectives).
    """
    sign = [-1.0 if d == "maximize" else 1.0 for d in directions]
    pts = [[s * x for s, x in zip(sign, v, strict=True)] for v in values]
    ref = [s * r for s, r in zip(sign, reference, strict=True)]
    pts = [p for p in pts if all(x < r for x, r in zip(p, ref, strict=True))]
    if not pts:
        return 0.0
    dims = len(ref)
    axes = [sorted({p[d] for p in pts} | {ref[d]}) for d in range(dims)]
    import itertools

    import numpy as np

    arr = np.array(pts)
    total = 0.0
    for cell in itertools.product(*(range(len(a) - 1) for a in axes)):
        lower = [axes[d][c] for d, c in enumerate(cell)]
        if (arr <= np.array(lower)).all(axis=1).any():
            total += math.prod(axes[d][c + 1] - axes[d][c] for d, c in enumerate(cell))
    return total


def normalized_values(attrs: dict[str, Any], objectives: list[str] | tuple[str, ...],
                      baseline: dict[str, Any]) -> list[float]:
    """A trial's objectives scaled for hypervolume: quality as is, bytes / fp32 bytes, latency / baseline."""
    scale = {"quality": 1.0, "bytes": float(baseline["bytes"]), "latency": float(baseline["latency_ms"])}
    key = {"quality": "quality", "bytes": "bytes", "latency": "latency_ms"}
    return [float(attrs[key[o]]) / scale[o] for o in objectives]


# Reference point of the normalized objectives: quality 0, the fp32 size, twice the baseline latency.
HV_REFERENCE = {"quality": 0.0, "bytes": 1.0, "latency": 2.0}


def hypervolume_history(trials: list[dict[str, Any]], objectives: list[str] | tuple[str, ...],
                        baseline: dict[str, Any], reference: dict[str, float] | None = None) -> list[float]:
    """Hypervolume of the front after each trial (``trials`` = user attrs in trial order, complete only).

    ``reference`` overrides :data:`HV_REFERENCE` per objective (normalized units), e.g. the quality floor a
    ``max_drop`` constraint sets, so that only points above it count."""
    directions = [DIRECTIONS[o] for o in objectives]
    corner = [{**HV_REFERENCE, **(reference or {})}[o] for o in objectives]
    points: list[list[float]] = []
    history = []
    for attrs in trials:
        points.append(normalized_values(attrs, objectives, baseline))
        front = pareto_front(list(enumerate(points)), directions)
        history.append(hypervolume([points[i] for i in front], corner, directions))
    return history


def _describe(over: dict[str, float], constraints: dict[str, float]) -> str:
    parts = []
    for name, amount in over.items():
        if amount > 0:
            limit = constraints[name]
            unit = UNITS[name]
            rel = f", {amount / limit:.1%}" if limit else ""
            shown = f"{amount:,.0f}" if name == "max_bytes" else f"{amount:.3g}"
            parts.append(f"{name} {limit:,g} {unit} missed by {shown} {unit}{rel}")
    return "; ".join(parts)


def _row(trial: Any) -> dict[str, Any]:
    a = trial.user_attrs
    return {"trial": trial.number, "quality": a.get("quality"), "bytes": a.get("bytes"),
            "latency_ms": a.get("latency_ms"), "speedup": a.get("speedup"), "drop_pp": a.get("drop_pp"),
            "violations": a.get("violations", {}), "artifact": a.get("artifact"),
            "artifact_sha256": a.get("artifact_sha256"), "recipe": a.get("recipe")}


def write_answer(study: Any, space: SearchSpace, out: Path, storage: str, study_name: str,
                 note: str = "") -> SearchResult:
    """Write the Pareto front (one recipe YAML per point), ``best.yaml`` and ``summary.json`` under ``out``
    (``note`` is appended to the answer's message)."""
    import optuna

    states = optuna.trial.TrialState
    trials = study.get_trials(deepcopy=False)
    complete = [t for t in trials if t.state == states.COMPLETE and "recipe" in t.user_attrs
                and "quality" in t.user_attrs]
    result = SearchResult(study_name, storage, len(trials), len(complete),
                          sum(t.state == states.PRUNED and not _is_repeat(t) for t in trials),
                          sum(t.state == states.FAIL for t in trials), sum(_is_repeat(t) for t in trials),
                          baseline=study.user_attrs.get("baseline", {}),
                          references=study.user_attrs.get("references", []))
    directions = [DIRECTIONS[o] for o in space.objectives]
    by_number = {t.number: t for t in complete}
    values = [(t.number, objective_values(t.user_attrs, space.objectives)) for t in complete]
    front = sorted(pareto_front(values, directions), key=lambda n: -by_number[n].user_attrs["quality"])
    front_dir = out / "front"
    if front_dir.exists():
        for stale in front_dir.glob("trial-*.yaml"):
            stale.unlink()
    front_dir.mkdir(parents=True, exist_ok=True)
    for number in front:
        row = _row(by_number[number])
        row["recipe_file"] = str(front_dir / f"trial-{number:04d}.yaml")
        _write_recipe(Path(row["recipe_file"]), row, space)
        result.front.append(row)
    if not complete:
        result.message = "no trial has completed yet: run the same command again to continue the study"
    else:
        over = {t.number: violations(t.user_attrs, space.constraints) for t in complete}
        feasible = [t for t in complete if all(v <= 0 for v in over[t.number].values())]
        if feasible:
            best = max(feasible, key=lambda t: (t.user_attrs["quality"], -t.user_attrs["bytes"],
                                                -t.user_attrs["latency_ms"]))
            result.feasible = True
            if space.constraints:
                result.message = f"trial {best.number} meets every constraint with the highest validation quality"
            else:
                result.message = f"trial {best.number} has the highest validation quality (no constraints given)"
        else:
            def badness(t: Any) -> float:
                return sum(max(v, 0.0) / max(space.constraints[k], 1e-12)
                           for k, v in over[t.number].items())

            best = min(complete, key=badness)
            result.message = (f"no trial meets the constraints; the closest is trial {best.number}: "
                              f"{_describe(over[best.number], space.constraints)}")
        result.best = _row(best)
        result.best["violations"] = over[best.number]
        result.best["recipe_file"] = str(out / "best.yaml")
        _write_recipe(out / "best.yaml", result.best, space)
    result.message += note
    summary = {
        "study": study_name, "storage": _redact(storage), "objectives": list(space.objectives),
        "constraints": space.constraints, "trials": result.trials, "complete": result.complete,
        "pruned": result.pruned, "failed": result.failed, "repeats": result.repeats, "baseline": result.baseline,
        "front": [{k: v for k, v in r.items() if k != "recipe"} for r in result.front],
        "best": {k: v for k, v in result.best.items() if k != "recipe"} if result.best else None,
        "feasible": result.feasible, "message": result.message, "references": result.references,
    }
    write_text_atomic(out / "summary.json", json.dumps(summary, indent=2, default=str))
    return result


def compact_recipe(recipe: dict[str, Any]) -> dict[str, Any]:
    """The recipe form without the stage fields that equal their defaults (the same recipe, easier to read)."""
    from deepsqueeze.core.config import registered_stages

    stages = registered_stages()
    out = dict(recipe)
    compact = []
    for stage in recipe["stages"]:
        cls = stages[stage["type"]]
        kept = {"type": stage["type"]}
        for key, value in stage.items():
            if key == "type":
                continue
            info = cls.model_fields.get(key)
            if info is None or info.is_required():
                kept[key] = value
                continue
            default = info.get_default(call_default_factory=True)
            default = json.loads(json.dumps(default, default=lambda v: getattr(v, "value", str(v))))
            if default != value:
                kept[key] = value
        compact.append(kept)
    out["stages"] = compact
    return out


def _write_recipe(path: Path, row: dict[str, Any], space: SearchSpace) -> None:
    header = (f"# search trial {row['trial']}: validation quality {row['quality']:.4f}, {row['bytes']:,} bytes, "
              f"{row['latency_ms']:.3f} ms (batch {space.latency_batch}, {space.latency_threads} threads)\n"
              f"# replay: deepsqueeze compress --recipe {path.name} --out OUT.dsq\n")
    write_text_atomic(path, header + yaml.safe_dump(compact_recipe(row["recipe"]), sort_keys=False))


def _redact(url: str) -> str:
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        creds, host = rest.rsplit("@", 1)
        return f"{scheme}://{creds.split(':')[0]}@{host}"
    return redact(url)


def _plain(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))
