"""A search space is a recipe with holes; a point of the space is an ordinary recipe.

The space file is YAML::

    model: zoo:lenet300@digits          # optional (--model overrides)
    data: digits                        # optional (--data overrides)
    seed: 0
    objectives: [quality, bytes]        # quality (maximised), bytes, latency (minimised)
    constraints: {max_bytes: 60000, max_drop: 1.0, max_latency_ms: null}
    latency: {batch: 64, threads: 2}
    priors: sensitivity                 # optional: seed the study with points allocated from sensitivity
                                        # scans (per-layer sparsity, per-layer quantize bits;
                                        # one bits point at each compare recipe's weight bytes)
    compare: [w4-rtn]                   # optional: shipped recipes measured once, as reference points
    stages:
      - type: quantize
        method: rtn
        bits: {per_layer: {choice: [2, 4, 8, null]}}   # null: the layer stays float
        group_size: 64
      - type: lora
        optional: true                  # the sampler decides whether the stage runs
        rank: {choice: [4, 8]}

Pruning belongs in a space of its own (``recipes/spaces/cnn-sparsity.yaml``): packed codes store every
weight, so zeros pruned before a weight-only quantize stage save no bytes (and the stage says so). The
shipped spaces (``deepsqueeze recipes`` lists them) are found by name: ``search --space cnn-bits``.

A *hole* is a mapping ``{choice: [...]}`` or ``{low: A, high: B[, step: S][, log: true]}``; every other
value is passed to the stage as is. ``{per_layer: HOLE[, layers: [patterns]]}`` opens one hole per layer:
for the fields a stage already takes per layer (prune ``sparsity``, prune_channels ``ratio``, share
``bits``, quantize ``bits`` with method rtn, gptq or qat) it fills the stage's ``overrides``; for any
other field the stage is split into one stage per layer (``include: [layer]``), e.g. rank per layer.
Layers are the model's Linear and Conv2d modules (quantize: also its embedding tables; prune_channels:
the producing layer of each prunable dependency group), or those matching ``layers``.

Every hole is sampled in every trial, whether or not its stage runs, so the space seen by the sampler is
the same in every trial (grid and CMA-ES need that).
"""

from __future__ import annotations

import difflib
import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from deepsqueeze.core.config import config_from_dict, registered_stages
from deepsqueeze.core.model import Model
from deepsqueeze.errors import RecipeError, one_line
from deepsqueeze.quant.config import PER_LAYER_BITS
from deepsqueeze.recipes.schema import Recipe, load_yaml_bounded, parse_recipe

SPACE_KEYS = ("model", "data", "seed", "description", "objectives", "constraints", "latency", "priors",
              "compare", "stages", "trials", "sampler")
OBJECTIVES = ("quality", "bytes", "latency")
CONSTRAINTS = ("max_bytes", "max_latency_ms", "max_drop")
# Stage fields that the stage itself already sets per layer through its ``overrides`` mapping.
OVERRIDE_FIELDS = {"prune": "sparsity", "prune_channels": "ratio", "share": "bits"}
# Quantize methods that take per-layer bits in one stage (``overrides``); others split into one stage per layer.
PER_LAYER_BITS_METHODS = tuple(m.value for m in PER_LAYER_BITS)
HOLE_KEYS = ({"choice"}, {"low", "high"}, {"low", "high", "step"}, {"low", "high", "log"})

#: The most points a grid search may list (the product of its holes' sizes), checked before listing.
MAX_GRID_POINTS = 100_000
#: Bounds on the numbers of a space file: hole ends and steps (where floats stop being exact integers; Optuna's
#: stepped ranges fail beyond), latency batch and threads, trials.
MAX_HOLE_VALUE = 2**53
MAX_LATENCY_BATCH = 1 << 16
MAX_THREADS = 1024
MAX_TRIALS = 1_000_000


