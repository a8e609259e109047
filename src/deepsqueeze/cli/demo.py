"""``deepsqueeze demo``: the main job. Compress MiniLM and LeNet-5 with the best shipped recipes
and print a before/after table of size, speed and quality, all measured in this run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from deepsqueeze.cli._common import JsonOption, emit_json, rows_table, stderr, stdout

# (model, evaluation data, recipes): every shipped recipe listed runs, each compared with the fp32 model.
DEMO_JOBS: list[tuple[str, str, tuple[str, ...]]] = [
    ("minilm", "pydoc-sentences:eval", ("w4-gptq", "int8-smoothquant")),
    ("zoo:lenet5@{images}", "{images}", ("deep-compression-lenet5", "int8-static")),
]
QUICK_JOBS: list[tuple[str, str, tuple[str, ...]]] = [
    ("zoo:lenet300@digits", "digits", ("deep-compression",)),
]


def register(app: typer.Typer) -> None:
    @app.command()
    def demo(
        out_dir: Path = typer.Option(Path("demo-artifacts"), "--out-dir", help="Where the .dsq files go"),
        quick: bool = typer.Option(False, "--quick", help="Small job on the bundled digits data (seconds)"),
        as_json: bool = JsonOption,
    ) -> None:
        """Compress MiniLM and LeNet-5 and show size, speed and quality before and after."""
        rows = run_demo(out_dir, quick=quick, progress=not as_json)
        if as_json:
            emit_json({"rows": rows})
        else:
            stdout.print(rows_table("deepsqueeze demo: measured in this run", rows))


def run_demo(out_dir: Path, quick: bool = False, progress: bool = True) -> list[dict[str, Any]]:
    from deepsqueeze.data.fashion_mnist import fashion_mnist_dir
    from deepsqueeze.recipes.schema import find_recipe

    images = "fashion-mnist" if (fashion_mnist_dir() / "train-images-idx3-ubyte.gz").exists() else "digits"
    if images == "digits" and not quick:
        stderr.print("[yellow]fashion-mnist is not installed (Debian package dataset-fashion-mnist): "
                     "LeNet-5 runs on the bundled digits instead[/yellow]")
    _prepare_out_dir(out_dir)
    rows: list[dict[str, Any]] = []
    for model_ref, data_ref, recipe_names in QUICK_JOBS if quick else DEMO_JOBS:
        model_ref, data_ref = model_ref.format(images=images), data_ref.format(images=images)
        shipped = [name for name in recipe_names if find_recipe(name) is not None] or ["finetune"]
        if progress:
            stderr.print(f"[bold]{model_ref}[/bold] with {', '.join(shipped)} ...")
        rows += compare(model_ref, data_ref, shipped, out_dir, progress)
    return rows


def _prepare_out_dir(out_dir: Path) -> None:
    """Create ``out_dir`` and check a file can be written in it, before any work (ArtifactError otherwise)."""
    from deepsqueeze.codec.format import check_writable
    from deepsqueeze.errors import ArtifactError

    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ArtifactError(f"cannot create --out-dir {out_dir}: {exc.strerror or exc}; choose another folder"
                            ) from None
    check_writable(out_dir / "demo.dsq")


def compare(model_ref: str, data_ref: str, recipe_names: list[str], out_dir: Path,
            progress: bool) -> list[dict[str, Any]]:
    """Evaluate the fp32 model and each recipe's artifact, reloaded from disk, side by side."""
    from deepsqueeze.artifact import load
    from deepsqueeze.data import resolve_data
    from deepsqueeze.eval import evaluate
    from deepsqueeze.recipes import compress, load_recipe
    from deepsqueeze.resolve import resolve_model

    fp32 = resolve_model(model_ref, progress=progress)
    data = resolve_data(data_ref, split="eval")
    before = evaluate(fp32, data, fp32)
    quality_keys = [k for k in ("accuracy", "cosine_mean", "cosine_min", "neighbor_agreement_at_10") if k in before]

    def row(variant: str, res: dict[str, Any], size: int, compress_s: float | None) -> dict[str, Any]:
        return {
            "model": model_ref,
            "variant": variant,
            "size_mb": size / 1e6,
            "ratio": before["fp32_bytes"] / size,
            **{k: res[k] for k in quality_keys},
            "latency_ms": res["latency_ms_median"],
            "speedup": before["latency_ms_median"] / res["latency_ms_median"],
            "compress_s": compress_s,
        }

    rows = [row("fp32", before, before["fp32_bytes"], None)]
    for recipe_name in recipe_names:
        out = out_dir / f"{model_ref.replace(':', '-').replace('@', '-')}.{recipe_name}.dsq"
        result = compress(model_ref, load_recipe(recipe_name), out, progress=progress, evaluate_result=False)
        after = evaluate(load(out), data, fp32)
        rows.append(row(recipe_name, after, after["artifact_bytes"], round(result.compress_s, 1)))
    return rows
