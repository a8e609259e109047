"""``deepsqueeze demo``: the main job. Compress MiniLM and LeNet-5 with shipped recipes of every technique
family and print a before/after table of size, speed and quality, all measured in this run.

The default run takes a few minutes on a quiet 2-core machine: LeNet-5 comes from the cache when it was
trained on Fashion-MNIST before (``deepsqueeze train zoo:lenet5 --data fashion-mnist``), else it is trained
on the bundled digits in seconds; ``--full`` runs the long recipes (GPTQ, distillation, Fashion-MNIST).
"""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import typer

from deepsqueeze.cli._common import JsonOption, emit_json, stderr, stdout

Job = tuple[str, str, tuple[str, ...], int]

# (model, evaluation data, recipes, latency batch): every recipe listed runs, each compared with the fp32
# model. LeNet-5 is timed on 256 images: at 64 an 8x8 digit batch takes about a millisecond, call overhead.
DEFAULT_JOBS: list[Job] = [
    ("minilm", "pydoc-sentences:eval", ("int8-dynamic", "w4-rtn"), 64),  # quantization
    # pruning + weight sharing + entropy coding, static int8, low-rank, distillation
    ("zoo:lenet5@{images}", "{images}", ("deep-compression-lenet5", "int8-static", "lowrank-tucker",
                                         "distill-lenet300"), 256),
]
FULL_JOBS: list[Job] = [
    ("minilm", "pydoc-sentences:eval", ("w4-gptq", "int8-smoothquant", "distill-3layer"), 64),
    ("zoo:lenet5@{images}", "{images}", ("deep-compression-lenet5", "int8-static", "lowrank-tucker",
                                         "distill-lenet300"), 256),
]
QUICK_JOBS: list[Job] = [
    ("zoo:lenet300@digits", "digits", ("deep-compression-lenet300",), 256),
]


def register(app: typer.Typer) -> None:
    @app.command()
    def demo(
        out_dir: Path = typer.Option(Path("demo-artifacts"), "--out-dir", help="Where the .dsq files go"),
        quick: bool = typer.Option(False, "--quick", help="One small job on the bundled digits data (seconds)"),
        full: bool = typer.Option(False, "--full", help="Also GPTQ and distillation of MiniLM, and LeNet-5 on "
                                  "Fashion-MNIST (trained first if not cached; tens of minutes)"),
        as_json: bool = JsonOption,
    ) -> None:
        """Compress MiniLM and LeNet-5 and show size, speed and quality before and after (a few minutes)."""
        rows = run_demo(out_dir, quick=quick, full=full, progress=not as_json)
        if as_json:
            emit_json({"rows": rows})
        else:
            stdout.print(demo_table(rows))
            for line in demo_notes(rows):
                stdout.print(line, markup=False, highlight=False)


def choose_images(full: bool, quick: bool) -> str:
    """fashion-mnist for --full (when installed) or when LeNet-5 is already cached on it; else digits."""
    from deepsqueeze.data.fashion_mnist import fashion_mnist_dir
    from deepsqueeze.zoo.pretrained import checkpoint_path

    installed = (fashion_mnist_dir() / "train-images-idx3-ubyte.gz").exists()
    if installed and (full or checkpoint_path("lenet5", "fashion-mnist").exists()):
        return "fashion-mnist"
    if full and not quick:
        stderr.print("[yellow]fashion-mnist is not installed (Debian package dataset-fashion-mnist): "
                     "LeNet-5 runs on the bundled digits instead[/yellow]")
    return "digits"


