"""Points a study starts from (``priors: sensitivity``), allocated from sensitivity scans: per-layer quantize
and share bits from the mixed-precision scan (at three mean widths and at each ``compare`` recipe's size,
corrected once measured), per-layer sparsities from the pruning scan. They come on top of the samplers'
own exploration (:func:`deepsqueeze.search.study.make_sampler`).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from deepsqueeze.data.datasets import ClassificationData
from deepsqueeze.data.resolve import resolve_data
from deepsqueeze.errors import DeepsqueezeError, RecipeError
from deepsqueeze.recipes.schema import load_recipe
from deepsqueeze.search.space import SearchSpace
from deepsqueeze.search.trial import SearchContext


def enqueue_sensitivity_priors(study: Any, ctx: SearchContext) -> None:
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
    again under a budget smaller by the excess (:func:`correct_prior`). The other optional stages are left
    out of those points."""
    from deepsqueeze.core.calibrate import calibration_batches
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


def correct_prior(ctx: SearchContext) -> Callable[[Any, Any], None]:
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
