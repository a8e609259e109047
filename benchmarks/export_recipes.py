"""export: every shipped recipe on its model, exported to ONNX (and Hugging Face where it applies).

``EXPORT_BENCH_RECIPES=a,b`` runs a subset; ``EXPORT_BENCH_SKIP_TRAINING=1`` leaves out the recipes with a
training stage (the rows say which were left out).
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.runner import BenchContext
from deepsqueeze.core.model import Task

NAME = "export"
TITLE = "Export: each shipped recipe's artifact as ONNX (and Hugging Face), checked against torch"
SETUP = (
    "Each shipped recipe is applied through `compress` to the model it is written for (`model:` in the recipe, "
    "else by name: MiniLM for transformer recipes, LeNet-300-100 for `*-lenet300`, LeNet-5 on Fashion-MNIST "
    "for the generic CNN recipes), the .dsq is loaded and `deepsqueeze.export(..., 'onnx')` writes and checks "
    "the ONNX file (16 samples: test images / pydoc eval sentences). `hf` rows: `--format hf` of the float "
    "transformer recipes. `worst_1-cos`: worst per-sample 1 - cosine of the exported model's outputs against "
    "the .dsq's torch model; `top1`: agreement of predicted classes on those samples (classifiers). Latency: "
    "the same .dsq in torch and its ONNX file in ONNX Runtime, batch 64 images / 32 sentences, 2 threads, "
    "interleaved, median of 7. `exported_as`: what the representations became in the graph. `gguf` rows (causal "
    "LMs): `--format gguf`, verified through transformers' GGUF reader and in llama.cpp where installed; "
    "gguf_bpw = file bits over the base model's parameters; gguf_max_logit_error: largest logit difference "
    "from the torch model in the reader."
)

TEXT_HINTS = ("minilm", "3layer", "transformer", "smoothquant", "lora")
TRAINING = ("finetune", "qat", "distill", "prune-agp", "prune-structured", "prune-transformer", "lora",
            "deep-compression")


def model_for(name: str, recipe: Any) -> tuple[str, str]:
    """(model reference, data reference) the recipe is written for."""
    if recipe.model:
        return recipe.model, recipe.data or "fashion-mnist"
    if any(h in name for h in TEXT_HINTS):
        return "minilm", "pydoc-sentences:calib"
    if "lenet300" in name:
        return "zoo:lenet300@fashion-mnist", "fashion-mnist"
    return "zoo:lenet5@fashion-mnist", "fashion-mnist"


def run(ctx: BenchContext) -> list[dict[str, Any]]:
    import deepsqueeze
    from deepsqueeze.data import resolve_data
    from deepsqueeze.errors import DeepsqueezeError
    from deepsqueeze.eval.latency import measure_latency_spread
    from deepsqueeze.export import export, sample_batch
    from deepsqueeze.export.onnx import OrtModule
    from deepsqueeze.recipes import compress, load_recipe
    from deepsqueeze.recipes.schema import shipped_recipes
    from deepsqueeze.zoo.pretrained import checkpoint_path

    torch.set_num_threads(ctx.threads)
    names = sorted(shipped_recipes())
    chosen = [n.strip() for n in os.environ.get("EXPORT_BENCH_RECIPES", "").split(",") if n.strip()]
    if chosen:
        names = [n for n in names if n in chosen]
    skip_training = os.environ.get("EXPORT_BENCH_SKIP_TRAINING") == "1"
    rows: list[dict[str, Any]] = []
    tmp = Path(tempfile.mkdtemp(prefix="bench-export-"))
    for name in names:
        recipe = load_recipe(name)
        model_ref, data_ref = model_for(name, recipe)
        row: dict[str, Any] = {"recipe": name, "model": model_ref}
        if skip_training and any(t in name for t in TRAINING):
            rows.append({**row, "onnx": "not run (training recipe, EXPORT_BENCH_SKIP_TRAINING=1)"})
            continue
        if model_ref.startswith("zoo:") and not checkpoint_path(*model_ref[4:].split("@")).exists():
            rows.append({**row, "onnx": "not run (the fp32 zoo model is not trained on this machine)"})
            continue
        ctx.log(f"export: {name} on {model_ref}")
        dsq = tmp / f"{name}.dsq"
        try:
            compress(model_ref, recipe, dsq, data_ref, progress=False, evaluate_result=False)
        except DeepsqueezeError as exc:
            rows.append({**row, "onnx": f"compress refused: {exc}"})
            continue
        model = deepsqueeze.load(dsq)
        eval_data = resolve_data(data_ref.split(":")[0] + (":eval" if model.task.is_text else ""), split="eval")
        sample = sample_batch(model, eval_data)
        row["dsq_bytes"] = dsq.stat().st_size
        start = time.perf_counter()
        try:
            result = export(model, "onnx", tmp / f"{name}.onnx", sample=sample, threads=ctx.threads)
        except DeepsqueezeError as exc:
            rows.append({**row, "onnx": f"refused: {exc}"})
            continue
        row.update({"onnx": "ok", "onnx_bytes": result.bytes, "export_s": round(time.perf_counter() - start, 1),
                    "worst_1-cos": f"{result.check['worst_cosine_distance']:.1e}",
                    "top1": result.check.get("top1_agreement"),
                    "exported_as": "; ".join(sorted({r["exported_as"] for r in result.layers})) or "float layers"})
        ort = OrtModule(result.path, model.module, ctx.threads)
        if model.task.is_text:
            tokens = model.module.tokenize(eval_data.sentences[:32])
            fns = {"torch": lambda m=model.module, t=tokens: m(**t), "ort": lambda o=ort, t=tokens: o(**t)}
        else:
            images = next(iter(eval_data.batches("test", batch_size=64)))[0]
            fns = {"torch": lambda m=model.module, x=images: m(x), "ort": lambda o=ort, x=images: o(x)}
        with torch.inference_mode():
            spread = measure_latency_spread(fns, warmup=2, repeat=7, threads=ctx.threads)
        row.update({"torch_ms": round(spread["torch"].median, 2), "ort_ms": round(spread["ort"].median, 2),
                    "ort_speedup": round(spread["torch"].median / spread["ort"].median, 2)})
        if model.task is Task.CAUSAL_LM:
            row.update(_gguf_row(model, tmp / f"{name}.gguf", sample, ctx.threads))
        if model.task.is_text:
            try:
                hf = export(model, "hf", tmp / f"{name}-hf", sample=sample)
                row.update({"hf": "ok", "hf_bytes": hf.bytes})
            except DeepsqueezeError as exc:
                row["hf"] = f"refused: {str(exc).split(':')[0]}"
        rows.append(row)
    return rows


def _gguf_row(model: Any, path: Path, sample: Any, threads: int) -> dict[str, Any]:
    """A causal LM's GGUF export: verified or refused, bytes, bits per parameter, worst logit error in the reader and
    in llama.cpp (where llama-cpp-python is installed)."""
    from deepsqueeze.errors import DeepsqueezeError
    from deepsqueeze.export import export

    try:
        result = export(model, "gguf", path, sample=sample, threads=threads)
    except DeepsqueezeError as exc:
        return {"gguf": f"refused: {exc}"}
    llama_cpp = result.check.get("llama_cpp", {})
    return {"gguf": "ok", "gguf_bytes": result.bytes, "gguf_bpw": round(8 * result.bytes / model.base_params, 3),
            "gguf_max_logit_error": round(result.check["max_abs_error"], 5),
            "gguf_llama_cpp_top1": llama_cpp.get("top1_agreement", "llama.cpp not installed"),
            "gguf_types": "; ".join(sorted({r["type"] for r in result.layers}))}
