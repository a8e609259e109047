"""MiniLM with 2 of 12 heads and 30% of the FFN neurons removed from every layer: fidelity, size, speed."""

from __future__ import annotations

import copy
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.runner import BenchContext

NAME = "prune-minilm"
TITLE = "Structured pruning: MiniLM minus 2 heads and 30% of the FFN neurons per layer"
SETUP = (
    "all-MiniLM-L6-v2 (`minilm`). `prune_transformer` stage: in each of the 6 layers the 2 attention heads "
    "and 30% of the FFN neurons with the smallest L2 weight magnitude (q/k/v rows + output columns; "
    "intermediate rows + output columns) are removed, so the model is physically smaller. Fidelity to the "
    "unpruned model on `pydoc-sentences:eval` right after pruning, and after fine-tuning on "
    "`pydoc-sentences:calib` with the unpruned model's embeddings as targets (cosine loss, Adam lr 5e-5, "
    "cosine schedule, batch 32, the epochs listed), or instead by the `distill` stage with the unpruned model "
    "as teacher (AdamW lr 1e-3 one-cycle, batch 32, embedding cosine + 0.1 x TinyBERT hidden-state MSE, 3 "
    "augmented variants per calib sentence, as kd-minilm). Size: the reloaded .dsq file (fp32, raw). Latency: batch "
    "of 64 eval sentences, interleaved with the fp32 model, 2 threads."
)


def run(ctx: BenchContext) -> list[dict[str, Any]]:
    from deepsqueeze.artifact import load, save
    from deepsqueeze.core.context import StageContext
    from deepsqueeze.core.counting import count_params
    from deepsqueeze.data import resolve_data
    from deepsqueeze.distill import DistillConfig, distill_
    from deepsqueeze.eval import embedding_fidelity, measure_latency_interleaved
    from deepsqueeze.eval.metrics import encoder_inputs
    from deepsqueeze.prune import PruneTransformerConfig, prune_
    from deepsqueeze.resolve import resolve_model

    eval_data = resolve_data("pydoc-sentences:eval")
    calib = resolve_data("pydoc-sentences:calib")
    sentences = eval_data.sentences[:64] if ctx.quick else eval_data.sentences
    base = resolve_model("minilm", progress=False)
    ref_emb = base.module.encode(sentences)
    fp32_bytes = 4 * base.base_params
    epochs = 1 if ctx.quick else 3
    limit = 64 if ctx.quick else None
    tmp = Path(tempfile.mkdtemp())

    model = copy.deepcopy(base)
    sctx = StageContext(model, data=calib, reference=base, seed=ctx.seed, progress=False)
    start = time.perf_counter()
    prune_(model, PruneTransformerConfig(heads=2, ffn_ratio=0.3), sctx)
    prune_s = time.perf_counter() - start
    after_prune = embedding_fidelity(model.module.encode(sentences), ref_emb)
    distilled = copy.deepcopy(model)  # the same pruned model, recovered by the distill stage below
    start = time.perf_counter()
    from deepsqueeze.prune.stage import finetune

    finetune(model, sctx, PruneTransformerConfig(epochs=epochs, lr=5e-5, batch_size=32, limit=limit), epochs,
             description="prune-minilm fine-tuning")
    finetune_s = time.perf_counter() - start
    size = save(model, tmp / "pruned.dsq")
    loaded = load(tmp / "pruned.dsq")
    after_ft = embedding_fidelity(loaded.module.encode(sentences), ref_emb)

    # the pruned model recovered by the distill stage instead (what kd-minilm uses)
    kd = DistillConfig(epochs=0.5 if ctx.quick else 2.0, lr=1e-3, batch_size=32, optimizer="adamw",
                       schedule="onecycle", embedding_weight=1.0, hidden_weight=0.1, augment=0 if ctx.quick else 3,
                       limit=limit)
    start = time.perf_counter()
    distill_(distilled, base.module, kd, calib, seed=ctx.seed, progress=False)
    distill_s = time.perf_counter() - start
    save(distilled, tmp / "distilled.dsq")
    after_kd = embedding_fidelity(load(tmp / "distilled.dsq").module.encode(sentences), ref_emb)

    batch = encoder_inputs(base.module, eval_data.sentences[:64])
    fp32_m, ours_m = base.module.eval(), loaded.module.eval()
    times = measure_latency_interleaved({"fp32": lambda: fp32_m(**batch), "ours": lambda: ours_m(**batch)},
                                        warmup=2 if ctx.quick else 3, repeat=3 if ctx.quick else 9,
                                        threads=ctx.threads)
    common = {"params": count_params(ours_m), "fp32_params": base.base_params, "fp32_bytes": fp32_bytes,
              "artifact_bytes": size, "compression_ratio": round(fp32_bytes / size, 3),
              "latency_ms_b64": round(times["ours"], 1), "fp32_latency_ms_b64": round(times["fp32"], 1),
              "speedup": round(times["fp32"] / times["ours"], 3), "prune_s": round(prune_s, 2)}
    rows = []
    for label, fid, extra in (("right after pruning", after_prune, {}),
                              (f"after {epochs} epochs of embedding matching on calib", after_ft,
                               {"finetune_epochs": epochs, "finetune_s": round(finetune_s, 1)}),
                              (f"after the distill stage on calib ({kd.epochs:g} epochs, embedding cosine + 0.1 "
                               f"hidden states, {kd.augment} augmented variants per sentence, lr 1e-3)", after_kd,
                               {"finetune_epochs": kd.epochs, "finetune_s": round(distill_s, 1)})):
        rows.append({"method": f"minus 2/12 heads and 30% FFN per layer, {label}",
                     **{k: round(v, 4) for k, v in fid.items()}, **common, **extra})
    return rows
