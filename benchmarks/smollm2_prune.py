"""SmolLM2-135M (zoo:smollm2-135m) one-shot pruning: magnitude vs Wanda vs SparseGPT at 50% and 2:4, and 2:4 + 4-bit."""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Any

from benchmarks.runner import BenchContext
from benchmarks.smollm2_quant import CALIBRATION, STRIDE, WINDOW, _scores, prepare

WIKI_TOKENS, NEWS_TOKENS = 16_384, 4_096  # half of smollm2-quant's: the calibrating methods take most of the time

NAME = "smollm2-prune"
TITLE = "SmolLM2-135M one-shot pruning: magnitude vs Wanda vs SparseGPT at 50% and 2:4"
SETUP = (
    "zoo:smollm2-135m (SmolLM2-135M-Instruct, Q4_1 GGUF dequantized to fp32: the base). Every row prunes the 210 "
    "Linear layers of the 30 blocks (the tied embedding / head is not pruned) with deepsqueeze's prune_oneshot "
    "stage, no training: magnitude (|w| over the layer), Wanda (|w| x input norm, per output row), SparseGPT "
    "(OBS mask selection in blocks of 128 columns with weight update, damp 0.01); Wanda and SparseGPT calibrate "
    "layer by layer (sequentially, each on the pruned layers' outputs) on 64 wiki:calib paragraphs. Quality: the "
    f"scoring of smollm2-quant (windows of {WINDOW} every {STRIDE}) on {WIKI_TOKENS} wiki:eval and {NEWS_TOKENS} "
    "news:eval tokens, on the model loaded back from its .dsq. `sparsegpt + w4`: the llm-sparsegpt-2of4-w4 "
    "recipe's stages (SparseGPT 2:4, then GPTQ 4-bit group 128 keeping the zeros, 8-bit embedding) on the same "
    "calibration count. Block removal: prune_transformer drop_blocks 4 and 8 (the blocks of lowest Block "
    "Influence, 1 - cos of each block's input and output hidden states, on 32 wiki:calib paragraphs; ShortGPT), "
    "alone and followed by the llm-drop-blocks recipe's recovery (distill, student self, teacher the base: "
    "next-token cross-entropy + KL at T=1 to the base's next-token distributions, one pass over 256 wiki:calib "
    "paragraphs, batch 4, AdamW lr 5e-5 cosine); `seconds` is that training budget on 2 threads."
)


def run(ctx: BenchContext) -> list[dict[str, Any]]:
    setup = prepare(ctx, WIKI_TOKENS, NEWS_TOKENS)
    base, wiki, news, calib, tmp, base_top1 = (setup.base, setup.wiki, setup.news, setup.calib, setup.tmp,
                                               setup.base_top1)
    rows: list[dict[str, Any]] = [{"method": "base (Q4_1 dequantized, fp32)", "pattern": "dense",
                                   **setup.base_scores, "seconds": 0.0}]
    samples = 16 if ctx.quick else CALIBRATION
    patterns = ("2:4",) if ctx.quick else ("unstructured", "2:4")
    for pattern in patterns:
        for method in ("magnitude", "wanda", "sparsegpt"):
            stages = [{"type": "prune_oneshot", "method": method, "pattern": pattern, "sparsity": 0.5,
                       "calibration_samples": samples}]
            rows.append(_row(method, pattern, stages, base, base_top1, calib, wiki, news, tmp, ctx))
    from deepsqueeze.recipes.schema import load_recipe

    stages = [{**stage.model_dump(mode="json"), "type": stage.stage_type, "calibration_samples": samples}
              for stage in load_recipe("llm-sparsegpt-2of4-w4").stages]
    rows.append(_row("sparsegpt + w4", "2:4", stages, base, base_top1, calib, wiki, news, tmp, ctx))
    recovery = [{**stage.model_dump(mode="json"), "type": stage.stage_type}
                for stage in load_recipe("llm-drop-blocks").stages if stage.stage_type == "distill"]
    for count in (4,) if ctx.quick else (4, 8):
        drop = [{"type": "prune_transformer", "drop_blocks": count, "calibration_samples": 32}]
        for method, stages in (("block removal", drop), ("block removal + LM distillation", drop + recovery)):
            if ctx.quick and "+" in method:
                continue
            rows.append(_row(method, f"{count} of 30 blocks", stages, base, base_top1, calib, wiki, news, tmp, ctx))
    return mark_targets(rows, patterns)


def mark_targets(rows: list[dict[str, Any]], patterns: tuple[str, ...]) -> list[dict[str, Any]]:
    """Each row's perplexity against the base's (first row); the SparseGPT row of each pattern with the
    issue's target (SparseGPT <= Wanda < magnitude; 2:4 within 40% of the base) and whether it is met."""
    base_ppl = rows[0]["wiki_ppl"]
    for row in rows[1:]:
        row["vs_base"] = f"{100 * (row['wiki_ppl'] / base_ppl - 1):+.2f}%"
    for pattern in (_label(p) for p in patterns):
        got = {r["method"]: r["wiki_ppl"] for r in rows if r["pattern"] == pattern and "+" not in r["method"]}
        row = next(r for r in rows if r["pattern"] == pattern and r["method"] == "sparsegpt")
        row["target"] = "SparseGPT <= Wanda < magnitude" + ("; within 40% of the base" if pattern == "2:4" else "")
        ok = got["sparsegpt"] <= got["wanda"] < got["magnitude"]
        row["met"] = "yes" if ok and (pattern != "2:4" or got["sparsegpt"] <= 1.4 * base_ppl) else "no"
    return rows


def _row(method: str, pattern: str, stages: list[dict[str, Any]], base: Any, base_top1: Any, calib: Any, wiki: list[str],
         news: list[str], tmp: Path, ctx: BenchContext) -> dict[str, Any]:
    from deepsqueeze.artifact import load, save
    from deepsqueeze.recipes.run import run_stages
    from deepsqueeze.recipes.schema import parse_recipe

    ctx.log(f"{NAME}: {method} {pattern}")
    model = copy.deepcopy(base)
    start = time.perf_counter()
    run_stages(model, parse_recipe({"stages": stages}), calib, progress=False)
    seconds = time.perf_counter() - start
    path = tmp / f"{method.replace(' ', '')}-{pattern.replace(':', 'of')}.dsq"
    save(model, path)
    loaded = load(path)
    scores = _scores(loaded.module, base_top1, wiki, news, ctx, f"{method} {pattern}")
    scores.pop("_top1")
    return {"method": method, "pattern": _label(pattern),
            **scores,
            "artifact_mb": round(path.stat().st_size / 1e6, 2), "seconds": round(seconds, 1)}


def _label(pattern: str) -> str:
    """A row's pattern as the table shows it (the unstructured rows are at 50%)."""
    return "50% unstructured" if pattern == "unstructured" else pattern
