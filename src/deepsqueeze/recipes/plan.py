"""``plan``: the coverage table of a recipe on a model, before anything expensive runs.

Each stage's registered planner (:func:`deepsqueeze.core.coverage.register_planner`) predicts what the
stage will do per weight-bearing module, from the config and the layer kinds alone; structured pruning
traces the model once with one fixed random batch. Nothing calibrates, trains or changes the model.
Stages are planned on the model as it is before the first stage: a plan for a later stage does not
see what an earlier one removes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

from deepsqueeze.core.counting import count_params
from deepsqueeze.core.coverage import coverage_totals, planner_for
from deepsqueeze.core.record import CoverageEntry
from deepsqueeze.errors import RecipeError
from deepsqueeze.recipes.run import _example, check_trainable, fit_to_data, preflight, training_data
from deepsqueeze.recipes.schema import Recipe
from deepsqueeze.resolve import resolve_file_reference, resolve_model
from deepsqueeze.zoo.resolve import ModelCode

__all__ = ["Plan", "plan"]

_INT8_METHODS = ("dynamic", "static", "smoothquant")


@dataclass
class Plan:
    """``modules``: one coverage entry per stage and weight-bearing module; ``stages``: totals per stage
    (modules compressed / skipped / float, weights covered and %, ``expected_bytes`` for quantize stages:
    codes at the stage's bits plus fp32 for everything else, scales not included)."""

    model: str
    params: int
    fp32_bytes: int
    stages: list[dict[str, Any]] = field(default_factory=list)
    modules: list[CoverageEntry] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "params": self.params, "fp32_bytes": self.fp32_bytes, "stages": self.stages,
                "modules": [e.to_dict() for e in self.modules]}


def _bits(config: Any) -> int | None:
    if getattr(config, "stage_type", None) != "quantize":
        return None
    method = getattr(config.method, "value", config.method)
    return 8 if method in _INT8_METHODS else int(config.bits)


def plan(model_ref: str | None, recipe: Recipe, *, weights: str | None = None, data_ref: str | None = None,
         model_code: ModelCode = None, device: str = "cpu") -> Plan:
    """Resolve ``model_ref`` (or the recipe's model) and plan every stage of ``recipe`` on it; ``data_ref``
    (or the recipe's data) gives a classifier without a known input shape its shape, as compress does.
    ``model_code``: the architecture of a ``py:`` model's artifact (see :func:`deepsqueeze.load`)."""
    if model_ref is None and recipe.model is None:
        raise RecipeError("no model given: pass --model REF or set 'model:' in the recipe")
    if model_ref is None:
        model = resolve_file_reference(recipe.model, "the recipe's model", weights=weights, progress=False)
    else:
        model = resolve_model(model_ref, weights=weights, progress=False, device=device, model_code=model_code)
    data = training_data(model, data_ref or recipe.data)
    fit_to_data(model, data, device)  # data the model cannot take is refused here, as compress refuses it
    example = _example(model)
    check_trainable(model, recipe, example)
    preflight(model, recipe, data)
    params = count_params(model.module)
    result = Plan(model.ref, params, 4 * params)
    for index, config in enumerate(recipe.stages):
        planner = planner_for(config.stage_type)
        if planner is None:
            result.stages.append({"stage": index, "type": config.stage_type, "modules": None,
                                  "note": "no coverage planner: this stage does not compress weights by kind"})
            continue
        entries = [replace(e, stage=index) for e in planner(model.module, config, example)]
        result.modules.extend(entries)
        totals = coverage_totals(entries)
        row = totals[0] if totals else {"stage": index, "type": config.stage_type, "modules": 0, "weights": 0,
                                        "weights_covered": 0, "covered_pct": 100.0}
        bits = _bits(config)
        if bits is not None:
            covered = row["weights_covered"]
            row["expected_bytes"] = math.ceil(bits * covered / 8) + 4 * (params - covered)
        result.stages.append(row)
    return result
