"""Output helpers shared by the commands: one JSON object with --json, rich tables otherwise."""

from __future__ import annotations

import json
import math
import sys
from typing import Any

import typer
from rich.console import Console
from rich.table import Table
from typer.core import TyperCommand

from deepsqueeze.core.config import MAX_THREADS

# Off a terminal (a file, a CI log) tables get 100 columns, not rich's 80, which truncates; rows_table fits them.
stdout = Console() if sys.stdout.isatty() else Console(width=100)
stderr = Console(stderr=True)

JsonOption = typer.Option(False, "--json", help="Print exactly one JSON object on stdout.")
DeviceOption = typer.Option("cpu", "--device", help="Torch device: cpu, cuda, cuda:1, mps ...")
MAX_BATCH = 4096


def threads_option(help: str) -> Any:
    """``--threads`` (1..MAX_THREADS; out of range: a usage error, exit 2, before any work)."""
    return typer.Option(2, "--threads", min=1, max=MAX_THREADS, help=help)


ModelCodeOption = typer.Option(None, "--model-code", help="py:package.module:factory building the architecture of "
                               "an artifact compressed from your own code (a .dsq never names code to run)")

# The model options every command that takes a model accepts, declared once (tests/test_conformance.py checks).
MODEL_OPTIONS = ("--model", "--weights", "--model-code", "--data", "--device", "--threads")
ModelOption = typer.Option(None, "--model", help="Model reference: zoo:NAME[@DATA], minilm, hf:DIR, "
                           "py:package.module:factory, or FILE.dsq")
WeightsOption = typer.Option(None, "--weights", help="safetensors file with a py: model's weights (every tensor "
                             "must match a parameter or buffer, and every one the model has must be there)")
DataOption = typer.Option(None, "--data", help="The data the model takes: fashion-mnist, digits, "
                          "pydoc-sentences[:calib|eval|val], text:FILE ...; a py: model without an input_shape "
                          "attribute takes its input shape from it")
ThreadsOption = typer.Option(None, "--threads", min=1, max=MAX_THREADS, help="torch threads, and ONNX Runtime's "
                             "where the command runs it (default: torch's own; 2 for timing and export checks)")


def model_ref(positional: str | None, option: str | None) -> str:
    """The model a command works on, given as its argument or as ``--model`` (not two different ones)."""
    from deepsqueeze.errors import RecipeError

    if positional and option and positional != option:
        raise RecipeError(f"two models given ({positional} and --model {option}): pass one")
    ref = positional or option
    if not ref:
        raise RecipeError("no model given: pass MODEL or --model REF")
    return ref


def need_data(data: str | None, command: str) -> str:
    """``--data``, required by ``command``."""
    from deepsqueeze.errors import RecipeError

    if not data:
        raise RecipeError(f"{command} needs --data: the data the model takes (fashion-mnist, digits, "
                          "pydoc-sentences, text:FILE ...); a model no shipped data fits cannot be scored here")
    return data


def use_threads(threads: int | None) -> int:
    """Set torch's threads to ``threads`` (when given); returns the count timing and ONNX Runtime use."""
    if threads is None:
        return 2
    import torch

    torch.set_num_threads(threads)
    return threads


PreferOption = typer.Option(None, "--prefer", metavar="memory|speed", help="memory (default): a compressed layer "
                            "keeps no float copy of its weight; speed: it may keep its decoded weight where that "
                            "runs faster (env DEEPSQUEEZE_PREFER)")


def use_prefer(prefer: str | None) -> None:
    """Apply ``--prefer`` (None: the environment's, else memory) before any model runs."""
    from deepsqueeze.runtime import set_prefer

    set_prefer(prefer)


def kernels_line(kernels: dict[str, dict[str, int]]) -> str:
    """``evaluate``'s ``kernels`` field as one line: ``PackedIntLinear few: gemv x36, many: dequant x36; ...``."""
    return "; ".join(f"{name} " + ", ".join(f"{k} x{n}" for k, n in counts.items())
                     for name, counts in kernels.items())


