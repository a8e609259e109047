"""Coverage: per weight-bearing module, what a stage did to it (or will do, for ``plan``), and totals.

A stage's coverage is computed from the outside: :func:`snapshot` lists the weight-bearing modules
(:mod:`deepsqueeze.core.kinds`) before the stage, :func:`diff_coverage` compares the tree after it
(a module replaced by another representation was compressed into it). Techniques register a
*planner* per stage type (:func:`register_planner`): the same table computed from the config and the
layer kinds the technique claims, without running anything expensive.

``on_unsupported`` (a recipe key) decides what happens to weight-bearing modules of kinds a stage
does not handle: ``warn`` (default: one ``DeepsqueezeWarning`` naming them), ``skip`` (recorded only)
or ``error`` (``UnsupportedLayerError`` before the stage runs). Modules of kinds a stage claims but
left alone (not reached by the calibration data, for instance) always warn; modules excluded by the
recipe, tied to one already handled, or blocked by the dependency graph are recorded without a warning.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from torch import nn

from deepsqueeze.core.kinds import weight_bearing_modules, weight_elements
from deepsqueeze.core.record import BLOCKED, EXCLUDED, TIED, UNSUPPORTED, CoverageEntry, get_record
from deepsqueeze.errors import DeepsqueezeWarning, RecipeError, UnsupportedLayerError

__all__ = [
    "ON_UNSUPPORTED",
    "ModuleSnapshot",
    "coverage_totals",
    "diff_coverage",
    "planner_for",
    "register_planner",
    "report_coverage",
    "snapshot",
]

ON_UNSUPPORTED = ("warn", "skip", "error")

Planner = Callable[[nn.Module, Any, Any], list[CoverageEntry]]
_PLANNERS: dict[str, Planner] = {}


def register_planner(stage_type: str) -> Callable[[Planner], Planner]:
    """Register ``planner(module, config, example) -> coverage entries`` for stages of ``stage_type``.

    ``example`` is one input batch or None. A planner must not calibrate, train or change ``module``;
    it may trace it once with ``example``.
    """

    def decorate(fn: Planner) -> Planner:
        _PLANNERS[stage_type] = fn
        return fn

    return decorate


def planner_for(stage_type: str) -> Planner | None:
    return _PLANNERS.get(stage_type)


@dataclass(frozen=True)
class ModuleSnapshot:
    name: str
    module: nn.Module
    kind: str | None
    weights: int  # shared tensors counted at their first module only
    tied_to: str | None  # first module holding the same weight tensor


def snapshot(root: nn.Module) -> list[ModuleSnapshot]:
    """The weight-bearing modules of ``root`` in tree order, with their weight counts and ties."""
    seen: set[int] = set()
    owner_of: dict[int, str] = {}
    out = []
    for name, module, kind in weight_bearing_modules(root):
        tied_to = None
        if kind is not None:
            for wname in kind.weights(module):
                path, _, attr = wname.rpartition(".")
                tensor = getattr(module.get_submodule(path) if path else module, attr, None)
                if tensor is not None and id(tensor) in owner_of and tied_to is None:
                    tied_to = owner_of[id(tensor)]
                elif tensor is not None:
                    owner_of.setdefault(id(tensor), name)
            count = weight_elements(module, seen)
        else:
            count = 0
            for p in module.parameters(recurse=False):
                if p.dim() >= 2 and id(p) not in seen:
                    seen.add(id(p))
                    count += p.numel()
        out.append(ModuleSnapshot(name, module, kind.name if kind else None, count, tied_to))
    return out


def _stage_index(root: nn.Module) -> int:
    return len(get_record(root).stages)


def diff_coverage(root: nn.Module, before: list[ModuleSnapshot], stage_type: str, claimed: Iterable[str],
                  reasons: Mapping[str, str] | None = None,
                  representations: tuple[type, ...] | None = None) -> list[CoverageEntry]:
    """Coverage of the stage that just ran on ``root``: compare each module of ``before`` with what now
    sits at its name. ``claimed`` are the kind names the stage handles; ``reasons`` gives the reason for
    modules the stage skipped on purpose (excluded by a pattern, too small, ...); ``representations``
    (default: any replacement) are the module classes that count as compressed."""
    claimed, reasons = set(claimed), dict(reasons or {})
    stage = _stage_index(root)
    entries = []
    replaced_parents: list[str] = []
    for snap in before:
        try:
            now = root.get_submodule(snap.name)
        except AttributeError:
            now = None  # removed by the stage (e.g. a pruned layer)
        if now is None and any(snap.name.startswith(p + ".") for p in replaced_parents):
            continue  # went with its replaced parent (e.g. a fake-quant layer's quantizer at convert)
        if now is not None and now is not snap.module:
            replaced_parents.append(snap.name)
        kind = snap.kind or f"other:{type(snap.module).__name__}"
        replaced = now is not snap.module and now is not None and not isinstance(now, nn.Identity)
        if replaced and (representations is None or isinstance(now, representations)):
            reason = f"{TIED}: {snap.tied_to}" if snap.tied_to else reasons.get(snap.name)
            entries.append(CoverageEntry(stage, stage_type, snap.name, kind, snap.weights, "compressed",
                                         type(now).__name__, reason))
        elif snap.name in reasons:
            entries.append(CoverageEntry(stage, stage_type, snap.name, kind, snap.weights, "skipped",
                                         None, reasons[snap.name]))
        elif snap.kind in claimed:
            entries.append(CoverageEntry(stage, stage_type, snap.name, kind, snap.weights, "skipped", None,
                                         "left float by the stage"))
        else:
            entries.append(CoverageEntry(stage, stage_type, snap.name, kind, snap.weights, "float", None,
                                         UNSUPPORTED))
    return entries


def check_unsupported(entries: list[CoverageEntry], on_unsupported: str) -> None:
    """Raise UnsupportedLayerError for unsupported modules when ``on_unsupported`` is ``error``."""
    if on_unsupported not in ON_UNSUPPORTED:
        raise RecipeError(f"on_unsupported must be one of {', '.join(ON_UNSUPPORTED)}, got {on_unsupported!r}")
    if on_unsupported != "error":
        return
    bad = [e for e in entries if e.action == "float" and e.weights > 0]
    if bad:
        raise UnsupportedLayerError(
            f"{bad[0].stage_type} does not handle {_names(bad)}: exclude them, or set on_unsupported: warn|skip")


def report_coverage(entries: list[CoverageEntry], on_unsupported: str = "warn") -> None:
    """Warn (``DeepsqueezeWarning``, naming the modules) about what a stage left untouched."""
    check_unsupported(entries, on_unsupported)
    left = [e for e in entries if e.action == "skipped" and e.weights > 0
            and not (e.reason or "").startswith((EXCLUDED, TIED, BLOCKED))]
    if left:
        warnings.warn(f"{left[0].stage_type} left {_names(left)} float ({left[0].reason})", DeepsqueezeWarning,
                      stacklevel=3)
    unsupported = [e for e in entries if e.action == "float" and e.weights > 0]
    if unsupported and on_unsupported == "warn":
        warnings.warn(f"{unsupported[0].stage_type} does not handle {_names(unsupported)}: left float "
                      "(set on_unsupported: skip to silence, error to refuse)", DeepsqueezeWarning, stacklevel=3)


def _names(entries: list[CoverageEntry]) -> str:
    shown = ", ".join(f"{e.module} ({e.kind})" for e in entries[:5])
    return shown + (f" and {len(entries) - 5} more" if len(entries) > 5 else "")


def coverage_totals(entries: Iterable[CoverageEntry]) -> list[dict[str, Any]]:
    """One row per stage: modules and weights compressed, skipped, left float, and the covered share."""
    rows: dict[int, dict[str, Any]] = {}
    for e in entries:
        row = rows.setdefault(e.stage, {"stage": e.stage, "type": e.stage_type, "modules": 0, "compressed": 0,
                                        "skipped": 0, "float": 0, "weights": 0, "weights_covered": 0})
        row["modules"] += 1
        row[e.action] += 1
        row["weights"] += e.weights
        if e.action == "compressed":
            row["weights_covered"] += e.weights
    for row in rows.values():
        row["covered_pct"] = round(100.0 * row["weights_covered"] / row["weights"], 2) if row["weights"] else 100.0
    return [rows[k] for k in sorted(rows)]
