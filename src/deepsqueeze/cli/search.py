"""``deepsqueeze search --model REF --space SPACE.yaml --data D --out DIR``: find recipes under budgets."""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from deepsqueeze.cli._common import (
    DataOption,
    DeviceOption,
    JsonOption,
    ModelCodeOption,
    ModelOption,
    ThreadsOption,
    WeightsOption,
    emit_json,
    fmt,
    kv_table,
    rows_table,
    stderr,
    stdout,
    use_threads,
)


def register(app: typer.Typer) -> None:
    @app.command()
    def search(
        space: Path = typer.Option(..., "--space", help="YAML search space (a recipe with holes)"),
        out: Path = typer.Option(..., "--out", help="Folder for the study (study.db), the front's recipes, "
                                 "best.yaml and summary.json"),
        sampler: str = typer.Option(None, "--sampler", help="grid, random, tpe, cmaes, gp or nsga2 (default: the "
                                    "space's, else tpe)"),
        trials: int = typer.Option(None, "--trials", help="Finished trials the study should hold (default: the "
                                   "space's, else 20)"),
        storage: str = typer.Option(None, "--storage", help="Optuna storage shared by workers, e.g. "
                                    "postgresql://user@host:5432/db (default: sqlite under --out)"),
        study: str = typer.Option("search", "--study", help="Study name inside the storage"),
        pruner: str = typer.Option("median", "--pruner", help="median, halving or none (single-objective studies)"),
        max_bytes: int = typer.Option(None, "--max-bytes", help="Constraint: artifact bytes (overrides the space)"),
        max_latency_ms: float = typer.Option(None, "--max-latency-ms", help="Constraint: ms per batch"),
        model: str = ModelOption,
        weights: str = WeightsOption,
        model_code: str = ModelCodeOption,
        data: str = DataOption,
        device: str = DeviceOption,
        threads: int = ThreadsOption,
        max_drop: float = typer.Option(None, "--max-drop", help="Constraint: validation quality drop, in "
                                       "percentage points"),
        as_json: bool = JsonOption,
    ) -> None:
        """Search a space of recipes for the Pareto front of quality, bytes and latency (resumable)."""
        import os

        from deepsqueeze.errors import RecipeError
        from deepsqueeze.search import load_space, run_search
        from deepsqueeze.search.storage import prepare_out

        if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
            raise RecipeError("search does not run under torchrun: each process would train a different trial in "
                              "one process group; start the workers as separate commands sharing --storage "
                              "(or --out), and use torchrun for compress")
        use_threads(threads)
        prepare_out(out)
        parsed, resolved = load_space(space, model, weights=weights, model_code=model_code)
        for key, value in (("max_bytes", max_bytes), ("max_latency_ms", max_latency_ms), ("max_drop", max_drop)):
            if value is not None:
                if value < 0:
                    raise RecipeError(f"--{key.replace('_', '-')} must be >= 0, got {value}")
                parsed.constraints[key] = value
        try:
            result = run_search(parsed, resolved, out, data, sampler=sampler or parsed.sampler or "tpe",
                                trials=trials or parsed.trials or 20, storage=storage, study_name=study,
                                pruner=pruner, progress=not as_json,
                                log=None if as_json else lambda msg: stderr.print(msg), weights=weights,
                                model_code=model_code, device=device)
        except KeyboardInterrupt as exc:
            from deepsqueeze.core.signals import exit_code

            code = exit_code(exc)
            print(f"{'terminated' if code == 143 else 'interrupted'}: the answer so far is in {out}; run the same "
                  "command to resume the study", file=sys.stderr)
            raise SystemExit(code) from None
        if result.all_failed:
            from deepsqueeze.errors import DeepsqueezeError

            raise DeepsqueezeError(f"{result.message}; fix it and run the same command again (the study is in {out})")
        if as_json:
            emit_json({"study": result.study_name, "trials": result.trials, "complete": result.complete,
                       "pruned": result.pruned, "failed": result.failed, "repeats": result.repeats,
                       "baseline": result.baseline,
                       "front": result.front, "best": result.best, "feasible": result.feasible,
                       "message": result.message, "references": result.references})
            return
        stdout.print(kv_table("baseline (uncompressed, validation split)", result.baseline))
        rows = [{"trial": r["trial"], "quality": r["quality"], "drop_pp": r["drop_pp"], "bytes": r["bytes"],
                 "latency_ms": r["latency_ms"], "speedup": r["speedup"], "recipe": r["recipe_file"]}
                for r in result.front]
        repeats = f", {result.repeats} repeats of a measured recipe" if result.repeats else ""
        stdout.print(rows_table(f"Pareto front ({result.complete} complete, {result.pruned} pruned, "
                                f"{result.failed} failed trials{repeats})", rows))
        if result.best:
            stdout.print(f"best: {result.best['recipe_file']} (quality {fmt(result.best['quality'])}, "
                         f"{fmt(result.best['bytes'])} B)")
        stdout.print(result.message)