def run_demo(out_dir: Path, quick: bool = False, progress: bool = True, full: bool = False) -> list[dict[str, Any]]:
    from deepsqueeze.core.progress import keep_talking, log
    from deepsqueeze.recipes.schema import find_recipe

    images = choose_images(full, quick)
    if images == "digits" and not (quick or full) and progress:
        log("LeNet-5 trains on the bundled digits (seconds); train it once on Fashion-MNIST "
            "(deepsqueeze train zoo:lenet5 --data fashion-mnist) or pass --full to see it there")
    jobs = QUICK_JOBS if quick else FULL_JOBS if full else DEFAULT_JOBS
    _prepare_out_dir(out_dir)
    rows: list[dict[str, Any]] = []
    with keep_talking("demo", progress):  # a line every 15 s, between steps too (loading, writing)
        for number, (model_ref, data_ref, recipe_names, batch) in enumerate(jobs, start=1):
            model_ref, data_ref = model_ref.format(images=images), data_ref.format(images=images)
            shipped = [name for name in recipe_names if find_recipe(name) is not None] or ["finetune"]
            if progress:
                log(f"demo job {number}/{len(jobs)}: {model_ref} with {', '.join(shipped)}")
            rows += compare(model_ref, data_ref, shipped, out_dir, progress, batch)
    return rows


def _prepare_out_dir(out_dir: Path) -> None:
    """Create ``out_dir`` and check a file can be written in it, before any work (ArtifactError otherwise)."""
    from deepsqueeze.core.files import make_folder

    make_folder(out_dir, "--out-dir", "demo.dsq")


def includes_training(recipe: Any) -> bool:
    """Whether a recipe trains (fine-tuning, distillation, training-aware pruning or sharing)."""
    return any(stage.stage_type in ("finetune", "distill", "lora") or (getattr(stage, "epochs", 0) or 0) > 0
               for stage in recipe.stages)


def compare(model_ref: str, data_ref: str, recipe_names: list[str], out_dir: Path,
            progress: bool, batch: int = 64) -> list[dict[str, Any]]:
    """Evaluate the fp32 model and each recipe's artifact, reloaded from disk, side by side; every
    artifact is timed interleaved with the fp32 model (median, p10/p90 and a reliability verdict)."""
    from deepsqueeze.artifact import load
    from deepsqueeze.core.progress import log
    from deepsqueeze.data import resolve_data
    from deepsqueeze.eval import evaluate
    from deepsqueeze.recipes import compress, load_recipe
    from deepsqueeze.resolve import resolve_model

    fp32 = resolve_model(model_ref, progress=progress)
    data = resolve_data(data_ref, split="eval")
    if progress:
        log(f"{model_ref}: evaluating fp32 (quality on {data.name}, then latency)")
    before = evaluate(fp32, data, fp32, batch_size=batch)
    quality_keys = [k for k in ("accuracy", "cosine_mean", "cosine_min", "neighbor_agreement_at_10") if k in before]

    def row(variant: str, res: dict[str, Any], size: int, compress_s: float | None,
            trained: bool | None) -> dict[str, Any]:
        return {
            "model": model_ref,
            "variant": variant,
            "size_mb": size / 1e6,
            "ratio": before["fp32_bytes"] / size,
            **{k: res[k] for k in quality_keys},
            "latency_ms": res["latency_ms_median"],
            "latency_ms_p10": res["latency_ms_p10"],
            "latency_ms_p90": res["latency_ms_p90"],
            "latency_batch": res["latency_batch"],
            "speedup": res["speedup"] if res["speedup"] is not None else 1.0,
            "speedup_p10": res["speedup_p10"],
            "speedup_p90": res["speedup_p90"],
            "latency_reliable": res["latency_reliable"],
            "latency_note": res["latency_note"],
            "compress_s": compress_s,
            "compress_includes_training": trained,
        }

    rows = [row("fp32", before, before["fp32_bytes"], None, None)]
    for recipe_name in recipe_names:
        recipe = load_recipe(recipe_name)
        out = out_dir / f"{model_ref.replace(':', '-').replace('@', '-')}.{recipe_name}.dsq"
        result = compress(model_ref, recipe, out, progress=progress)  # the quality budget measured too
        if progress:
            log(f"{model_ref} {recipe_name}: evaluating the artifact, timed interleaved with fp32")
        after = evaluate(load(out), data, fp32, baseline=fp32, batch_size=batch)
        rows.append({**row(recipe_name, after, after["artifact_bytes"], round(result.compress_s, 1),
                           includes_training(recipe)),
                     "budget_within": None if result.budget is None else result.budget.within,
                     "budget": None if result.budget is None else result.budget.message()})
    return rows


