"""LoRA recovery of a 3-bit weight-quantized MiniLM (QLoRA-style: packed base frozen, fp32 adapters trained)."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from benchmarks.runner import BenchContext

NAME = "lora-recovery"
TITLE = "LoRA recovery after 3-bit weight quantization of MiniLM"
SETUP = (
    "all-MiniLM-L6-v2; every Linear layer of the encoder quantized by `quantize_` (method rtn, 3 bits, "
    "asymmetric, group 64, packed codes; embeddings stay fp32). `add_lora_` wraps the 37 packed layers (pooler included) with rank-8 "
    "adapters (alpha 16), trained on `pydoc-sentences:calib` against the fp32 model's embeddings (cosine loss, "
    "AdamW lr 1e-3, one-cycle, batch 32, epochs listed) with the packed weights frozen. Export keeps each adapter "
    "as a recorded fp32 side branch (`merge_lora_`); the `merged, re-quantized` row folds the adapters into "
    "the dequantized weights and re-quantizes them to 3 bits instead, to show why we do not. Fidelity to the "
    "fp32 model on `pydoc-sentences:eval` (never trained on), measured on the reloaded .dsq."
)


def _fidelity(module: nn.Module, sentences: list[str], ref: torch.Tensor) -> dict[str, float]:
    from deepsqueeze.eval import embedding_fidelity

    with torch.no_grad():
        return {k: round(v, 4) for k, v in embedding_fidelity(module.encode(sentences), ref).items()}


def run(ctx: BenchContext) -> list[dict[str, Any]]:
    import copy

    from deepsqueeze.artifact import load, save
    from deepsqueeze.core.context import StageContext
    from deepsqueeze.data import resolve_data
    from deepsqueeze.data.datasets import TextData
    from deepsqueeze.lowrank import (
        LoRALinear,
        LoRALoss,
        add_lora_,
        lora_parameters,
        merge_lora_,
        train_adapters,
    )
    from deepsqueeze.quant import PackedIntLinear, QuantizeConfig, quantize_
    from deepsqueeze.resolve import resolve_model

    calib = resolve_data("pydoc-sentences:calib")
    evals = resolve_data("pydoc-sentences:eval").sentences
    if ctx.quick:
        calib, evals = TextData(calib.name, calib.sentences[:64]), evals[:64]
    teacher = resolve_model("minilm", progress=False)
    ref = teacher.module.encode(evals)
    model = resolve_model("minilm", progress=False)
    linears = [n for n, m in model.module.named_modules() if isinstance(m, nn.Linear)]
    start = time.perf_counter()
    quantize_(model.module, QuantizeConfig(method="rtn", bits=3, group_size=64, symmetric=False,
                                           include=tuple(linears)))
    quant_s = time.perf_counter() - start
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        save(model, Path(tmp) / "q.dsq")
        before = _fidelity(load(Path(tmp) / "q.dsq").module, evals, ref)
        q_bytes = (Path(tmp) / "q.dsq").stat().st_size
        rows.append({"model": "minilm", "method": "rtn 3-bit g64 (before LoRA)", **before,
                     "trained_params": 0, "artifact_bytes": q_bytes, "compress_s": round(quant_s, 1)})
        wrapped = add_lora_(model, rank=8, alpha=16.0, include=linears)
        params = lora_parameters(model)
        epochs = 0.5 if ctx.quick else 2.0
        stage_ctx = StageContext(model, data=calib, reference=teacher, seed=ctx.seed, progress=False)
        start = time.perf_counter()
        stats = train_adapters(model, stage_ctx, params, loss=LoRALoss.DISTILL, epochs=epochs, lr=1e-3,
                               batch_size=32)
        train_s = time.perf_counter() - start
        adapted = copy.deepcopy(model.module)
        merge_lora_(model)
        save(model, Path(tmp) / "lora.dsq")
        loaded = load(Path(tmp) / "lora.dsq")
        after = _fidelity(loaded.module, evals, ref)
        rows.append({"model": "minilm", "method": "rtn 3-bit g64 + LoRA r8 (fp32 side branches)", **after,
                     "trained_params": sum(p.numel() for p in params), "layers_adapted": len(wrapped),
                     "artifact_bytes": (Path(tmp) / "lora.dsq").stat().st_size, "train_epochs": epochs,
                     "train_s": round(train_s, 1), "train_loss": round(stats["loss"], 5),
                     "cosine_gain": round(after["cosine_mean"] - before["cosine_mean"], 4),
                     "target": "LoRA raises cosine_mean on eval",
                     "met": "yes" if after["cosine_mean"] > before["cosine_mean"] else "no"})
        # The alternative export: fold the update into the weights and re-quantize to the same grid.
        changed = total = 0
        for name, module in list(adapted.named_modules()):
            if not isinstance(module, LoRALinear):
                continue
            base = module.base
            dense = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None)
            with torch.no_grad():
                dense.weight.copy_(base.dequantized_weight() + module.delta_weight())
                if base.bias is not None:
                    dense.bias.copy_(base.bias)
            requant = PackedIntLinear.from_float(dense, bits=base.bits, group_size=base.group_size)
            changed += int((requant.int_codes() != base.int_codes()).sum())
            total += base.int_codes().numel()
            parent, _, child = name.rpartition(".")
            setattr(adapted.get_submodule(parent), child, requant)
        rows.append({"model": "minilm", "method": "rtn 3-bit g64 + LoRA merged, re-quantized to 3 bits",
                     **_fidelity(adapted, evals, ref), "trained_params": sum(p.numel() for p in params),
                     "codes_changed": round(changed / total, 4)})
    return rows
