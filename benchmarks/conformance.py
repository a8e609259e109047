"""The conformance matrix of issue 24 as benchmark rows: cells per outcome, per command and in total."""

from __future__ import annotations

import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

from benchmarks.runner import BenchContext

NAME = "conformance"
TITLE = "Conformance: every command x shipped recipe x model kind, works or refused before any work"
SETUP = (
    "`deepsqueeze.testing.conformance` (what `make test` and `make conformance` run): every CLI command that takes "
    "a model (plan, compress, search with one trial, inspect, evaluate, export onnx and hf, report, load then "
    "call; sensitivity and inspect once per model kind) x every shipped recipe x every model kind of "
    "`deepsqueeze.testing` (CNNs plain, residual, depthwise; ConvTranspose decoder; dict and tuple outputs; MLP; "
    "Conv1d+LSTM+GRU; MultiheadAttention; py: with --weights; hf: BERT, BERT classifier, RoBERTa, DistilBERT, "
    "ALBERT, GPT-2, Llama-GQA, Qwen2; sentence-transformers with Dense; zoo LeNet-300-100), tiny random-weight "
    "models, digits for images and 96 pydoc sentences for text. Plan runs on every (recipe, kind) cell; the "
    "whole pipeline on the covering subset (every recipe, kind and command at least once: what make test runs) "
    "in `conformance`, on every cell in `conformance-full`. Outcomes: works (exit 0), works over budget (exit 3, the artifact written and its drop "
    "said), refused (one line, exit 2; for compress only where plan refuses the same cell), failed (anything "
    "else: a traceback, another exit code, an unmeasured budget, a refusal plan did not predict). Target "
    "(issue 24): failed = 0, and every compress refusal also given by plan."
)
COLUMNS = ("command", "cells", "works", "works_over_budget", "refused", "failed")


def run(ctx: BenchContext) -> list[dict[str, Any]]:
    return matrix_rows(ctx, full=False)


def matrix_rows(ctx: BenchContext, full: bool) -> list[dict[str, Any]]:
    """The rows of the matrix: plan on every cell, the covering subset (``full``: every cell) end to end."""
    from deepsqueeze.testing import conformance as cf

    with tempfile.TemporaryDirectory() as tmp:
        cells = cf.run_matrix(Path(tmp), cf.covering_subset(), full=full and not ctx.quick, log=ctx.log)
    plans = {(c.recipe, c.kind): c.outcome for c in cells if c.command == "plan"}
    unplanned = sum(1 for c in cells if c.command == "compress" and c.outcome == cf.REFUSED
                    and plans.get((c.recipe, c.kind)) != cf.REFUSED)
    rows = []
    for command in [*cf.COMMANDS, "total"]:
        chosen = [c for c in cells if command in ("total", c.command)]
        got = Counter(c.outcome for c in chosen)
        rows.append({"command": command, "cells": len(chosen), "works": got[cf.WORKS],
                     "works_over_budget": got[cf.OVER_BUDGET], "refused": got[cf.REFUSED],
                     "failed": got[cf.FAILED], "target": "failed 0, every compress refusal planned",
                     "met": "yes" if got[cf.FAILED] == 0 and (command != "total" or unplanned == 0) else "no"})
    for cell in cells:
        if cell.outcome == cf.FAILED:
            ctx.notes.append(f"failed: {cell.command} {cell.recipe} on {cell.kind}: {cell.message[:300]}")
    ran = "every cell ran end to end" if full and not ctx.quick else "every cell planned, the covering subset ran end to end"
    ctx.notes.append(f"{ran}; {len(plans)} (recipe, kind) cells")
    return rows
