"""``deepsqueeze compress --model REF --recipe FILE --out OUT.dsq``: run a recipe, write the artifact."""

from __future__ import annotations

from pathlib import Path

import typer

from deepsqueeze.cli._common import (
    DeviceOption,
    JsonOption,
    ListingCommand,
    ModelCodeOption,
    emit_json,
    kv_table,
    rows_table,
    stdout,
)


def register(app: typer.Typer) -> None:
    @app.command(cls=ListingCommand)
    def compress(
        recipe: Path = typer.Option(..., "--recipe", help="a shipped recipe name (see deepsqueeze recipes) or a YAML file"),
        out: Path = typer.Option(..., "--out", help="Artifact to write (.dsq); never the input model"),
        model: str = typer.Option(None, "--model", help="Model reference (overrides the recipe's model)"),
        data: str = typer.Option(None, "--data", help="Training/calibration data (overrides the recipe's data)"),
        weights: str = typer.Option(None, "--weights", help="safetensors weights for py: models"),
        report: bool = typer.Option(False, "--report", help="Measure and print bytes, ratio and quality after every stage"),
        stream: bool = typer.Option(False, "--stream", help="Quantize an hf:DIR model block by block from its "
                                    "safetensors shards (weight-only recipes; for models larger than memory)"),
        device: str = DeviceOption,
        model_code: str = ModelCodeOption,
        as_json: bool = JsonOption,
    ) -> None:
        """Compress a model with a recipe and write a .dsq artifact."""
        from deepsqueeze.recipes import compress as run_compress
        from deepsqueeze.recipes import load_recipe

        parsed = load_recipe(recipe)
        from deepsqueeze.train.distributed import is_main_process

        if stream:
            from deepsqueeze.recipes.stream import compress_streaming

            result = compress_streaming(model, parsed, out, data, progress=not as_json)
        else:
            result = run_compress(model, parsed, out, data, weights=weights, device=device, progress=not as_json,
                                  report=report, model_code=model_code)
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
        if as_json:
            emit_json({**summary, "stages": result.stage_reports, "coverage": result.coverage})
            return
        stdout.print(kv_table(f"compressed {result.model.ref} -> {out}", summary))
        if result.coverage:
            stdout.print(rows_table("coverage (weight-bearing modules per stage)", result.coverage))
        if report:
            stdout.print(rows_table("stages", result.stage_reports))
