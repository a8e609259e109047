"""``deepsqueeze bench [NAME ...]``: run benchmarks side by side with peers, write BENCHMARKS.md."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from types import ModuleType

import typer

from deepsqueeze.cli._common import JsonOption, emit_json, rows_table, stdout, threads_option


def register(app: typer.Typer) -> None:
    @app.command()
    def bench(
        names: list[str] = typer.Argument(None, help="Benchmarks to run (default: all); see --list"),
        list_only: bool = typer.Option(False, "--list", help="List the benchmarks and exit"),
        quick: bool = typer.Option(False, "--quick", help="Tiny smoke run; writes nothing"),
        threads: int = threads_option("torch threads (stated in every row)"),
        device: str = typer.Option("cpu", "--device"),
        as_json: bool = JsonOption,
    ) -> None:
        """Run benchmarks and regenerate BENCHMARKS.md from their results."""
        from deepsqueeze.errors import DeepsqueezeError

        runner = benchmarks_runner()
        BenchContext, discover, run_benchmark = runner.BenchContext, runner.discover, runner.run_benchmark
        available = discover()
        if list_only:
            listing = {name: getattr(mod, "TITLE", "") for name, mod in available.items()}
            emit_json({"benchmarks": listing}) if as_json else [stdout.print(f"{k}: {v}") for k, v in listing.items()]
            return
        chosen = names or list(available)
        unknown = [n for n in chosen if n not in available]
        if unknown:
            raise DeepsqueezeError(f"unknown benchmark {unknown[0]!r}: choose from {', '.join(available)}")
        results = []
        from deepsqueeze.core.progress import stage

        for index, name in enumerate(chosen):
            with stage(index, len(chosen), name, enabled=not as_json, kind="benchmark"):
                result = run_benchmark(available[name], BenchContext(threads=threads, device=device, quick=quick))
            results.append(result)
            if not as_json:
                stdout.print(rows_table(f"{name}: {result['title']}", result["rows"]))
        if as_json:
            emit_json({"results": results})


def benchmarks_runner() -> ModuleType:
    """``benchmarks.runner`` of the source checkout deepsqueeze runs from (``src/deepsqueeze`` beside
    ``benchmarks/``). Benchmarks are not part of the installed package (a top-level ``benchmarks`` in
    site-packages would collide with other projects' packages); from a wheel install this raises
    ``DeepsqueezeError`` saying so."""
    import deepsqueeze
    from deepsqueeze.errors import DeepsqueezeError

    root = Path(deepsqueeze.__file__).resolve().parents[2]
    folder = root / "benchmarks"
    if not (folder / "runner.py").is_file():
        raise DeepsqueezeError("benchmarks need a source checkout (they are not installed with the package): "
                               "clone deepsqueeze, pip install -e . and run deepsqueeze bench there")
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    runner = importlib.import_module("benchmarks.runner")
    found = Path(runner.__file__ or "").resolve().parent
    if found != folder:
        raise DeepsqueezeError(f"another package named benchmarks ({found}) shadows {folder}: uninstall it or run "
                               "deepsqueeze bench from the checkout's folder")
    return runner
