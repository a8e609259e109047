"""``deepsqueeze plan --model REF --recipe R``: what each stage will do to each layer, before any work."""

from __future__ import annotations

from pathlib import Path

import typer

from deepsqueeze.cli._common import JsonOption, emit_json, kv_table, rows_table, stdout


def register(app: typer.Typer) -> None:
    @app.command()
    def plan(
        recipe: Path = typer.Option(..., "--recipe", help="YAML recipe (or a shipped recipe's name)"),
        model: str = typer.Option(None, "--model", help="Model reference (overrides the recipe's model)"),
        data: str = typer.Option(None, "--data", help="Data the model takes (as for compress): a py: model "
                                 "without an input_shape attribute takes its input shape from it"),
        weights: str = typer.Option(None, "--weights", help="safetensors weights for py: models"),
        modules: bool = typer.Option(True, "--modules/--totals", help="Print the per-module table too"),
        as_json: bool = JsonOption,
    ) -> None:
        """Print the coverage table of a recipe on a model (no calibration, no training, no file written)."""
        from deepsqueeze.recipes import load_recipe
        from deepsqueeze.recipes.plan import plan as make_plan

        result = make_plan(model, load_recipe(recipe), weights=weights, data_ref=data)
        if as_json:
            emit_json(result.to_dict())
            return
        stdout.print(kv_table("plan", {"model": result.model, "recipe": str(recipe), "params": result.params,
                                       "fp32_bytes": result.fp32_bytes}))
        stdout.print(rows_table("stages (weights = weight elements of weight-bearing modules)", result.stages))
        if modules and result.modules:
            stdout.print(rows_table("modules", [e.to_dict() for e in result.modules]))
