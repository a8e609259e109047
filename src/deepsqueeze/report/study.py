"""The report of a search study: Pareto front (the points written as front/*.yaml marked), hypervolume per trial, parameter
importance (fANOVA, Hutter et al. 2014, as Optuna computes it), the answer and the front's recipes."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import quote

import pydantic

from deepsqueeze.core.jsonfile import read_json
from deepsqueeze.errors import RecipeError, one_line
from deepsqueeze.report.html import Page

MAX_SUMMARY_BYTES = 16 << 20


Num = Annotated[float, pydantic.Strict(), pydantic.Field(allow_inf_nan=False)]
Int = Annotated[int, pydantic.Strict(), pydantic.Field(ge=0, le=1 << 48)]
Text = Annotated[str, pydantic.Strict(), pydantic.Field(max_length=4096)]
Objectives = Annotated[list[Literal["quality", "bytes", "latency"]], pydantic.Field(min_length=1, max_length=3)]
_Open = pydantic.ConfigDict(extra="allow")


class _Baseline(pydantic.BaseModel):
    model_config = _Open
    quality: Num
    bytes: Num
    latency_ms: Num
    quality_key: Text = "quality"


class _Row(pydantic.BaseModel):
    model_config = _Open
    trial: Int
    recipe_file: Text | None = None
    quality: Num | None = None
    drop_pp: Num | None = None
    bytes: Num | None = None
    latency_ms: Num | None = None
    speedup: Num | None = None


class _Best(pydantic.BaseModel):
    model_config = _Open
    trial: Int


class _Summary(pydantic.BaseModel):
    model_config = _Open
    objectives: Objectives | None = None
    baseline: _Baseline | None = None
    front: Annotated[list[_Row], pydantic.Field(max_length=100_000)] = []
    best: _Best | None = None
    message: Text | None = None
    feasible: bool = False


class _Reference(pydantic.BaseModel):
    model_config = _Open
    recipe: Text
    quality: Num
    drop_pp: Num
    bytes: Num
    latency_ms: Num


class _StudyAttrs(pydantic.BaseModel):
    model_config = _Open
    objectives: Objectives | None = None
    baseline: _Baseline | None = None
    references: Annotated[list[_Reference | dict[str, Any]], pydantic.Field(max_length=1000)] = []
    model: Text | None = None


class _TrialAttrs(pydantic.BaseModel):
    model_config = _Open
    quality: Num
    bytes: Num
    latency_ms: Num


def _checked(schema: type[pydantic.BaseModel], value: Any, where: str) -> Any:
    try:
        return schema.model_validate(value)
    except pydantic.ValidationError as exc:
        err = exc.errors(include_url=False)[0]
        field = ".".join(str(p) for p in err["loc"]) or "(top level)"
        raise RecipeError(f"{where} is not a deepsqueeze study's (field {field}: {one_line(err['msg'], 120)}): the "
                          "folder was edited or comes from another tool; run deepsqueeze search again") from None


def _read_only_sqlite(db: Path) -> str:
    """The SQLAlchemy URL opening ``db`` read-only, once it is known to hold Optuna's tables."""
    import sqlite3

    try:
        con = sqlite3.connect(f"file:{quote(str(db.resolve()))}?mode=ro", uri=True)
        try:
            tables = {row[0] for row in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        finally:
            con.close()
    except (sqlite3.Error, ValueError) as exc:  # ValueError: a damaged name that is not UTF-8 (UnicodeDecodeError)
        raise RecipeError(f"{db} is not a readable SQLite study ({one_line(exc, 120)}): pass the --out folder of "
                          "deepsqueeze search") from None
    if not {"studies", "trials", "study_user_attributes"} <= tables:
        raise RecipeError(f"{db} holds no Optuna study: pass the --out folder of deepsqueeze search")
    return f"sqlite:///file:{quote(str(db.resolve()))}?mode=ro&uri=true"


def load_study(folder: str | Path, storage: str | None = None, study_name: str = "search") -> tuple[Any, dict]:
    """The Optuna study of a ``deepsqueeze search --out`` folder (or of ``storage``) and its summary.json,
    read only (an SQLite study is opened read-only) and validated: a tampered folder is one ``RecipeError``."""
    import optuna

    from deepsqueeze.search.storage import own_trial_reports, redact_url

    root = Path(folder)
    summary_path = root / "summary.json"
    summary: dict[str, Any] = {}
    if summary_path.exists():
        try:
            raw = read_json(summary_path, max_bytes=MAX_SUMMARY_BYTES)
        except (OSError, ValueError) as exc:
            raise RecipeError(f"{summary_path} is not a deepsqueeze study summary ({one_line(exc, 120)}): run "
                              "deepsqueeze search again to rewrite it") from None
        summary = _checked(_Summary, raw, str(summary_path)).model_dump(exclude_none=True)
    if storage is None:
        if not (root / "study.db").is_file():
            raise RecipeError(f"{root} holds no study.db: pass the --out folder of deepsqueeze search (or --storage)")
        url = _read_only_sqlite(root / "study.db")
    else:
        url = storage
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg://" + url.removeprefix("postgresql://")
    own_trial_reports()
    try:
        study = optuna.load_study(study_name=study_name, storage=url)
    except KeyError:
        raise RecipeError(f"no study named {study_name!r} in {redact_url(url)}: pass --study NAME") from None
    except Exception as exc:  # sqlalchemy / optuna errors: connection refused, auth failure, read-only schema
        raise RecipeError(f"cannot open the study storage: {type(exc).__name__}: {one_line(exc, 200)}") from None
    # Optuna decodes rows lazily (attributes, trial states, parameter distributions, values): read everything the
    # report reads now, so a tampered row is one RecipeError here, not a JSONDecodeError, LookupError, IndexError
    # or RecursionError from deep inside Optuna or SQLAlchemy later.
    attrs = read_storage(lambda: (study.user_attrs, study.directions, study.get_trials(deepcopy=False)),
                         f"study {study_name!r}")[0]
    _checked(_StudyAttrs, attrs, f"study {study_name!r}")
    return study, summary


def read_storage(read: Any, where: str) -> Any:
    """``read()`` of an Optuna study's storage; anything it raises (a row Optuna cannot decode) is a RecipeError."""
    try:
        return read()
    except RecipeError:
        raise
    except Exception as exc:  # noqa: BLE001 - whatever a tampered row makes Optuna or SQLAlchemy raise
        raise RecipeError(f"{where} holds rows Optuna cannot read ({type(exc).__name__}: {one_line(exc, 120)}): the "
                          "folder was edited or comes from another tool; run deepsqueeze search again") from None


def study_report(folder: str | Path, storage: str | None = None, study_name: str = "search") -> str:
    """The HTML page for one study."""
    import optuna
    import plotly.graph_objects as go

    from deepsqueeze.search.front import DIRECTIONS, hypervolume_history, pareto_front

    study, summary = load_study(folder, storage, study_name)
    attrs = read_storage(lambda: study.user_attrs, f"study {study_name!r}")
    objectives = list(attrs.get("objectives") or summary.get("objectives") or ["quality", "bytes"])
    baseline = attrs.get("baseline") or summary.get("baseline") or {}
    complete = [t for t in read_storage(lambda: study.get_trials(
        deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)), f"study {study_name!r}") if "quality" in t.user_attrs]
    total = len(read_storage(lambda: study.get_trials(deepcopy=False), f"study {study_name!r}"))
    for t in complete:
        _checked(_TrialAttrs, t.user_attrs, f"trial {t.number} of study {study_name!r}")
    page = Page(f"deepsqueeze search: {attrs.get('model', '?')}",
                f"study {study_name}: {total} trials ({len(complete)} complete); objectives "
                f"{', '.join(objectives)}; constraints {attrs.get('constraints') or 'none'}; validation on "
                f"{baseline.get('validation', '?')} ({baseline.get('validation_samples', '?')} samples); latency "
                f"batch {baseline.get('latency_batch', '?')}, {baseline.get('threads', '?')} threads")
    if summary.get("message"):
        page.note(summary["message"], warn=not summary.get("feasible", False))
    if not complete:
        page.note("no trial has completed yet", warn=True)
        return page.render()
    quality_key = baseline.get("quality_key", "quality")
    directions = [DIRECTIONS[o] for o in objectives]
    values = [(t.number, [t.user_attrs[{"quality": "quality", "bytes": "bytes", "latency": "latency_ms"}[o]]
                          for o in objectives]) for t in complete]
    front = set(pareto_front(values, directions))
    shipped = {row["trial"]: row.get("recipe_file") for row in summary.get("front", [])}
    best = (summary.get("best") or {}).get("trial")
    references = [r for r in attrs.get("references", []) if isinstance(r, dict) and "quality" in r]
    for r in references:
        _checked(_Reference, r, f"a compare reference of study {study_name!r}")

    page.heading("Pareto front")
    axes = [("bytes", "artifact bytes (.dsq file)")]
    if "latency" in objectives:
        axes.append(("latency_ms", f"latency ms (batch {baseline.get('latency_batch')})"))
    for key, label in axes:
        fig = go.Figure()
        others = [t for t in complete if t.number not in front]
        fig.add_trace(go.Scatter(x=[t.user_attrs[key] for t in others], y=[t.user_attrs["quality"] for t in others],
                                 mode="markers", name="dominated trials", marker={"color": "#b8c0cc", "size": 7},
                                 text=[f"trial {t.number}" for t in others]))
        on_front = sorted((t for t in complete if t.number in front), key=lambda t: t.user_attrs[key])
        fig.add_trace(go.Scatter(x=[t.user_attrs[key] for t in on_front],
                                 y=[t.user_attrs["quality"] for t in on_front], mode="lines+markers" if len(objectives) == 2 else "markers",
                                 name="Pareto front" if len(objectives) == 2 else "Pareto front (3 objectives)", marker={"color": "#2f6fd0", "size": 9},
                                 line={"shape": "hv", "width": 1},
                                 text=[f"trial {t.number}" for t in on_front]))
        marked = [t for t in complete if t.number in shipped]
        fig.add_trace(go.Scatter(x=[t.user_attrs[key] for t in marked], y=[t.user_attrs["quality"] for t in marked],
                                 mode="markers", name="front points written as recipes (front/*.yaml)",
                                 marker={"symbol": "circle-open", "size": 16, "color": "#2f6fd0",
                                         "line": {"width": 2}},
                                 text=[Path(shipped[t.number] or "").name for t in marked]))
        if best is not None:
            b = next((t for t in complete if t.number == best), None)
            if b is not None:
                fig.add_trace(go.Scatter(x=[b.user_attrs[key]], y=[b.user_attrs["quality"]], mode="markers",
                                         name="best.yaml", marker={"symbol": "star", "size": 18,
                                                                   "color": "#e0a020"}))
        if references:
            fig.add_trace(go.Scatter(x=[r[key] for r in references], y=[r["quality"] for r in references],
                                     mode="markers+text", name="shipped recipes (compare)",
                                     text=[r["recipe"] for r in references], textposition="top center",
                                     marker={"symbol": "diamond", "size": 12, "color": "#d0504a"}))
        if baseline:
            base_x = baseline["bytes"] if key == "bytes" else baseline["latency_ms"]
            fig.add_trace(go.Scatter(x=[base_x], y=[baseline["quality"]], mode="markers", name="uncompressed",
                                     marker={"symbol": "x", "size": 12, "color": "#333"}))
        fig.update_layout(title=f"validation {quality_key} vs {label}", xaxis_title=label,
                          yaxis_title=f"validation {quality_key}", height=460)
        if key == "bytes":
            fig.update_xaxes(type="log")
        page.figure(fig, f"pareto-{key}")

    page.heading("Hypervolume per trial")
    ordered = sorted(complete, key=lambda t: t.number)
    history = hypervolume_history([t.user_attrs for t in ordered], objectives, baseline)
    fig = go.Figure(go.Scatter(x=[t.number for t in ordered], y=history, mode="lines+markers", name="hypervolume"))
    fig.update_layout(title="hypervolume of the front after each trial (quality, bytes / fp32 bytes, latency / "
                      "baseline; reference 0, 1, 2)", xaxis_title="trial", yaxis_title="hypervolume", height=380)
    page.figure(fig, "hypervolume")

    page.heading("Parameter importance")
    importance = _importance(study, complete)
    if importance:
        names = list(importance)[:20][::-1]
        fig = go.Figure(go.Bar(x=[importance[n] for n in names], y=names, orientation="h"))
        fig.update_layout(title=f"importance for validation {quality_key} (fANOVA)", height=120 + 24 * len(names),
                          xaxis_title="importance")
        page.figure(fig, "importance")
    else:
        page.text("needs at least two complete trials whose parameters differ")

    page.heading("Front (each point is a recipe under front/)")
    page.table([{"trial": r["trial"], quality_key: r.get("quality"), "drop_pp": r.get("drop_pp"),
                 "bytes": r.get("bytes"), "latency_ms": r.get("latency_ms"), "speedup": r.get("speedup"),
                 "recipe": Path(r.get("recipe_file") or "").name} for r in summary.get("front", [])],
               left=("recipe",))
    if references:
        page.heading("Shipped recipes measured the same way")
        page.table([{"recipe": r["recipe"], quality_key: r["quality"], "drop_pp": r["drop_pp"], "bytes": r["bytes"],
                     "latency_ms": r["latency_ms"]} for r in references], left=("recipe",))
    page.heading("Baseline (uncompressed)")
    page.table([baseline])
    return page.render()


def _importance(study: Any, complete: list[Any]) -> dict[str, float]:
    import optuna

    if len(complete) < 2:
        return {}
    try:
        evaluator = optuna.importance.FanovaImportanceEvaluator(seed=0)
        return optuna.importance.get_param_importances(study, evaluator=evaluator,
                                                       target=lambda t: t.user_attrs["quality"])
    except Exception:  # noqa: BLE001 - optional: a tampered distribution or value costs the chart, not the page
        return {}
