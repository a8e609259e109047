"""``deepsqueeze export ARTIFACT --format onnx|hf|gguf|pte --out PATH``: write a model for a deployment stack, verified."""

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
    model_ref,
    rows_table,
    stdout,
    use_threads,
)
from deepsqueeze.core.files import OUT_RULE


def register(app: typer.Typer) -> None:
    @app.command()
    def export(
        model_arg: str = typer.Argument(None, metavar="[MODEL]", help="FILE.dsq or any model reference (or --model)"),
        fmt: str = typer.Option(..., "--format", help="onnx (ONNX Runtime, integer operators), hf (a Hugging "
                                "Face directory; sentence encoders also load with SentenceTransformer), gguf (a "
                                "causal LM for llama.cpp, codes on its block types) or pte (an ExecuTorch program, "
                                "XNNPACK delegate)"),
        out: Path = typer.Option(..., "--out", help="FILE.onnx, FILE.gguf or FILE.pte for those formats, a new folder for hf; "
                            + OUT_RULE),
        force: bool = typer.Option(False, "--force", help="replace an existing --out that deepsqueeze exported "
                                   "(never a link, never a file or folder it did not write)"),
        model: str = ModelOption,
        weights: str = WeightsOption,
        model_code: str = ModelCodeOption,
        data: str = DataOption,
        device: str = DeviceOption,
        threads: int = ThreadsOption,
        as_json: bool = JsonOption,
    ) -> None:
        """Export a model to ONNX, a Hugging Face directory, GGUF or ExecuTorch; the written model is run and compared with the
        torch model before it is reported (above tolerance: nothing is written, exit 2)."""
        from deepsqueeze.data import resolve_data
        from deepsqueeze.errors import ArtifactError
        from deepsqueeze.export import FORMATS, check_out, sample_batch
        from deepsqueeze.export import export as run_export
        from deepsqueeze.recipes.run import fit_to_data
        from deepsqueeze.resolve import resolve_model

        model = model_ref(model_arg, model)
        threads = use_threads(threads)
        if fmt not in FORMATS:
            raise ArtifactError(f"unknown --format {fmt!r}: use one of {', '.join(FORMATS)}")
        check_out(out, fmt, model, force)  # before the model is loaded
        m = resolve_model(model, weights=weights, progress=not as_json, model_code=model_code, device=device)
        dataset = resolve_data(data, split="eval") if data else None
        if dataset is not None:
            fit_to_data(m, dataset, device)
        result = run_export(m, fmt, out, sample=sample_batch(m, dataset), threads=threads, overwrite=force)
        summary = {"path": result.path, "format": result.format, "bytes": result.bytes,
                   "source_bytes": m.meta.get("artifact_bytes"), "check": result.check, "layers": result.layers}
        if as_json:
            emit_json(summary)
            return
        stdout.print(kv_table(f"exported {model} -> {result.path}", {**summary, **result.check}))
        if result.layers:
            stdout.print(rows_table("layers (what each representation became)", result.layers))
