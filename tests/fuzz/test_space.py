"""Fuzzing search spaces: a space YAML edited as data (holes with hostile bounds, steps, choices, per-layer
holes, optional stages, objectives, constraints, latency, priors, compare, seed, trials, model) or as text
(YAML anchors and aliases, tags, merges, huge integers, non-string keys, damage).

The oracle runs what ``deepsqueeze search`` runs before its first trial: ``read_space_file``, ``parse_space``
(or ``load_space``, which resolves the file's model through the file-reference door: a planted ``py:`` canary
must never be imported), the fingerprint, one point sampled by a real Optuna trial, the grid (``space.grid()``
and Optuna's ``GridSampler`` on it) and the point's recipe as the study stores it (JSON). Only ``RecipeError``
and ``ModelError`` may come out; every case is bounded in time and memory.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any

import pytest
import yaml

from deepsqueeze.errors import ModelError, RecipeError
from tests.fuzz.oracle import Campaign, Canary, case_rng, mutate_json, mutate_text, random_value

SURFACE = "space"
CASES = int(os.environ.get("DEEPSQUEEZE_FUZZ_SPACE_CASES", "300"))
SEED = int(os.environ.get("DEEPSQUEEZE_FUZZ_SEED", "0"))
LAYERS = ["1", "3", "5"]
KINDS = ["holes", "fields", "yaml", "text", "model"]
WEIGHTS = [35, 25, 15, 10, 15]

SPACES: list[dict[str, Any]] = [
    {"stages": [
        {"type": "prune", "optional": True, "sparsity": {"per_layer": {"low": 0.5, "high": 0.9, "step": 0.2}}},
        {"type": "quantize", "method": "rtn", "bits": {"per_layer": {"choice": [4, 8, None]}, "layers": ["1", "5"]}},
        {"type": "finetune", "epochs": {"choice": [0.5, 2]}, "lr": 0.001}]},
    {"model": "zoo:lenet300", "data": "digits", "objectives": ["quality", "bytes", "latency"],
     "latency": {"batch": 32, "threads": 1},
     "stages": [{"type": "prune", "optional": True, "storage": "dense", "sparsity": {"choice": [0.5, 0.8]}},
                {"type": "quantize", "method": "rtn", "bits": {"per_layer": {"choice": [2, 4, 8]}}}]},
    {"model": "zoo:lenet300", "seed": 3, "description": "all the settings", "trials": 12, "sampler": "tpe",
     "constraints": {"max_bytes": 60000, "max_drop": 1.0, "max_latency_ms": None}, "priors": "sensitivity",
     "compare": ["w4-rtn"],
     "stages": [{"type": "share", "bits": {"per_layer": {"choice": [2, 4, 5]}}},
                {"type": "quantize", "method": "rtn", "bits": {"choice": [4, 8]}, "group_size": {"choice": [32, 64]}},
                {"type": "lowrank", "optional": True, "rank": {"per_layer": {"low": 4, "high": 16, "step": 4}}}]},
    {"stages": [{"type": "prune_channels", "ratio": {"low": 0.1, "high": 0.5, "step": 0.1}},
                {"type": "finetune", "epochs": 1, "lr": {"low": 0.0001, "high": 0.01, "log": True}}]},
]

YAML_TEXTS = [
    "stages:\n  - &s {type: prune, sparsity: {choice: [0.5]}}\n  - *s\n  - {<<: *s, optional: true}\n",
    "a: &a [1, 2]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\nc: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]\n"
    "d: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c]\ne: [*d, *d, *d, *d, *d, *d, *d, *d, *d]\nstages: [{type: prune}]\n",
    "stages: [{type: prune, sparsity: !!python/object/apply:os.system [echo hi]}]\n",
    "stages: [{type: quantize, bits: {low: 2, high: 1" + "0" * 5000 + "}}]\n",
    "stages: [{type: prune, sparsity: {choice: !!set {0.5, 0.7}}}]\n",
    "stages: [{type: prune, sparsity: {low: 2001-01-01, high: 2002-01-01}}]\n",
    "stages: [{type: prune, ? [a, b] : 1}]\n",
    "stages: [{type: prune, 5: 1, null: 2, true: 3}]\n",
    "stages:\n  - type: prune\n    sparsity: {low: .nan, high: .inf}\n",
    "stages: [{type: prune, sparsity: {choice: [!!binary aGVsbG8=]}}]\n",
    "seed: 0x7fffffffffffffffffff\nstages: [{type: prune}]\n",
    "stages: [{type: prune}]\nstages: [{type: quantize}]\n",
    "\ufeffstages: [{type: prune}]\n",
    "%YAML 1.1\n---\nstages: [{type: prune}]\n---\nstages: [{type: quantize}]\n",
    "stages: [{type: prune, sparsity: {low: 0.1, high: 0.9, step: 1e-300}}]\n",
    "stages: [{type: quantize, method: rtn, group_size: {low: 1, high: 1099511627776}}]\n",
    "latency: {batch: [64], threads: two}\nstages: [{type: prune}]\n",
    "objectives: 7\nconstraints: [max_bytes]\nstages: [{type: prune}]\n",
]


def layer_lister(stage_type: str, patterns: list[str] | None) -> list[str]:
    return [n for n in LAYERS if not patterns or n in patterns]


def _hole(rng: random.Random, strings: list[str]) -> Any:
    pick = rng.randrange(8)
    if pick == 0:
        return {"choice": rng.choice([[], [None], [[1, 2]], [{"a": 1}], [True, False], ["x", 1, 2.5, None],
                                      list(range(rng.choice([2, 1000, 50_000]))), [float("nan")], [10**30]])}
    if pick == 1:
        low, high = rng.choice([(0, 1), (1, 0), (-1e308, 1e308), (0, 10**18), (1e-300, 1e-299), (5, 5), (0.1, 0.9),
                                ("a", "b"), (True, False), (None, 1), (-(2**63), 2**63), (1, 2**40)])
        return {"low": low, "high": high}
    if pick == 2:
        return {"low": rng.choice([0, 0.5, 1, -1]), "high": rng.choice([1, 2, 1e9, 10**12]),
                "step": rng.choice([1e-12, 1e-300, 0, -1, True, 0.25, 3, "1", None, float("inf")])}
    if pick == 3:
        return {"low": rng.choice([0, 1e-9, -1, 1]), "high": rng.choice([1, 1e300, 10**6]),
                "log": rng.choice([True, False, "yes", 1])}
    if pick == 4:
        return {"per_layer": _hole(rng, strings), "layers": rng.choice([None, [], ["*"], ["nope"], "1", [1], ["1"]])}
    if pick == 5:
        return {"per_layer": rng.choice([5, None, [1], {"choice": [1]}, {"low": 1}])}
    if pick == 6:
        return {"choice": [1], "low": 0, "high": 1}
    return random_value(rng, strings)


def _mutate_holes(rng: random.Random, space: dict[str, Any], strings: list[str]) -> None:
    stages = space.get("stages") or [{"type": "prune"}]
    stage = rng.choice(stages)
    key = rng.choice([*stage.keys(), "sparsity", "bits", "group_size", "rank", "epochs", "lr", "ratio",
                      "optional", "include", "exclude", "overrides", "method"])
    if key == "type":
        stage[key] = rng.choice(["prune", "quantize", "share", "nope", "", None, 5, ["prune"], "Prune", "distill"])
    elif key == "optional":
        stage[key] = rng.choice([True, "yes", 2, None, {"choice": [True]}])
    else:
        stage[key] = _hole(rng, strings)


def _mutate_fields(rng: random.Random, space: dict[str, Any], strings: list[str]) -> None:
    key = rng.choice(["objectives", "constraints", "latency", "priors", "compare", "seed", "trials", "sampler",
                      "description", "data", "stages", "extra"])
    space[key] = rng.choice([
        random_value(rng, strings), ["quality", "quality"], ["bytes"], ["quality", "speed"], "quality",
        {"max_bytes": -1}, {"max_bytes": float("nan")}, {"max_bytes": "1e6"}, {"max_size": 3}, {"batch": 10**12},
        {"batch": [64], "threads": "x"}, {"batch": 0, "threads": -1}, "sensitivity", ["w4-rtn", 5], ["../../etc"],
        True, 2**63, -1, [], [{"type": "prune"}] * rng.choice([1, 100, 2_000]), {"type": "prune"}])


def _mutate_model(rng: random.Random, space: dict[str, Any], canary: Canary) -> None:
    """Plant a model reference (canaries, refused or cheap zoo references; not minilm: a legitimate, heavy load)."""
    space["model"] = rng.choice([*canary.references(), "zoo:lenet300", "zoo:lenet300@digits", "zoo:nope",
                                 "zoo:lenet300@digits:/tmp", "py:os:system", "", 5, None, ["zoo:lenet300"]])


def mutate(rng: random.Random, canary: Canary) -> tuple[str, bytes]:
    kind = rng.choices(KINDS, WEIGHTS)[0]
    space = json.loads(json.dumps(rng.choice(SPACES)))
    strings = ["prune", "quantize", "rtn", "gptq", "1", "3", "5", *canary.references()[:2]]
    if kind == "holes":
        for _ in range(rng.choice([1, 1, 2])):
            _mutate_holes(rng, space, strings)
    elif kind == "fields":
        _mutate_fields(rng, space, strings)
    elif kind == "model":
        _mutate_model(rng, space, canary)
    elif kind == "yaml":
        if rng.random() < 0.5:
            return kind, rng.choice(YAML_TEXTS).encode()
        mutate_json(rng, space, strings)
    text = _dump(space)
    if kind == "text":
        return kind, mutate_text(rng, text.encode())
    return kind, text.encode()


_DUMPER = getattr(yaml, "CSafeDumper", yaml.SafeDumper)


def _dump(space: Any) -> str:
    try:
        return yaml.dump(space, Dumper=_DUMPER, sort_keys=False, allow_unicode=True)
    except (yaml.YAMLError, RecursionError):
        return "stages: []\n"


def _exercise(path: Path, use_load_space: bool, rng: random.Random) -> None:
    import optuna

    from deepsqueeze.search.space import load_space, parse_space, read_space_file
    from deepsqueeze.search.trial import plain as _plain

    data = read_space_file(path)
    if use_load_space:
        space, _ = load_space(path)  # the file's model, through the file-reference door
    else:
        space = parse_space(data, layer_lister, source=str(path))
    space.fingerprint()
    directions = ["maximize" if o == "quality" else "minimize" for o in space.objectives]
    study = optuna.create_study(directions=directions, sampler=optuna.samplers.RandomSampler(seed=rng.randrange(99)))
    recipe = space.point(study.ask(), "zoo:lenet300", None)
    json.dumps(_plain(recipe.to_dict()))  # what the study stores for the trial
    try:
        grid = space.grid()
    except RecipeError:
        return  # a continuous hole: the grid sampler is refused, the others run
    sampler = optuna.samplers.GridSampler(grid, seed=0)
    grid_study = optuna.create_study(directions=directions, sampler=sampler)
    space.point(grid_study.ask(), "zoo:lenet300", None)


def run_campaign(cases: int, seed: int, tmp: Path, start: int = 0, progress: Any = None) -> dict[str, Any]:
    import optuna

    tmp = Path(tmp)
    os.environ.setdefault("DEEPSQUEEZE_CACHE", str(tmp / "cache"))  # nothing trained here: zoo@data is refused
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    canary = Canary(tmp / "canary")
    path = tmp / "space.yaml"
    for space in SPACES:  # warm-up: optuna, pydantic schemas, the registries
        path.write_text(yaml.safe_dump(space))
        _exercise(path, False, random.Random(0))
    campaign = Campaign(SURFACE, canary, (RecipeError, ModelError))
    campaign.warmed()
    for case in range(start, start + cases):
        if progress:
            progress(case)
        rng = case_rng(SURFACE, seed, case)
        kind, text = mutate(rng, canary)
        path.write_bytes(text)
        use_load_space = kind == "model" or rng.random() < 0.1
        campaign.case(case, kind, lambda: _exercise(path, use_load_space, rng))  # noqa: B023 - called at once
        if campaign.stop:
            break
    return campaign.result()


@pytest.mark.filterwarnings("ignore")
def test_fuzzed_spaces_fail_cleanly(tmp_path):
    result = run_campaign(CASES, SEED, tmp_path)
    print(json.dumps({k: v for k, v in result.items() if k != "failures"}))
    assert result["failures"] == [], result["failures"][:5]
    assert result["documented"].get("RecipeError", 0) > 0 and result["ok"] > 0
