"""``deepsqueeze compress --model REF --recipe FILE --out OUT.dsq``: run a recipe, write the artifact."""

from __future__ import annotations

from pathlib import Path

import typer

from deepsqueeze.cli._common import (
    DataOption,
    DeviceOption,
    JsonOption,
    ListingCommand,
    ModelCodeOption,
    ModelOption,
    ThreadsOption,
    WeightsOption,
    emit_json,
    kv_table,
    rows_table,
    stderr,
    stdout,
    use_threads,
)
from deepsqueeze.core.files import OUT_RULE


def register(app: typer.Typer) -> None:
    @app.command(cls=ListingCommand)
    def compress(
        recipe: Path = typer.Option(..., "--recipe", help="a shipped recipe name (see deepsqueeze recipes) or a YAML file"),
        out: Path = typer.Option(..., "--out", help="Artifact to write (.dsq); never the input model; "
                         + OUT_RULE),
        model: str = ModelOption,
        weights: str = WeightsOption,
        model_code: str = ModelCodeOption,
        data: str = DataOption,
        device: str = DeviceOption,
        threads: int = ThreadsOption,
        teacher: str = typer.Option(None, "--teacher", help="Teacher of the recipe's distill stages (a reference "
                                    "the recipe file names runs only when you name it here too)"),
        max_drop: float = typer.Option(None, "--max-drop", min=0, help="Quality budget, in the task's unit: "
                                       "accuracy pp (classifiers, default 1), 1 - cosine (encoders, 0.03), "
                                       "perplexity % (causal LMs, 10); overrides the recipe's max_drop. Over it, "
                                       "the best artifact is written and the exit code is 3"),
        report: bool = typer.Option(False, "--report", help="Measure and print bytes, ratio and quality after every stage"),
        stream: bool = typer.Option(False, "--stream", help="Quantize an hf:DIR model block by block from its "
                                    "safetensors shards (weight-only recipes; for models larger than memory)"),
        as_json: bool = JsonOption,
    ) -> None:
        """Compress a model with a recipe and write a .dsq artifact."""
        from deepsqueeze.recipes import compress as run_compress
        from deepsqueeze.recipes import load_recipe

        use_threads(threads)
        parsed = load_recipe(recipe)
        from deepsqueeze.train.distributed import is_main_process

        if stream:
            from deepsqueeze.recipes.stream import compress_streaming

            result = compress_streaming(model, parsed, out, data, progress=not as_json)
        else:
            result = run_compress(model, parsed, out, data, weights=weights, device=device, progress=not as_json,
                                  report=report, model_code=model_code, teacher=teacher, max_drop=max_drop)
        if not is_main_process():
            return
        summary = {
            "model": result.model.ref,
            "recipe": str(recipe),
            "out": result.artifact_path,
            "params": result.model.base_params,
            "fp32_bytes": 4 * result.model.base_params,
            "artifact_bytes": result.artifact_bytes,
            "compression_ratio": result.compression_ratio,
            "compress_s": round(result.compress_s, 2),
            **result.metrics,
        }
        budget = result.budget.to_dict() if result.budget is not None else None
        if as_json:
            emit_json({**summary, "budget": budget, "adapted": result.adapted, "budget_note": result.budget_note,
                       "attempts": result.attempts,
                       "stages": result.stage_reports,
                       "coverage": result.coverage})
            _over_budget(result, out)
            return
        stdout.print(kv_table(f"compressed {result.model.ref} -> {out}", summary))
        if result.coverage:
            stdout.print(rows_table("coverage (weight-bearing modules per stage)", result.coverage))
        if report:
            stdout.print(rows_table("stages", result.stage_reports))
        if result.budget_note:
            stderr.print(f"warning: {result.budget_note}", markup=False, highlight=False)
        if result.budget is not None and result.budget.within:
            stdout.print(f"quality budget met: {result.budget.message()}"
                         + (f" (adapted: {result.adapted})" if result.adapted else ""))
        _over_budget(result, out)


def _over_budget(result: object, out: Path) -> None:
    """Exit with ``EXIT_OVER_BUDGET`` and one line when the written artifact misses its quality budget."""
    import sys

    from deepsqueeze.recipes.budget import EXIT_OVER_BUDGET

    budget = getattr(result, "budget", None)
    if budget is None or budget.within:
        return
    adapted = f" even after {result.adapted}" if getattr(result, "adapted", None) else ""
    print(f"error: over the quality budget{adapted}: {budget.message()}; the best artifact found is in {out}: "
          "choose a milder recipe, or pass --max-drop to accept it", file=sys.stderr)
    raise SystemExit(EXIT_OVER_BUDGET)