BackendOption = typer.Option("torch", "--backend", help="torch, ort (export to ONNX, causal LMs with past "
                             "key-values, and run in ONNX Runtime) or pte (export an ExecuTorch program and run it "
                             "in ExecuTorch's runtime)")


def on_backend(model: Any, backend: str, threads: int, data: Any = None) -> Any:
    """``model`` as ``--backend`` runs it: itself for torch, its verified export in ONNX Runtime (ort) or
    ExecuTorch (pte), checked on a sample of ``data`` (or the model's own sample)."""
    if backend == "torch":
        return model
    from deepsqueeze.export import BACKENDS, runnable, sample_batch

    if backend not in BACKENDS:
        from deepsqueeze.errors import DataError

        raise DataError(f"unknown backend {backend!r}: use torch, {', '.join(BACKENDS)}")
    return runnable(model, backend, threads=threads, sample=sample_batch(model, data))


def brief_listing() -> str:
    """One paragraph for ``--help``: the recipe names and stage types, pointing at ``deepsqueeze recipes``."""
    from deepsqueeze.core.config import registered_stages
    from deepsqueeze.recipes.schema import shipped_recipes

    return (f"Shipped recipes: {', '.join(shipped_recipes())}. Stage types: {', '.join(registered_stages())}. "
            "Run 'deepsqueeze recipes' for one line per recipe and every stage's keys.")


class ListingCommand(TyperCommand):
    """A command whose ``--help`` ends with the shipped recipes and stage types (computed only when shown)."""

    def format_help(self, ctx, formatter):  # type: ignore[no-untyped-def]
        self.epilog = brief_listing()
        return super().format_help(ctx, formatter)


def emit_json(obj: dict[str, Any]) -> None:
    print(json.dumps(obj, default=_plain, allow_nan=False, indent=2, sort_keys=False))


def _plain(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return str(value)


def fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 100 else f"{value:,.1f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def kv_table(title: str, values: dict[str, Any]) -> Table:
    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column("key", style="bold")
    table.add_column("value", justify="right")
    for key, value in values.items():
        if not isinstance(value, (dict, list)):
            table.add_row(key, fmt(value))
    return table


TABLE_WIDTH = 100  # columns a table may take; what does not fit is named under it (--json has every column)
# Columns a reader looks for first, in this order; the others follow in the order the rows give them.
PRIORITY = ("stage", "model", "variant", "module", "layer", "trial", "action", "into", "reason", "type", "method",
            "bits", "bytes",
            "ratio", "compression_ratio", "accuracy", "perplexity", "cosine_mean", "label_agreement", "quality",
            "drop_pp", "latency_ms", "speedup", "covered_pct")
FOLD = 40  # a longer text column is folded onto more lines rather than left out


def rows_table(title: str, rows: list[dict[str, Any]], width: int = TABLE_WIDTH) -> Table:
    """One row per dict; columns in first-seen order while they fit in ``width`` characters, the rest named
    in the caption (a person reads 100 columns; ``--json`` carries every field)."""
    columns: list[str] = []
    for row in rows:
        columns += [c for c in row if c not in columns]
    columns = [c for c in PRIORITY if c in columns] + [c for c in columns if c not in PRIORITY]
    shown, left_out, used = [], [], 4
    for column in columns:
        need = min(FOLD, max([len(column), *(len(fmt(row.get(column))) for row in rows)])) + 3
        if used + need <= width or not shown:
            shown.append(column)
            used += need
        else:
            left_out.append(column)
    caption = f"not shown (--json has them): {', '.join(left_out)}" if left_out else None
    table = Table(title=title, title_justify="left", caption=caption, caption_justify="left")
    for column in shown:
        table.add_column(column, justify="left" if column in ("stage", "model", "variant") else "right",
                         overflow="fold")
    for row in rows:
        table.add_row(*(fmt(row.get(c)) for c in shown))
    return table