class TrialLike(Protocol):
    """What a space needs from a sampler's trial (``optuna.Trial`` fits)."""

    def suggest_categorical(self, name: str, choices: Any) -> Any: ...
    def suggest_int(self, name: str, low: int, high: int, step: int = 1, log: bool = False) -> int: ...
    def suggest_float(self, name: str, low: float, high: float, *, step: float | None = None,
                      log: bool = False) -> float: ...


@dataclass(frozen=True)
class Hole:
    """One sampled value: a categorical ``choice`` or an int/float range (optionally stepped or log)."""

    name: str
    choice: tuple[Any, ...] | None = None
    low: float | None = None
    high: float | None = None
    step: float | None = None
    log: bool = False

    @property
    def is_int(self) -> bool:
        return self.choice is None and all(isinstance(v, int) and not isinstance(v, bool)
                                           for v in (self.low, self.high, self.step or 1))

    def sample(self, trial: TrialLike) -> Any:
        if self.choice is not None:
            return trial.suggest_categorical(self.name, list(self.choice))
        if self.is_int:
            return trial.suggest_int(self.name, int(self.low), int(self.high), step=int(self.step or 1),  # type: ignore[arg-type]
                                     log=self.log)
        return trial.suggest_float(self.name, float(self.low), float(self.high), step=self.step,  # type: ignore[arg-type]
                                   log=self.log)

    def size(self) -> int:
        """How many values :meth:`grid` would list, counted without listing them (RecipeError when infinite)."""
        if self.choice is not None:
            return len(self.choice)
        if self.log or (self.step is None and not self.is_int):
            raise RecipeError(f"hole {self.name}: the grid sampler needs a finite hole: give 'step' or 'choice'")
        span = (float(self.high) - float(self.low)) / (self.step or 1) + 1e-9  # type: ignore[arg-type]
        if not math.isfinite(span) or span > MAX_GRID_POINTS:
            return MAX_GRID_POINTS + 1
        return int(math.floor(span)) + 1

    def grid(self) -> list[Any]:
        """Every value of the hole (a range needs a step, an int range has step 1 by default); a hole of
        more than ``MAX_GRID_POINTS`` values is a RecipeError, before any is listed."""
        if self.size() > MAX_GRID_POINTS:
            raise RecipeError(f"hole {self.name} has more than {MAX_GRID_POINTS:,} values: the grid sampler "
                              "lists every point; widen its step or use --sampler tpe / random")
        if self.choice is not None:
            return list(self.choice)
        step = self.step or 1
        n = int(math.floor((float(self.high) - float(self.low)) / step + 1e-9))  # type: ignore[arg-type]
        if self.is_int:
            return [int(self.low) + i * int(step) for i in range(n + 1)]  # type: ignore[arg-type]
        return [round(float(self.low) + i * step, 10) for i in range(n + 1)]  # type: ignore[arg-type]

    def snap(self, value: float) -> Any:
        """The hole's value nearest to ``value`` (for priors)."""
        if self.choice is not None:
            numeric = [c for c in self.choice if isinstance(c, (int, float)) and not isinstance(c, bool)]
            return min(numeric, key=lambda c: abs(c - value)) if numeric else self.choice[0]
        value = min(max(value, float(self.low)), float(self.high))  # type: ignore[arg-type]
        if self.step:
            value = float(self.low) + round((value - float(self.low)) / self.step) * self.step  # type: ignore[arg-type]
            value = min(value, float(self.high))  # type: ignore[arg-type]
        return int(round(value)) if self.is_int else round(value, 10)


@dataclass
class StageTemplate:
    """One stage of the space: fixed fields, holes, per-layer holes and whether the stage may be skipped."""

    index: int
    type: str
    fixed: dict[str, Any]
    holes: dict[str, Hole] = field(default_factory=dict)  # field -> hole
    per_layer: dict[str, tuple[list[str], Hole]] = field(default_factory=dict)  # field -> (layers, template)
    run: Hole | None = None  # present when the stage is optional

    @property
    def prefix(self) -> str:
        return f"{self.index}.{self.type}"

    def layer_hole(self, fname: str, layer: str) -> Hole:
        _, template = self.per_layer[fname]
        return Hole(f"{self.prefix}.{fname}[{layer}]", template.choice, template.low, template.high,
                    template.step, template.log)

    def all_holes(self) -> list[Hole]:
        holes = [self.run] if self.run is not None else []
        holes += list(self.holes.values())
        for fname, (layers, _) in self.per_layer.items():
            holes += [self.layer_hole(fname, layer) for layer in layers]
        return holes


