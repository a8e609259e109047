"""Low-rank factorization of the zoo classifiers: SVD of LeNet-300-100's FC layers (this module) and
Tucker-2 of vgg-small's convolutions (``lowrank_vgg.py``, which reuses ``factor_and_finetune``)."""

from __future__ import annotations

import copy
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.runner import BenchContext

NAME = "lowrank-lenet300"
TITLE = "Low-rank: truncated SVD of LeNet-300-100 to 25% of its FC parameters"
SETUP = (
    "zoo:lenet300@fashion-mnist (trained by the zoo). `decompose_` with rule=budget, budget=0.25 of the FC "
    "parameters, ranks spread across layers greedily by sensitivity-weighted squared error per parameter "
    "(`allocation=sensitivity`, 256 training images), or the same rank fraction in every layer (`uniform` row); "
    "then fine-tuned with Adam (lr 1e-3, cosine, batch 128) for the epochs listed. Accuracy on the full 10k "
    "test split; `decompose_s` is the factorization wall time; latency at batch 1 and 256, interleaved with "
    "the fp32 model, 2 threads: each factored layer runs its factors or the dense layer they equal (rebuilt per "
    "call), whichever raced faster (`kernels`: batch kind:kernel x layers); `*_speed`: the same .dsq loaded "
    "again and run with `--prefer speed` (the dense weight kept where it races faster). Sizes are the measured .dsq files (fp32 factors, raw encoding)."
)
TARGET_DROP_PP = 1.0


def factor_and_finetune(ref: str, data_ref: str, config: Any, epochs: float, lr: float, ctx: BenchContext,
                        label: str, optimizer: str = "adam", schedule: str = "cosine",
                        limit: int | None = None) -> tuple[dict[str, Any], Any]:
    """Factor a copy of ``ref`` with ``config``, fine-tune it, round-trip it through .dsq; return (row, model)."""
    from deepsqueeze.artifact import load, save
    from deepsqueeze.core.counting import count_params
    from deepsqueeze.data import resolve_data
    from deepsqueeze.eval import accuracy, measure_latency_interleaved
    from deepsqueeze.lowrank import decompose_
    from deepsqueeze.resolve import resolve_model
    from deepsqueeze.runtime import preferring
    from deepsqueeze.train.loop import train_classifier

    data = resolve_data(data_ref)
    base = resolve_model(ref, progress=False)
    model = copy.deepcopy(base)
    fp32_acc = accuracy(base.module, data)
    start = time.perf_counter()
    summary = decompose_(model, config, example_inputs=data.train_x[:256])
    decompose_s = time.perf_counter() - start
    acc_factored = accuracy(model.module, data)
    start = time.perf_counter()
    train_classifier(model.module, data, epochs=epochs, lr=lr, batch_size=128, optimizer=optimizer,
                     schedule=schedule, seed=ctx.seed, progress=False, limit=limit)
    finetune_s = time.perf_counter() - start
    model.module.eval()
    with tempfile.TemporaryDirectory() as tmp:
        size = save(model, Path(tmp) / "m.dsq")
        loaded, again = load(Path(tmp) / "m.dsq"), load(Path(tmp) / "m.dsq")
    acc = accuracy(loaded.module, data)
    if acc != accuracy(model.module, data):
        raise AssertionError("the loaded artifact does not evaluate like the model that was saved")
    ours, ref_module, speed = loaded.module.eval(), base.module.eval(), again.module.eval()
    one, big = data.test_x[:1], data.test_x[:256]

    def fast(x: Any) -> Any:
        with preferring("speed"):
            return speed(x)

    times = measure_latency_interleaved(
        {"fp32_b1": lambda: ref_module(one), "ours_b1": lambda: ours(one), "speed_b1": lambda: fast(one),
         "fp32_b256": lambda: ref_module(big), "ours_b256": lambda: ours(big), "speed_b256": lambda: fast(big)},
        warmup=3, repeat=3 if ctx.quick else 11, threads=ctx.threads)
    macs_before, macs_after = layer_macs(ref_module, one), layer_macs(ours, one)
    row = {
        "model": ref, "method": label, "layers_factored": len(summary),
        "ranks": " ".join(f"{n}:{v['rank'] if isinstance(v['rank'], int) else '/'.join(map(str, v['rank']))}"
                          for n, v in summary.items()),
        "params": count_params(ours), "fp32_params": base.base_params,
        "params_kept": round(count_params(ours) / base.base_params, 4),
        "conv_macs_kept": round(macs_after["conv"] / macs_before["conv"], 4) if macs_before["conv"] else None,
        "artifact_bytes": size, "compression_ratio": round(4 * base.base_params / size, 3),
        "fp32_accuracy": round(fp32_acc, 4), "accuracy_factored": round(acc_factored, 4),
        "accuracy": round(acc, 4), "drop_pp": round(100 * (fp32_acc - acc), 2),
        "finetune_epochs": epochs, "decompose_s": round(decompose_s, 2), "finetune_s": round(finetune_s, 1),
        "speedup_b1": round(times["fp32_b1"] / times["ours_b1"], 3),
        "speedup_b256": round(times["fp32_b256"] / times["ours_b256"], 3),
        "latency_ms_b256": round(times["ours_b256"], 3),
        "kernels": _kernels(ours),
        "speedup_b1_speed": round(times["fp32_b1"] / times["speed_b1"], 3),
        "speedup_b256_speed": round(times["fp32_b256"] / times["speed_b256"], 3),
        "kernels_speed": _kernels(speed),
    }
    return row, model


def _kernels(module: Any) -> str:
    """``few:factors many:dense`` per factored layer kind: what each layer's race chose at batch 1 and 256."""
    from deepsqueeze.runtime import kernel_summary

    return " ".join(f"{k.replace(': ', ':')}x{n}" for counts in kernel_summary(module).values()
                    for k, n in counts.items()) or "-"


def layer_macs(module: Any, x: Any) -> dict[str, int]:
    """Multiply-accumulates per sample of the Conv2d and Linear layers, from one forward pass."""
    import torch
    from torch import nn

    macs = {"conv": 0, "linear": 0}

    def hook(mod: nn.Module, args: tuple, out: torch.Tensor) -> None:
        if isinstance(mod, nn.Conv2d):
            k = mod.in_channels // mod.groups * mod.kernel_size[0] * mod.kernel_size[1]
            macs["conv"] += out[0].numel() * k
        else:
            macs["linear"] += mod.in_features * mod.out_features

    handles = [m.register_forward_hook(hook) for m in module.modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    try:
        with torch.no_grad():
            module(x[:1])
    finally:
        for h in handles:
            h.remove()
    return macs


def run(ctx: BenchContext) -> list[dict[str, Any]]:
    from deepsqueeze.lowrank import LowRankConfig

    data_ref = "digits" if ctx.quick else "fashion-mnist"
    ref = f"zoo:lenet300@{data_ref}"
    epochs = 5 if ctx.quick else 4  # digits has 11 steps per epoch
    rows = []
    for label, cfg in (
        ("svd, sensitivity allocation",
         LowRankConfig(rule="budget", budget=0.25, allocation="sensitivity", conv="none")),
        ("svd, same rank fraction (0.18) per layer",
         LowRankConfig(rule="fixed", rank_ratio=0.18, conv="none")),
    ):
        row, _ = factor_and_finetune(ref, data_ref, cfg, epochs, 1e-3, ctx, label)
        met = row["drop_pp"] <= TARGET_DROP_PP and row["params_kept"] <= 0.25
        row.update(target=f"<= 25% of params, drop <= {TARGET_DROP_PP} pp", met="yes" if met else "no")
        rows.append(row)
    return rows
