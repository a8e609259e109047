"""Deep Compression (prune -> share -> entropy-code) of LeNet-300-100 on Fashion-MNIST; the LeNet-5
benchmark (``deep_compression_lenet5.py``) reuses ``run_deep_compression``.

The stages are the shipped recipe's, applied one at a time through the public API so that the real
.dsq file can be written and measured after each one (the paper's per-stage table)."""

from __future__ import annotations

import copy
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.runner import ROOT, BenchContext

NAME = "deep-compression-lenet300"
TITLE = "Deep Compression of LeNet-300-100: pruning, weight sharing, entropy coding (>= 50x)"
SETUP = (
    "zoo:lenet300@fashion-mnist (fp32, trained by the zoo) compressed with recipes/deep-compression-lenet300.yaml: AGP "
    "pruning to 94/90/70% per layer over 8 epochs of Adam fine-tuning (lr 1e-3, cosine); k-means weight sharing "
    "(linear init, Lloyd) with 4 bits for the first layer, 5 bits elsewhere, biases 5 bits; 3 epochs of centroid "
    "fine-tuning (Adam, lr 1e-4); then entropy coding (per stream the smallest of canonical Huffman, ANS and fixed "
    "width; positions as the smallest of entropy-coded gaps, an adaptive-context bitmap and fixed gaps). "
    "`bytes` is the whole .dsq file written after the stage (header and manifest included); ratio = fp32 "
    "parameter bytes / file bytes. Accuracy on the full 10k test split, after a save/load round trip. "
    "`compress_s` = clustering + writing the coded file (fine-tuning excluded). Layer rows: the coded file's "
    "streams per tensor (bits per non-zero weight; `shannon` = order-0 bound of the index stream)."
)
RECIPE = "deep-compression-lenet300.yaml"
MODEL = "zoo:lenet300@fashion-mnist"
TARGET_RATIO = 50.0
TARGET_DROP_PP = 0.5
TARGET_COMPRESS_S: float | None = None


def _quick(config: Any) -> Any:
    """The same stage with a fraction of its fine-tuning (smoke runs only)."""
    epochs = getattr(config, "epochs", 0)
    if not epochs:
        return config
    return type(config)(**{**config.model_dump(), "epochs": min(epochs, 0.3)})


def run_deep_compression(ctx: BenchContext, model_ref: str, recipe_name: str, target_ratio: float,
                         target_drop_pp: float, target_compress_s: float | None = None) -> list[dict[str, Any]]:
    from deepsqueeze.artifact import load, save
    from deepsqueeze.codec.codebook import analyze
    from deepsqueeze.core.config import config_to_dict, stage_entry
    from deepsqueeze.core.context import StageContext
    from deepsqueeze.core.record import get_record
    from deepsqueeze.data import resolve_data
    from deepsqueeze.eval import accuracy
    from deepsqueeze.recipes.schema import load_recipe
    from deepsqueeze.resolve import resolve_model

    recipe = load_recipe(ROOT / "recipes" / recipe_name)
    data = resolve_data("fashion-mnist")
    base = resolve_model(model_ref, progress=False)
    fp32_bytes = 4 * base.base_params
    fp32_acc = accuracy(base.module, data)
    model = copy.deepcopy(base)
    sctx = StageContext(model, data=data, reference=base, seed=ctx.seed, progress=False)
    rows: list[dict[str, Any]] = [{"stage": "fp32", "bytes": fp32_bytes, "ratio": 1.0,
                                   "accuracy": round(100 * fp32_acc, 2), "drop_pp": 0.0}]
    compress_s = 0.0
    with tempfile.TemporaryDirectory() as tmp:
        for i, config in enumerate(recipe.stages):
            config = _quick(config) if ctx.quick else config
            _, handler = stage_entry(config.stage_type)
            ctx.log(f"{model_ref}: stage {config.stage_type}")
            start = time.perf_counter()
            handler(model, config, sctx)
            get_record(model.module).stages.append(config_to_dict(config))  # as `compress` records them
            stage_s = time.perf_counter() - start
            model.module.eval()
            path = Path(tmp) / f"stage{i}.dsq"
            start = time.perf_counter()
            size = save(model, path)
            save_s = time.perf_counter() - start
            report = sctx.report[-1] if sctx.report else {}
            if config.stage_type == "share":
                compress_s += report.get("cluster_s", 0.0)
            if config.stage_type == "encode":
                compress_s += save_s  # entropy coding happens when the file is written
            loaded = load(path)
            acc = accuracy(loaded.module, data)
            if acc != accuracy(model.module, data):
                raise AssertionError("the loaded artifact does not evaluate like the model that was saved")
            rows.append({"stage": f"after {config.stage_type}", "bytes": size, "ratio": round(fp32_bytes / size, 2),
                         "accuracy": round(100 * acc, 2), "drop_pp": round(100 * (fp32_acc - acc), 2),
                         "stage_s": round(stage_s, 1)})
        final = rows[-1]
        met = final["ratio"] >= target_ratio and final["drop_pp"] <= target_drop_pp
        final.update(compress_s=round(compress_s, 2),
                     target=f">= {target_ratio:g}x with drop <= {target_drop_pp} pp", met="yes" if met else "no")
        if target_compress_s is not None:
            rows.append({"stage": "time to compress (sharing + coding)", "compress_s": round(compress_s, 2),
                         "target": f"< {target_compress_s:g} s", "met": "yes" if compress_s < target_compress_s
                         else "no"})
        state = model.module.state_dict()
        manifest_bytes = final["bytes"]
        for name, enc in get_record(model.module).encodings.items():
            if "codebook" not in enc["encoding"]:
                continue
            stats = analyze(name, state[name], enc["encoding"]).as_dict()
            manifest_bytes -= stats["total_bytes"]
            nz = max(stats["nonzero"], 1)
            rows.append({"stage": f"layer {name}", "params": stats["numel"],
                         "kept_pct": round(100 * stats["nonzero"] / max(stats["numel"], 1), 1),
                         "bytes": stats["total_bytes"], "positions": stats["position_scheme"],
                         "pos_bits": stats["position_bits_per_nonzero"], "index_coder": stats["index_coder"],
                         "idx_bits": stats["index_bits_per_nonzero"],
                         "idx_shannon_bits": round(8 * stats["index_shannon_bytes"] / nz, 3),
                         "codebook_bytes": stats["codebook_bytes"]})
        raw = sum(t.numel() * t.element_size() for n, t in state.items()
                  if "codebook" not in get_record(model.module).encodings.get(n, {}).get("encoding", "raw"))
        rows.append({"stage": "raw tensors + header + manifest", "bytes": manifest_bytes,
                     "params": sum(t.numel() for n, t in state.items()
                                   if "codebook" not in get_record(model.module).encodings.get(n, {}).get(
                                       "encoding", "raw")), "codebook_bytes": None, "kept_pct": None,
                     "idx_bits": None, "raw_tensor_bytes": raw})
    if ctx.quick:
        ctx.notes.append("quick run: fine-tuning shortened to 0.3 epochs per stage; targets not meaningful")
    return rows


def run(ctx: BenchContext) -> list[dict[str, Any]]:
    return run_deep_compression(ctx, MODEL, RECIPE, TARGET_RATIO, TARGET_DROP_PP, TARGET_COMPRESS_S)