NAME_WIDTH = 17  # recipe names wrap at hyphens to this width: the table fits 80 columns


def demo_table(rows: list[dict[str, Any]]) -> Any:
    """One table per model, each fitting 80 columns: quality in the model's metric (``over`` past the recipe's
    quality budget), latency as median ms ± half the p10-p90 spread and the speedup, both ``n/a [k]`` where the
    timing was not trustworthy (note k in :func:`demo_notes` says why)."""
    from rich import box
    from rich.console import Group
    from rich.table import Table

    marks, tables = _untrusted_marks(rows), []
    for model in dict.fromkeys(r["model"] for r in rows):
        ours = [r for r in rows if r["model"] == model]
        metric = "accuracy" if "accuracy" in ours[0] else "cosine"
        table = Table(title=f"{model}: {metric}, ms per batch of {ours[0]['latency_batch']}", title_justify="left",
                      box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False, collapse_padding=True)
        for name, justify in (("recipe", "left"), ("MB", "right"), ("ratio", "right"), (metric, "right"),
                              ("ms ±spread", "right"), ("speedup", "right"), ("compress s", "right")):
            table.add_column(name, justify=justify, no_wrap=True)  # type: ignore[arg-type]
        for r in ours:
            quality = f"{100 * r['accuracy']:.2f}%" if metric == "accuracy" else f"{r['cosine_mean']:.4f}"
            if r.get("budget_within") is False:
                quality += " over"
            if id(r) in marks:
                latency = speedup = f"n/a [{marks[id(r)]}]"
            else:
                spread = 50 * (r["latency_ms_p90"] - r["latency_ms_p10"]) / r["latency_ms"] if r["latency_ms"] else 0.0
                latency = f"{r['latency_ms']:.2f} ±{spread:.0f}%"
                speedup = "1.00x" if r["variant"] == "fp32" else f"{r['speedup']:.2f}x"
            compress_s = "-" if r["compress_s"] is None else \
                f"{r['compress_s']:.3g}{' +train' if r['compress_includes_training'] else ''}"
            table.add_row(_wrap(r["variant"]), f"{r['size_mb']:.2f}", f"{r['ratio']:.1f}x", quality, latency,
                          speedup, compress_s)
        tables += [table, ""]
    return Group(*tables[:-1])


def _wrap(name: str, width: int = NAME_WIDTH) -> str:
    """``name`` on lines of at most ``width`` characters, broken after hyphens (never inside a word)."""
    return "\n".join(textwrap.wrap(name, width, break_on_hyphens=True, break_long_words=False))


def _untrusted_marks(rows: list[dict[str, Any]]) -> dict[int, int]:
    """id(row) -> note number, for every row whose timing was not trustworthy, in table order."""
    untrusted = [r for r in rows if not r["latency_reliable"]]
    return {id(r): k for k, r in enumerate(untrusted, start=1)}


def demo_notes(rows: list[dict[str, Any]]) -> list[str]:
    notes = ["accuracy: top-1 on the data's test split; cosine: to the fp32 model's embeddings on held-out "
             "sentences.",
             "ms: median wall time per batch (its size in the title) on 2 threads, measured in this run, timed "
             "interleaved with fp32, round by round (± half the p10-p90 range); speedup: median of per-round "
             "fp32/recipe ratios.",
             "compress s: seconds the recipe ran; +train: includes fine-tuning or distillation epochs."]
    over = [r for r in rows if r.get("budget_within") is False]
    for r in over:
        notes.append(f"over: {r['model']} {r['variant']} is over its recipe's quality budget: {r['budget']}.")
    marks = _untrusted_marks(rows)
    for r in rows:
        if id(r) in marks:
            notes.append(f"[{marks[id(r)]}] {r['model']} {r['variant']}: timing withheld, not trustworthy "
                         f"({r['latency_note'] or 'wide p10-p90 spread'}): rerun on a quiet machine.")
    return notes
