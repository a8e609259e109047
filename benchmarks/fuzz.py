"""The fuzzing campaign of issue 25 (round three) as a benchmark row: every surface of ``tests/fuzz/`` with the
same oracle, its figures against the issue's targets."""

from __future__ import annotations

from typing import Any

from benchmarks.runner import BenchContext

NAME = "fuzz"
TITLE = "Hostile inputs: a 30,000-case fuzzing campaign over every surface that reads a file"
CASES = 30_000
QUICK_CASES = 400
SEED = 1
SETUP = (
    "`tests/fuzz/campaign.py` (what `make fuzz` runs), seed 1, 30,000 cases split across five surfaces, each in its "
    "own worker process, niced. **dsq**: the .dsq loader on six seed artifacts (TinyMLP with every entropy, "
    "codebook and sparse encoding; pruned + int8 dynamic; packed 4-bit Linear; TinyBNConvNet with int8 static "
    "`Int8Conv2d` and packed 4-bit convolutions; a tied LM), mutation kinds manifest fields, ties, replay geometry, "
    "list amplification, raw bytes resealed or not, payload damage with every segment CRC and the digest "
    "resealed; oracle `load` + a forward pass on an ordinary input. **hf**: `hf:DIR` folders (BERT in the "
    "sentence-transformers layout, a BERT classifier, GPT-2, Llama) with config.json, safetensors headers and "
    "data, modules.json / pooling / sentence_bert_config, tokenizer.json / tokenizer_config.json and planted "
    "references edited; oracle `resolve_model` + tokenize + forward. **study**: a real search folder's "
    "summary.json, study and trial attributes, Optuna tables and raw study.db bytes; oracle `study_report`, "
    "study.db byte for byte unchanged. **space**: search-space YAML as data and as text; oracle `read_space_file`, "
    "`parse_space` / `load_space`, a point sampled by Optuna, the grid and `GridSampler`. **signals**: `compress` "
    "and `export` (ONNX, HF folder) CLI runs with SIGINT / SIGTERM after random delays; oracle exit 0 / 130 / 143 "
    "(or killed by the signal only with the output complete), no temporaries or staging folders, outputs "
    "complete, input untouched. Targets (issue 25): no exception but deepsqueeze's documented errors "
    "(ArtifactError, ModelError, RecipeError, DataError; the space surface RecipeError / ModelError only), no case "
    "over 10 s (signals: exit within 10 s of the signal), peak RSS growth under 200 MB per surface, no load that "
    "fails in forward or computes NaN / Inf, no import or run of a canary module and no open of the canary folder "
    "(audit hook). `slowest_case_s` of the signal surface is a whole CLI run, delay included."
)
COLUMNS = ("surface", "cases", "accepted", "documented_errors", "other_exceptions", "hangs", "slowest_case_s",
           "peak_rss_growth_mb", "forward_failures", "canary_hits")


def _row(name: str, result: dict[str, Any]) -> dict[str, Any]:
    return {
        "surface": name, "cases": result["cases"], "accepted": result["ok"],
        "documented_errors": result["documented_errors"], "other_exceptions": result["other"],
        "hangs": result["hangs"], "slowest_case_s": round(float(result["slowest_s"]), 2),
        "peak_rss_growth_mb": round(float(result["peak_rss_growth_mb"]), 1),
        "forward_failures": result["forward_failures"], "canary_hits": result["canary_hits"],
        "target": "0 other, 0 hangs, < 200 MB, 0 forward failures, 0 canary hits",
        "met": "yes" if result["met"] else "no",
    }


def run(ctx: BenchContext) -> list[dict[str, Any]]:
    from tests.fuzz.campaign import run_all

    cases = QUICK_CASES if ctx.quick else CASES
    summary = run_all(cases, SEED, log=ctx.log)
    rows = [_row(name, result) for name, result in summary["surfaces"].items()]
    rows.append(_row("total", summary["total"]))
    for name, result in summary["surfaces"].items():
        kinds = ", ".join(f"{k} {v}" for k, v in result.get("kinds", {}).items())
        errors = ", ".join(f"{k} {v}" for k, v in result.get("documented", {}).items()) or "none"
        ctx.notes.append(f"{name}: cases by kind: {kinds}; documented errors: {errors}; wall {result['wall_s']} s")
        for failure in result["failures"][:5]:
            ctx.notes.append(f"{name} failure (case {failure[0]}, {failure[1]}): {failure[2][:300]}")
    return rows