@dataclass
class SearchSpace:
    """A parsed space file: templates of the stages plus the study settings."""

    stages: list[StageTemplate]
    model: str | None = None
    data: str | None = None
    seed: int = 0
    description: str | None = None
    objectives: tuple[str, ...] = ("quality", "bytes")
    constraints: dict[str, float] = field(default_factory=dict)
    latency_batch: int = 64
    latency_threads: int = 2
    priors: str | None = None
    compare: tuple[str, ...] = ()
    trials: int | None = None
    sampler: str | None = None
    source: dict[str, Any] = field(default_factory=dict)

    def holes(self) -> list[Hole]:
        return [hole for stage in self.stages for hole in stage.all_holes()]

    def grid(self) -> dict[str, list[Any]]:
        """Every hole's values, for ``optuna.samplers.GridSampler`` (which lists their product): the product
        is counted first and a space of more than ``MAX_GRID_POINTS`` points is a RecipeError."""
        holes = self.holes()
        points = 1
        for hole in holes:
            points *= hole.size()
            if points > MAX_GRID_POINTS:
                raise RecipeError(f"the space holds more than {MAX_GRID_POINTS:,} grid points ({len(holes)} holes): "
                                  "the grid sampler lists every one; use --sampler tpe or random, or fewer holes")
        return {hole.name: hole.grid() for hole in holes}

    def fingerprint(self) -> str:
        """A digest of the space (holes and stages), so a resumed study refuses a different space."""
        text = json.dumps({"stages": self.source.get("stages"), "holes": [h.name for h in self.holes()]},
                          sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def point(self, trial: TrialLike, model_ref: str, data_ref: str | None) -> Recipe:
        """Sample every hole through ``trial`` and return the recipe of that point."""
        stages: list[dict[str, Any]] = []
        for template in self.stages:
            runs = template.run.sample(trial) if template.run is not None else True
            values = {fname: hole.sample(trial) for fname, hole in template.holes.items()}
            layer_values = {fname: {layer: template.layer_hole(fname, layer).sample(trial) for layer in layers}
                            for fname, (layers, _) in template.per_layer.items()}
            if runs:
                stages += _expand(template, values, layer_values)
        if not stages:
            raise RecipeError("this point of the space runs no stage: make at least one stage not optional")
        recipe = {"model": model_ref, "seed": self.seed, "stages": stages,
                  "description": f"search point of {self.description or 'a search space'}"}
        if data_ref is not None:
            recipe["data"] = data_ref
        return parse_recipe(recipe, source="search point")


def _expand(template: StageTemplate, values: dict[str, Any],
            layer_values: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    base = {"type": template.type, **template.fixed, **values}
    if not isinstance(base.get("overrides", {}), dict) or not isinstance(base.get("exclude", []), list):
        raise RecipeError(f"stage {template.prefix}: overrides is a mapping and exclude a list of layer patterns")
    split: list[tuple[str, dict[str, Any]]] = []
    for fname, per_layer in layer_values.items():
        if OVERRIDE_FIELDS.get(template.type) == fname:
            base["overrides"] = {**base.get("overrides", {}), **per_layer}
        elif template.type == "quantize" and fname == "bits" and base.get("method") in PER_LAYER_BITS_METHODS:
            # one stage, so one GPTQ pass calibrates every width; a null leaves the layer in float and the
            # layers without a hole (embedding tables, ...) follow the stage's own fields
            chosen = {layer: bits for layer, bits in per_layer.items() if bits is not None}
            floats = [layer for layer, bits in per_layer.items() if bits is None]
            base["overrides"] = {**base.get("overrides", {}), **chosen}
            if floats:
                base["exclude"] = [*base.get("exclude", ()), *floats]
        else:
            split.append((fname, per_layer))
    if not split:
        return [base]
    if len(split) > 1:
        raise RecipeError(f"stage {template.prefix}: only one field per stage can be split per layer")
    fname, per_layer = split[0]
    # One stage per layer; a null value leaves that layer out (e.g. bits: null = the layer stays float).
    return [{**base, fname: value, "include": [layer]} for layer, value in per_layer.items() if value is not None]


def _hole(name: str, spec: dict[str, Any]) -> Hole:
    keys = set(spec)
    if keys not in HOLE_KEYS and keys != {"low", "high", "step", "log"}:
        raise RecipeError(f"{name}: a hole is {{choice: [...]}} or {{low: A, high: B[, step: S][, log: true]}}, "
                          f"got keys {sorted(keys)}")
    if "choice" in spec:
        choice = spec["choice"]
        if not isinstance(choice, list) or not choice:
            raise RecipeError(f"{name}: choice must be a non-empty list")
        return Hole(name, choice=tuple(choice))
    low, high = spec["low"], spec["high"]
    if not _number(low) or not _number(high) or low > high:
        raise RecipeError(f"{name}: low and high must be numbers with low <= high (at most 2**53 in size), got "
                          f"{one_line(repr(low), 40)} and {one_line(repr(high), 40)}")
    step = spec.get("step")
    if step is not None and (not _number(step) or step <= 0):
        raise RecipeError(f"{name}: step must be a positive number, got {one_line(repr(step), 40)}")
    if step is not None and (high - low) / step > MAX_HOLE_VALUE:
        raise RecipeError(f"{name}: a step of {step} from {low} to {high} makes more than 2**53 values")
    log = spec.get("log", False)
    if not isinstance(log, bool):
        raise RecipeError(f"{name}: log is true or false, got {one_line(repr(log), 40)}")
    if log and (step is not None or low <= 0):
        raise RecipeError(f"{name}: a log range needs low > 0 and no step")
    return Hole(name, low=low, high=high, step=step, log=log)


def _number(value: Any) -> bool:
    """A finite int or float (not a bool) of magnitude at most ``MAX_HOLE_VALUE``."""
    return (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            and abs(value) <= MAX_HOLE_VALUE)


def _is_hole(value: Any) -> bool:
    return isinstance(value, dict) and ("choice" in value or {"low", "high"} <= set(value))


def parse_space(data: Any, layers_of: LayerLister | None = None, source: str = "space") -> SearchSpace:
    """Validate a space given as plain data. ``layers_of(stage_type, patterns)`` names the layers of the
    model that per-layer holes open on (needed only when the space has per-layer holes)."""
    if not isinstance(data, dict):
        raise RecipeError(f"{source}: a search space is a mapping with a 'stages' list")
    unknown = [k for k in data if k not in SPACE_KEYS]
    if unknown:
        raise RecipeError(f"{source}: unknown key {unknown[0]!r}; allowed keys: {', '.join(SPACE_KEYS)}")
    raw_stages = data.get("stages")
    if not isinstance(raw_stages, list) or not raw_stages:
        raise RecipeError(f"{source}: 'stages' must be a non-empty list of stages, each with a 'type'")
    known = registered_stages()
    stages = []
    for index, raw in enumerate(raw_stages):
        where = f"{source}: stage {index + 1}"
        if not isinstance(raw, dict) or "type" not in raw:
            raise RecipeError(f"{where}: expected a mapping with a 'type' (one of: {', '.join(known)})")
        stage_type = str(raw["type"])
        if stage_type not in known:
            config_from_dict({"type": stage_type}, where=where)  # raises with the did-you-mean message
        template = StageTemplate(index, stage_type, {})
        fields = known[stage_type].model_fields
        for key, value in raw.items():
            if not isinstance(key, str):
                raise RecipeError(f"{where}: field names are strings, got {one_line(repr(key), 40)}")
            if key == "type":
                continue
            if key == "optional":
                if value:
                    template.run = Hole(f"{template.prefix}.run", choice=(True, False))
                continue
            if key not in fields:
                config_from_dict({"type": stage_type, key: None}, where=where)  # names the allowed keys
            if isinstance(value, dict) and "per_layer" in value:
                if not _is_hole(value["per_layer"]) or set(value) - {"per_layer", "layers"}:
                    raise RecipeError(f"{where}: {key}: per_layer takes a hole ({{choice: [...]}} or "
                                      "{low, high}) and an optional 'layers' list of patterns")
                patterns = value.get("layers")
                if patterns is not None and (not isinstance(patterns, list)
                                             or not all(isinstance(p, str) for p in patterns)):
                    raise RecipeError(f"{where}: {key}: layers is a list of name patterns, got "
                                      f"{one_line(repr(patterns), 60)}")
                if layers_of is None:
                    raise RecipeError(f"{where}: {key}: per-layer holes need the model to list its layers")
                layers = layers_of(stage_type, value.get("layers"))
                if not layers:
                    raise RecipeError(f"{where}: {key}: no layer of the model matches {value.get('layers')}")
                if OVERRIDE_FIELDS.get(stage_type) != key and "include" not in fields:
                    raise RecipeError(f"{where}: {key} cannot be set per layer: stage {stage_type} has no include")
                template.per_layer[key] = (layers, _hole(f"{template.prefix}.{key}", value["per_layer"]))
            elif _is_hole(value):
                template.holes[key] = _hole(f"{template.prefix}.{key}", value)
            else:
                template.fixed[key] = value
        stages.append(template)
    objectives_raw = data.get("objectives") or ["quality", "bytes"]
    if not isinstance(objectives_raw, list) or not all(isinstance(o, str) for o in objectives_raw):
        raise RecipeError(f"{source}: objectives is a list of names among {', '.join(OBJECTIVES)}, got "
                          f"{one_line(repr(objectives_raw), 80)}")
    objectives = tuple(objectives_raw)
    bad = [o for o in objectives if o not in OBJECTIVES]
    if bad or len(set(objectives)) != len(objectives) or "quality" not in objectives:
        raise RecipeError(f"{source}: objectives are distinct names among {', '.join(OBJECTIVES)} and include "
                          f"quality, got {list(objectives)}")
    raw_constraints = data.get("constraints") or {}
    if not isinstance(raw_constraints, dict):
        raise RecipeError(f"{source}: constraints is a mapping, e.g. {{max_bytes: 60000, max_drop: 1.0}}")
    constraints = {k: v for k, v in raw_constraints.items() if v is not None}
    bad = [k for k in constraints if k not in CONSTRAINTS]
    if bad:
        raise RecipeError(f"{source}: unknown constraint {one_line(repr(bad[0]), 60)}; use {', '.join(CONSTRAINTS)}")
    for key, value in constraints.items():
        if not _number(value) or value < 0:
            raise RecipeError(f"{source}: constraint {key} must be a non-negative number, got {value!r}")
    latency = data.get("latency") or {}
    if not isinstance(latency, dict) or set(latency) - {"batch", "threads"}:
        raise RecipeError(f"{source}: latency takes batch and threads, e.g. {{batch: 64, threads: 2}}")
    for key, limit in (("batch", MAX_LATENCY_BATCH), ("threads", MAX_THREADS)):
        value = latency.get(key, 1)
        if type(value) is not int or not 1 <= value <= limit:
            raise RecipeError(f"{source}: latency {key} is an integer from 1 to {limit}, got "
                              f"{one_line(repr(value), 40)}")
    priors = data.get("priors")
    if priors not in (None, "sensitivity"):
        raise RecipeError(f"{source}: priors is 'sensitivity' or absent, got {one_line(repr(priors), 60)}")
    compare = data.get("compare") or []
    if not isinstance(compare, list) or not all(isinstance(c, str) for c in compare):
        raise RecipeError(f"{source}: compare is a list of recipe names or files")
    seed = data.get("seed", 0)
    if type(seed) is not int or not 0 <= seed < 2**32:
        raise RecipeError(f"{source}: seed must be an integer from 0 to 2**32 - 1")
    trials = data.get("trials")
    if trials is not None and (type(trials) is not int or not 1 <= trials <= MAX_TRIALS):
        raise RecipeError(f"{source}: trials must be an integer from 1 to {MAX_TRIALS:,}")
    for key in ("model", "data", "description", "sampler"):
        if data.get(key) is not None and not isinstance(data[key], str):
            raise RecipeError(f"{source}: {key} must be a string, got {one_line(repr(data[key]), 60)}")
    space = SearchSpace(stages, data.get("model"), data.get("data"), seed, data.get("description"), objectives,
                        constraints, int(latency.get("batch", 64)), int(latency.get("threads", 2)), priors,
                        tuple(compare), trials, data.get("sampler"), source=data)
    try:
        space.point(_LowestTrial(), "zoo:probe", None)  # fixed values and hole bounds must make valid stages
    except RecipeError as exc:
        raise RecipeError(f"{source}: {exc}") from None
    return space


class _LowestTrial:
    """A trial that takes every hole's first choice or low end (to validate a space once, up front)."""

    def suggest_categorical(self, name: str, choices: Any) -> Any:
        return True if True in choices else choices[0]

    def suggest_int(self, name: str, low: int, high: int, step: int = 1, log: bool = False) -> int:
        return low

    def suggest_float(self, name: str, low: float, high: float, *, step: float | None = None,
                      log: bool = False) -> float:
        return low


class LayerLister(Protocol):
    def __call__(self, stage_type: str, patterns: list[str] | None) -> list[str]: ...


def read_space_file(path: str | Path) -> dict[str, Any]:
    """The space file as plain data (YAML, safe loader)."""
    from deepsqueeze.recipes.schema import find_space, shipped_spaces

    file = Path(path)
    if not file.exists() and find_space(str(path)) is not None:  # a shipped space by name
        file = find_space(str(path))  # type: ignore[assignment]
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        names = list(shipped_spaces())
        hint = difflib.get_close_matches(file.stem, names, n=1, cutoff=0.6)
        raise RecipeError(f"search space {file} does not exist: {f'did you mean {hint[0]!r}? ' if hint else ''}"
                          f"pass a YAML space or a shipped one by name ({', '.join(names)}; see deepsqueeze "
                          "recipes)") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise RecipeError(f"cannot read search space {file}: {exc}") from None
    return load_yaml_bounded(text, source=f"search space {file}")


def layer_lister(model: Model) -> LayerLister:
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


def load_space(path: str | Path, model_ref: str | None = None, *, weights: str | None = None,
               model_code: str | None = None) -> tuple[SearchSpace, Model]:
    """Read the space file and resolve its model (``model_ref`` overrides the file's ``model``; ``weights`` and
    ``model_code`` as for ``compress``: the user's own weights, the architecture of a py: model's artifact)."""
    from deepsqueeze.resolve import resolve_file_reference, resolve_model

    data = read_space_file(path)
    ref = model_ref or (data.get("model") if isinstance(data, dict) else None)
    if not ref or not isinstance(ref, str):
        raise RecipeError("no model given: pass --model REF or set 'model:' in the space file")
    if model_ref:
        model = resolve_model(ref, weights=weights, progress=False, model_code=model_code)
    else:
        model = resolve_file_reference(ref, f"the search space's model ({path})", (model_code,), weights=weights,
                                       progress=False, model_code=model_code)
    space = parse_space(data, layer_lister(model), source=str(path))
    space.model = ref
    return space, model
