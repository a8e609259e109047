"""``deepsqueeze report SOURCE --out REPORT.html``: one self-contained HTML page for a study or an artifact."""

from __future__ import annotations

from pathlib import Path

import typer

from deepsqueeze.cli._common import (
    DataOption,
    DeviceOption,
    ModelCodeOption,
    ModelOption,
    ThreadsOption,
    WeightsOption,
    model_ref,
    stdout,
    use_threads,
)
from deepsqueeze.core.files import OUT_RULE


def register(app: typer.Typer) -> None:
    @app.command()
    def report(
        source: str = typer.Argument(None, metavar="[SOURCE]", help="A deepsqueeze search --out folder, or an "
                                     "artifact FILE.dsq (or --model FILE.dsq)"),
        out: Path = typer.Option(..., "--out", help="HTML file to write (plots embedded, opens offline); "
                                 + OUT_RULE),
        storage: str = typer.Option(None, "--storage", help="Study storage when it is not the folder's SQLite"),
        study: str = typer.Option("search", "--study", help="Study name inside the storage"),
        model: str = ModelOption,
        weights: str = WeightsOption,
        model_code: str = ModelCodeOption,
        data: str = DataOption,
        device: str = DeviceOption,
        threads: int = ThreadsOption,
    ) -> None:
        """Write a report: Pareto front, hypervolume and parameter importance of a study, or per-layer bytes,
        representation, output error, stages and coverage of an artifact."""
        from deepsqueeze.codec.format import atomic_write
        from deepsqueeze.errors import ArtifactError, RecipeError

        source = Path(model_ref(source, model))
        use_threads(threads)
        if out.suffix.lower() != ".html":
            raise RecipeError(f"--out must name an .html file, got {out.name}")
        if out.exists() and out.resolve() == source.resolve():
            raise ArtifactError(f"refusing to overwrite the input {source}: choose another --out path")
        if not out.parent.exists():
            raise ArtifactError(f"cannot write {out}: folder {out.parent} does not exist")
        from deepsqueeze.core.files import check_output
        from deepsqueeze.report.html import is_report

        out = check_output(out, is_report, "report")
        if source.is_dir() or storage:
            from deepsqueeze.report import study_report

            text = study_report(source, storage, study)
        elif source.suffix == ".dsq" or source.is_file():
            from deepsqueeze.report import artifact_report

            text = artifact_report(source, data, model_code=model_code, weights=weights, device=device)
        else:
            raise RecipeError(f"{source} does not exist: pass a search --out folder or a .dsq artifact")
        payload = text.encode("utf-8")
        atomic_write(out, lambda fh: fh.write(payload))
        stdout.print(f"wrote {out} ({len(payload):,} bytes)")
