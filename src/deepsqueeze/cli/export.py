"""``deepsqueeze export ARTIFACT --format onnx|hf --out PATH``: write a model for a deployment stack, verified."""

from __future__ import annotations

from pathlib import Path

import typer

from deepsqueeze.cli._common import (
    JsonOption,
    ModelCodeOption,
    emit_json,
    kv_table,
    rows_table,
    stdout,
    threads_option,
)
from deepsqueeze.core.files import OUT_RULE


def register(app: typer.Typer) -> None:
    @app.command()
    def export(
        model: str = typer.Argument(..., help="FILE.dsq (or any model reference)"),
        fmt: str = typer.Option(..., "--format", help="onnx (ONNX Runtime, integer operators) or hf (a Hugging "
                                "Face directory; sentence encoders also load with SentenceTransformer)"),
        out: Path = typer.Option(..., "--out", help="FILE.onnx for onnx, a new folder for hf; "
                            + OUT_RULE),
        data: str = typer.Option(None, "--data", help="inputs for the check against torch (images: default "
                                 "random of the model's shape; text: pydoc sentences)"),
        threads: int = threads_option("ONNX Runtime threads for the check"),
        force: bool = typer.Option(False, "--force", help="replace an existing --out that deepsqueeze exported "
                                   "(never a link, never a file or folder it did not write)"),
        model_code: str = ModelCodeOption,
        as_json: bool = JsonOption,
    ) -> None:
        """Export a model to ONNX or a Hugging Face directory; the written model is run and compared with the
        torch model before it is reported (above tolerance: nothing is written, exit 2)."""
        from deepsqueeze.data import resolve_data
        from deepsqueeze.errors import ArtifactError
        from deepsqueeze.export import FORMATS, check_out, sample_batch
        from deepsqueeze.export import export as run_export
        from deepsqueeze.recipes.run import shape_from_data
        from deepsqueeze.resolve import resolve_model

        if fmt not in FORMATS:
            raise ArtifactError(f"unknown --format {fmt!r}: use one of {', '.join(FORMATS)}")
        check_out(out, fmt, model, force)  # before the model is loaded
        m = resolve_model(model, progress=not as_json, model_code=model_code)
        dataset = resolve_data(data, split="eval") if data else None
        if dataset is not None:
            shape_from_data(m, dataset)
        result = run_export(m, fmt, out, sample=sample_batch(m, dataset), threads=threads, overwrite=force)
        summary = {"path": result.path, "format": result.format, "bytes": result.bytes,
                   "source_bytes": m.meta.get("artifact_bytes"), "check": result.check, "layers": result.layers}
        if as_json:
            emit_json(summary)
            return
        stdout.print(kv_table(f"exported {model} -> {result.path}", {**summary, **result.check}))
        if result.layers:
            stdout.print(rows_table("layers (what each representation became)", result.layers))
