"""``deepsqueeze plan --model REF --recipe R``: what each stage will do to each layer, before any work."""

from __future__ import annotations

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
    kv_table,
    rows_table,
    stdout,
    use_threads,
)


def register(app: typer.Typer) -> None:
    @app.command()
    def plan(
        recipe: Path = typer.Option(..., "--recipe", help="YAML recipe (or a shipped recipe's name)"),
        model: str = ModelOption,
        weights: str = WeightsOption,
        model_code: str = ModelCodeOption,
        data: str = DataOption,
        device: str = DeviceOption,
        threads: int = ThreadsOption,
        modules: bool = typer.Option(True, "--modules/--totals", help="Print the per-module table too"),
        as_json: bool = JsonOption,
    ) -> None:
        """Print the coverage table of a recipe on a model (no calibration, no training, no file written)."""
        from deepsqueeze.recipes import load_recipe
        from deepsqueeze.recipes.plan import plan as make_plan

        use_threads(threads)
        result = make_plan(model, load_recipe(recipe), weights=weights, data_ref=data, model_code=model_code,
                           device=device)
        if as_json:
            emit_json(result.to_dict())
            return
        stdout.print(kv_table("plan", {"model": result.model, "recipe": str(recipe), "params": result.params,
                                       "fp32_bytes": result.fp32_bytes}))
        stdout.print(rows_table("stages (weights = weight elements of weight-bearing modules)", result.stages))
        if modules and result.modules:
            stdout.print(rows_table("modules", [e.to_dict() for e in result.modules]))
