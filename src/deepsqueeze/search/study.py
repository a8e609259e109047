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

This module is the driver (samplers, pruners, the loop that runs and counts trials). The search package
keeps one concern per module: ``space`` (the space file, its holes and points), ``trial`` (one point
measured; the Optuna objective), ``priors`` (points seeded from sensitivity scans), ``front`` (the Pareto
front, hypervolume and the answer's files) and ``storage`` (the study folder and the Optuna storage).
study imports the others and none of them imports study; trial, priors and front stand on space, front on
trial and storage too.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from deepsqueeze.core.deprecation import moved_to
from deepsqueeze.core.model import Model
from deepsqueeze.data.resolve import resolve_data
from deepsqueeze.errors import DeepsqueezeError, RecipeError
from deepsqueeze.recipes.run import fit_to_data
from deepsqueeze.search import front as _front
from deepsqueeze.search import space as _space
from deepsqueeze.search import storage as _storage
from deepsqueeze.search import trial as _trial
from deepsqueeze.search.front import DIRECTIONS, SearchResult, write_answer
from deepsqueeze.search.priors import correct_prior, enqueue_sensitivity_priors
from deepsqueeze.search.space import SearchSpace
from deepsqueeze.search.storage import check_storage, open_study, own_trial_reports, redact_url, study_url
from deepsqueeze.search.trial import (
    QUALITY_KEYS,
    SearchContext,
    is_repeat,
    make_objective,
    measure_baseline,
    measure_references,
    plain,
    validation_refs,
)

SAMPLERS = ("grid", "random", "tpe", "cmaes", "gp", "nsga2")
PRUNERS = ("median", "halving", "none")


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


def run_search(space: SearchSpace, model: Model, out: str | Path, data_ref: str | None = None, *,
               sampler: str = "tpe", trials: int = 20, storage: str | None = None, study_name: str = "search",
               pruner: str = "median", progress: bool = True, log: Callable[[str], None] | None = None,
               weights: str | None = None, model_code: str | None = None, device: str = "cpu") -> SearchResult:
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
    check_storage(storage)
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    fit_ref, val_ref = validation_refs(model, data_ref or space.data)
    val = resolve_data(val_ref, split="val")
    fit_to_data(model, val)
    quality_key = QUALITY_KEYS[model.task]
    model_ref = space.model or model.ref
    if model_code is None and model_ref.startswith("py:"):  # the factory the user named rebuilds the trials
        model_code = model_ref
    ctx = SearchContext(space, model_ref, fit_ref, val, model, out_dir, quality_key, weights, model_code, device)
    url = study_url(storage, out_dir)
    own_trial_reports()
    directions = [DIRECTIONS[o] for o in space.objectives]
    study = open_study(url, study_name, directions, storage or url)
    if [d.name.lower() for d in study.directions] != directions:
        raise RecipeError(f"study {study_name!r} in {redact_url(url)} optimizes other objectives: use another --out or --study")
    fingerprint = space.fingerprint()
    stored = study.user_attrs.get("space_fingerprint")
    if stored is None:
        study.set_user_attr("space_fingerprint", fingerprint)
        study.set_user_attr("space", plain(space.source))
        study.set_user_attr("model", ctx.model_ref)
        study.set_user_attr("objectives", list(space.objectives))
        study.set_user_attr("constraints", space.constraints)
    elif stored != fingerprint:
        raise RecipeError(f"study {study_name!r} in {redact_url(url)} was started from another space: use another --out or "
                          "--study to start a new one")
    say = log or (lambda _msg: None)
    say(f"study {study_name} in {redact_url(url)}: " + ("created" if stored is None else
                                                         f"continued ({len(study.trials)} trials stored)"))
    baseline = measure_baseline(study, ctx)
    if space.compare and "references" not in study.user_attrs:
        study.set_user_attr("references", measure_references(ctx, baseline))
    if space.priors == "sensitivity" and not study.user_attrs.get("priors_enqueued"):
        enqueue_sensitivity_priors(study, ctx)

    done = _finished(study)
    seed = space.seed + len(study.trials) + (os.getpid() if storage else 0)
    # fixed at the study's start, so a resumed study or a second worker keeps the same generations
    seeded = study.user_attrs.get("seeded_points")
    if seeded is None:
        seeded = len(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.WAITING,)))
        study.set_user_attr("seeded_points", seeded)
    study.sampler = make_sampler(sampler, space, trials, seed, seeded)
    study.pruner = make_pruner(pruner) if len(space.objectives) == 1 else optuna.pruners.NopPruner()
    objective = make_objective(ctx, baseline)
    note = ""
    try:
        if done < trials:
            say(f"study {study_name}: {done} of {trials} trials done, running {trials - done} more ({sampler})")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                # twice the trials left: room for the repeats a sampler proposes, which are not measured
                study.optimize(objective, n_trials=2 * (trials - done), catch=(DeepsqueezeError,),
                               callbacks=[correct_prior(ctx), _stop_after(trials, trials - done),
                                          _progress_callback(say, trials)])
            counted = _finished(study)
            if counted < trials:  # the proposals ran out: say what they were spent on
                repeats = sum(is_repeat(t) for t in study.trials)
                failed = sum(t.state == optuna.trial.TrialState.FAIL for t in study.trials)
                note = (f" The study stopped at {counted} of {trials} trials: {repeats} proposals repeated a "
                        f"measured recipe (the space may hold fewer distinct points) and {failed} trials failed.")
    finally:
        result = write_answer(study, space, out_dir, url, study_name, note)
    return result


def _finished(study: Any) -> int:
    """Trials that count toward the budget: complete, or pruned after measuring (not repeats of a measured
    recipe)."""
    import optuna

    states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    return sum(not is_repeat(t) for t in study.get_trials(deepcopy=False, states=states))


def _stop_after(total: int, here: int) -> Callable[[Any, Any], None]:
    """Stop when the study holds ``total`` counted trials (any worker's) or this call has run ``here``
    trials that were not repeats."""
    ran = 0

    def callback(study: Any, trial: Any) -> None:
        nonlocal ran
        ran += not is_repeat(trial)
        if ran >= here or _finished(study) >= total:
            study.stop()

    return callback


def _progress_callback(say: Callable[[str], None], trials: int) -> Callable[[Any, Any], None]:
    def callback(study: Any, trial: Any) -> None:
        attrs = trial.user_attrs
        if is_repeat(trial):
            say(f"trial {trial.number}: the recipe of trial {attrs['repeat_of']}, not measured again")
        elif trial.state.name == "COMPLETE":
            say(f"trial {trial.number}: quality {attrs.get('quality', float('nan')):.4f}, "
                f"{attrs.get('bytes', 0):,} B, {attrs.get('latency_ms', float('nan')):.3f} ms")
        else:
            say(f"trial {trial.number}: {trial.state.name.lower()} {attrs.get('error', '')}".rstrip())

    return callback


# names that lived in this module before the search package was split by concern (deprecated)
__getattr__ = moved_to(__name__, {
    _front: ["HV_REFERENCE", "UNITS", "compact_recipe", "hypervolume", "hypervolume_history", "normalized_values",
             "pareto_front"],
    _space: ["layer_lister", "load_space"],
    _storage: ["STUDY_FILES", "default_storage", "prepare_out"],
    _trial: ["measure_point", "objective_values", "violations"],
})
