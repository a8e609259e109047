"""search-minilm: per-layer bits and head / FFN pruning for all-MiniLM-L6-v2; the front against shipped recipes.

    deepsqueeze bench search-minilm                                  # TPE, 20 trials
    SEARCH_MINILM_TRIALS=8 SEARCH_MINILM_SAMPLER=random deepsqueeze bench search-minilm
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.runner import BenchContext

NAME = "search-minilm"
TITLE = "Policy search on MiniLM: per-layer bits and head / FFN pruning; the front vs int8-dynamic, w4-gptq, mixed"
COMPARE = ("int8-dynamic", "w4-gptq", "mixed-precision")
WIDTHS = [2, 3, 4, 5, 6, 8]  # a superset of mixed-precision's 2/3/4/8
SPACE: dict[str, Any] = {
    "description": "search-minilm: heads / FFN pruning, then GPTQ with per-layer bits",
    "objectives": ["quality", "bytes"],
    # The fidelity floor a user would state (cosine >= 0.97): TPE ranks trials under it below those above it,
    # so it stops spending trials on pruning without recovery (cosine ~0.74 in the first run).
    "constraints": {"max_drop": 3.0},
    "latency": {"batch": 32, "threads": 2},
    "priors": "sensitivity",
    "compare": list(COMPARE),
    "stages": [
        {"type": "prune_transformer", "optional": True, "heads": {"choice": [1, 2]},
         "ffn_ratio": {"choice": [0.1, 0.2, 0.3]}},
        {"type": "quantize", "method": "gptq", "symmetric": False, "calibration_samples": 128,
         "group_size": {"choice": [64, 128]},
         # every Linear and embedding table (pooler and position embeddings too): a prior at a reference's
         # weight bytes is then no larger than the reference's file
         "bits": {"per_layer": {"choice": WIDTHS}}},
    ],
}
SETUP = (
    "all-MiniLM-L6-v2 (`minilm`). Space: an optional `prune_transformer` stage (1 or 2 heads per block, 10/20/30% "
    "of the FFN neurons, no recovery training), then one GPTQ `quantize` stage (asymmetric, group 64 or 128, 128 "
    "calibration sentences) with one hole per layer for the bits, 2/3/4/5/6/8, over every Linear layer and "
    "embedding table (36 encoder Linear layers, the pooler, the word, position and token-type embeddings: 40 "
    "holes). `priors: "
    "sensitivity` enqueues points allocated from the mixed-precision sensitivity scan (group 64) at mean widths "
    "3.5, 5 and 6.5 bits and, for each shipped recipe (measured first), under the weight bytes its file spends on "
    "the 40 layers, re-enqueued under a budget lowered by the excess when the prior's file comes out larger than "
    "the shipped recipe's (at most twice). Constraint `max_drop: 3` (validation cosine >= "
    "0.97), which TPE uses to rank trials. Objectives: mean cosine to fp32 on `pydoc-sentences:val` (288 sentences; trials calibrate on "
    "`pydoc-sentences:fit`, disjoint) and the measured .dsq bytes; latency (batch 32, 2 threads, interleaved "
    "with fp32) measured on every trial but not an objective. The shipped recipes run through the same compress "
    "in the same study (`compare`). Front points and shipped recipes are then re-scored on the 579 "
    "`pydoc-sentences:eval` sentences (the test split: never calibration, training or validation); "
    "`refs_dominated` counts the shipped recipes matched or dominated there by a front point at equal or smaller "
    "file bytes. `hv_quality_bytes`: hypervolume on (validation cosine, bytes / fp32 bytes), reference (0, 1)."
)


def run(ctx: BenchContext) -> list[dict[str, Any]]:
    import optuna
    import torch
    import yaml

    from deepsqueeze.data import resolve_data
    from deepsqueeze.eval import embedding_fidelity
    from deepsqueeze.resolve import resolve_model
    from deepsqueeze.search import load_space, run_search
    from deepsqueeze.search.front import hypervolume_history

    trials = int(os.environ.get("SEARCH_MINILM_TRIALS", "20"))
    sampler = os.environ.get("SEARCH_MINILM_SAMPLER", "tpe")
    space_form = dict(SPACE)
    if ctx.quick:
        trials = 2
        space_form = {**SPACE, "priors": None, "compare": ["int8-dynamic"],
                      "stages": [{**SPACE["stages"][1], "calibration_samples": 16}]}
    sentences = resolve_data("pydoc-sentences:eval").sentences
    if ctx.quick:
        sentences = sentences[:64]
    fp32 = resolve_model("minilm", progress=False)
    with torch.no_grad():
        reference = fp32.module.eval().encode(sentences)

    def test_cosine(path: str) -> float:
        with torch.no_grad():
            emb = resolve_model(path, progress=False).module.eval().encode(sentences)
        return float(embedding_fidelity(emb, reference)["cosine_mean"])

    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        space_file = root / "space.yaml"
        space_file.write_text(yaml.safe_dump({**space_form, "model": "minilm", "data": "pydoc-sentences"}))
        space, base = load_space(space_file)
        start = time.perf_counter()
        res = run_search(space, base, root / "study", sampler=sampler, trials=trials, study_name=sampler,
                         log=ctx.log)
        wall = time.perf_counter() - start
        study = optuna.load_study(study_name=sampler, storage=f"sqlite:///{root / 'study' / 'study.db'}")
        complete = sorted((t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE),
                          key=lambda t: t.number)
        history = hypervolume_history([t.user_attrs for t in complete], ("quality", "bytes"), res.baseline)
        front = [{"trial": r["trial"], "bytes": r["bytes"], "val_cosine": r["quality"],
                  "test_cosine": test_cosine(r["artifact"])} for r in res.front]
        refs = []
        for ref in study.user_attrs.get("references", []):
            if "error" in ref:
                ctx.notes.append(f"shipped {ref['recipe']} did not run: {ref['error']}")
                continue
            refs.append({"recipe": ref["recipe"], "bytes": ref["bytes"], "val_cosine": ref["quality"],
                         "test_cosine": test_cosine(ref["artifact"]), "compress_s": ref["compress_s"],
                         "speedup": ref["speedup"]})
        covered = [r["recipe"] for r in refs
                   if any(p["bytes"] <= r["bytes"] and p["test_cosine"] >= r["test_cosine"] for p in front)]
        by_trial = {t.number: t for t in complete}
        rows.append({
            "row": f"search ({sampler})", "trials": len(complete), "failed": res.failed,
            "hv_quality_bytes": round(history[-1], 4) if history else None,
            "front_points": len(front), "refs_dominated": f"{len(covered)}/{len(refs)}",
            "refs_not_dominated": " ".join(r["recipe"] for r in refs if r["recipe"] not in covered) or "-",
            "search_s": round(wall, 1),
            "mean_compress_s": round(sum(t.user_attrs.get("compress_s", 0.0) for t in complete)
                                     / max(len(complete), 1), 1),
            "target": "every shipped recipe (int8-dynamic, w4-gptq, mixed-precision) matched or dominated on test "
                      "cosine at equal or smaller bytes",
            "met": "yes" if refs and len(covered) == len(refs) else "no",
        })
        for point in sorted(front, key=lambda p: p["bytes"]):
            attrs = by_trial[point["trial"]].user_attrs
            stages = attrs["recipe"]["stages"]
            quant = next((s for s in stages if s["type"] == "quantize"), {})
            widths = list((quant.get("overrides") or {}).values())
            pruned = next((s for s in stages if s["type"] == "prune_transformer"), None)
            rows.append({
                "row": f"front: trial {point['trial']}" + (f" ({attrs['prior']})" if attrs.get("prior") else ""),
                "mb": round(point["bytes"] / 1e6, 2), "val_cosine": round(point["val_cosine"], 4),
                "test_cosine": round(point["test_cosine"], 4),
                "speedup_vs_fp32": round(attrs.get("speedup", 0.0), 2),
                "policy": (f"unweighted mean of the {len(widths)} layers' widths {sum(widths) / len(widths):.2f} bits, "
                           f"g{quant.get('group_size', '-')}" if widths else "-")
                + (f"; minus {pruned.get('heads')} heads, {pruned.get('ffn_ratio')} FFN" if pruned else ""),
            })
        for ref in refs:
            rows.append({"row": f"shipped: {ref['recipe']}", "mb": round(ref["bytes"] / 1e6, 2),
                         "val_cosine": round(ref["val_cosine"], 4), "test_cosine": round(ref["test_cosine"], 4),
                         "speedup_vs_fp32": round(ref["speedup"], 2), "search_s": ref["compress_s"]})
    ctx.notes.append(f"One study ({sampler}, {trials} trials, seed 0). Latency is measured on every trial on a "
                     "2-core machine (`speedup_vs_fp32`, interleaved with fp32) but is not an objective.")
    return rows
