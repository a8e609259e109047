"""prune_transformer across Hugging Face families: BERT, DistilBERT, GPT-2 and a Llama with grouped-query attention."""

from __future__ import annotations

import copy
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.runner import BenchContext

NAME = "prune-transformer-families"
TITLE = "Structured transformer pruning on four families: 25% of heads and 30% of FFN neurons removed"
SETUP = (
    "Random-weight models built from configs inside the benchmark (hf:DIR directories written by "
    "deepsqueeze.testing.hf_models.make_hf_dir, seed 0): BERT and DistilBERT encoders (hidden 256, 4 layers, "
    "8 heads, FFN 1024, MiniLM WordPiece tokenizer), GPT-2 (hidden 256, 4 layers, 8 heads, FFN 1024, fused "
    "Conv1D q|k|v) and a Llama decoder with grouped-query attention (hidden 256, 4 layers, 8 query heads in 2 "
    "KV groups, gated FFN 1024; byte-level tokenizers). Every block loses 2 of its 8 heads (Llama: one query "
    "head per KV group) and 30% of its FFN neurons by L2 weight magnitude (prune_transformer stage, no "
    "fine-tuning; the stage's per-block calls, timed as prune_s). Output error: max |pruned - masked reference| / max |reference| on a batch of 8 "
    "pydoc-sentences:eval sentences, where the masked reference is the unpruned model with the removed heads' "
    "and neurons' output-projection inputs zeroed (must be float rounding, <= 1e-5). Latency: the same batch "
    "(8 sentences, padded), 2 threads, 3 warm-up rounds, 15 timed rounds with the order rotated each round; "
    "median ms with p10-p90. The machine was shared with other jobs: latency figures are noisy, the ratios "
    "measured side by side are what the rows report."
)
SIZES = {
    "bert": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=8, intermediate_size=1024),
    "distilbert": dict(dim=256, n_layers=4, n_heads=8, hidden_dim=1024),
    "gpt2": dict(n_embd=256, n_layer=4, n_head=8),
    "llama": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2,
                  intermediate_size=1024),
}
TARGET_ERROR = 1e-5


def run(ctx: BenchContext) -> list[dict[str, Any]]:
    from deepsqueeze.core.counting import count_params
    from deepsqueeze.data import resolve_data
    from deepsqueeze.eval.latency import measure_latency_spread
    from deepsqueeze.prune import find_blocks, mask_pruned_, prune_ffn_, prune_heads_
    from deepsqueeze.resolve import resolve_model
    from deepsqueeze.testing.hf_models import make_hf_dir

    sentences = resolve_data("pydoc-sentences:eval").sentences[:8]
    tmp = Path(tempfile.mkdtemp())
    rows = []
    for family, sizes in SIZES.items():
        ctx.log(f"{NAME}: {family}")
        model = resolve_model(f"hf:{make_hf_dir(family, tmp / family, **sizes)}", progress=False)
        base, reference = copy.deepcopy(model.module), copy.deepcopy(model.module)
        before = [(b.heads, b.kv_heads) for b in find_blocks(model.module)]
        start = time.perf_counter()
        with torch.no_grad():  # what the prune_transformer stage does per block (heads=2, ffn_ratio=0.3)
            for block, ref_block in zip(find_blocks(model.module), find_blocks(reference), strict=True):
                kept_heads = prune_heads_(model.module, block, 2)
                kept_neurons = prune_ffn_(model.module, block, 0.3)
                mask_pruned_(reference, ref_block, kept_heads, kept_neurons)
        prune_s = time.perf_counter() - start
        batch = model.module.tokenize(sentences)
        with torch.no_grad():
            out, ref = model.module(**batch), reference(**batch)
        error = float((out - ref).abs().max() / ref.abs().max())
        pruned_m = model.module.eval()
        t = measure_latency_spread({"fp32": lambda m=base, b=batch: m(**b), "pruned": lambda m=pruned_m, b=batch: m(**b)},
                                   warmup=2 if ctx.quick else 3, repeat=5 if ctx.quick else 15, threads=ctx.threads)
        after = [(b.heads, b.kv_heads) for b in find_blocks(model.module)]
        rows.append({
            "family": family, "task": model.task.value,
            "heads_before": f"{before[0][0]} (kv {before[0][1]})", "heads_after": f"{after[0][0]} (kv {after[0][1]})",
            "params_before": count_params(base), "params_after": count_params(pruned_m),
            "params_ratio": round(count_params(pruned_m) / count_params(base), 3),
            "max_rel_error_vs_masked": f"{error:.1e}",
            "latency_ms_b8": round(t["pruned"].median, 2), "latency_p10_p90": f"{t['pruned'].p10:.2f}-{t['pruned'].p90:.2f}",
            "fp32_latency_ms_b8": round(t["fp32"].median, 2), "fp32_p10_p90": f"{t['fp32'].p10:.2f}-{t['fp32'].p90:.2f}",
            "speedup": round(t["fp32"].median / t["pruned"].median, 3),
            "spreads_overlap": "yes" if t["pruned"].p90 >= t["fp32"].p10 else "no",
            "prune_s": round(prune_s, 3),
            "target": f"runs; error vs masked reference <= {TARGET_ERROR:g}",
            "met": "yes" if error <= TARGET_ERROR else "no",
        })
    return rows
