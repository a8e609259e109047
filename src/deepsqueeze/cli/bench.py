"""``deepsqueeze bench [NAME ...]``: run benchmarks side by side with peers, write BENCHMARKS.md."""

from __future__ import annotations

import typer

from deepsqueeze.cli._common import JsonOption, emit_json, rows_table, stdout


def register(app: typer.Typer) -> None:
    @app.command()
    def bench(
        names: list[str] = typer.Argument(None, help="Benchmarks to run (default: all); see --list"),
        list_only: bool = typer.Option(False, "--list", help="List the benchmarks and exit"),
        quick: bool = typer.Option(False, "--quick", help="Tiny smoke run; writes nothing"),
        threads: int = typer.Option(2, "--threads", help="torch threads (stated in every row)"),
        device: str = typer.Option("cpu", "--device"),
        as_json: bool = JsonOption,
    ) -> None:
        """Run benchmarks and regenerate BENCHMARKS.md from their results."""
        try:
            from benchmarks.runner import BenchContext, discover, run_benchmark
        except ImportError:
            from deepsqueeze.errors import DeepsqueezeError

            raise DeepsqueezeError("benchmarks/ is not importable: run deepsqueeze bench from a source checkout") from None
        from deepsqueeze.errors import DeepsqueezeError

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
        for name in chosen:
            result = run_benchmark(available[name], BenchContext(threads=threads, device=device, quick=quick))
            results.append(result)
            if not as_json:
                stdout.print(rows_table(f"{name}: {result['title']}", result["rows"]))
        if as_json:
            emit_json({"results": results})
