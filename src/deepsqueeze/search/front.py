"""The answer of a study: the Pareto front of the measured trials, its hypervolume, the best point (or the
closest to the constraints), and the files that carry them: one replayable recipe per front point under
``front/``, ``best.yaml`` and ``summary.json``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from deepsqueeze.core.files import write_text_atomic
from deepsqueeze.errors import one_line
from deepsqueeze.search.space import SearchSpace
from deepsqueeze.search.storage import redact_url
from deepsqueeze.search.trial import is_repeat, objective_values, violations

DIRECTIONS = {"quality": "maximize", "bytes": "minimize", "latency": "minimize"}
UNITS = {"max_bytes": "B", "max_latency_ms": "ms", "max_drop": "pp"}


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
    all_failed: bool = False  # trials ran and every one failed: a problem to fix, not a study to continue


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
    front: list[list[float]] = []  # kept incrementally: O(trials x front), not a new front per trial
    volume, history = 0.0, []
    for attrs in trials:
        point = normalized_values(attrs, objectives, baseline)
        if not any(_dominates(q, point, directions) for q in front):  # a dominated point changes nothing
            front = [q for q in front if not _dominates(point, q, directions)] + [point]
            volume = hypervolume(front, corner, directions)
        history.append(volume)
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
                          sum(t.state == states.PRUNED and not is_repeat(t) for t in trials),
                          sum(t.state == states.FAIL for t in trials), sum(is_repeat(t) for t in trials),
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
    failures = [str(t.system_attrs.get("fail_reason", "")) for t in trials if t.state == states.FAIL]
    if not complete and failures:
        result.all_failed = True
        result.message = (f"all {len(failures)} trials failed, none measured; the first: "
                          f"{one_line(failures[0], 300) or 'no reason recorded'}")
    elif not complete:
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
        "study": study_name, "storage": redact_url(storage), "objectives": list(space.objectives),
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
