"""Tucker-2 decomposition of vgg-small's convolutions to half their MACs, fine-tuned."""

from __future__ import annotations

from typing import Any

from benchmarks.lowrank import factor_and_finetune
from benchmarks.runner import BenchContext

NAME = "lowrank-vgg"
TITLE = "Low-rank: Tucker-2 of vgg-small's convolutions to 50% of their MACs"
SETUP = (
    "zoo:vgg-small@fashion-mnist (trained by the zoo). `decompose_` with conv=tucker2 (HOOI via TensorLy, "
    "each kxk conv becomes 1x1 -> kxk core -> 1x1), rule=budget, budget=0.5 of the convolutions' MACs, ranks "
    "spread across layers greedily by relative squared weight error (HOSVD) saved per MAC; Linear layers untouched. "
    "Fine-tuned with Adam (lr 5e-4, cosine, batch 128) for the epochs listed. Accuracy on the full 10k test "
    "split; latency at batch 1 and 256 interleaved with the fp32 model, 2 threads: each Tucker-2 layer runs its "
    "three convolutions or the one dense convolution they equal (rebuilt per call), whichever raced faster for "
    "its input size and batch (`kernels`); `*_speed`: the same .dsq run with `--prefer speed` (the dense kernel "
    "kept where it races faster); `conv_macs_kept` is measured by forward hooks on both models."
)
TARGET_DROP_PP = 1.0
TARGET_SPEEDUP = 1.5


def run(ctx: BenchContext) -> list[dict[str, Any]]:
    from deepsqueeze.lowrank import LowRankConfig

    data_ref = "digits" if ctx.quick else "fashion-mnist"
    cfg = LowRankConfig(rule="budget", budget=0.5, budget_metric="macs", allocation="energy", linear=False,
                        conv="tucker2")
    row, _ = factor_and_finetune(f"zoo:vgg-small@{data_ref}", data_ref, cfg, 3 if ctx.quick else 2, 5e-4, ctx,
                                 "tucker2, energy allocation")
    met = (row["drop_pp"] <= TARGET_DROP_PP and row["speedup_b256"] >= TARGET_SPEEDUP
           and row["conv_macs_kept"] <= 0.5)
    row.update(target=f"<= 50% conv MACs, speedup >= {TARGET_SPEEDUP}x, drop <= {TARGET_DROP_PP} pp",
               met="yes" if met else "no")
    return [row]
